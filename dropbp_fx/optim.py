"""How a dropped branch's parameters meet the optimizer (``optimizer_mode``).

A dropped branch's parameters get no gradient that step (``.grad`` stays ``None``). What the optimizer then
does depends on it, and on the mode, set once with the other options and applied by the step hooks of the
optimizer given to :meth:`dropbp_fx.DropBP.attach_optimizer` (the Trainer and Lightning callbacks attach
theirs):

* ``"none"`` (no hook): ``torch.optim`` skips a parameter whose ``.grad`` is ``None``. A branch dropped at
  rate ``p`` gets ``1 - p`` of the updates; AdamW neither moves its moments nor decays its weights on the
  other steps; SGD with momentum leaves its buffer as it is.
* ``"zero"``: before the step, every gated parameter that trains and has no gradient gets a zero one. AdamW
  then decays its weights and its moments every step and keeps moving it with its first moment (an update of
  ``lr * m / (sqrt(v) + eps)`` with ``m`` and ``v`` decaying); plain SGD only applies weight decay; SGD
  with momentum keeps moving it with its buffer.
* ``"lr_scale"``: a kept branch's update is scaled by ``min(cap, 1 / (1 - p_i))``, ``p_i`` its rate at this
  step (schedule and calibration included), so that the distance it travels over training matches plain
  training's in expectation (FreezeOut's rule). Done by moving each such parameter to
  ``old + scale * (new - old)`` after the step: exact for any optimizer whose update is linear in the learning
  rate (SGD, SGD with momentum, Adam, AdamW: weight decay included), and blind to LR schedulers, which keep
  working on the param groups. Costs one copy of the kept gated parameters per step.

With gradient accumulation, a parameter counts as dropped when no micro-step gave it a gradient.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class OptimizerLink:
    """The step hooks that put one :class:`~dropbp_fx.DropBP`'s mode into one optimizer."""

    def __init__(self, dbp, optimizer: torch.optim.Optimizer, mode: str, cap: float) -> None:
        self.dbp, self.optimizer, self.mode, self.cap = dbp, optimizer, mode, cap
        self._before: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self._members: tuple | None = None  # ((gates, gate params) seen, [(parameter, gate slot)])
        self.scaled_steps = 0  # steps at which lr_scale moved a parameter (a test reads it)
        self._handles = []
        if mode != "none":
            self._handles.append(optimizer.register_step_pre_hook(self._pre))
        if mode == "lr_scale":
            self._handles.append(optimizer.register_step_post_hook(self._post))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _gated(self) -> list[tuple[torch.Tensor, float]]:
        """(parameter, its gate's rate at the current step) for every trainable parameter of a gated branch that
        this optimizer holds. Which parameters those are is worked out again only when gates or parameters were
        added (a recompile); per step only the rates are read."""
        model = self.dbp.model()
        controller = self.dbp.controller
        if model is None or not controller.gates:
            return []
        key = (len(controller.gates), len(controller.gate_params))
        if self._members is None or self._members[0] != key:
            by_name = dict(model.named_parameters())
            owned = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            members, seen = [], set()
            for slot, gate in enumerate(controller.gates):
                for name in sorted(gate.params):
                    p = by_name.get(name)
                    if p is not None and p.requires_grad and id(p) in owned and id(p) not in seen:
                        seen.add(id(p))
                        members.append((p, slot))
            self._members = (key, members)
        rates = controller.rates_at(max(0, controller.step - 1))
        return [(p, rates[slot]) for p, slot in self._members[1]]

    def _pre(self, optimizer, args, kwargs) -> None:
        gated = self._gated()
        if self.mode == "zero":
            for p, _ in gated:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        elif self.mode == "lr_scale":
            self._before = [(p, p.detach().clone(), min(self.cap, 1.0 / (1.0 - rate)))
                            for p, rate in gated if p.grad is not None and rate > 0.0]

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        for p, old, scale in self._before:
            p.copy_(old.lerp_(p, scale))  # old + scale * (new - old)
        if self._before:
            self.scaled_steps += 1
        self._before = []
