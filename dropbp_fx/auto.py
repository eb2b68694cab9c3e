"""``target="auto"``: the drop rate chosen from what the run measures.

At each calibration (``CalibrationSchedule(..., target="auto")``, the callbacks' ``drop_rate="auto"``) the rule
picks the target that maximises the estimated training progress per second,

    progress(t) / time(t),   t on a grid from ``floor`` to ``ceiling`` (step 0.05),
    progress(t) = (1 - S(t)) ** GAMMA,

and applies the rates the allocator gives for it. Both factors come from measurements of this run:

* ``S(t) = sum_i p_i(t) C_i / sum_i C_i``: the share of the gradient change the branches carry that a step
  loses in expectation, ``C_i`` the sensitivities just measured, ``p_i(t)`` the allocated rates; ``GAMMA`` = 0.5
  is the rule's one assumption: a step's progress grows like the square root of the gradient signal it keeps
  (with ``GAMMA`` = 1 no rate above 0 can pay for itself unless dropping saves more than the share of step time
  it costs in signal; with 0.5, dropping pays once branch backward is more than half of a step, as measured
  for MiniLM at 128 tokens);
* ``time(t) = a - b * D(t)``: the step time, ``D(t) = sum_i p_i(t) B_i`` the backward FLOPs dropped per step,
  ``a, b`` a least-squares line through the (dropped FLOPs, seconds) of the training steps seen so far (the
  controller records both for every step; before the calibration the schedule is uniform at ``ceiling``
  rates' varying masks, and the ``topup`` policy varies the dropped FLOPs). Without enough spread in the data
  (fewer than 4 steps, or no slope) ``b`` falls back to the FLOPs model: ``a`` the median step time,
  ``b = a * (backward share of branch FLOPs) / sum_i B_i`` with ``backward share`` = 2/3.

The choice is deterministic given the seed and the measurements (the same sensitivities and step times give
the same target). What it does not see: how progress per step depends on the rate beyond the gradient-change
share (noise, the optimizer); the convergence benchmark measures how far that matters.
"""

from __future__ import annotations

import statistics

GRID_STEP = 0.05
GAMMA = 0.5


def step_time_line(samples: list[tuple[float, float]], total_bwd: float) -> tuple[float, float]:
    """``(a, b)`` of ``seconds = a - b * dropped_bwd_flops`` from ``(dropped_bwd_flops, seconds)`` samples."""
    times = sorted(s for _, s in samples)
    if not times:
        return 1.0, 2.0 / 3.0 / max(total_bwd, 1.0)
    median = times[len(times) // 2]
    kept = [(d, s) for d, s in samples if s <= 3 * median]  # compiles and other one-off stalls
    fallback = median, median * (2.0 / 3.0) / max(total_bwd, 1.0)
    if len(kept) < 4:
        return fallback
    xs, ys = [d for d, _ in kept], [s for _, s in kept]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return fallback
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if slope >= 0:  # dropping did not make steps faster in what was seen: trust the FLOPs model
        return fallback
    return my - slope * mx, -slope


def choose_target(sens: list[float], flops: list[float], samples: list[tuple[float, float]], allocate,
                  floor: float = 0.0, ceiling: float = 0.9) -> tuple[float, list[float], dict]:
    """The target (and its rates) of the largest estimated progress per second; also the table it chose from."""
    total_sens = sum(sens) or 1.0
    a, b = step_time_line(samples, sum(flops))
    best, table = None, {}
    steps = int(round((ceiling - floor) / GRID_STEP))
    for k in range(steps + 1):
        t = round(floor + k * GRID_STEP, 6)
        rates = allocate(t)
        progress = max(0.0, 1.0 - sum(p * c for p, c in zip(rates, sens)) / total_sens) ** GAMMA
        seconds = max(1e-9, a - b * sum(p * f for p, f in zip(rates, flops)))
        table[t] = progress / seconds
        if best is None or table[t] > table[best[0]] * (1 + 1e-12):
            best = (t, rates)
    return best[0], best[1], {"a": a, "b": b, "progress_per_s": table}
