"""The data-flow graph of an FX graph: a ``networkx`` graph with an edge where a node consumes another's *data*
(not a shape, not a constant), and path queries on it. Built on :mod:`.predicates` and :mod:`.views` alone;
re-exported by :mod:`dropbp_fx.passes.graph_view`."""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from .predicates import (carries_grad, is_constant, is_shape_query, meta_value, mutates_first_arg, reads_data,
                         reads_only_metadata)
from .views import view_bases


def constant_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Parameters, buffers, and values computed from them alone (``W.T``, ``bias.view(1, -1)``), or from them
    and the metadata of other tensors (a quantized weight dequantized as ``Wq.to(x.dtype) * scale``)."""
    constants: set[fx.Node] = set()
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if is_constant(node) or (node.op.startswith("call") and any(a in constants for a in inputs)
                                 and all(a in constants or is_shape_query(a) or reads_only_metadata(node, a)
                                         for a in inputs)):
            constants.add(node)
    return constants


def metadata_nodes(graph: fx.Graph, constants: set[fx.Node]) -> set[fx.Node]:
    """Shape queries, and values computed from them alone (``math.sqrt(q.size(-1))``): metadata, not data."""
    meta: set[fx.Node] = set()
    from_data: set[fx.Node] = set()  # ``int(h.sum().item()) % 2``: symbolic ints computed from data are data
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if reads_data(node) or (any(a in from_data for a in inputs) and not isinstance(meta_value(node), torch.Tensor)):
            from_data.add(node)
            continue
        if is_shape_query(node) or (node.op.startswith("call") and any(a in meta for a in inputs)
                                    and all(a in meta or a in constants for a in inputs)):
            meta.add(node)
    return meta


def data_flow_graph(graph: fx.Graph) -> nx.DiGraph:
    """Nodes of ``graph`` with an edge ``u -> v`` when ``v`` consumes the *data* of ``u``.

    Edges out of constants (parameters, buffers, ``W.T``) and out of metadata (``x.size(1)``,
    ``x.dtype``), and edges into ops that read only an operand's metadata (``b.expand_as(x)``), are left
    out: two values that share a weight, or whose only link is a shape, are not on one stream. The sets are kept as ``g.graph["constants"]`` and ``g.graph["metadata"]``.

    An in-place op (``y.add_(z)``) takes over the edges to every later user of the tensor it writes:
    they read the value it produced, though FX records them as users of ``y``.
    """
    constants = constant_nodes(graph)
    g = nx.DiGraph(constants=constants, metadata=metadata_nodes(graph, constants))
    for index, node in enumerate(graph.nodes):
        g.add_node(node, index=index)
    for node in graph.nodes:
        if node in constants or node in g.graph["metadata"]:
            continue
        for user in node.users:
            if not reads_only_metadata(user, node):
                g.add_edge(node, user)
    for node in graph.nodes:
        if mutates_first_arg(node) and node.args and isinstance(node.args[0], fx.Node):
            index = g.nodes[node]["index"]
            for written in (node.args[0], *view_bases(node.args[0])):  # ``k[..., :16].copy_(v)`` writes ``k``
                for user in written.users:
                    if g.nodes[user]["index"] > index:
                        g.add_edge(node, user)
                        if g.has_edge(written, user):
                            g.remove_edge(written, user)
    return g


def between(g: nx.DiGraph, source: fx.Node, sink: fx.Node) -> set[fx.Node]:
    """Nodes on some data path ``source -> ... -> sink``, excluding ``source``, including ``sink``."""
    index = g.nodes[source]["index"]
    upstream: set[fx.Node] = set()
    stack = [sink]
    while stack:  # backwards from sink, never earlier than source
        node = stack.pop()
        if node in upstream or node is source or g.nodes[node]["index"] < index:
            continue
        upstream.add(node)
        stack.extend(g.predecessors(node))
    reached: set[fx.Node] = set()
    stack = [s for s in g.successors(source) if s in upstream]
    while stack:  # forwards from source, inside the backward cone
        node = stack.pop()
        if node in reached:
            continue
        reached.add(node)
        stack.extend(s for s in g.successors(node) if s in upstream)
    return reached


def reaches(g: nx.DiGraph, source: fx.Node, sink: fx.Node) -> bool:
    """True when a data path leads from ``source`` to ``sink`` (or they are the same node)."""
    lo = g.nodes[source]["index"]
    seen = set()
    stack = [sink]
    while stack:
        node = stack.pop()
        if node is source:
            return True
        if node in seen or g.nodes[node]["index"] < lo:
            continue
        seen.add(node)
        stack.extend(g.predecessors(node))
    return False


def reaches_avoiding(g: nx.DiGraph, source: fx.Node, sink: fx.Node, avoid: set[fx.Node]) -> bool:
    """True when a data path leads from ``source`` to ``sink`` through none of the nodes in ``avoid``."""
    hi = g.nodes[sink]["index"]
    seen = set()
    stack = [source]
    while stack:
        node = stack.pop()
        if node is sink:
            return True
        if node in seen or node in avoid or g.nodes[node]["index"] > hi:
            continue
        seen.add(node)
        stack.extend(g.successors(node))
    return False


def differentiable_ancestors(g: nx.DiGraph, node: fx.Node) -> set[fx.Node]:
    """The nodes a gradient of ``node`` can reach: its ancestors along data paths of values that carry one
    (:func:`~dropbp_fx.passes.predicates.carries_grad`). An attention mask made from the token ids by
    ``ids != pad`` shares the ids with the scores, but no gradient: it is not on their stream."""
    seen: set[fx.Node] = set()
    stack = [p for p in g.predecessors(node) if carries_grad(p)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(p for p in g.predecessors(n) if carries_grad(p))
    return seen
