"""Which nodes belong to a residual branch, beyond the data path from the stream to the branch output.

:func:`dropbp_fx.passes.residuals.find_residual_branches` starts from the nodes between the stream and the branch
output (:func:`dropbp_fx.passes.graph_view.between`) and asks each rule here what else the branch must hold (or
give up) so that it can be outlined into one gate and compiled on its own: shapes it reads back, views and
cache writes only the graph returns, whole ``no_grad``/vmap/autocast regions, parameter-only prologues;
and, last, only nodes whose every reader is in the branch.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from . import graph_view as gv


class Reject(Exception):
    """This add is not a residual branch the backend can gate; the message says why."""


def _topo(nodes, dfg) -> list[fx.Node]:
    return sorted(nodes, key=lambda n: dfg.nodes[n]["index"])


def parts_of_outside_tuples(nodes: set[fx.Node]) -> set[fx.Node]:
    """``getitem`` parts of a tuple made outside the branch (a ``split`` in the trunk, of a weight the trunk
    reads too): inputs of the branch, not members, so that pieces pass tensors, not the tuple."""
    return {n for n in nodes if n.target is operator.getitem and isinstance(n.args[0], fx.Node)
            and n.args[0] not in nodes and gv.is_multi_output(n.args[0])}


def metadata_used_inside(nodes: set[fx.Node], dfg) -> set[fx.Node]:
    """What the branch feeds and reads again through a shape (``scores / sqrt(q.size(-1))``, XLM's
    ``scores.masked_fill_(mask.expand_as(scores), ...)``): it belongs to the branch, or the branch would
    both feed it and read it. These are the FX nodes on a path from a branch node to a branch node (the
    data-flow graph has no edge into a shape, so :func:`dropbp_fx.passes.graph_view.between` leaves them out)."""
    def reach(step) -> set[fx.Node]:
        seen: set[fx.Node] = set()
        frontier = [m for n in nodes for m in step(n) if m not in nodes]
        while frontier:
            m = frontier.pop()
            if m not in seen and m not in nodes and m.op != "output":
                seen.add(m)
                frontier += step(m)
        return seen

    return reach(lambda n: list(n.users)) & reach(lambda n: n.all_input_nodes)


def returned_views(nodes: set[fx.Node], out: fx.Node, dfg) -> set[fx.Node]:
    """Slices, views and casts of branch values that only the graph returns: side outputs of the branch.

    A sliding-window KV cache (Gemma2, Mistral) returns ``keys[:, :, -W:]``, not ``keys``; left outside,
    that slice would pull the key/value projections and the norm before them out of the branch, into the
    trunk, where they keep their backward when the gate is closed.
    """
    constants, metadata = dfg.graph["constants"], dfg.graph["metadata"]
    found: set[fx.Node] = set()
    for node in nodes - {out}:
        for user in node.users:
            if user in nodes or not (user.target is operator.getitem or gv.is_alias(user)):
                continue
            if user.users and all(u.op == "output" for u in user.users) and all(
                    (a in nodes and a is not out) or a in constants or a in metadata for a in user.all_input_nodes):
                found.add(user)
    return found


def cache_writes(nodes: set[fx.Node], out: fx.Node, dfg) -> set[fx.Node]:
    """Branch values written into fresh buffers that only the graph returns, and what computes them from
    the branch alone: side outputs of the branch.

    Mamba's states (``conv = zeros(...); conv.copy_(x[..., -k:])``, ``s = zeros_like(h[:, -1]); s.copy_(...)``,
    returned as the cache): left outside, the writes would pull the mixer's input projection and the norm
    before it into the trunk. A scan over chunks (Qwen3-Next's gated delta rule) updates its state once more
    after the last chunk's output, for the cache alone: ``s = s * decay[:, -1] + k[:, -1] @ v``; left outside,
    that update would pull the decay (``dt_bias``), keys and values, and all before them, into the trunk.

    Before (``[...]`` the branch)::          After::

        [ x ─► k, v, decay ─► out ]              [ x ─► k, v, decay ─► out ]
               └─► s·decay + k@v ─► copy_ ─► output    [ └─► s·decay + k@v ─► copy_ ] ─► output

    A part is taken whole: the values connected to the branch outside it (through inputs and users, not
    through the branch, weights or metadata), when none is a graph input and only the graph output reads
    them, and one of them writes in place (a cache write, not a returned activation).
    """
    constants, metadata = dfg.graph["constants"], dfg.graph["metadata"]
    found: set[fx.Node] = set()
    doomed: set[fx.Node] = set()  # parts found to reach a graph input: every walk that meets them ends there
    for node in nodes - {out}:
        for start in node.users:
            if start in nodes or start in found or start in doomed or start.op == "output":
                continue
            part, frontier, ok = set(), [start], True
            while frontier and ok:
                v = frontier.pop()
                if v in part or v in nodes or v in constants or v in metadata:
                    continue
                if v.op not in ("call_function", "call_method", "call_module") or v in doomed:
                    ok = False  # a graph input (the stream, a mask, a past state): the part is the trunk's
                    break
                part.add(v)
                frontier += [u for u in v.users if u.op != "output"] + list(v.all_input_nodes)
            if not ok:
                doomed |= part
            elif any(gv.mutates_first_arg(v) for v in part):
                found |= part
    return found


def whole_regions(nodes: set[fx.Node], add: fx.Node) -> set[fx.Node]:
    """Stateful regions Dynamo inlines as a pair of calls: ``torch.no_grad()`` (``_set_grad_enabled(False)``
    ... ``(True)``: DeepSeek-V3.2's sparse-attention indexer), ``torch.func.vmap`` (``_vmap_increment_nesting``
    ... ``_vmap_decrement_nesting``: Mamba's generic scan on CPU), autocast. A piece that holds part of one
    runs the rest in the wrong mode (the indexer with grad on, batched tensors outside their level). A
    region the branch touches comes whole, or the add is not gated."""
    regions, stack = [], []
    for node in add.graph.nodes:
        if gv.opens_region(node):
            stack.append([node])
            continue
        for open_region in stack:
            open_region.append(node)
        if gv.closes_region(node) and stack:
            regions.append(set(stack.pop()))
    extra: set[fx.Node] = set()
    for region in regions:
        if region & nodes and not region <= nodes and not nodes <= region:  # a branch inside autocast is fine
            outside = [u for n in region for u in n.users if u not in nodes and u not in region and u.op != "output"
                       and not gv.reads_only_metadata(u, n)]
            if outside:
                raise Reject(f"the branch holds part of a {region_name(region)} region (Dynamo inlined it) "
                              f"whose values {outside[0].name} reads outside the branch")
            extra |= region
    return extra


def region_name(region: set[fx.Node]) -> str:
    first = min(region, key=lambda n: list(n.graph.nodes).index(n))
    return {"_vmap_increment_nesting": "torch.func.vmap", "_enter_autocast": "autocast"}.get(
        getattr(first.target, "__name__", None), "torch.no_grad()")


def parameter_prologue(nodes: set[fx.Node], dfg) -> set[fx.Node]:
    """Parameter-only expressions that only the branch reads (``1 + w`` of Gemma's RMSNorm, ``w.float()``,
    ``W.T``): they belong to the branch.

    Left in the trunk, an AOT-compiled trunk segment (inner ``aot_eager``/``inductor``) returns them with
    a backward, and a closed gate's parameter gets a zero gradient instead of none.
    """
    found: set[fx.Node] = set()
    for node in sorted(dfg.graph["constants"], key=lambda n: dfg.nodes[n]["index"], reverse=True):  # users first
        if node.op.startswith("call") and node.users and all(u in nodes or u in found for u in node.users):
            found.add(node)
    return found


def own_nodes(nodes: set[fx.Node], out: fx.Node, reader: fx.Node, metadata: set[fx.Node]) -> set[fx.Node]:
    """Keep the nodes whose every user is in the branch (or the graph output); shared ones become inputs."""
    nodes = set(nodes)
    changed = True
    while changed:
        changed = False
        for n in list(nodes):
            allowed = (reader,) if n is out else ()
            outside = (u for u in n.users if u not in nodes and u.op != "output" and u not in allowed
                       and not gv.reads_only_metadata(u, n))  # ``b.expand_as(y)`` reads only y's shape
            if any(u not in metadata for u in outside):  # ``y.dtype`` reads metadata, not the value
                nodes.discard(n)
                changed = True
    return nodes
