"""Gate names: every name a gate (or a residual branch) is shown by is made here, by :func:`gate_name`.

The passes decide a branch's structure, a :class:`BranchPath`; :func:`gate_name` turns that into the name:

    BranchPath("blocks.0", "mlp")                          -> "blocks.0.mlp"
    BranchPath("", "bert.encoder.layer.0", ("intermediate", "output"))
                                                           -> "bert.encoder.layer.0.{intermediate,output}"
    BranchPath("", "layer.attn", repeat=1)                 -> "layer.attn#1"

``frame`` is the module path of the frame Dynamo traced (empty for the model's own frame); ``module`` the module
path, in that frame, shared by the branch's compute; ``parts`` its submodules that compute, when that module
also holds the residual add (the branch is then only part of it); ``repeat`` counts branches of the same path in
one graph (a shared layer applied twice). :func:`name_branches` decides the paths of the branches one graph holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.fx as fx
from torch import nn

from . import graph_view as gv


@dataclass(frozen=True)
class BranchPath:
    """Where a residual branch sits in the model: the structure a gate's name is made from."""

    frame: str = ""  # module path of the traced frame (a layer Dynamo compiled on its own), "" for the model's
    module: str = ""  # module path in the frame shared by the branch's compute
    parts: tuple[str, ...] = ()  # the submodules of ``module`` that compute, when ``module`` holds the add too
    repeat: int = 0  # the n-th branch of this path in one graph
    fallback: str = ""  # the name of a branch without module path (a hand-written graph): its add's node name

    def in_frame(self, frame: str) -> BranchPath:
        """The same branch in another frame (the same layer graph run for another layer)."""
        return replace(self, frame=frame)


def gate_name(path: BranchPath) -> str:
    """The name of the gate (or branch) at ``path``: the one place names are made."""
    local = path.module
    if path.parts:
        braced = "{" + ",".join(path.parts) + "}"
        local = f"{local}.{braced}" if local else braced
    if not local:
        local = path.fallback
    if path.repeat:
        local = f"{local}#{path.repeat}"
    return ".".join(p for p in (path.frame, local) if p)


def branch_path(compute: list[fx.Node], add: fx.Node) -> BranchPath:
    """The module path shared by the branch's compute nodes (``model.layers.3.mlp``).

    When that module also holds the residual add (BERT's ``layer.0`` holds the FFN and
    its add), the branch is only part of it: name the parts, ``bert.encoder.layer.0.{intermediate,output}``.
    """
    paths = [gv.module_path(n) for n in compute]
    return _within(gv.common_module_path(paths), paths, add, "", single_part_braced=False)


def _within(module: str, paths: list[str], add: fx.Node, frame: str, *, single_part_braced: bool) -> BranchPath:
    """``module`` itself, or, when the module at ``module`` also holds ``add`` (so that its name would read as the
    whole module, skip included), ``module.{a,b}``: the submodules of it that ``paths`` run in.
    ``single_part_braced``: one such submodule ``a`` is named ``module.{a}`` (kept apart from a branch named
    ``module.a`` inside it), not ``module``."""
    add_path = gv.module_path(add)
    if module and add_path != module and not add_path.startswith(module + "."):
        return BranchPath(frame, module)
    depth = len(module.split(".")) if module else 0
    parts = tuple(dict.fromkeys(p.split(".")[depth] for p in paths if p and len(p.split(".")) > depth))
    if len(parts) > 1 or (parts and single_part_braced):
        return BranchPath(frame, module, parts)
    return BranchPath(frame, module)


def name_branches(branches: list, root: nn.Module, frame: str = "") -> None:
    """Decide each branch's path (``branch.path``, in the traced ``frame``) by its module path; repeats (a shared
    layer applied twice) get ``#1``, ``#2``.

    A branch holding another branch of the same path (its only parametric compute is the inner branch's:
    ``x + relu(h + f(h))``) is named by the module path shared by all its nodes (``b0``, not ``b0.inner#1``),
    or by its computing parts when that module also holds the outer add.
    """
    for branch in branches:
        branch.path = branch.path.in_frame(frame)
    for outer in branches:
        members = set(outer.nodes)
        if any(b is not outer and b.path == outer.path and b.add in members for b in branches):
            paths = [p for p in (gv.module_path(n) for n in outer.nodes if n.op != "get_attr") if p]
            shared = gv.common_module_path(paths)
            # a module holding the add too is named by the parts that compute (SwiftFormer's ``blocks.0.{attn}``:
            # the attention, with the inner ``attn`` branch, and the layer scale of ``blocks.0``, which adds it)
            computing = [gv.module_path(n) for n in outer.nodes if gv.is_compute(n, root)]
            if shared:
                outer.path = _within(shared, computing, outer.add, outer.path.frame, single_part_braced=True)
    seen: dict[BranchPath, int] = {}
    for branch in branches:
        base = branch.path
        if not base.module and not base.parts:
            base = replace(base, fallback=f"branch_{branch.add.name}")
        count = seen.get(base, 0)
        seen[base] = count + 1
        branch.path = replace(base, repeat=count)
