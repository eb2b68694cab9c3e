"""Outlining: move a set of nodes into a submodule and call it in their place.

Before::

    %a = f(%x)            # nodes to outline: a, b
    %b = g(%a, %w)
    %c = h(%b, %a)

After (``outline(gm, [a, b], make_module)``)::

    %call = call_module[name](%x, %w)      # make_module(sub_gm) is installed as ``gm.name``
    %b    = getitem(%call, 0)
    %a    = getitem(%call, 1)
    %c    = h(%b, %a)

Outputs are the outlined nodes used outside, ``first`` (if given) in position 0.
Callers run ``stable_topological_sort``, ``lint`` and ``recompile`` once when done.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch.fx as fx
from torch import nn
from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule

from passes import kernels


def outline(gm: fx.GraphModule, nodes: list[fx.Node], make_module: Callable[[fx.GraphModule], nn.Module],
            prefix: str, first: fx.Node | None = None, class_name: str = "Outlined") -> fx.Node:
    """Replace ``nodes`` (topologically ordered) by a call to ``make_module(sub_gm)``; returns the call node."""
    nodes = _with_bodies(gm, nodes)
    members = set(nodes)
    sub_gm, inputs, outputs = fuse_as_graphmodule(gm, nodes, class_name, dict.fromkeys(nodes),
                                                  always_return_tuple=True)
    order = list(outputs)
    if first is not None and order and order[0] is not first:
        order = [first] + [o for o in order if o is not first]
        out_node = sub_gm.graph.output_node()
        position = {o: i for i, o in enumerate(outputs)}
        out_node.args = (tuple(out_node.args[0][position[o]] for o in order),)
        sub_gm.recompile()
    attr = free_attr(gm, prefix)
    gm.add_submodule(attr, make_module(sub_gm))

    with gm.graph.inserting_after(nodes[-1]):
        call = gm.graph.call_module(attr, args=tuple(inputs))
    for key in ("example_value", "val"):
        if all(key in o.meta for o in order):
            call.meta[key] = tuple(o.meta[key] for o in order)
    previous = call
    for i, old in enumerate(order):
        with gm.graph.inserting_after(previous):
            item = gm.graph.call_function(operator.getitem, (call, i))
        item.meta = dict(old.meta)
        old.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
        previous = item
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    return call


def _with_bodies(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[fx.Node]:
    """The ``get_attr`` nodes of submodules the outlined nodes read (a higher-order op's bodies) go with them.

    A body left outside would reach the piece as an argument, a module and not a tensor, which no inner
    compiler takes (AOTAutograd: ``all flat_args must be KNOWN_TYPES``). A body also read outside the
    outlined nodes gets a ``get_attr`` of its own for them.
    """
    members = set(nodes)
    moved: list[fx.Node] = []
    for node in nodes:
        for attr in kernels.module_attrs(gm, node):
            if attr in members:
                continue
            if all(user in members for user in attr.users):
                moved.append(attr)
                members.add(attr)
                continue
            with gm.graph.inserting_before(nodes[0]):
                copy = gm.graph.get_attr(attr.target)
            copy.meta = dict(attr.meta)
            for user in [u for u in attr.users if u in members]:
                user.replace_input_with(attr, copy)
            moved.append(copy)
            members.add(copy)
    return moved + list(nodes) if moved else nodes


def free_attr(gm: fx.GraphModule, prefix: str) -> str:
    index = 0
    while hasattr(gm, f"{prefix}_{index}"):
        index += 1
    return f"{prefix}_{index}"
