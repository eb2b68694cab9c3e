"""Time to target: when a run's smoothed curve first reaches a quality.

One rule for the demo (a run's per-step train loss against the baseline's final one) and the convergence benchmark
(``benchmarks/convergence_report.py``: eval curves against the baseline's last smoothed value).
"""

from __future__ import annotations

import math


def smoothed(values: list[float], window: int, partial: bool = False) -> list[float | None]:
    """Trailing mean over ``window`` values. Before the ``window``-th value: None, or with ``partial`` the mean of
    the values so far."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return [math.fsum(values[max(0, i + 1 - window):i + 1]) / min(window, i + 1) if partial or i + 1 >= window
            else None for i in range(len(values))]


def at_least_as_good(value: float, target: float, higher_is_better: bool) -> bool:
    return value >= target if higher_is_better else value <= target


def time_to_target(clock: list[float], values: list[float], target: float, higher_is_better: bool, window: int,
                   partial: bool = False) -> float | None:
    """The clock of the first value whose smoothed value (:func:`smoothed`) reaches ``target``; None if none does.

    ``values`` may begin before the clock (the demo's warm-up steps, which are off it): the first
    ``len(values) - len(clock)`` count in the means, never as a time.
    """
    off_clock = len(values) - len(clock)
    if off_clock < 0:
        raise ValueError(f"{len(values)} values for {len(clock)} clock readings")
    for t, v in zip(clock, smoothed(values, window, partial)[off_clock:]):
        if v is not None and at_least_as_good(v, target, higher_is_better):
            return t
    return None
