"""Drop schedules: the rate as a function of the training step.

A schedule is a multiplier ``m(step)`` in ``[0, 1]``-ish; gate ``i`` drops at step ``t`` with rate

    clip(rate_i * m(t), min_rate, max_rate)        (a gate whose rate_i is 0 stays open)

where ``rate_i`` is its uniform or calibrated rate. Masks stay a pure function of (seed, step, gate, rates,
schedule). Named schedules (``total_steps`` = T, ``ramp`` = r, a fraction of T):

* ``"constant"``: ``m = 1`` (the published DropBP);
* ``"ramp_up"``: Progressive Layer Dropping's shape, ``m = 1 - exp(-5 t / (r T))`` (95% of the rate after
  ``0.6 r T`` steps): early steps, where every update counts most, train the whole network;
* ``"ramp_down"``: ``m = 1`` until ``(1 - r) T``, then linearly to 0 at ``T``: the last steps train everything,
  so the run ends where plain training would;
* ``"ramp_up_down"``: both;
* a callable ``step -> multiplier`` (saved by its qualified name; a resumed run passes the same callable).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

NAMED = ("constant", "ramp_up", "ramp_down", "ramp_up_down")


def check_schedule(key: str, value) -> None:
    if not (callable(value) or value in NAMED):
        raise ValueError(f"{key} must be one of {NAMED} or a callable step -> rate multiplier, got {value!r}")


def _up(t: int, total: int, ramp: float) -> float:
    return 1.0 - math.exp(-5.0 * t / max(1.0, ramp * total))


def _down(t: int, total: int, ramp: float) -> float:
    start = (1.0 - ramp) * total
    return 1.0 if t < start else max(0.0, (total - t) / max(1.0, total - start))


@dataclass
class Schedule:
    """One model's schedule (owned by its :class:`~dropbp_fx.controller.DropController`)."""

    kind: str | Callable = "constant"
    total_steps: int | None = None  # needed by the ramps; the Trainer and Lightning callbacks set max_steps
    ramp: float = 0.2
    min_rate: float = 0.0
    max_rate: float = 0.95

    @property
    def needs_total(self) -> bool:
        return isinstance(self.kind, str) and self.kind != "constant"

    def multiplier(self, step: int) -> float:
        if callable(self.kind):
            return float(self.kind(step))
        if self.kind == "constant":
            return 1.0
        if self.total_steps is None:
            raise ValueError(f"dropbp: schedule {self.kind!r} needs the run's length: pass total_steps=N (the "
                             "optimizer steps of the run) with the other options, or train with the Trainer / "
                             "Lightning callback, which sets it from max_steps")
        m = 1.0
        if self.kind in ("ramp_up", "ramp_up_down"):
            m *= _up(step, self.total_steps, self.ramp)
        if self.kind in ("ramp_down", "ramp_up_down"):
            m *= _down(step, self.total_steps, self.ramp)
        return m

    def rate(self, base: float, step: int) -> float:
        """The rate of a gate whose uniform or calibrated rate is ``base``, at ``step``."""
        if base <= 0.0:
            return 0.0
        if self.kind == "constant":
            return base
        return min(self.max_rate, max(self.min_rate, base * self.multiplier(step)))

    def state_dict(self) -> dict:
        kind = self.kind if isinstance(self.kind, str) else f"callable:{getattr(self.kind, '__qualname__', '?')}"
        return {"kind": kind, "total_steps": self.total_steps, "ramp": self.ramp, "min_rate": self.min_rate,
                "max_rate": self.max_rate}

    def load_state_dict(self, state: dict) -> None:
        kind = state["kind"]
        if kind.startswith("callable:"):
            if not callable(self.kind):
                raise ValueError(f"dropbp: the saved run's schedule was the callable {kind[9:]!r}; pass the same "
                                 "callable as schedule=... to the run that loads the state")
        else:
            self.kind = kind
        self.total_steps = state["total_steps"]
        self.ramp, self.min_rate, self.max_rate = float(state["ramp"]), float(state["min_rate"]), float(state["max_rate"])
