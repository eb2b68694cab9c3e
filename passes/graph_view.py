"""The op vocabulary the residual passes need: "an add", "a parametric compute op", "an alias", "a constant".

The same questions are asked of three graph dialects:

* ``torch.fx.symbolic_trace``: ``call_module`` nodes for layers, parameters in modules or ``get_attr``;
* Dynamo: torch-level ``call_function`` nodes (``torch._C._nn.linear``, ``operator.add``),
  parameters and buffers lifted to placeholders;
* ``torch.export(...).module()``: aten overloads (``aten.linear.default``,
  ``aten.add.Tensor``), parameters as ``get_attr``.

Everything dialect-specific lives here and in the leaf :mod:`.predicates` (what a value is: a constant,
metadata, data that carries a gradient), so the passes can speak of "an add", "a parametric compute op",
"a constant" and "a data edge". The passes read all of it as ``gv.*``: this module re-exports the predicates,
the module paths, the views and the networkx data-flow graph (:mod:`.data_flow`, built on the predicates alone).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn

from . import kernels
from ._torch import torch_grouped_mm
from .data_flow import (between, constant_nodes, data_flow_graph, differentiable_ancestors,  # noqa: F401
                        metadata_nodes, reaches, reaches_avoiding)
from .module_paths import clean_module_path, common_module_path, module_path, structure_key  # noqa: F401
from .predicates import (carries_grad, is_constant, is_shape_query, meta_value, mutates_first_arg,  # noqa: F401
                         packet, reads_data, reads_only_metadata)
from .views import view_bases  # noqa: F401

aten = torch.ops.aten

# ---------------------------------------------------------------------------
# adds
# ---------------------------------------------------------------------------
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_}
_ADD_ATEN = {aten.add, aten.add_}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}


def is_add(node: fx.Node) -> bool:
    """``x + y`` in any dialect: ``operator.add/iadd``, ``torch.add``, ``Tensor.add(_)``, ``aten.add(_).Tensor``."""
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS or packet(node.target) in _ADD_ATEN
    if node.op == "call_method":
        return node.target in _ADD_METHODS
    return False


def add_operands(node: fx.Node) -> tuple[object, object]:
    """The two summands of an add node (``alpha`` scales the second and is left on the node)."""
    args = list(node.args)
    if len(args) < 2:
        other = node.kwargs.get("other")
        args = [args[0] if args else node.kwargs.get("input"), other]
    return args[0], args[1]


_DROPOUT_FUNCTIONS = {torch.nn.functional.dropout, torch.dropout}


def is_dropout(node: fx.Node) -> bool:
    """``F.dropout(x, p, training)`` / ``aten.dropout``: a per-element scaling of ``x`` (its first argument)."""
    if node.op == "call_function":
        return node.target in _DROPOUT_FUNCTIONS or packet(node.target) is aten.dropout
    return node.op == "call_method" and node.target == "dropout"


# ---------------------------------------------------------------------------
# parametric compute: matmul, linear, conv, attention
# ---------------------------------------------------------------------------
_COMPUTE_FUNCTIONS = {
    torch.nn.functional.linear, torch.matmul, operator.matmul, torch.mm, torch.bmm,
    torch.addmm, torch.baddbmm, torch.addbmm, torch.einsum, torch.bilinear,
    torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.conv1d, torch.nn.functional.conv2d,
    torch.nn.functional.conv3d, torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
    torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.multi_head_attention_forward,
}
_COMPUTE_ATEN = {
    aten.linear, aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.addbmm, aten.matmul, aten.einsum,
    aten.convolution, aten.conv1d, aten.conv2d, aten.conv3d, aten._convolution, aten.conv_transpose1d,
    aten.conv_transpose2d, aten.conv_transpose3d, aten.scaled_dot_product_attention,
    aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_cudnn_attention,
    aten.bilinear, aten._trilinear, aten._grouped_mm,
}
# Grouped (mixture-of-experts) matmuls: transformers' MoE experts run ``F.grouped_mm`` / ``torch._grouped_mm``,
# or, where those cannot run (CPU, fp32), its own custom op ``torch.ops.transformers.grouped_mm_fallback``.
_COMPUTE_FUNCTIONS |= {f for f in (getattr(torch.nn.functional, "grouped_mm", None),
                                  torch_grouped_mm) if f is not None}
_COMPUTE_METHODS = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm"}


def is_compute(node: fx.Node, root: nn.Module | None = None) -> bool:
    """A parametric-compute node: matmul/linear/conv/attention, a module holding a >=2-D weight, or a kernel
    the vocabulary cannot name (a higher-order op, a custom op) that reads a weight or whose body computes."""
    if node.op == "call_function":
        if node.target in _COMPUTE_FUNCTIONS or packet(node.target) in _COMPUTE_ATEN:
            return True
        if kernels.is_kernel(node):
            return reads_weight(node, root) or kernels.body_computes(node, root, is_compute)
        return False
    if node.op == "call_method":
        return node.target in _COMPUTE_METHODS
    if node.op == "call_module" and root is not None:
        mod = _get_submodule(root, node.target)
        if mod is None or isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            return False
        return any(p.dim() >= 2 for p in mod.parameters(recurse=True))
    return False


def reads_weight(node: fx.Node, root: nn.Module | None = None) -> bool:
    """Does ``node`` read a >=2-D parameter (or one of unknown shape), directly or through a few views?

    Data flow, whatever the op: a library's matmul kernel (transformers' MoE ``grouped_mm_fallback``),
    bitsandbytes' 4-bit matmul (an ``autograd.Function`` on a ``uint8`` ``Params4bit`` viewed ``(-1, 1)``),
    a user's fused linear. A norm's 1-D weight is not one.
    """
    for arg in node.all_input_nodes:
        for _ in range(4):  # W, W.T, W.transpose(-2, -1).contiguous(), W.view(-1, 1), ...
            if is_constant(arg) or arg.op not in ("call_method", "call_function") or len(arg.all_input_nodes) != 1:
                break
            arg = arg.all_input_nodes[0]
        if is_constant(arg) and not kernels.is_body(arg, root):
            value = meta_value(arg)
            if not isinstance(value, torch.Tensor) or value.dim() >= 2:
                return True
    return False


# ---------------------------------------------------------------------------
# aliases of the residual stream: casts, copies, views
# ---------------------------------------------------------------------------
_ALIAS_METHODS = {"to", "type", "float", "half", "bfloat16", "double", "contiguous", "clone", "view", "reshape",
                  "type_as"}
_ALIAS_ATEN = {aten.to, aten._to_copy, aten.clone, aten.contiguous, aten.alias, aten.view, aten._unsafe_view,
               aten.reshape, aten.lift_fresh_copy}
_ALIAS_FUNCTIONS = {torch.clone, torch.reshape}


def is_alias(node: fx.Node) -> bool:
    """A node that only re-labels its first input (dtype cast, copy, view): still the same stream."""
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS
    if node.op == "call_function":
        return node.target in _ALIAS_FUNCTIONS or packet(node.target) in _ALIAS_ATEN
    return False


# ---------------------------------------------------------------------------
# stateful regions: paired calls Dynamo inlines (``torch.no_grad()``, ``torch.func.vmap``, autocast)
# ---------------------------------------------------------------------------
def opens_region(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", None)
    return name in ("_vmap_increment_nesting", "_enter_autocast") or (
        name == "_set_grad_enabled" and node.args[:1] == (False,))


def closes_region(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", None)
    return name in ("_vmap_decrement_nesting", "_exit_autocast") or (
        name == "_set_grad_enabled" and node.args[:1] == (True,))


# ---------------------------------------------------------------------------
# constants (parameters, buffers) and multi-output values (the predicates are in .predicates)
# ---------------------------------------------------------------------------
def is_multi_output(node: fx.Node) -> bool:
    """A node whose value is a tuple or list (``split``, ``topk``, a gate call) that ``getitem`` unpacks."""
    value = meta_value(node)
    if value is not None:
        return isinstance(value, (tuple, list))
    return node.op != "placeholder" and bool(node.users) and all(
        u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users)


def constant_numel(node: fx.Node, root: nn.Module | None) -> int:
    """Elements in a parameter node (0 when unknown)."""
    value = meta_value(node)
    if isinstance(value, torch.Tensor):
        return value.numel()
    if node.op == "get_attr" and root is not None:
        try:
            attr = _get_attr(root, node.target)
        except AttributeError:
            return 0
        return attr.numel() if isinstance(attr, torch.Tensor) else 0
    return 0


def _get_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _get_submodule(root: nn.Module, target: str) -> nn.Module | None:
    try:
        return root.get_submodule(target)
    except AttributeError:
        return None


def constant_leaves(node: fx.Node) -> list[fx.Node]:
    """The parameters/buffers a constant-derived value (``W``, ``W.T``, ``W.view(...)``) is made of."""
    if is_constant(node):
        return [node]
    return [leaf for arg in node.all_input_nodes if not is_shape_query(arg) for leaf in constant_leaves(arg)]


def node_weight(node: fx.Node, root: nn.Module | None, constants: set[fx.Node]) -> int:
    """Parameter elements a compute node uses (also through ``W.T``): a proxy for its cost that needs no shapes."""
    if node.op == "call_module" and root is not None:
        mod = _get_submodule(root, node.target)
        return sum(p.numel() for p in mod.parameters()) if mod is not None else 0
    leaves = {leaf for arg in node.all_input_nodes if arg in constants for leaf in constant_leaves(arg)}
    return sum(constant_numel(leaf, root) for leaf in leaves)


def compute_depth(nodes: Iterable[fx.Node], root: nn.Module | None) -> int:
    """Longest chain of parametric-compute nodes inside ``nodes`` (which are in topological order)."""
    nodes = list(nodes)
    inside = set(nodes)
    depth: dict[fx.Node, int] = {}
    for node in nodes:
        best = max((depth[a] for a in node.all_input_nodes if a in inside), default=0)
        depth[node] = best + (1 if is_compute(node, root) else 0)
    return max(depth.values(), default=0)

