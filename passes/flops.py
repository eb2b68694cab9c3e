"""FLOPs of a graph piece, counted on the graph itself.

The piece runs once on fake tensors (shapes only, no data, no memory) under
``torch.utils.flop_counter.FlopCounterMode``: the forward pass, then a backward
pass from every output that requires grad. Matmuls, convolutions and attention
are counted (with their sequence-length terms); norms and pointwise ops count 0.

Backward FLOPs depend on what trains: a frozen weight (LoRA's base layers) costs
no weight gradient, so its backward is about half that of a trained one.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from . import graph_view as gv
from ._torch import FakeTensorMode, TorchDispatchMode, deepcopy_to_fake_tensor, op_qualified_name, pytree, tensor_base

aten = torch.ops.aten
log = logging.getLogger("dropbp_fx.passes")


def _cpu_flash(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _prod(shape) -> int:
    return math.prod(int(s) for s in shape)


def _grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``aten._grouped_mm`` (MoE experts in transformers 5): tokens ``(S, K)`` x experts ``(G, K, N)``,
    batched ``(G, M, K)`` x ``(G, K, N)``, or the weight gradient ``(K, S)`` x ``(S, N)`` split by ``offs``
    into ``(G, K, N)``: every output element is one dot product over the contracted dimension."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * _prod(a_shape) * int(b_shape[1])
    return 2 * _prod(out_shape) * int(a_shape[-1])


def _grouped_mm_fallback(input_shape, weight_shape, *args, **kwargs) -> int:
    """transformers' ``grouped_mm_fallback(input (S, K), weight (G, K, N), offs)``."""
    return 2 * _prod(input_shape) * int(weight_shape[-1])


def _grouped_mm_fallback_backward(input_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * _grouped_mm_fallback(input_shape, weight_shape)  # input and weight gradients


def _matmul_4bit(a_shape, b_shape, shape_b, *args, **kwargs) -> int:
    """bitsandbytes' ``gemm_4bit``/``gemv_4bit(A, B_packed, shapeB=[N, K], ...)``: the dense matmul of the
    dequantized ``(N, K)`` weight (``B`` holds two 4-bit values a byte, so its own shape is not the matmul's)."""
    return 2 * _prod(a_shape[:-1]) * _prod(shape_b)


def _int8_matmul(a_shape, b_shape, *args, **kwargs) -> int:
    """bitsandbytes' ``int8_linear_matmul``/``int8_scaled_mm(A, B (N, K), ...)``."""
    return 2 * _prod(a_shape) * int(b_shape[0])


def _int8_mixed(a_shape, ca_shape, cb_shape, *args, **kwargs) -> int:
    return _int8_matmul(ca_shape, cb_shape)


def _library_formulas() -> dict:
    """Formulas for the kernels of libraries users bring, where that library is loaded."""
    formulas = {}
    for namespace, name, formula in (
            ("transformers", "grouped_mm_fallback", _grouped_mm_fallback),
            ("transformers", "grouped_mm_fallback_backward", _grouped_mm_fallback_backward),
            ("bitsandbytes", "gemm_4bit", _matmul_4bit), ("bitsandbytes", "gemv_4bit", _matmul_4bit),
            ("bitsandbytes", "int8_linear_matmul", _int8_matmul), ("bitsandbytes", "int8_scaled_mm", _int8_matmul),
            ("bitsandbytes", "int8_mixed_scaled_mm", _int8_mixed)):
        packet = getattr(getattr(torch.ops, namespace), name, None)  # None until the library is imported
        if packet is not None:
            formulas[packet] = formula
    return formulas


# torch counts the CUDA attention kernels; the CPU flash kernel (what SDPA runs here) is added, with the
# grouped matmul of MoE experts, which torch has no formula for.
_EXTRA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
    aten._grouped_mm: _grouped_mm,
}


def _fake_like(mode: FakeTensorMode, value):
    if not isinstance(value, torch.Tensor):
        return value
    with mode:
        fake = torch.empty_strided(tuple(value.shape), tuple(value.stride()), dtype=value.dtype,
                                   device=value.device)
    return fake.requires_grad_(value.requires_grad) if value.is_floating_point() else fake


def count_flops(gm: fx.GraphModule, example_inputs) -> tuple[int, int]:
    """``(forward FLOPs, backward FLOPs)`` of one call of ``gm`` on inputs shaped like ``example_inputs``.

    ``example_inputs`` may be real or fake tensors (for example the ``example_value`` metadata of the
    nodes that feed ``gm``); neither they nor ``gm``'s own weights are run on or modified (a fake copy is).
    A kernel with no formula that reads a weight is estimated (:class:`_Estimates`), never counted as 0.
    """
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    reads_data = any((n.op == "call_method" and n.target == "item") or
                     (n.op == "call_function" and getattr(n.target, "__name__", "") == "_local_scalar_dense")
                     for n in gm.graph.nodes)
    # a shape env of its own lets ``.item()`` run (an unbacked int); only then: it would not know the graph's symbols
    mode = FakeTensorMode(allow_non_fake_inputs=False, shape_env=ShapeEnv() if reads_data else None)
    args = [pytree.tree_map(lambda v: _fake_like(mode, v), v) for v in example_inputs]  # tuples of tensors too
    if any(True for _ in gm.parameters()) or any(True for _ in gm.buffers()):  # symbolic_trace: weights inside
        gm = deepcopy_to_fake_tensor(gm, mode)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights = [a for n, a in zip(placeholders, args) if isinstance(a, torch.Tensor) and gv.is_constant(n)]
    weights += list(gm.parameters()) + list(gm.buffers())
    formulas = {**_EXTRA_FORMULAS, **_library_formulas()}
    vmapped = [n for n in gm.graph.nodes if getattr(n.target, "__name__", None) == "_vmap_increment_nesting"]
    if vmapped:  # a vmap Dynamo inlined: under the counter's modes it fails inside, leaving its level pushed
        return _weight_estimate(gm, placeholders, args, "the branch runs torch.func.vmap, inlined by Dynamo")
    try:
        with mode, FlopCounterMode(display=False, custom_mapping=formulas) as counter, \
                _Estimates(set(counter.flop_registry), weights) as estimates:
            outputs = gm(*args)
            forward = counter.get_total_flops() + estimates.flops
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            grads = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
            if grads:
                torch.autograd.backward(grads, [torch.ones_like(o) for o in grads])
            total = counter.get_total_flops() + estimates.flops
    except Exception as error:  # a kernel that cannot run on fake tensors under a dispatch mode
        return _weight_estimate(gm, placeholders, args, error)
    return forward, total - forward


def _weight_estimate(gm: fx.GraphModule, placeholders, args, error) -> tuple[int, int]:
    """When the graph cannot run under the counter (a higher-order op such as ``associative_scan`` that
    refuses the dispatch mode): every weight read by a compute node as a dense matmul, ``2 x weight elements x
    rows`` forward, twice that backward for weights that train. Logged, never a silent zero."""
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    value = dict(zip(placeholders, args))
    data = [a for n, a in value.items() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() >= 1
            and not gv.is_constant(n)]
    # hints, not ``int()``: reading a symbolic size as an int would guard on it in Dynamo's shape env (a recompile)
    rows = optimization_hint(data[0].numel() // data[0].shape[-1], fallback=1) if data else 1
    forward = backward = 0
    for node in gm.graph.nodes:
        if not gv.is_compute(node, gm):
            continue
        for arg in node.all_input_nodes:
            weight = value.get(arg) if arg.op == "placeholder" and gv.is_constant(arg) else None
            if weight is None and arg.op == "get_attr":
                weight = getattr(gm, arg.target, None)
            if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
                flops = 2 * optimization_hint(weight.numel(), fallback=0) * max(int(rows), 1)
                forward += flops
                backward += 2 * flops if weight.requires_grad else flops
    why = error if isinstance(error, str) else f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
    log.warning("dropbp: FLOPs of a branch could not be counted on fake tensors (%s); estimated from its weights "
                "as 2 x weight elements x rows: %d forward, %d backward", why, forward, backward)
    return forward, backward


class _Estimates(TorchDispatchMode):
    """Kernels with no FLOP formula that read a weight (a ``torch.library`` op, a library's fused matmul):
    estimated as ``2 x weight elements x rows``, the dense matmul of the weight with the rows of the
    first floating-point input, and logged once per kernel. Weight-free kernels (a custom activation)
    count 0, as torch's own pointwise ops do.
    """

    def __init__(self, registry: set, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.registry, self.weights, self.flops = registry, {id(w) for w in weights}, 0

    def _is_weight(self, t: torch.Tensor) -> bool:
        while t is not None:
            if id(t) in self.weights:
                return True
            t = tensor_base(t)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = getattr(func, "overloadpacket", None)
        if packet is None or packet in self.registry or op_qualified_name(packet).split("::")[0] in _TORCH_NAMESPACES:
            return out
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        weights = [t for t in tensors if t.dim() >= 2 and self._is_weight(t)]
        data = [t for t in tensors if t.is_floating_point() and t.dim() >= 1 and not self._is_weight(t)]
        if weights and data:
            weight = max(weights, key=lambda t: t.numel())
            rows = data[0].numel() // max(int(data[0].shape[-1]), 1)
            estimate = 2 * int(weight.numel()) * int(rows)
            self.flops += estimate
            if packet not in _LOGGED:
                _LOGGED.add(packet)
                log.info("dropbp: no FLOP formula for %s, which reads a %s weight: counted as 2 x weight elements "
                         "x rows (%d FLOPs here); register one with torch.utils.flop_counter.register_flop_formula",
                         op_qualified_name(packet), tuple(weight.shape), estimate)
        return out


_TORCH_NAMESPACES = ("aten", "prims", "prim", "_c10d_functional", "c10d_functional", "profiler", "inductor")
_LOGGED: set = set()
