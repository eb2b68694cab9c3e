"""Group the trunk of a gated graph into segments an inner compiler can take whole.

A gate decides at run time whether its branch keeps a backward, so it cannot sit
inside one static compiled graph. This pass outlines every run of trunk nodes
between two gate calls into a submodule of its own.

Before (after :func:`dropbp_fx.passes.gating.gate_residual_branches`)::

    %emb   = embedding(%ids, %w_emb)
    %g0    = call_module[dropbp_gate_0](%emb, ...)
    %o0    = getitem(%g0, 0)
    %h1    = add(%emb, %o0)
    %g1    = call_module[dropbp_gate_1](%h1, ...)
    %o1    = getitem(%g1, 0)
    %h2    = add(%h1, %o1)
    %loss  = cross_entropy(linear(norm(%h2), ...), %labels)

After (``split_trunk(gm, is_gate)``)::

    %t0    = call_module[dropbp_trunk_0](%ids, %w_emb)     # embedding
    %emb   = getitem(%t0, 0)
    %g0    = call_module[dropbp_gate_0](%emb, ...)
    %o0    = getitem(%g0, 0)
    %t1    = call_module[dropbp_trunk_1](%emb, %o0)        # add
    ...

Within a run, values that only gates (and the graph output) read get segments of their own, one per
set of readers (see :func:`_by_consumers`): when all their gates are closed, such a segment's backward
never runs and its parameters keep ``grad=None``, as in eager. Values nobody reads
are dropped first (:func:`dropbp_fx.passes.dead_code.remove_dead_code`). Runs that compute nothing but metadata (sizes, dtypes)
stay inline.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.tools_common import stable_topological_sort

from . import graph_view as gv
from ._torch import pytree
from .dead_code import remove_dead_code
from .outline import outline


def split_trunk(gm: fx.GraphModule, is_gate: Callable[[fx.Node], bool],
                make_module: Callable[[fx.GraphModule], nn.Module] = lambda sub_gm: sub_gm,
                prefix: str = "dropbp_trunk") -> list[str]:
    """Outline each run of trunk nodes between gate calls; returns the new submodules' names."""
    remove_dead_code(gm)  # a dead reader (Zaya's unused ``r.clone()``) would keep a value from its gate's segment
    runs: list[list[fx.Node]] = [[]]
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if is_gate(node) or (node.target is operator.getitem and isinstance(node.args[0], fx.Node)
                             and is_gate(node.args[0])):
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append(node)
    names = []
    _read_through_writes(gm)
    feeds = _gate_consumers(gm, is_gate)
    for group in _with_their_parts([g for run in runs for g in _by_consumers(run, feeds)]):
        if any(_computes_tensor(n) for n in group):
            names.append(outline(gm, group, make_module, prefix, class_name="TrunkSegment").target)
    stable_topological_sort(gm)
    gm.graph.lint()
    gm.recompile()
    return names


def _with_their_parts(groups: list[list[fx.Node]]) -> list[list[fx.Node]]:
    """The ``getitem`` parts of a tuple (``split``, ``topk``) go to the segment that makes the tuple: segments
    return tensors, and an inner compiler cannot return a tuple nested in its outputs (AOTAutograd's
    "output spec mismatch")."""
    home = {n: i for i, group in enumerate(groups) for n in group}
    for i, group in enumerate(groups):
        for node in list(group):
            if not gv.is_multi_output(node):
                continue
            parts = [u for u in node.users if u.target is operator.getitem and home.get(u, i) != i]
            for part in parts:
                groups[home[part]].remove(part)
                home[part] = i
            at = group.index(node) + 1
            group[at:at] = parts
    return [g for g in groups if g]


def _read_through_writes(gm: fx.GraphModule) -> None:
    """Readers of a tensor after an in-place write read the write's value, not the tensor's older node.

    Before::                               After::

        %y  = clone(%x)                        %y  = clone(%x)
        %w  = call_method[add_](%y, %f)        %w  = call_method[add_](%y, %f)
        %h  = layer_norm(%y, ...)              %h  = layer_norm(%w, ...)

    The same tensor (``add_`` returns ``self``), but now the order is a data edge, so ``%h`` may go to
    another segment. Only writes that return their input (methods ``foo_``, aten ``foo_`` ops; not
    ``setitem``), and only direct readers of the written node.
    """
    latest: dict[fx.Node, fx.Node] = {}  # written node -> its latest write so far
    for node in list(gm.graph.nodes):
        for arg in set(node.all_input_nodes):
            if arg in latest and latest[arg] is not node and not (gv.mutates_first_arg(node) and node.args[0] is arg):
                node.replace_input_with(arg, latest[arg])
        if gv.mutates_first_arg(node) and node.args and isinstance(node.args[0], fx.Node) and _returns_self(node):
            target = node.args[0]
            latest[target] = node


def _returns_self(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    schema = getattr(node.target, "_schema", None)
    return schema is not None and node.target is not operator.setitem and schema.name.endswith("_") and \
        bool(schema.returns) and schema.returns[0].alias_info is not None and schema.returns[0].alias_info.is_write


def _gate_consumers(gm: fx.GraphModule, is_gate: Callable[[fx.Node], bool]) -> dict[fx.Node, frozenset | None]:
    """Node -> the gate calls and graph output it feeds (directly or through trunk nodes); None for metadata-only.

    Each position of the output counts as a consumer like a gate: a KV-cache tensor that goes to a closed gate
    and to the output gets no gradient unless the caller's loss reads it, and it is not grouped with the
    stream, which goes to the same gate and to another position (SwitchTransformers' cross-attention keys,
    computed in the decoder layer and returned in its cache: grouped with the stream, they got zeros). A
    stateful region between two gates (see :func:`_regions`) counts as one node: its calls and every node
    inside feed what the region feeds.
    """
    def gate_or_part(node):
        return is_gate(node) or (node.target is operator.getitem and isinstance(node.args[0], fx.Node)
                                 and is_gate(node.args[0]))

    unit = {n: region for region in _regions(gm.graph.nodes, gate_or_part) for n in region}
    returned: dict[fx.Node, set[tuple[str, int]]] = {}  # node -> the output positions that return it
    for i, value in enumerate(pytree.tree_flatten(gm.graph.output_node().args)[0]):
        if isinstance(value, fx.Node):
            returned.setdefault(value, set()).add(("output", i))
    feeds: dict[fx.Node, frozenset | None] = {}
    for node in reversed(gm.graph.nodes):
        if node in feeds:
            continue
        members = unit.get(node, (node,))  # a region is met at its last call: its readers outside come after it
        reached: set | None = set()
        for user in (u for m in members for u in m.users if u not in members):
            if user.op == "output":  # each returned value a consumer of its own: the stream is not the KV cache
                reached |= {pos for m in members for pos in returned.get(m, ())}
            elif is_gate(user):
                reached.add(user)
            elif feeds.get(user) is not None:
                reached |= feeds[user]
            else:
                reached = None
                break
        feeds.update(dict.fromkeys(members, frozenset(reached) if reached else None))
    return feeds


def _regions(nodes, is_gate: Callable[[fx.Node], bool]) -> list[list[fx.Node]]:
    """The outermost stateful regions (``torch.no_grad()``, vmap, autocast: paired calls Dynamo inlines) that hold
    no gate call, each with its calls.

    Such a region goes whole to one segment: split, a part runs outside its mode. HY-V4's sparse-attention
    indexer runs under ``torch.no_grad()`` and only gates read its top-k; alone in a gate-only segment, without
    the ``_set_grad_enabled`` calls, it ran with grad on and its weights got zeros instead of no gradient.
    """
    regions, stack = [], []
    for node in nodes:
        if gv.opens_region(node):
            stack.append([])
        for region in stack:
            region.append(node)
        if gv.closes_region(node) and stack:
            regions.append(stack.pop())
    free = [r for r in regions if not any(is_gate(n) for n in r)]
    return [r for r in free if not any(len(o) > len(r) and set(r) <= set(o) for o in free)]


def _by_consumers(run: list[fx.Node], feeds: dict[fx.Node, frozenset | None]) -> list[list[fx.Node]]:
    """Split a run into the nodes that feed only gates, grouped by the gates they feed, and the rest.

    ``ln(x)`` shared by two parallel branches (Falcon), a cross-attention's ``k_proj(encoder_out)``, T5's
    position bias: a value that only gates read gets no gradient when they are all closed. In a segment
    of its own, that segment's backward then never runs and its parameters keep ``grad=None``, as in
    eager; inside a larger segment the compiled backward would hand them zeros. Gate-only groups come
    first (the rest never reads them); order inside each group is kept. A stateful region (one value of
    ``feeds``) goes whole to one group, or whole to the rest.
    """
    pinned, members = _around_writes(run), set(run)
    for region in _regions(run, lambda node: False):
        if pinned.intersection(region):
            pinned.update(region)
    for node in reversed(run):  # and what they read in the run: the rest never reads a gate-only group
        if node in pinned:
            pinned.update(a for a in node.all_input_nodes if a in members)
    groups: dict[frozenset, list[fx.Node]] = {}
    for node in run:
        if feeds[node] is not None and node not in pinned:
            groups.setdefault(feeds[node], []).append(node)
    rest = [n for n in run if feeds[n] is None or n in pinned]
    return list(groups.values()) + ([rest] if rest else [])


def _around_writes(run: list[fx.Node]) -> set[fx.Node]:
    """In-place writes in the run, the tensors they write (and their aliases), their readers, and
    everything in the run they read.

    They stay together, in program order: a reader moved into another segment could run on the
    wrong side of the write (``shifted[..., 1:] = ids[..., :-1]`` before ``embedding(shifted)``).
    A reader of the last write's own value (``ln(y.add_(f))``) is ordered by that data edge and may move.
    """
    def base(node):  # the tensor a write lands in: through views and writes, not through copies (``x.clone()``)
        while isinstance(node, fx.Node) and (gv.is_alias(node) or gv.mutates_first_arg(node)) \
                and not _is_clone(node) and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return node

    writes = [n for n in run if gv.mutates_first_arg(n) and n.args and isinstance(n.args[0], fx.Node)]
    if not writes:
        return set()
    written = {base(n.args[0]) for n in writes}
    members = set(run)
    family = {n for n in run if base(n) in written} | written
    last = {}  # base -> its last write in the run: reading that node's value already orders a reader after it
    for w in writes:
        last[base(w.args[0])] = w
    settled = set(last.values())
    readers = {u for n in family for u in n.users if u not in family
               and not all(a in settled for a in u.all_input_nodes if a in family)}
    pinned = (family | readers) & members
    for node in reversed(run):  # and what they read in the run: the kept-together part depends on no other group
        if node in pinned:
            pinned.update(a for a in node.all_input_nodes if a in members)
    return pinned


def _is_clone(node: fx.Node) -> bool:
    """A copy: writes into it leave its source alone (``y = x.clone(); y.add_(f(x))``)."""
    if node.op == "call_method":
        return node.target == "clone"
    return node.op == "call_function" and (node.target is torch.clone or node.target in (
        torch.ops.aten.clone.default, torch.ops.aten.clone))


def _computes_tensor(node: fx.Node) -> bool:
    value = gv.meta_value(node)
    if value is None:
        return node.op in ("call_function", "call_method", "call_module")
    return isinstance(value, torch.Tensor) or (isinstance(value, (tuple, list))
                                               and any(isinstance(v, torch.Tensor) for v in value))
