"""The convergence benchmark's configurations: names -> what DropBP runs with, and the learning-rate schedule
every configuration shares (``benchmarks/convergence.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass


MODIFIERS = {  # "+name" suffix -> what it changes (DropBP options, or the calibration schedule)
    "up": {"schedule": "ramp_up"}, "down": {"schedule": "ramp_down"}, "updown": {"schedule": "ramp_up_down"},
    "zero": {"optimizer_mode": "zero"}, "lr": {"optimizer_mode": "lr_scale"}, "recal": {"recalibrate": True},
}


@dataclass(frozen=True)
class Config:
    """One configuration: ``baseline``, ``{sensitivity,uniform}_p<rate>[+modifier...]`` or ``auto[+modifier...]``
    (modifiers: ``MODIFIERS``), or a name of ``NAMED``."""
    name: str
    kind: str  # baseline | sensitivity | uniform | auto
    rate: float
    options: tuple = ()  # DropBP options, (key, value) pairs
    recalibrate: bool = False


# the configuration the measurements recommend: the 2026-12-07 screen (python -m benchmarks.convergence --screen
# --tasks classify,mlm, 2 seeds at 128 tokens; benchmarks/results/convergence-screen.md) put auto+lr closest to
# the baseline's time to target on both tasks, and the final 5-seed run (benchmarks/results/convergence.md) has
# it best or tied on all three; it is the callbacks' default (dropbp_fx.config.RECOMMENDED, which names the same
# two options: a test keeps them equal)
NAMED = {"recommended": "auto+lr"}


def parse_config(name: str) -> Config:
    """``"sensitivity_p0.5+lr"`` -> ``Config("sensitivity_p0.5+lr", "sensitivity", 0.5, (("optimizer_mode",
    "lr_scale"),))``; ``"baseline"`` -> kind ``"baseline"``, rate 0."""
    if name == "baseline":
        return Config(name, "baseline", 0.0)
    head, *mods = NAMED.get(name, name).split("+")
    unknown = [m for m in mods if m not in MODIFIERS]
    if unknown:
        raise ValueError(f"configuration {name!r}: unknown modifier(s) {unknown}; choose from {sorted(MODIFIERS)}")
    if head == "auto":
        kind, p = "auto", 0.5
    else:
        kind, _, rate = head.partition("_p")
        if kind not in ("sensitivity", "uniform") or not rate:
            raise ValueError(f"configuration {name!r}: not 'baseline', 'auto[+...]', one of {sorted(NAMED)} nor "
                             "'{sensitivity,uniform}_p<rate>[+modifier...]'")
        p = float(rate)
        if not 0 < p < 1:
            raise ValueError(f"configuration {name!r}: the rate must be in (0, 1)")
    options, recal = {}, False
    for m in mods:
        change = dict(MODIFIERS[m])
        recal = recal or change.pop("recalibrate", False)
        options.update(change)
    return Config(name, kind, p, tuple(sorted(options.items())), recal)


def lr_lambda(sizes):
    """``sizes`` (a ``convergence.TaskSizes``): linear warm-up, then cosine decay to 10% of the peak at the
    baseline's last step, constant after; the same for every configuration, in steps."""
    warm, total = max(1, sizes.warmup), sizes.steps

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        done = min(1.0, (step - warm) / max(1, total - warm))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))
    return f
