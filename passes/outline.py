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

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule

from . import graph_view as gv
from . import kernels


def outline(gm: fx.GraphModule, nodes: list[fx.Node], make_module: Callable[[fx.GraphModule], nn.Module],
            prefix: str, first: fx.Node | None = None, class_name: str = "Outlined") -> fx.Node:
    """Replace ``nodes`` (topologically ordered) by a call to ``make_module(sub_gm)``; returns the call node."""
    nodes = _with_scalar_sources(gm, _with_bodies(gm, nodes))
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


def _with_scalar_sources(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[fx.Node]:
    """A symbolic float the outlined nodes read is recomputed inside, from the tensor it came from.

    Before::                                    After (outlining ``%h``)::

        %eps = call_method[item](%eps_t)            %eps = call_method[item](%eps_t)   # for other readers
        %h   = add(%var, %eps)                      %call = call_module[...](%var, %eps_t)
                                                    #   inside: %eps' = item(%eps_t); %h = add(%var, %eps')

    Dynamo passes a Python float it made dynamic (a norm's ``eps``, after a recompile with another value)
    as a 0-d tensor read with ``.item()``. A piece handed the resulting ``SymFloat`` as an input is one
    Inductor cannot compile (its C++ kernel names the symbol without declaring it); the same ``.item()``
    inside the piece is the graph Inductor compiles without DropBP. The chain from the tensor (``item``,
    then scalar arithmetic) is copied, and the original stays for its other readers.

    So is a 0-d integer tensor made from numbers alone (Longformer's chunk count,
    ``torch.div(seq_len, 2 * window, rounding_mode="trunc")``, passed to ``view``): as an input, AOTAutograd
    makes it a fake tensor whose value is unknown, and the ``view`` then fails with
    ``DataDependentOutputException``; computed inside, its value is the constant it is.
    """
    members = set(nodes)

    def scalar_chain(node: fx.Node, chain: dict) -> bool:
        """Collect the nodes from tensors to ``node`` (scalars, 0-d tensors of numbers); False where the chain
        does not start at tensors."""
        if node in chain or node in members:
            return True
        value = gv.meta_value(node)
        if node.op in ("placeholder", "get_attr"):
            return not isinstance(value, torch.SymFloat)  # an input (a SymFloat input stays one)
        if isinstance(value, torch.Tensor) and not _scalar_tensor_of_numbers(node, value):
            return True  # a tensor: the chain starts here, it stays an input
        if not isinstance(value, (torch.Tensor, torch.SymFloat, torch.SymInt, torch.SymBool, float, int, bool)):
            return False
        if not all(scalar_chain(a, chain) for a in node.all_input_nodes):
            return False
        chain[node] = None
        return True

    copied: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            value = gv.meta_value(arg)
            if arg in members or arg in copied or not (isinstance(value, torch.SymFloat)
                                                       or _scalar_tensor_of_numbers(arg, value)):
                continue
            chain: dict[fx.Node, None] = {}
            if not scalar_chain(arg, chain):
                continue
            for old in chain:  # in dependency order
                if old in copied:
                    continue
                with gm.graph.inserting_before(nodes[0]):
                    new = gm.graph.node_copy(old, lambda a: copied.get(a, a))
                new.meta = dict(old.meta)
                copied[old] = new
    if not copied:
        return nodes
    for node in nodes:
        for old, new in copied.items():
            node.replace_input_with(old, new)
    return list(copied.values()) + list(nodes)


_RANDOM = ("rand", "bernoulli", "normal", "multinomial", "dropout", "uniform", "poisson", "exponential")


def _scalar_tensor_of_numbers(node: fx.Node, value) -> bool:
    """A 0-d integer or boolean tensor computed by a deterministic op from Python numbers and symbols alone
    (``torch.div(16, 8)``, ``torch.tensor(n)``): the same value wherever it is computed."""
    if not (isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point()
            and not value.is_complex() and node.op == "call_function"):
        return False
    name = getattr(node.target, "__name__", str(node.target))
    return not any(word in name for word in _RANDOM)


def free_attr(gm: fx.GraphModule, prefix: str) -> str:
    index = 0
    while hasattr(gm, f"{prefix}_{index}"):
        index += 1
    return f"{prefix}_{index}"
