"""The runtime op of :mod:`passes.instrument`: an identity that, while a calibration records,
adds the squared norm of the gradient passing through it to a per-gate total."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


class ProbeRecorder:
    """Squared gradient norms per ``(gate slot, side)``; records only while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.sums: dict[tuple[int, str], float] = defaultdict(float)

    def add(self, slot: int | None, side: str, grad: torch.Tensor) -> None:
        if slot is not None:
            self.sums[(slot, side)] += float(grad.detach().float().pow(2).sum())

    def reset(self) -> None:
        self.sums.clear()


class _Record(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ticket, side, recorder):
        ctx.info = (ticket, side, recorder)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ticket, side, recorder = ctx.info
        recorder.add(ticket[0], side, grad)
        return grad, None, None, None


class Probe(nn.Module):
    """Identity on a gate's stream input (``side="in"``) or branch output (``side="out"``)."""

    def __init__(self, gate: nn.Module, side: str, recorder: ProbeRecorder) -> None:
        super().__init__()
        self.side = side
        self.recorder = recorder
        object.__setattr__(self, "gate", gate)  # a reference, not a submodule

    def forward(self, x):
        if not self.recorder.active or not torch.is_grad_enabled() or not x.requires_grad:
            return x
        if self.side == "in":  # the gate is called next: it fills in its slot (layer-frame gates vary)
            ticket = [None]
            self.gate.ticket = ticket
        else:
            ticket = [self.gate.last_slot]
        return _Record.apply(x, ticket, self.side, self.recorder)
