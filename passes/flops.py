"""FLOPs of a graph piece, counted on the graph itself.

The piece runs once on fake tensors (shapes only, no data, no memory) under
``torch.utils.flop_counter.FlopCounterMode``: the forward pass, then a backward
pass from every output that requires grad. Matmuls, convolutions and attention
are counted (with their sequence-length terms); norms and pointwise ops count 0.

Backward FLOPs depend on what trains: a frozen weight (LoRA's base layers) costs
no weight gradient, so its backward is about half that of a trained one.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_flash(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels; the CPU flash kernel (what SDPA runs here) is added.
_EXTRA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
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
    """
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    args = [_fake_like(mode, v) for v in example_inputs]
    if any(True for _ in gm.parameters()) or any(True for _ in gm.buffers()):  # symbolic_trace: weights inside
        from torch._dynamo.utils import deepcopy_to_fake_tensor

        gm = deepcopy_to_fake_tensor(gm, mode)
    with mode, FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        outputs = gm(*args)
        forward = counter.get_total_flops()
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        grads = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
        if grads:
            torch.autograd.backward(grads, [torch.ones_like(o) for o in grads])
        total = counter.get_total_flops()
    return forward, total - forward
