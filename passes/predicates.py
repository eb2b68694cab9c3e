"""What a node's value is, in every FX dialect: a constant, metadata (a shape, a dtype), data a gradient can flow
through; and whether the op writes into its first input.

A leaf of the passes: :mod:`.data_flow` builds its data-flow graph from these, and :mod:`.graph_view` (the rest of
the op vocabulary) uses and re-exports them. It imports no other module of the passes.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
from torch import nn

aten = torch.ops.aten


def packet(target):
    """The overload packet of an aten overload (``aten.add`` for ``aten.add.Tensor``), else None."""
    return getattr(target, "overloadpacket", None)


def meta_value(node: fx.Node):
    """The traced value of ``node`` (a fake tensor, a SymInt, a tuple of them), or None: Dynamo's ``example_value``
    first (it keeps what ``.item()`` of a dynamic float returns), else the ``val`` of ``FakeTensorProp``/export."""
    return node.meta.get("example_value", node.meta.get("val"))


# ---------------------------------------------------------------------------
# in-place ops
# ---------------------------------------------------------------------------
def mutates_first_arg(node: fx.Node) -> bool:
    """``x.mul_(...)``, ``operator.iadd``, ``aten.*_`` overloads: the node writes into its first input."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__") or node.target.startswith("__i")
    if node.op == "call_function":
        # ``x[idx] = v`` (``operator.setitem``) writes into ``x`` too: transformers' MoE experts build the
        # inverse permutation that way; unseen, the write is left outside the branch that reads ``x``.
        if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem):
            return True
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.arguments:
            info = schema.arguments[0].alias_info
            return bool(info is not None and info.is_write)
    return False


# ---------------------------------------------------------------------------
# constants (parameters, buffers) and non-data values (shapes, dtypes)
# ---------------------------------------------------------------------------
_SHAPE_METHODS = {"size", "dim", "numel", "stride", "nelement", "ndimension", "get_device", "is_contiguous"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_SHAPE_ATEN = {aten.sym_size, aten.sym_numel, aten.sym_stride, aten.sym_storage_offset}
_DYNAMO_CONSTANT = re.compile(r"_(parameters|buffers)_")
_COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "argmax",
                "argmin", "long", "int", "bool"}
_COMPARISON_FUNCTIONS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge}


def carries_grad(node: fx.Node) -> bool:
    """Can a gradient flow through ``node``'s value: a floating-point (or complex) tensor, a tuple holding one.
    Integer and boolean tensors (token ids, ``ids != pad``, a comparison) cannot. With no traced value
    (``symbolic_trace``), what the op is: a comparison, ``argmax``, ``.long()`` cannot; anything else may."""
    value = meta_value(node)
    values = value if isinstance(value, (tuple, list)) else (value,)
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if tensors:
        return any(t.is_floating_point() or t.is_complex() for t in tensors)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return value is not None or not (node.target in _COMPARISON_FUNCTIONS or
                                     (node.op in ("call_method", "call_function") and name in _COMPARISONS))


def is_shape_query(node: fx.Node) -> bool:
    """A node whose value is metadata of a tensor (size, dtype, ...), not data derived from it."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS:
            return True
        if packet(node.target) in _SHAPE_ATEN:
            return True
    if reads_data(node):  # ``h.sum().item()``: a symbolic int whose value depends on the data of ``h``
        return False
    value = meta_value(node)
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, torch.Size, torch.dtype, torch.device))


# Operands an op reads only the metadata of (shape, dtype): ``bias.expand_as(x)`` (GPT-NeoX-Japanese's attention
# bias), ``w.view_as(x)``, ``y.type_as(x)``. No gradient flows into them, so they are no data edge:
# ``bias.expand_as(residual)`` is a bias, not a value of the stream. (Factories such as ``x.new_ones(n)`` keep
# their edge: the fresh buffer belongs with the values written into it.)
_METADATA_OPERAND_METHODS = {"expand_as": 1, "view_as": 1, "reshape_as": 1, "type_as": 1}


def reads_only_metadata(user: fx.Node, arg: fx.Node) -> bool:
    """Does ``user`` read nothing of ``arg`` but its metadata (every place ``arg`` appears in its arguments)?"""
    if not (user.op == "call_method" and user.target in _METADATA_OPERAND_METHODS):
        return False
    places = [i for i, a in enumerate(user.args) if a is arg]
    return places == [_METADATA_OPERAND_METHODS[user.target]] and arg not in user.kwargs.values()


def reads_data(node: fx.Node) -> bool:
    """``.item()``, ``.tolist()``, ``aten._local_scalar_dense``: a Python value read from a tensor's data."""
    if node.op == "call_method":
        return node.target in ("item", "tolist")
    return node.op == "call_function" and packet(node.target) is aten._local_scalar_dense


def is_constant(node: fx.Node) -> bool:
    """A parameter or buffer: ``get_attr``, or a Dynamo placeholder for ``L['self']...parameters/buffers``."""
    if node.op == "get_attr":
        return True
    if node.op == "placeholder":
        if isinstance(meta_value(node), nn.Parameter):
            return True
        grapharg = node.meta.get("grapharg")
        if grapharg is not None and isinstance(getattr(grapharg, "example", None), nn.Parameter):
            return True
        return bool(_DYNAMO_CONSTANT.search(str(node.target)))
    return False
