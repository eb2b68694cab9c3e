"""Drop-rate allocation (``dropbp_fx.allocate``): the published greedy rule and the optimal allocator.

Properties of ``method="optimal"`` on random problems (1-64 gates, sensitivities in [0, 1e3] with
zeros and ties, FLOPs in [1, 1e12], random per-gate or shared bounds, targets up to the largest
feasible one):

(a) the budget holds, with equality (up to rounding) unless the minimum rates already meet it;
(b) every rate lies within its gate's bounds;
(c) raising the target never lowers any rate;
(d) among gates with equal FLOPs and bounds, a less sensitive gate never gets a lower rate;
(e) equal sensitivities and FLOPs give the uniform allocation;
(f) zero-sensitivity gates reach their maximum before any sensitive gate leaves its minimum;
plus the KKT conditions of the objective it claims to minimise, and that it never does worse on
that objective than the greedy rule at the FLOPs the greedy rule reached.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dropbp_fx.allocate import allocate_rates, flops_weighted_rate, kept_backward_flops


def budget(n: int) -> int:
    """``n`` examples under the default profile; more under a larger profile (fuzz)."""
    return max(n, settings.default.max_examples)


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SENS = st.one_of(st.just(0.0), st.sampled_from([1.0, 2.5, 1e3]), st.floats(0.0, 1e3))
FLOPS = st.one_of(st.sampled_from([1.0, 4.0, 1e12]), st.floats(1.0, 1e12))
BOUND = st.floats(0.0, 0.99)


@st.composite
def bounds(draw, n: int):
    """(min_rate, max_rate) as passed, and as per-gate lists."""
    kind = draw(st.sampled_from(["default", "scalar", "per_gate"]))
    if kind == "default":
        return (0.0, 0.95), [0.0] * n, [0.95] * n
    if kind == "scalar":
        lo, hi = sorted(draw(st.tuples(BOUND, BOUND)))
        return (lo, hi), [lo] * n, [hi] * n
    pair = st.one_of(st.sampled_from([(0.0, 0.95), (0.1, 0.5), (0.3, 0.3)]),
                     st.tuples(BOUND, BOUND).map(lambda t: tuple(sorted(t))))
    pairs = draw(st.lists(pair, min_size=n, max_size=n))
    lo, hi = [p[0] for p in pairs], [p[1] for p in pairs]
    return (lo, hi), lo, hi


def max_target(flops, hi) -> float:
    return min(0.95, math.fsum(h * f for h, f in zip(hi, flops)) / math.fsum(flops))


@st.composite
def problems(draw, sens=SENS, flops=FLOPS, max_gates=64):
    n = draw(st.integers(1, max_gates))
    s = draw(st.lists(sens, min_size=n, max_size=n))
    f = draw(st.lists(flops, min_size=n, max_size=n))
    (min_rate, max_rate), lo, hi = draw(bounds(n))
    return s, f, min_rate, max_rate, lo, hi


FRACTION = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))


def dropped(rates, flops) -> float:
    return math.fsum(p * f for p, f in zip(rates, flops))


# ---------------------------------------------------------------------------
# optimal: properties (a)-(f)
# ---------------------------------------------------------------------------
@settings(max_examples=budget(200), **SETTINGS)
@given(problems(), FRACTION)
def test_budget_met_exactly_and_rates_within_bounds(problem, frac):
    s, f, min_rate, max_rate, lo, hi = problem
    target = frac * max_target(f, hi)
    rates = allocate_rates(s, f, target, min_rate=min_rate, max_rate=max_rate)
    total = math.fsum(f)
    assert len(rates) == len(s)
    assert all(l <= p <= h for p, l, h in zip(rates, lo, hi)), (rates, lo, hi)  # (b)
    need = target * total
    assert dropped(rates, f) >= need - 1e-9 * total  # (a)
    if rates != hi:  # below the top the allocator keeps the budget without slack, as computed here
        assert dropped(rates, f) >= need
    assert kept_backward_flops(rates, f) <= (1 - target) * total + 1e-9 * total
    if need > dropped(lo, f):
        assert dropped(rates, f) <= need + 1e-9 * total  # met with equality, not overshot
    else:
        assert rates == lo  # the minimum rates already meet the budget: nothing is raised


@settings(max_examples=budget(200), **SETTINGS)
@given(problems(), FRACTION, FRACTION)
def test_monotone_in_target(problem, f1, f2):
    s, f, min_rate, max_rate, lo, hi = problem
    t1, t2 = sorted((f1 * max_target(f, hi), f2 * max_target(f, hi)))
    r1 = allocate_rates(s, f, t1, min_rate=min_rate, max_rate=max_rate)
    r2 = allocate_rates(s, f, t2, min_rate=min_rate, max_rate=max_rate)
    assert all(a <= b for a, b in zip(r1, r2)), [(i, a, b) for i, (a, b) in enumerate(zip(r1, r2)) if a > b]


# few distinct FLOPs and sensitivities so that many pairs of gates are comparable
@settings(max_examples=budget(200), **SETTINGS)
@given(problems(sens=st.one_of(st.sampled_from([0.0, 1.0, 2.0, 7.5]), SENS), flops=st.sampled_from([1.0, 3.0, 1e9])),
       FRACTION)
def test_less_sensitive_never_gets_a_lower_rate(problem, frac):
    s, f, min_rate, max_rate, lo, hi = problem
    rates = allocate_rates(s, f, frac * max_target(f, hi), min_rate=min_rate, max_rate=max_rate)
    n = len(s)
    for i in range(n):
        for j in range(n):
            if f[i] == f[j] and lo[i] == lo[j] and hi[i] == hi[j]:
                if s[i] < s[j]:
                    assert rates[i] >= rates[j], (i, j, s[i], s[j], rates[i], rates[j])  # (d)
                elif s[i] == s[j]:
                    assert rates[i] == rates[j], (i, j, rates[i], rates[j])  # symmetric gates, same rate


@settings(max_examples=budget(100), **SETTINGS)
@given(st.integers(1, 64), st.sampled_from([0.0, 1e-300, 1.0, 1e3]) | st.floats(0.0, 1e3),
       st.sampled_from([1.0, 1e12]) | st.floats(1.0, 1e12), st.floats(0.0, 0.95))
def test_equal_sensitivities_and_flops_give_uniform_rates(n, c, flops, target):
    rates = allocate_rates([c] * n, [flops] * n, target)
    assert rates == pytest.approx([target] * n, abs=1e-12)  # (e)


@settings(max_examples=budget(200), **SETTINGS)
@given(problems(sens=st.one_of(st.just(0.0), SENS)), FRACTION)
def test_zero_sensitivity_gates_are_dropped_first(problem, frac):
    s, f, min_rate, max_rate, lo, hi = problem
    rates = allocate_rates(s, f, frac * max_target(f, hi), min_rate=min_rate, max_rate=max_rate)
    zero = [i for i in range(len(s)) if s[i] == 0]
    sensitive = [i for i in range(len(s)) if s[i] > 0]
    if any(rates[i] > lo[i] for i in sensitive):
        assert all(rates[i] == hi[i] for i in zero), [(i, rates[i], hi[i]) for i in zero]  # (f)
    if any(rates[i] < hi[i] for i in zero):
        assert all(rates[i] == lo[i] for i in sensitive)


def test_zero_sensitivity_example():
    # 2 free (zero-sensitivity) gates of 4 equal ones: 0.2 of the FLOPs come from them alone
    assert allocate_rates([0, 2, 0, 4], [1, 1, 1, 1], 0.2) == pytest.approx([0.4, 0, 0.4, 0], abs=1e-12)
    # past their max_rate, the sensitive gates share the rest
    rates = allocate_rates([0, 1, 0, 3], [1, 1, 1, 1], 0.6, max_rate=0.9)
    assert rates[0] == rates[2] == 0.9 and 0 < rates[3] < rates[1] < 0.9


# KKT of  min 1/2 sum C_i p_i^2  s.t.  sum F_i p_i >= T, lo <= p <= hi:  C_i p_i / F_i = lambda for the
# free gates, <= lambda for gates at their maximum, >= lambda for gates at their minimum.
# (Sensitivities are kept >= 1e-3 or 0 here so that no rate underflows to 0.0.)
@settings(max_examples=budget(200), **SETTINGS)
@given(problems(sens=st.one_of(st.just(0.0), st.sampled_from([1.0, 5.0]), st.floats(1e-3, 1e3))), FRACTION)
def test_optimal_satisfies_kkt(problem, frac):
    s, f, min_rate, max_rate, lo, hi = problem
    target = frac * max_target(f, hi)
    rates = allocate_rates(s, f, target, min_rate=min_rate, max_rate=max_rate)
    total = math.fsum(f)
    if target * total <= dropped(lo, f) + 1e-9 * total:
        return  # the budget does not bind: covered by test_budget_met_exactly_and_rates_within_bounds
    gates = [i for i in range(len(s)) if s[i] > 0 and lo[i] < hi[i]]
    if any(rates[i] < hi[i] for i in range(len(s)) if s[i] == 0) or not gates:
        return  # zero-sensitivity phase: covered by test_zero_sensitivity_gates_are_dropped_first
    ratio = {i: s[i] * rates[i] / f[i] for i in gates}
    free = [i for i in gates if lo[i] < rates[i] < hi[i]]
    below = [ratio[i] for i in gates if rates[i] == hi[i]] + [ratio[i] for i in free]  # <= lambda
    above = [ratio[i] for i in gates if rates[i] == lo[i]] + [ratio[i] for i in free]  # >= lambda
    if below and above:
        assert max(below) <= min(above) * (1 + 1e-7), (max(below), min(above))


def objective(sens, rates) -> float:
    return 0.5 * math.fsum(c * p * p for c, p in zip(sens, rates))


@settings(max_examples=budget(150), **SETTINGS)
@given(problems(max_gates=24), st.floats(0.0, 0.9), st.sampled_from([0.1, 0.05, 0.25]))
def test_optimal_never_worse_than_greedy_at_the_flops_greedy_reached(problem, target, step):
    s, f, min_rate, max_rate, lo, hi = problem
    try:
        greedy = allocate_rates(s, f, target, method="greedy", min_rate=min_rate, max_rate=max_rate, step=step)
    except ValueError as e:
        assert "cannot reach" in str(e) and 'method="optimal"' in str(e)
        # the highest rates on the greedy grid lo + k * step at or below min(0.9, max_rate)
        top = [l + max(0, math.floor((min(0.9, h) - l) / step + 1e-9)) * step for l, h in zip(lo, hi)]
        assert target > flops_weighted_rate(top, f) - 1e-9
        return
    total = math.fsum(f)
    assert all(l <= p <= max(l, min(0.9, h)) for p, l, h in zip(greedy, lo, hi))  # a min_rate above 0.9 stays
    assert all(abs((p - l) / step - round((p - l) / step)) < 1e-6 for p, l in zip(greedy, lo))  # on the grid
    assert kept_backward_flops(greedy, f) <= (1 - target) * total + 1e-9 * total
    reached = min(flops_weighted_rate(greedy, f), 0.95)
    optimal = allocate_rates(s, f, reached, min_rate=min_rate, max_rate=max_rate)
    assert objective(s, optimal) <= objective(s, greedy) * (1 + 1e-9) + 1e-12


# ---------------------------------------------------------------------------
# greedy: the published rule
# ---------------------------------------------------------------------------
def test_greedy_hand_computed_example():
    # budget: drop >= 0.3 * 4 = 1.2 FLOPs. Cost of the next step C_i * (p_i + 0.1), cheapest first, ties to the
    # highest index: g0 .1 | g1 .1 (tie .2) | g0 .2 | g0 .3 | g2 .1 (3-way tie .4) | g1 .2 (tie .4) | g0 .4 | g0 .5
    # | g1 .3 (tie .6) | g0 .6 | g0 .7 -> dropped 0.7 + 0.3 + 2 * 0.1 = 1.2
    rates = allocate_rates([1, 2, 4], [1, 1, 2], 0.3, method="greedy")
    assert rates == pytest.approx([0.7, 0.3, 0.1], abs=1e-12)
    # the greedy priority ignores FLOPs; the optimal allocator weighs them (and drops gate 2 more than 0.1)
    optimal = allocate_rates([1, 2, 4], [1, 1, 2], 0.3)
    assert flops_weighted_rate(optimal, [1, 1, 2]) == pytest.approx(0.3)
    assert objective([1, 2, 4], optimal) < objective([1, 2, 4], rates)
    assert optimal[2] > 0.1


def test_greedy_caps_at_0_9_and_overshoots_by_its_step():
    assert allocate_rates([1, 1], [1, 1], 0.9, method="greedy") == pytest.approx([0.9, 0.9])
    assert allocate_rates([1, 1], [1, 1], 0.4, method="greedy", max_rate=0.5, min_rate=0.5) == [0.5, 0.5]
    assert allocate_rates([0, 1], [1, 1], 0.9, method="greedy") == pytest.approx([0.9, 0.9])
    # target 0.22 of 2 equal gates: 5 steps of 0.1 are needed (4 reach only 0.2), overshooting to 0.25
    rates = allocate_rates([1, 1], [1, 1], 0.22, method="greedy")
    assert rates == pytest.approx([0.2, 0.3]) and flops_weighted_rate(rates, [1, 1]) == pytest.approx(0.25)


def test_greedy_is_monotone_in_target():
    s, f = [3.0, 0.5, 1.0, 0.0, 8.0], [2.0, 1.0, 5.0, 1.0, 3.0]
    previous = [0.0] * 5
    for k in range(91):
        rates = allocate_rates(s, f, k / 100, method="greedy")
        assert all(a <= b for a, b in zip(previous, rates)) and flops_weighted_rate(rates, f) >= k / 100 - 1e-12
        previous = rates


@pytest.mark.parametrize("target", [0.95, 0.91])
def test_greedy_above_0_9_raises_pointing_at_optimal(target):
    with pytest.raises(ValueError, match=r'greedy rule cannot reach target .*method="optimal"'):
        allocate_rates([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], target, method="greedy")


def test_greedy_unreachable_because_of_max_rate_says_to_raise_it():
    with pytest.raises(ValueError, match=r'cannot reach.*method="optimal" and raise max_rate'):
        allocate_rates([1.0, 2.0], [1.0, 1.0], 0.6, method="greedy", max_rate=0.5)


# ---------------------------------------------------------------------------
# optimal: edges
# ---------------------------------------------------------------------------
@settings(max_examples=budget(50), **SETTINGS)
@given(st.lists(SENS, min_size=1, max_size=64).flatmap(
    lambda s: st.tuples(st.just(s), st.lists(FLOPS, min_size=len(s), max_size=len(s)))))
def test_optimal_at_0_95_with_max_0_95_drops_every_gate_at_0_95(problem):
    s, f = problem
    assert allocate_rates(s, f, 0.95, max_rate=0.95) == [0.95] * len(s)


def test_min_rates_above_target_are_kept():
    assert allocate_rates([1, 2, 3], [1, 1, 1], 0.2, min_rate=[0.3, 0.1, 0.5]) == [0.3, 0.1, 0.5]


def test_empty():
    assert allocate_rates([], [], 0.5) == []
    assert flops_weighted_rate([], []) == 0.0 and kept_backward_flops([], []) == 0.0


def test_infeasible_target_names_the_reachable_maximum_and_the_fix():
    with pytest.raises(ValueError, match=r"at most 0\.5; raise max_rate or lower the target to at most 0\.5"):
        allocate_rates([1.0, 2.0], [1.0, 3.0], 0.6, max_rate=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"at most 0\.725"):  # (0.2 * 1 + 0.9 * 3) / 4
        allocate_rates([1.0, 2.0], [1.0, 3.0], 0.8, max_rate=[0.2, 0.9])


# ---------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(sensitivities=[1, 2, 3], flops=[1, 1]), r"got 3 sensitivities but 2 flops"),
    (dict(sensitivities=[1, -2], flops=[1, 1]), r"sensitivities\[1\] = -2.0: sensitivities must be >= 0"),
    (dict(sensitivities=[1, float("nan")], flops=[1, 1]), r"sensitivities\[1\] = nan is not finite"),
    (dict(sensitivities=[1, 2], flops=[1, 0]), r"flops\[1\] = 0.0: backward FLOPs must be > 0"),
    (dict(sensitivities=[1, 2], flops=[float("inf"), 1]), r"flops\[0\] = inf is not finite"),
    (dict(target=0.96), r"target = 0.96 must be in \[0, 0.95\]: a rate of 1 would leave a branch untrained"),
    (dict(target=-0.1), r"target = -0.1 must be in \[0, 0.95\]"),
    (dict(target=float("nan")), r"target = nan must be in"),
    (dict(min_rate=0.6, max_rate=0.5), r"gate 0: need 0 <= min_rate <= max_rate < 1, got min_rate=0.6, max_rate=0.5"),
    (dict(max_rate=1.0), r"max_rate=1.0 \(a rate of 1 would leave the branch untrained forever\)"),
    (dict(min_rate=-0.1), r"need 0 <= min_rate"),
    (dict(max_rate=[0.9, 0.9, 0.9]), r"got 3 values of max_rate for 2 gates"),
    (dict(method="uniform"), r'method must be "optimal" or "greedy", got \'uniform\''),
    (dict(method="greedy", step=0.0), r"step = 0.0 must be in \(0, 1\]"),
])
def test_bad_input_raises(kwargs, message):
    args = dict(sensitivities=[1.0, 2.0], flops=[1.0, 1.0], target=0.5) | kwargs
    with pytest.raises(ValueError, match=message):
        allocate_rates(args.pop("sensitivities"), args.pop("flops"), args.pop("target"), **args)


def test_helpers():
    assert flops_weighted_rate([0.5, 0.0], [3.0, 1.0]) == 0.375
    assert kept_backward_flops([0.5, 0.0], [3.0, 1.0]) == 2.5
    with pytest.raises(ValueError, match=r"got 1 rates but 2 flops"):
        flops_weighted_rate([0.5], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"got 2 rates but 1 flops"):
        kept_backward_flops([0.5, 0.1], [1.0])
