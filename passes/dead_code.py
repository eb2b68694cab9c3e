"""Drop the values nothing reads before the residual analysis.

Dynamo hands the backend the graph as traced, dead code included (it removes only trivial nodes and leaves
the rest to the compiler): a module that returns its attention probabilities, which the caller discards,
leaves a node that reads them and has no user (ProphetNet's n-gram attention returns ``probs.view(...)``).
The analysis reads that node as a use of the branch's value outside the branch, and every node feeding
it (the query and key projections, the scores, the softmax) leaves the branch for the trunk: their
backward is never dropped, and an AOT-compiled trunk segment hands their weights zeros, not ``None``,
when the gate is closed.

Before::

    %k     = linear(%h, %w_k)
    %p     = softmax(matmul(%q, %k.T))
    %a     = linear(matmul(%p, %v), %w_o)
    %pv    = call_method[view](%p, ...)      # no user
    %y     = add(%x, %a)

After (``remove_dead_code(gm)``): the same without ``%pv``, so ``%k ... %a`` is one branch.

Only values nothing can observe are removed: a node with no user that computes tensors (or is a view),
writes into nothing, and draws no random numbers (a dead dropout still moves the RNG that later dropouts
read). The inner compilers would drop these nodes anyway; the forward and the gradients are unchanged.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

from . import graph_view as gv

_RANDOM = re.compile(r"rand|dropout|bernoulli|multinomial|poisson|rrelu|gumbel|^normal_?$")


def remove_dead_code(gm: fx.GraphModule) -> int:
    """Erase the unread, effect-free nodes of ``gm`` (chains of them too); returns how many."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):  # users before what they read: a dead chain goes in one sweep
        if _unobservable(node):
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.recompile()
    return removed


def _unobservable(node: fx.Node) -> bool:
    if node.users or node.op not in ("call_function", "call_method"):
        return False
    if gv.mutates_first_arg(node) or _draws_random(node) or (node.op == "call_function" and node.is_impure()):
        return False
    value = gv.meta_value(node)
    if value is None:  # no shapes (symbolic_trace): views and casts only
        return gv.is_alias(node) or bool(gv.view_bases(node))
    if isinstance(value, (tuple, list)):
        return bool(value) and all(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor)


def _draws_random(node: fx.Node) -> bool:
    if gv.is_dropout(node):
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    return node.target is not operator.getitem and bool(_RANDOM.search(name))
