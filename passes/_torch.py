"""Every private torch name the passes use, in one place: a torch upgrade shows its breakage here.

Each name has a ``# why:`` comment: what it is needed for, and the public replacement where one exists (used
instead wherever it works: ``F.linear`` for ``torch._C._nn.linear``, the same function). This module must not
import ``dropbp_fx`` (the passes are pure FX). ``tests/test_private_torch.py`` checks that no other pass module
uses a private torch name, and that each name here has its reason.
"""

from __future__ import annotations

import torch

# why: nested outputs flattened (segments' outputs, flops' values); no public pytree module in torch 2.6-2.13
from torch.utils import _pytree as pytree  # noqa: E402

# why: FLOPs counted on fake tensors (FakeTensorMode); no public class
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

# why: the FLOP counter is a dispatch mode; no public base class (``torch.utils.flop_counter`` uses this one too)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# why: a higher-order op node (``invoke_subgraph``, ``flex_attention``); no public class
HigherOrderOperator = torch._ops.HigherOrderOperator

# why: an op's packet (``torch.ops.<namespace>.<op>``), to tell custom ops; no public class
OpOverloadPacket = torch._ops.OpOverloadPacket

# why: transformers' MoE experts call ``torch._grouped_mm`` (public ``F.grouped_mm`` where torch has it, counted
# as well); None where this torch lacks it
torch_grouped_mm = getattr(torch, "_grouped_mm", None)


# why: a graph module copied onto fake tensors (FLOPs of a graph that reads data); no public API
def deepcopy_to_fake_tensor(gm, mode):
    from torch._dynamo.utils import deepcopy_to_fake_tensor as copy

    return copy(gm, mode)


# why: the tensor a view was taken of (``Tensor._base``); no public accessor
def tensor_base(t):
    return t._base


# why: ``namespace::name`` of an op packet (``_qualified_op_name``); no public accessor (``str(op)`` differs)
def op_qualified_name(packet, default=None):
    return getattr(packet, "_qualified_op_name", default)
