"""Per-gate drop rates from per-gate sensitivities and backward FLOPs.

DropBP calibrates once: it measures each gated branch's *sensitivity* ``C_i`` (the squared change of
the parameter gradients when that branch alone is dropped) and takes each branch's backward FLOPs
``F_i``, then spends a FLOPs budget on drop rates ``p_i``. The budget is the published one: the
kept backward FLOPs ``sum_i (1 - p_i) * F_i`` may be at most ``(1 - target) * sum_i F_i``, i.e. the
FLOPs-weighted average drop rate ``sum_i p_i F_i / sum_i F_i`` must be at least ``target``.

Two allocators (``allocate_rates(..., method=...)``):

``"greedy"``, the published rule
    Every rate starts at its ``min_rate``. While the kept FLOPs exceed the budget, the rate of the
    gate whose next increase costs the least sensitivity grows by ``step``: the gate with the
    largest priority ``-C_i * (p_i + step)`` among those that can still grow (ties: the gate with the
    largest index, as the published ``std::priority_queue<std::pair<float, int64_t>>`` pops them).
    A rate stops growing at 0.9 (the published cap), or at ``max_rate`` where that is lower. (The
    published loop checks the cap after each step, so from a ``min_rate`` off the 0.1 grid a rate
    could end one step above 0.9; this port does not.) The priority ignores FLOPs, and the rates are
    quantised to ``step``, so the budget is usually overshot. The published code fails (an assert on
    an empty queue) for targets it cannot reach, e.g. any target above 0.9; here that is a
    ``ValueError`` pointing at ``method="optimal"``.

``"optimal"`` (the default)
    The exact minimiser of the convex problem::

        minimise    1/2 * sum_i C_i * p_i**2
        subject to  sum_i F_i * p_i >= target * sum_i F_i,   min_i <= p_i <= max_i.

    Why this objective: (1) dropping branch ``i`` with probability ``p_i`` shifts the expected
    gradient by ``p_i * d_i``, where ``d_i`` is the gradient change the calibration measured
    (``C_i = |d_i|^2``); with roughly orthogonal per-branch changes the squared shift of the
    expected gradient is ``sum_i C_i p_i^2``. (2) Its marginal cost ``C_i * p_i`` is the published
    greedy priority ``C_i * (p_i + step)`` as the step shrinks, so this is the continuous problem the
    greedy rule approximates, without its three flaws: its priority ignores how many FLOPs a step
    buys (a step on a cheap branch costs as much sensitivity as one on an expensive branch but saves
    less), its 0.1 steps overshoot the budget, and its 0.9 cap makes targets above 0.9 unreachable.
    (3) It is strictly convex for positive sensitivities, so the answer is unique and moves
    continuously and monotonically with the target. (The expected squared gradient *error*,
    ``sum_i C_i p_i`` with independent drops, is linear: its minimiser is a fractional knapsack that
    puts all rates but one at a bound, some branches at ``max_rate`` (almost never trained) and the
    rest at ``min_rate`` (no savings) -- the opposite of the spread the paper's sensitivity-based
    allocation aims for.)

    The KKT conditions give ``C_i p_i = lambda * F_i``, i.e. water-filling:
    ``p_i = clip(lambda * F_i / C_i, min_i, max_i)`` with one multiplier ``lambda`` for all gates, found
    by bisection (on ``log lambda``, so sensitivities from 0 to 1e300 and FLOPs up to 1e300 neither
    overflow nor underflow) such that the budget holds. Gates with zero sensitivity cost nothing to
    drop: they are raised first, to their ``max_rate``, before any sensitive gate leaves its
    ``min_rate``; when only part of their room is needed they share a common level
    ``clip(mu, min_i, max_i)`` (the limit of adding a vanishing ``eps * F_i * p_i**2`` term, which keeps
    the all-equal case uniform).

    Guarantees: the budget holds whenever it is feasible (the bisection keeps an end where it holds,
    as computed) and is met with equality up to rounding when the ``min_rate`` values do not
    already meet it; every rate lies in ``[min_i, max_i]``; raising the target never lowers any
    rate (exactly, in floating point: the bisection's bracket does not depend on the target); among
    gates with equal FLOPs and equal bounds, a less sensitive gate never gets a lower rate; with
    equal sensitivities and FLOPs (and equal bounds that allow it) every rate equals the target.

Targets are limited to ``[0, 0.95]``: a rate of 1 would never train the branch again (its parameters
get no gradient and nothing flows back through it), and a FLOPs-weighted average near 1 forces
rates near 1.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

__all__ = ["MAX_TARGET", "GREEDY_CAP", "allocate_rates", "flops_weighted_rate", "kept_backward_flops"]

MAX_TARGET = 0.95
"""The largest target drop rate accepted."""

GREEDY_CAP = 0.9
"""The published greedy rule stops growing a rate at 0.9."""

_TOL = 1e-12  # relative (to sum F) slack for comparing FLOPs totals computed in different orders


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _floats(name: str, values: Sequence[float]) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of real numbers, got {values!r}") from e
    for i, v in enumerate(out):
        if not math.isfinite(v):
            raise ValueError(f"{name}[{i}] = {v} is not finite")
    return out


def _check_flops(flops: list[float]) -> None:
    for i, f in enumerate(flops):
        if not f > 0:
            raise ValueError(f"flops[{i}] = {f}: backward FLOPs must be > 0 (a ratio between gates is enough)")


def flops_weighted_rate(rates: Sequence[float], flops: Sequence[float]) -> float:
    """``sum_i p_i F_i / sum_i F_i``: the fraction of backward FLOPs dropped (0.0 for no gates)."""
    rates, flops = _floats("rates", rates), _floats("flops", flops)
    if len(rates) != len(flops):
        raise ValueError(f"got {len(rates)} rates but {len(flops)} flops; pass one of each per gate")
    _check_flops(flops)
    if not flops:
        return 0.0
    return math.fsum(p * f for p, f in zip(rates, flops)) / math.fsum(flops)


def kept_backward_flops(rates: Sequence[float], flops: Sequence[float]) -> float:
    """``sum_i (1 - p_i) F_i``: the expected backward FLOPs that are still run."""
    rates, flops = _floats("rates", rates), _floats("flops", flops)
    if len(rates) != len(flops):
        raise ValueError(f"got {len(rates)} rates but {len(flops)} flops; pass one of each per gate")
    _check_flops(flops)
    return math.fsum((1.0 - p) * f for p, f in zip(rates, flops))


def _bounds(name: str, value: float | Sequence[float], n: int) -> list[float]:
    try:
        len(value)  # type: ignore[arg-type]
        scalar = isinstance(value, str)
    except TypeError:  # a number, a NumPy scalar, a 0-d tensor
        scalar = True
    if scalar:
        try:
            v = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be a number or one number per gate, got {value!r}") from e
        if not math.isfinite(v):
            raise ValueError(f"{name} = {v} is not finite")
        return [v] * n
    out = _floats(name, value)
    if len(out) != n:
        raise ValueError(f"got {len(out)} values of {name} for {n} gates; pass a number or one value per gate")
    return out


def _bisect(lo: float, hi: float, total: Callable[[float], float], need: float, min_width: float) -> float:
    """The end ``hi`` of a shrinking bracket with ``total(hi) >= need`` (``total(hi)`` must hold at entry).

    The midpoints depend only on ``lo``, ``hi`` and the decisions ``total(mid) >= need``, so the
    result is nondecreasing in ``need`` whatever rounding does to ``total``.
    """
    for _ in range(400):
        if hi - lo <= min_width:
            break
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:  # adjacent floats
            break
        if total(mid) >= need:
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------------------------------------
# allocators
# ---------------------------------------------------------------------------------------------
def _greedy(sens, flops, target, lo, hi, step) -> list[float]:
    n = len(sens)
    total = math.fsum(flops)
    budget = (1.0 - target) * total
    tol = 1e-9 * total
    caps = [min(GREEDY_CAP, h) for h in hi]
    # number of steps gate i may take: the largest k with lo_i + k * step <= cap_i (up to rounding)
    kmax = [max(0, math.floor((c - m) / step + 1e-9)) for m, c in zip(lo, caps)]

    def rate(i: int, k: int) -> float:
        if k == 0:
            return lo[i]
        return min(max(round(lo[i] + k * step, 12), lo[i]), hi[i])

    def kept(ks: list[int]) -> float:
        return math.fsum((1.0 - rate(i, k)) * f for i, (k, f) in enumerate(zip(ks, flops)))

    if kept(kmax) > budget + tol:
        reach = 1.0 - kept(kmax) / total
        top = math.fsum(h * f for h, f in zip(hi, flops)) / total
        hint = (f'use method="optimal", which reaches any target up to max_rate (here {top:.6g})'
                if top >= target else
                f'use method="optimal" and raise max_rate (with these max_rate values even the optimal '
                f'allocator reaches at most {top:.6g})')
        raise ValueError(
            f"the greedy rule cannot reach target {target}: its rates grow in steps of {step} and stop at "
            f"{GREEDY_CAP} (the published cap) or max_rate, which drops at most {reach:.6g} of the backward "
            f"FLOPs; {hint}")

    ks = [0] * n
    # max-heap on (-C_i * new_rate, i): heapq is a min-heap, so push the negations
    heap = [(sens[i] * rate(i, 1), -i) for i in range(n) if kmax[i] > 0]
    heapq.heapify(heap)
    current = kept(ks)
    while current > budget + tol:
        if not heap:  # only the running sum's rounding can get here: the all-capped rates meet the budget
            current = kept(ks)
            break
        _, neg_i = heapq.heappop(heap)
        i = -neg_i
        ks[i] += 1
        current -= (rate(i, ks[i]) - rate(i, ks[i] - 1)) * flops[i]
        if ks[i] < kmax[i]:
            heapq.heappush(heap, (sens[i] * rate(i, ks[i] + 1), -i))
        if current <= budget + tol:  # recompute exactly before stopping: the running sum drifts
            current = kept(ks)
    return [rate(i, k) for i, k in enumerate(ks)]


def _optimal(sens, flops, target, lo, hi) -> list[float]:
    n = len(sens)
    total = math.fsum(flops)
    need = target * total
    base = math.fsum(m * f for m, f in zip(lo, flops))
    if need <= base:  # the minimum rates already meet the budget: raising any rate only costs
        return list(lo)
    top = math.fsum(h * f for h, f in zip(hi, flops))
    if need >= top - _TOL * total:  # at (or, by rounding, a hair from) the top: every gate at its maximum
        if need - top > _TOL * total:
            reach = top / total
            raise ValueError(
                f"target {target} is not reachable: with these max_rate values the FLOPs-weighted drop rate is "
                f"at most {reach:.6g}; raise max_rate or lower the target to at most {reach:.6g}")
        return list(hi)

    zero = [s == 0.0 for s in sens]

    # Phase 1: zero-sensitivity gates rise together to a common level mu, the others stay at their minimum.
    def phase1(mu: float) -> list[float]:
        return [min(max(mu, lo[i]), hi[i]) if zero[i] else lo[i] for i in range(n)]

    def total1(mu: float) -> float:
        return math.fsum(p * f for p, f in zip(phase1(mu), flops))

    if need <= total1(1.0):
        return phase1(_bisect(0.0, 1.0, total1, need, 0.0))

    # Phase 2: zero-sensitivity gates at their maximum, the others at clip(lambda * F_i / C_i, min_i, max_i),
    # written as exp(u + a_i) with u = log(lambda), a_i = log(F_i) - log(C_i).
    a = [0.0 if zero[i] else math.log(flops[i]) - math.log(sens[i]) for i in range(n)]

    def phase2(u: float) -> list[float]:
        out = []
        for i in range(n):
            if zero[i]:
                out.append(hi[i])
                continue
            x = u + a[i]
            # rates are < 1 = exp(0), and exp(-746) underflows to 0.0: clip before exp
            p = hi[i] if x >= 0.0 else (0.0 if x < -746.0 else math.exp(x))
            out.append(min(max(p, lo[i]), hi[i]))
        return out

    def total2(u: float) -> float:
        return math.fsum(p * f for p, f in zip(phase2(u), flops))

    pos = [i for i in range(n) if not zero[i]]
    u_lo = min(-746.0 - a[i] for i in pos)  # every sensitive gate at its minimum
    u_hi = max(1.0 - a[i] for i in pos)  # every gate at its maximum: total2(u_hi) == top > need
    return phase2(_bisect(u_lo, u_hi, total2, need, 0.0))


def allocate_rates(sensitivities: Sequence[float], flops: Sequence[float], target: float, *,
                   method: str = "optimal", min_rate: float | Sequence[float] = 0.0,
                   max_rate: float | Sequence[float] = 0.95, step: float = 0.1) -> list[float]:
    """Per-gate drop rates whose FLOPs-weighted average is at least ``target``.

    ``sensitivities[i] >= 0`` and ``flops[i] > 0`` (only their ratios matter) describe gate ``i``;
    ``min_rate`` and ``max_rate`` are a number for all gates or one value per gate, with
    ``0 <= min_rate <= max_rate < 1``; ``target`` is in ``[0, 0.95]``. The rates satisfy
    ``kept_backward_flops(rates, flops) <= (1 - target) * sum(flops)`` (up to 1e-9 of ``sum(flops)``).

    ``method="optimal"`` (default) minimises ``sum_i C_i p_i^2`` under that budget (see the module
    docstring); ``method="greedy"`` is the published rule (steps of ``step``, rates capped at 0.9).
    Raises ``ValueError`` on bad input and on targets the chosen method cannot reach.
    """
    if method not in ("optimal", "greedy"):
        raise ValueError(f'method must be "optimal" or "greedy", got {method!r}')
    sens = _floats("sensitivities", sensitivities)
    fl = _floats("flops", flops)
    if len(sens) != len(fl):
        raise ValueError(f"got {len(sens)} sensitivities but {len(fl)} flops; pass one of each per gate")
    for i, s in enumerate(sens):
        if s < 0:
            raise ValueError(f"sensitivities[{i}] = {s}: sensitivities must be >= 0")
    _check_flops(fl)
    try:
        target = float(target)
    except (TypeError, ValueError) as e:
        raise ValueError(f"target must be a number, got {target!r}") from e
    if not 0.0 <= target <= MAX_TARGET:  # also rejects NaN
        raise ValueError(
            f"target = {target} must be in [0, {MAX_TARGET}]: a rate of 1 would leave a branch untrained "
            f"forever, and a FLOPs-weighted average near 1 forces rates near 1")
    n = len(sens)
    lo, hi = _bounds("min_rate", min_rate, n), _bounds("max_rate", max_rate, n)
    for i, (m, h) in enumerate(zip(lo, hi)):
        if not 0.0 <= m <= h < 1.0:
            raise ValueError(
                f"gate {i}: need 0 <= min_rate <= max_rate < 1, got min_rate={m}, max_rate={h} "
                f"(a rate of 1 would leave the branch untrained forever)")
    if n == 0:
        return []
    if method == "greedy":
        step = float(step)
        if not 0.0 < step <= 1.0:
            raise ValueError(f"step = {step} must be in (0, 1]")
        return _greedy(sens, fl, target, lo, hi, step)
    return _optimal(sens, fl, target, lo, hi)
