"""Find the residual branches of an FX graph.

A residual branch is the ``f(x)`` of ``y = x + f(x)``: a sub-graph that starts from
the residual stream ``x``, holds parametric compute (matmul, linear, conv,
attention) and ends in one operand of an add whose other operand is the stream
itself, or an alias of it (``x.to(dtype)``, a view), or the previous residual add.

Before (pre-norm transformer block, Dynamo dialect)::

    x ──► norm ──► q,k,v ──► sdpa ──► o_proj ──┐
    │                                          ▼
    └─────────────────────────────────────────► add ──► ...

After :func:`find_residual_branches` nothing in the graph has changed; the result
holds one :class:`ResidualBranch` for the ``norm ... o_proj`` nodes, named after
their module path (``model.layers.0.self_attn``), with the add, the skip operand,
the branch's inputs (parameters, masks, rotary tables) and side outputs (KV-cache
tensors returned by the graph).

Shapes it recognises:

* identity skip: pre-norm ``x + f(norm(x))``, post-norm ``norm(x + f(x))``,
  sandwich ``x + norm(f(norm(x)))``, in any add spelling (``+``, ``+=``,
  ``torch.add(alpha=)``, ``Tensor.add(_)``, ``aten.add(_).Tensor``);
* parallel branches ``x + attn(ln(x)) + mlp(ln(x))``, in either association, also under a dropout of
  their sum (Falcon): one branch per term;
* projection shortcuts ``f(x) + proj(x)``: the heavier operand is the branch, the
  single projection stays the skip;
* a branch scaled by a light factor computed from the stream beside it, ``x + s(x) * f(x)``
  (hyper-connections' per-stream output weights): the branch is ``f``, the factor stays in the trunk.

It does not fire on: RoPE (``q*cos + rot(q)*sin``), ``variance + eps``, bias and
position-embedding adds, ``arange + offset``, mask or position-bias adds to
attention scores, operands linked only through a shared (tied) parameter, or a
branch without parametric compute. A branch that contains another branch is
nested: the innermost are ``branches``, the outer one is reported in ``nested``
(:func:`dropbp_fx.passes.nesting.choose_nest_levels` then picks the level to gate).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from . import branch_members as members
from . import graph_view as gv
from . import views
from .branch_names import BranchPath, branch_path, gate_name, name_branches


@dataclass
class ResidualBranch:
    """One residual branch ``add = skip + output``; ``nodes`` compute ``output``."""

    path: BranchPath  # where it sits; its name is ``gate_name(path)``
    add: fx.Node
    skip: fx.Node
    output: fx.Node
    nodes: list[fx.Node]
    inputs: list[fx.Node]
    side_outputs: list[fx.Node]
    kind: str  # "identity", "parallel" or "projection"
    weight: int  # parameter elements used by the branch's compute nodes
    partial_sum: fx.Node | None = None  # parallel terms: the add that sums this term with the others
    stream: fx.Node | None = None  # the residual-stream value the branch reads (one of ``inputs``)

    @property
    def name(self) -> str:
        return gate_name(self.path)

    def __repr__(self) -> str:
        return (f"ResidualBranch({self.name!r}, kind={self.kind}, add={self.add.name}, skip={self.skip.name}, "
                f"output={self.output.name}, {len(self.nodes)} nodes, {len(self.side_outputs)} side outputs)")


@dataclass
class SkippedAdd:
    """An add that was looked at and is not a gated residual branch."""

    add: fx.Node
    module: str
    reason: str


@dataclass
class ResidualAnalysis:
    branches: list[ResidualBranch] = field(default_factory=list)  # to gate
    nested: list[ResidualBranch] = field(default_factory=list)  # the other levels of nests, not gated
    skipped: list[SkippedAdd] = field(default_factory=list)
    nests: list = field(default_factory=list)  # passes.nesting.Nest: the level chosen per nest, and why


_Reject = members.Reject


def find_residual_branches(gm: fx.GraphModule, *, root: nn.Module | None = None, frame: str = "") -> ResidualAnalysis:
    """Return the residual branches of ``gm`` (innermost ones), the nested outer ones, and the adds skipped.
    ``frame``: the module path of the frame ``gm`` was traced for (its branches' names start with it)."""
    root = gm if root is None else root
    graph = gm.graph
    dfg = gv.data_flow_graph(graph)
    stream_parent: dict[fx.Node, fx.Node] = {}  # skip chain: alias -> its input, residual add -> its skip
    by_add: dict[fx.Node, list[ResidualBranch]] = {}
    analysis = ResidualAnalysis()

    writer: dict[fx.Node, fx.Node] = {}  # tensor -> the latest in-place op that wrote it
    no_grad = grad_disabled(graph)

    for node in graph.nodes:
        if gv.is_alias(node) and node.args and isinstance(node.args[0], fx.Node):
            stream_parent[node] = writer.get(node.args[0], node.args[0])
        try:
            branches = _classify_add(node, dfg, stream_parent, writer, root) if gv.is_add(node) else None
        except _Reject as why:
            analysis.skipped.append(SkippedAdd(node, gv.module_path(node), str(why)))
            branches = None
        if gv.mutates_first_arg(node) and node.args and isinstance(node.args[0], fx.Node):
            writer[node.args[0]] = node
        if not branches:
            continue
        for branch in branches:  # ``f + g`` first read as a projection is a partial sum of parallel terms
            if branch.partial_sum is not None and branch.partial_sum in by_add:
                del by_add[branch.partial_sum]
                del stream_parent[branch.partial_sum]
        stream_parent[node] = branches[0].skip
        by_add[node] = branches

    found = [b for branches in by_add.values() for b in branches]
    name_branches(found, root, frame)  # before the no-grad ones go: ``#k`` counts every call of a module
    for branch in [b for b in found if b.add in no_grad]:  # a region inside a branch is gated whole
        found.remove(branch)
        analysis.skipped.append(SkippedAdd(branch.add, gv.module_path(branch.add), f"{branch.name}: {NO_GRAD}"))
    adds = {b.add for b in found}
    for branch in found:
        members = set(branch.nodes)
        (analysis.nested if any(a in members for a in adds) else analysis.branches).append(branch)
    return analysis


NO_GRAD = "runs under torch.no_grad() (HRM's recurrent steps before the last): no backward to drop"


def grad_disabled(graph: fx.Graph) -> set[fx.Node]:
    """The nodes Dynamo traced with grad off: between ``torch._C._set_grad_enabled(False)`` and the next
    ``(True)``. A branch there has no backward, and gating it would split the region across pieces (each
    compiled piece restores the grad mode it was entered with, so the mode would leak)."""
    off, enabled = set(), True
    for node in graph.nodes:
        if getattr(node.target, "__name__", None) == "_set_grad_enabled" and node.args:  # as graph_view's regions
            enabled = bool(node.args[0])
        elif not enabled:
            off.add(node)
    return off


# ---------------------------------------------------------------------------
def _classify_add(add: fx.Node, dfg: nx.DiGraph, stream_parent, writer, root) -> list[ResidualBranch]:
    a, b = gv.add_operands(add)
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        raise _Reject("adds a Python constant (eps, offset), not two tensors")
    a, b = writer.get(a, a), writer.get(b, b)  # the value after an earlier in-place write (``y.add_(f)``)
    if a in dfg.graph["constants"] or b in dfg.graph["constants"]:
        raise _Reject("adds a parameter or buffer (bias)")
    for shape in RESIDUAL_SHAPES:
        branches = shape(add, a, b, dfg, stream_parent, root)
        if branches is not None:
            return branches
    raise _Reject("no residual shape matches")


def _identity_shape(add, a, b, dfg, stream_parent, root) -> list[ResidualBranch] | None:
    """``x + f(x)``, pre-, post- or sandwich-norm, and parallel terms ``x + f(x) + g(x)``: one operand is the
    stream (itself, an alias of it, or an earlier residual add on it)."""
    for skip, out in ((a, b), (b, a)):
        stream = _stream_root(dfg, stream_parent, skip, out)
        if stream is not None:
            return _identity_branches(add, skip, out, stream, dfg, stream_parent, root)
    return None


def _projection_shape(add, a, b, dfg, stream_parent, root) -> list[ResidualBranch] | None:
    """``f(x) + proj(x)``: the heavier operand is the branch, a single projection stays the skip."""
    return [_projection_branch(add, a, b, dfg, stream_parent, root)]


# The residual shapes, tried in order. A new shape is one function ``(add, a, b, dfg, stream_parent, root) ->
# branches``, returning None when the add is not of its shape (``_Reject`` says why the add is no residual at all),
# added here, and drawn by ``tests/random_nets.py``.
RESIDUAL_SHAPES = (_identity_shape, _projection_shape)


def _stream_root(dfg, stream_parent, skip: fx.Node, out: fx.Node) -> fx.Node | None:
    """The first node on ``skip``'s chain (itself, its aliases, earlier residual adds) that feeds ``out``."""
    node = skip
    while node is not None:
        if node is not out and gv.reaches(dfg, node, out):
            return node
        node = stream_parent.get(node)
    return None


def _identity_branches(add, skip, out, stream, dfg, stream_parent, root) -> list[ResidualBranch]:
    terms = _split_parallel(out, add, stream, dfg, root)
    kind = "parallel" if len(terms) > 1 else "identity"
    branches = [_make_branch(consumer, skip, *_unscaled(term, consumer, stream, dfg, root), stream, kind, dfg,
                             stream_parent, root, residual_add=add)
                for term, consumer in terms]
    if kind == "parallel":
        for branch, (_, consumer) in zip(branches, terms):
            branch.partial_sum = consumer
    return branches


def _split_parallel(out: fx.Node, consumer: fx.Node, stream: fx.Node, dfg, root) -> list[tuple[fx.Node, fx.Node]]:
    """``attn(x) + mlp(x)`` feeding one residual add: each term of the sum is a branch of its own.

    Returns ``(term, the add that consumes it)`` pairs.
    """
    if gv.is_dropout(out) and isinstance(out.args[0], fx.Node) and gv.is_add(out.args[0]):
        # Falcon: ``x + dropout(mlp(ln(x)) + attn(ln(x)))``. Dropout scales each term alike, so detaching one
        # term before the sum is the same as detaching it after: split the sum, leave the dropout in the trunk.
        data_users = [u for u in out.users if u not in dfg.graph["metadata"]]
        terms = _split_parallel(out.args[0], out, stream, dfg, root) if len(data_users) == 1 else []
        return terms if len(terms) > 1 else [(out, consumer)]
    if not gv.is_add(out):
        return [(out, consumer)]
    a, b = gv.add_operands(out)
    data_users = [u for u in out.users if u not in dfg.graph["metadata"]]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or len(data_users) != 1:
        return [(out, consumer)]
    paths = [gv.between(dfg, stream, term) for term in (a, b)]
    if not all(any(gv.is_compute(n, root) for n in nodes) for nodes in paths):
        return [(out, consumer)]
    if gv.reaches(dfg, a, b) or gv.reaches(dfg, b, a):
        return [(out, consumer)]
    if any(gv.is_compute(n, root) for n in paths[0] & paths[1]):
        # the terms share compute: ``base(attn(x)) + lora(attn(x))`` (a 4-bit LoRA projection, which PEFT
        # returns without a closing ``.to(dtype)``) is one branch ending in a LoRA add, not two parallel ones
        return [(out, consumer)]
    return _split_parallel(a, out, stream, dfg, root) + _split_parallel(b, out, stream, dfg, root)


def _unscaled(out: fx.Node, reader: fx.Node, stream: fx.Node, dfg, root) -> tuple[fx.Node, fx.Node]:
    """``x + s(x) * f(x)``, ``s`` a light factor computed from the stream beside ``f``: the branch is ``f``.

    A hyper-connection (HY-V4, DeepSeek-V4: several residual streams) weighs the branch per stream with
    weights computed from the streams, ``x + post(x) ⊗ f(mix(x))``; a gated residual scales it by
    ``sigmoid(W x)``. Such a factor is computed from the stream outside ``f``: it keeps its gradient when
    the gate is closed (eager with ``f`` detached), so it and the product stay in the trunk. It must be
    light (at most one projection deep, lighter than ``f``), and not ``f``'s own input projection
    (``f(h) * sigmoid(h)``, ``h = W x``, is one branch: the stream reaches ``f`` only through it). A product
    taken inside a submodule of the code that adds it (experts weighted by their router inside an MoE
    module, RWKV's receptance gate) is that module's output: its caller adds all of it, so all of it is the
    branch; the factor stays out only where the adding code applies it (the decoder layer, HY-V4).

    Before::                                 After::

        x ──► s ───────────┐                     x ──► s ───────────┐
        └───► [ f ] ──► mul(s, f) ──► add        └───► [ f ] ──► mul(s, f) ──► add
              └── branch ──────┘                       └ branch ┘

    Returns (the branch output, the node that reads it): ``(out, reader)`` when ``out`` is no such product.
    """
    product = out
    while (gv.is_alias(product) or _is_broadcast_view(product)) and isinstance(product.args[0], fx.Node) \
            and len(product.args[0].users) == 1:
        # ``(s * f).to(dtype)``; Qwen4-exp's ``(f.unsqueeze(-2) * post.unsqueeze(-1)).flatten(-2)``: the
        # per-stream product laid out as the streams again
        product = product.args[0]
    if not (_is_mul(product) and len(product.args) == 2 and all(isinstance(t, fx.Node) for t in product.args)):
        return out, reader
    a, b = product.args
    if not (gv.reaches(dfg, stream, a) and gv.reaches(dfg, stream, b)) or gv.reaches(dfg, a, b) \
            or gv.reaches(dfg, b, a):
        return out, reader
    paths = {t: _path(dfg, stream, t, root) for t in (a, b)}
    heavy, light = sorted((a, b), key=lambda t: paths[t][0], reverse=True)
    if paths[heavy][1] < 2 or paths[light][1] > 1 or paths[heavy][0] <= paths[light][0]:
        return out, reader
    if not gv.reaches_avoiding(dfg, stream, heavy, set(paths[light][2])):
        return out, reader
    where, at_add = gv.module_path(product), gv.module_path(reader)
    if where != at_add and (not at_add or where.startswith(at_add + ".")):  # a submodule scales its own output
        return out, reader
    reader = product
    while _is_broadcast_view(heavy) and len(heavy.users) == 1:
        heavy, reader = heavy.args[0], heavy  # ``f(x).unsqueeze(-2)`` spread over the streams: the product's view
    return heavy, reader


def _is_broadcast_view(node: fx.Node) -> bool:
    """A view that only reshapes its input for a product (``unsqueeze``, ``view``, ``expand``)."""
    return node.target is not operator.getitem and bool(views.view_bases(node))


_MULS = {operator.mul, torch.mul, torch.Tensor.mul}


def _is_mul(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _MULS or getattr(node.target, "overloadpacket", None) is torch.ops.aten.mul
    return node.op == "call_method" and node.target in ("mul", "__mul__", "__rmul__")


def _path(dfg, stream: fx.Node, term: fx.Node, root) -> tuple[int, int, list[fx.Node]]:
    """(parameter elements, compute depth, compute nodes) of the nodes between ``stream`` and ``term``."""
    nodes = _topo(gv.between(dfg, stream, term), dfg)
    compute = [n for n in nodes if gv.is_compute(n, root)]
    weight = sum(gv.node_weight(n, root, dfg.graph["constants"]) for n in compute)
    return weight, gv.compute_depth(nodes, root), compute


def _projection_branch(add, a, b, dfg, stream_parent, root) -> ResidualBranch:
    """``f(x) + proj(x)``: gate ``f`` when it is deeper and heavier than a single projection."""
    # the stream both operands carry gradient to: an additive mask made from the token ids (``ids != pad``:
    # T5Gemma's encoder) shares the ids with the scores, not a stream
    common = (gv.differentiable_ancestors(dfg, a) | {a}) & (gv.differentiable_ancestors(dfg, b) | {b})
    if not common:
        raise _Reject("operands share no data a gradient flows through (position embeddings, masks from the "
                      "token ids, tied weights): not a residual stream")
    stream = max(common, key=lambda n: dfg.nodes[n]["index"])
    paths = {term: _path(dfg, stream, term, root) for term in (a, b)}
    heavy, light = sorted((a, b), key=lambda t: paths[t][0], reverse=True)
    if not paths[heavy][2]:
        raise _Reject("no matmul, linear, conv or attention between the stream and either operand")
    if paths[heavy][1] < 2 or paths[light][1] > 1 or paths[heavy][0] == paths[light][0]:
        raise _Reject("two computed operands of one stream, but not a deep branch beside a single projection "
                      "(a LoRA or split projection, not a residual)")
    # a hyper-connection's ``post(H) * f(pre(H) . H) + comb(H)^T @ H``: the skip is a light mix of the streams,
    # and the branch is scaled by a factor computed beside it, which stays in the trunk as for an identity skip
    out, reader = _unscaled(heavy, add, stream, dfg, root)
    return _make_branch(add, light, out, reader, stream, "projection", dfg, stream_parent, root)


def _make_branch(add, skip, out, reader, stream, kind, dfg, stream_parent, root, residual_add=None) -> ResidualBranch:
    """The branch computing ``out`` from ``stream``; ``reader`` reads ``out`` (the add, or the product with a
    factor of :func:`_unscaled`); ``add`` is the add that consumes it (for a parallel term, the partial sum;
    ``residual_add`` is then the add with the skip)."""
    nodes = gv.between(dfg, stream, out)
    for node in nodes:  # the stream must not reach ``out`` only by way of another residual stream
        inner_skip = stream_parent.get(node) if gv.is_add(node) else None
        if inner_skip is not None and inner_skip is not stream and inner_skip not in nodes:
            raise _Reject(f"{stream.name} reaches {out.name} only through the residual stream at {node.name} "
                          "(an additive mask or bias shared by several layers), not as its own residual stream")
    nodes |= members.metadata_used_inside(nodes, dfg)
    nodes |= members.returned_views(nodes, out, dfg)
    nodes |= members.cache_writes(nodes, out, dfg)
    nodes = members.own_nodes(nodes, out, reader, dfg.graph["metadata"])
    nodes -= members.parts_of_outside_tuples(nodes)
    if out not in nodes:
        raise _Reject("the branch output is used outside the residual add")
    nodes |= members.whole_regions(nodes, add)
    nodes |= members.parameter_prologue(nodes, dfg)
    nodes -= members.parts_of_outside_tuples(nodes)
    shaped = members.metadata_used_inside(nodes, dfg)
    if shaped:
        between = min(shaped, key=lambda n: dfg.nodes[n]["index"])
        raise _Reject(f"{between.name} reads a branch value and feeds the branch, but is read outside it too")
    ordered = _topo(nodes, dfg)
    compute = [n for n in ordered if gv.is_compute(n, root)]
    if not compute:
        raise _Reject("branch holds no matmul, linear, conv or attention")
    for n in ordered:
        if gv.mutates_first_arg(n) and isinstance(n.args[0], fx.Node) and n.args[0] not in nodes:
            raise _Reject(f"branch node {n.name} mutates its input {n.args[0].name} in place")
    inputs: dict[fx.Node, None] = {}
    for n in ordered:
        for arg in n.all_input_nodes:
            if arg not in nodes:
                inputs[arg] = None
    side = [n for n in ordered if n is not out and any(u not in nodes for u in n.users)]
    weight = sum(gv.node_weight(n, root, dfg.graph["constants"]) for n in compute)
    return ResidualBranch(branch_path(compute, add), residual_add or add, skip, out, ordered, list(inputs), side,
                          kind, weight, stream=stream if stream in inputs else None)


def _topo(nodes, dfg) -> list[fx.Node]:
    return sorted(nodes, key=lambda n: dfg.nodes[n]["index"])
