"""Group the trunk of a gated graph into segments an inner compiler can take whole.

A gate decides at run time whether its branch keeps a backward, so it cannot sit
inside one static compiled graph. This pass outlines every run of trunk nodes
between two gate calls into a submodule of its own.

Before (after :func:`passes.gating.gate_residual_branches`)::

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
never runs and its parameters keep ``grad=None``, as in eager. Runs that compute nothing but metadata
(sizes, dtypes) stay inline.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.tools_common import stable_topological_sort

from passes import graph_view as gv
from passes.outline import outline


def split_trunk(gm: fx.GraphModule, is_gate: Callable[[fx.Node], bool],
                make_module: Callable[[fx.GraphModule], nn.Module] = lambda sub_gm: sub_gm,
                prefix: str = "dropbp_trunk") -> list[str]:
    """Outline each run of trunk nodes between gate calls; returns the new submodules' names."""
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
    feeds = _gate_consumers(gm, is_gate)
    for run in runs:
        for group in _by_consumers(run, feeds):
            if any(_computes_tensor(n) for n in group):
                names.append(outline(gm, group, make_module, prefix, class_name="TrunkSegment").target)
    stable_topological_sort(gm)
    gm.graph.lint()
    gm.recompile()
    return names


def _gate_consumers(gm: fx.GraphModule, is_gate: Callable[[fx.Node], bool]) -> dict[fx.Node, frozenset | None]:
    """Node -> the gate calls and graph output it feeds (directly or through trunk nodes); None for metadata-only.

    The output counts as a consumer like a gate: a KV-cache tensor that goes to a closed gate and to the
    output gets no gradient unless the caller's loss reads the output.
    """
    feeds: dict[fx.Node, frozenset | None] = {}
    for node in reversed(gm.graph.nodes):
        reached: set[fx.Node] | None = set()
        for user in node.users:
            if is_gate(user) or user.op == "output":
                reached.add(user)
            elif feeds.get(user) is not None:
                reached |= feeds[user]
            else:
                reached = None
                break
        feeds[node] = frozenset(reached) if reached else None
    return feeds


def _by_consumers(run: list[fx.Node], feeds: dict[fx.Node, frozenset | None]) -> list[list[fx.Node]]:
    """Split a run into the nodes that feed only gates, grouped by the gates they feed, and the rest.

    ``ln(x)`` shared by two parallel branches (Falcon), a cross-attention's ``k_proj(encoder_out)``, T5's
    position bias: a value that only gates read gets no gradient when they are all closed. In a segment
    of its own, that segment's backward then never runs and its parameters keep ``grad=None``, as in
    eager; inside a larger segment the compiled backward would hand them zeros. Gate-only groups come
    first (the rest never reads them); order inside each group is kept.
    """
    pinned = _around_writes(run)
    groups: dict[frozenset, list[fx.Node]] = {}
    for node in run:
        if feeds[node] is not None and node not in pinned:
            groups.setdefault(feeds[node], []).append(node)
    rest = [n for n in run if feeds[n] is None or n in pinned]
    return list(groups.values()) + ([rest] if rest else [])


def _around_writes(run: list[fx.Node]) -> set[fx.Node]:
    """In-place writes in the run, the tensors they write (and their aliases), every reader of those, and
    everything in the run they read.

    They stay together, in program order: a reader moved into another segment could run on the
    wrong side of the write (``shifted[..., 1:] = ids[..., :-1]`` before ``embedding(shifted)``).
    """
    def base(node):
        while isinstance(node, fx.Node) and (gv.is_alias(node) or gv.mutates_first_arg(node)) and node.args \
                and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return node

    written = {base(n.args[0]) for n in run if gv.mutates_first_arg(n) and n.args and isinstance(n.args[0], fx.Node)}
    if not written:
        return set()
    members = set(run)
    family = {n for n in run if base(n) in written} | written
    pinned = (family | {u for n in family for u in n.users}) & members
    for node in reversed(run):  # and what they read in the run: the kept-together part depends on no other group
        if node in pinned:
            pinned.update(a for a in node.all_input_nodes if a in members)
    return pinned


def _computes_tensor(node: fx.Node) -> bool:
    value = node.meta.get("example_value", node.meta.get("val"))
    if value is None:
        return node.op in ("call_function", "call_method", "call_module")
    return isinstance(value, torch.Tensor) or (isinstance(value, (tuple, list))
                                               and any(isinstance(v, torch.Tensor) for v in value))
