"""Which gates a trunk input's gradient must pass through.

A value the trunk computes for gated branches only (PEGASUS-X's global-token embedding, read by every encoder
layer's attention and by nothing the loss sees otherwise) gets no gradient on a step that closes all of those
gates: eager autograd leaves its parameter's ``.grad`` as ``None``. An AOT-compiled trunk segment that has
other outputs which do get a gradient materialises zeros for those that do not, and the parameter ends up
with a zero gradient instead, which AdamW does not skip (moments and weight decay move). This pass finds such
inputs; the runtime hands them ``None`` on those steps (:mod:`dropbp_fx.branch_only`). The graph is unchanged.

Before (and after)::

    %e  = embedding(%w_global, %ids)      # w_global: a placeholder the trunk reads
    %g0 = call_module[gate_0](%h, %e)     # a gate: its branch reads e
    %h1 = add(%h, getitem(%g0, 0))
    %g1 = call_module[gate_1](%h1, %e)
    %h2 = add(%h1, getitem(%g1, 0))
    return h2

``gates_on_every_path(gm, [w_global], is_gate)`` -> ``{w_global: {g0, g1}}``: every path from ``w_global`` to the
output enters ``gate_0`` or ``gate_1``. ``h`` would map to ``None``: it reaches the output through the adds.

Conservative: a path through an in-place op counts as reaching the output (a write may be read through another
node) unless the op writes into an intermediate that is no view, and so does any node the graph keeps for its
effect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx as fx

from .predicates import meta_value, mutates_first_arg


def gates_on_every_path(gm: fx.GraphModule, sources: Iterable[fx.Node],
                        is_gate: Callable[[fx.Node], bool]) -> dict[fx.Node, frozenset[fx.Node] | None]:
    """Per source: the gate calls that every data path from it to the graph's output enters, or ``None`` when
    some path reaches the output (or an effect) without entering a gate. Paths that end nowhere (a value the
    graph computes and drops, such as PEGASUS-X's global stream after its last layer) do not count, nor do the
    gates on them. A source read by no live gate and reaching no output maps to an empty set."""
    live = _live(gm)
    return {source: _gates_from(source, is_gate, live) for source in sources}


def _writes_own_value(node: fx.Node) -> bool:
    """An in-place op (``x.mul_(s)``, ``x[i] = v``) whose ``x`` is an intermediate the graph made and no view of
    another tensor: the write reaches ``x``'s later readers and nothing else (Gemma3n's ``per_layer_projection
    *= scale``). A write into an input, a constant or a view may be read through other nodes."""
    if not mutates_first_arg(node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    target = node.args[0]
    value = meta_value(target)
    return (target.op in ("call_function", "call_method", "call_module") and isinstance(value, torch.Tensor)
            and not value._is_view())


def _is_sink(node: fx.Node) -> bool:
    if _writes_own_value(node):
        return False
    return node.op == "output" or mutates_first_arg(node) or (node.op == "call_function" and node.is_impure())


def _live(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes from which the output or an effect can be reached (an in-place write into an intermediate is
    live when a later reader of what it writes is)."""
    live: set[fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        readers = node.args[0].users if _writes_own_value(node) else ()
        if _is_sink(node) or any(user in live for user in node.users) or any(user in live for user in readers):
            live.add(node)
    return live


def _gates_from(source: fx.Node, is_gate: Callable[[fx.Node], bool], live: set[fx.Node]) -> frozenset[fx.Node] | None:
    gates: set[fx.Node] = set()
    seen, frontier = {source}, [source]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen or user not in live:
                continue
            seen.add(user)
            if is_gate(user):
                gates.add(user)
            elif _is_sink(user):
                return None
            else:
                frontier.append(user)
                if _writes_own_value(user) and user.args[0] not in seen:  # what it writes, x's readers see
                    seen.add(user.args[0])
                    frontier.append(user.args[0])
    return frozenset(gates)
