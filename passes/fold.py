"""Fold the sizes of weight expressions into literals.

A parameter-only expression that only a branch reads belongs to that branch (see
``residuals._parameter_prologue``): left in the trunk, a compiled trunk segment returns it with a
backward, and a closed gate's parameter gets a zero gradient instead of none. A shape query on it
from outside the branch would keep it in the trunk. Weights have static sizes, so the query is
replaced by its value.

Before (Jamba's Mamba mixer)::

    %A      = neg(exp(%A_log.float()))          # read by the selective scan, in the branch
    %shape  = getattr(%A, "shape")
    %n      = getitem(%shape, -1)
    %state  = zeros(%b, %d, %n)                 # outside the branch

After :func:`fold_weight_shapes`::

    %A      = neg(exp(%A_log.float()))
    %state  = zeros(%b, %d, 16)
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from passes import graph_view as gv


def fold_weight_shapes(gm: fx.GraphModule) -> int:
    """Replace shape queries (and ``getitem`` on them) of constant expressions by their concrete values;
    returns how many nodes were folded."""
    constants = gv.constant_nodes(gm.graph)
    folded = 0
    for node in list(gm.graph.nodes):
        if not (gv.is_shape_query(node) and node.all_input_nodes and all(a in constants for a in node.all_input_nodes)):
            continue
        value = gv.meta_value(node)
        if not _concrete(value):
            continue
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem and len(user.users) and \
                    _concrete(gv.meta_value(user)):
                folded += _replace(user, gv.meta_value(user))
                gm.graph.erase_node(user)
        if node.users and not any(u.op == "output" for u in node.users):
            folded += _replace(node, tuple(value) if isinstance(value, torch.Size) else value)
        if not node.users:
            gm.graph.erase_node(node)
    if folded:
        gm.recompile()
    return folded


def _concrete(value) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, torch.Size) and all(isinstance(v, int) for v in value)


def _replace(node: fx.Node, value) -> int:
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
    return 1
