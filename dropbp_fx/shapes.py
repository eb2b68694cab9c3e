"""Values of graph nodes: the fake tensors a graph carries (Dynamo's ``example_value``, ``FakeTensorProp``'s
``val``), fake values for a graph that has none, and concrete FLOPs from symbolic ones."""

from __future__ import annotations

import torch
import torch.fx as fx

from dropbp_fx.passes.graph_view import meta_value


def node_value(node):
    """The traced value of ``node`` (a fake tensor, a SymInt, a tuple of them), or None. Dynamo's ``example_value``
    first: it keeps what ``.item()`` of a dynamic float returns; ``val`` is what ``FakeTensorProp`` writes."""
    return meta_value(node) if isinstance(node, fx.Node) else node


def placeholder_values(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, object]:
    """Placeholder -> its example input."""
    return dict(zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs or ()))


def attr(gm: fx.GraphModule, target: str):
    """The object ``get_attr[target]`` reads, or None."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def concrete(flops: tuple) -> tuple[int, int]:
    """FLOPs counted on a graph with symbolic sizes, at the sizes it was traced with (by hint: no guard)."""
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    return tuple(optimization_hint(v, fallback=0) if isinstance(v, torch.SymInt) else v for v in flops)


def propagate_shapes(gm: fx.GraphModule, example_inputs) -> None:
    """Give a graph without shape metadata (``symbolic_trace``) fake values, when inputs are known."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not example_inputs or any(node_value(n) is not None for n in placeholders):
        return
    from dropbp_fx._torch import fake_tensor_mode

    _grad_fake_tensor_prop(gm, fake_tensor_mode(allow_non_fake_inputs=True)).propagate(*example_inputs)


def _grad_fake_tensor_prop(gm, mode):
    """``FakeTensorProp`` whose values keep ``requires_grad`` (its snapshots are detached): branch FLOPs are
    counted on these values, and a weight read through ``get_attr`` (``x @ self.w.T``) or an input that
    requires grad would otherwise get no gradient there, halving that matmul's backward."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class Prop(FakeTensorProp):
        def run_node(self, n):
            result = super().run_node(n)
            _keep_requires_grad(n.meta.get("val"), result)
            return result

    return Prop(gm, mode)


def _keep_requires_grad(val, value) -> None:
    """Mark the (detached, leaf) fake ``val`` as requiring grad where the value it stands for does."""
    if isinstance(val, (tuple, list)) and isinstance(value, (tuple, list)) and len(val) == len(value):
        for v, w in zip(val, value):
            _keep_requires_grad(v, w)
    elif (isinstance(val, torch.Tensor) and isinstance(value, torch.Tensor) and value.requires_grad
          and val.is_floating_point() and val.is_leaf and not val.requires_grad):
        val.requires_grad_(True)
