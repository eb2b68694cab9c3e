"""Kernels the op vocabulary cannot name: higher-order ops and custom operators.

A model brings its own kernels: bitsandbytes' 4-bit matmul (QLoRA) and BLOOM's GeLU are Python
``torch.autograd.Function``s, which Dynamo captures as the higher-order op
``autograd_function_apply``; Liger, flash-attn and Unsloth-style fused ops do the same; transformers'
MoE experts run the custom op ``torch.ops.transformers.grouped_mm_fallback`` on CPU; a ``torch.library``
op or a wrapped Triton kernel is one node whose inside the graph does not show.

Before (Dynamo dialect, one 4-bit projection)::

    %fwd_body_0 = get_attr[fwd_body_0]          # GraphModule: gemm_4bit(x, W, ...)
    %bwd_body_0 = get_attr[bwd_body_0]          # GraphModule: dequantize_4bit(W) ... matmul
    %W          = view(%weight_4bit, -1, 1)
    %y          = autograd_function_apply(%fwd_body_0, %bwd_body_0, %W, %x, %absmax, ...)

This module only answers questions about such a node: is it one (:func:`is_kernel`), what is it called
(:func:`kernel_name`), which ``GraphModule`` bodies does it carry (:func:`bodies`), and does one of
them do parametric compute (:func:`body_computes`). Whether it reads a weight is data flow, asked by
:func:`dropbp_fx.passes.graph_view.is_compute`. Nothing here changes a graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from ._torch import HigherOrderOperator, OpOverloadPacket, op_qualified_name

# Namespaces whose operators the vocabulary already knows (or that are not kernels of their own).
_KNOWN_NAMESPACES = ("aten", "prims", "_c10d_functional", "c10d_functional", "higher_order", "profiler", "inductor")


def is_hop(node: fx.Node) -> bool:
    """A higher-order op call (``autograd_function_apply``, ``invoke_subgraph``, ``flex_attention``, ...)."""
    return node.op == "call_function" and isinstance(node.target, HigherOrderOperator)


def is_custom_op(node: fx.Node) -> bool:
    """A ``torch.ops.<namespace>.*`` operator outside the namespaces torch itself defines."""
    if node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", target)
    if not isinstance(packet, OpOverloadPacket):
        return False
    return op_qualified_name(packet).split("::")[0] not in _KNOWN_NAMESPACES


def is_kernel(node: fx.Node) -> bool:
    """A node whose computation the op vocabulary cannot see: a higher-order op or a custom operator."""
    return is_hop(node) or is_custom_op(node)


def kernel_name(node: fx.Node) -> str:
    """``autograd_function_apply(MatMul4Bit)``, ``bitsandbytes::gemm_4bit``, ...: for messages."""
    if is_hop(node):
        name = node.target.name()
        label = node.meta.get("source_fn_stack") or []
        fn = label[-1][1] if label else None
        owner = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
        return f"{name}({owner})" if owner and owner != name else name
    packet = getattr(node.target, "overloadpacket", node.target)
    return op_qualified_name(packet, str(node.target))


def bodies(node: fx.Node, root: nn.Module | None) -> list[fx.GraphModule]:
    """The ``GraphModule`` arguments of a higher-order op (``get_attr`` nodes on ``root``)."""
    if not is_hop(node) or root is None:
        return []
    found = []
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            value = _attr(root, arg.target)
            if isinstance(value, fx.GraphModule):
                found.append(value)
    return found


def body_computes(node: fx.Node, root: nn.Module | None, is_compute: Callable[[fx.Node, nn.Module], bool]) -> bool:
    """Does a body of the higher-order op ``node`` hold a compute node (a matmul, attention, a kernel on a weight)?

    Only the first body is the forward one for ``autograd_function_apply``; for a body-carrying op in
    general any body may run forward, so all are looked at (a backward body's matmul implies one forward).
    """
    return any(is_compute(n, body) for body in bodies(node, root) for n in body.graph.nodes)


def is_body(node: fx.Node, root: nn.Module | None) -> bool:
    """A ``get_attr`` of a submodule (a higher-order op's body), not of a tensor."""
    return node.op == "get_attr" and root is not None and isinstance(_attr(root, node.target), nn.Module)


def module_attrs(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The ``get_attr`` inputs of ``node`` that name a submodule (a higher-order op's bodies).

    :func:`dropbp_fx.passes.outline.outline` moves these into the piece that calls the op: a body passed to a
    compiled piece as an argument is not a tensor, and AOTAutograd refuses it
    (``all flat_args must be KNOWN_TYPES``).
    """
    return [a for a in node.all_input_nodes if is_body(a, gm)]


def _attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
