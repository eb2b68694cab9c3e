"""What a calibration reads during one backward pass: per gate, the squared norm of the gradient that
flows into the residual stream through the branch (``"in"``) and of the gradient the stream carries at
the add (``"out"``). The gate applies :func:`record_grad` to its stream argument and its output while
``controller.recording()`` is on; otherwise nothing of this runs."""

from __future__ import annotations

from collections import defaultdict

import torch


class ProbeRecorder:
    """Squared gradient norms per ``(gate slot, side)``; records only while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.sums: dict[tuple[int, str], float] = defaultdict(float)

    def add(self, slot: int, side: str, grad: torch.Tensor) -> None:
        self.sums[(slot, side)] += float(grad.detach().float().pow(2).sum())

    def reset(self) -> None:
        self.sums.clear()


class _Record(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, recorder, slot, side):
        ctx.info = (recorder, slot, side)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        recorder, slot, side = ctx.info
        recorder.add(slot, side, grad)
        return grad, None, None, None


def record_grad(x, recorder: ProbeRecorder, slot: int, side: str):
    """``x``, with the squared norm of its gradient added to ``recorder`` at ``(slot, side)`` in backward."""
    if not isinstance(x, torch.Tensor) or not x.requires_grad:
        return x
    return _Record.apply(x, recorder, slot, side)
