"""Benchmarks 1, 2 and 4: step time per candidate and drop rate, the speed model's limit, overhead at p = 0.

One process, one model per candidate (same initial weights), one fixed batch. A *unit* is one
training step (forward + backward + AdamW step) of one candidate at one rate. Every round runs
every unit once, in an order shuffled per round; the first ``warmup`` rounds are not recorded
(they hold the lazy compiles of the backend's dropped-branch variants). Every gated candidate sees
the same mask in the same (round, rate). Claims are ratios of times from the same round (paired),
summarised as median, min and max over the measured rounds.

The limit (benchmark 2), per gated candidate: T0 = its own step at p = 0, T1 = its own step with
every branch detached (``ALL_DROPPED``), B = T0 - T1, theory(p) = T0 - p * B, efficiency =
(T0 - Tp) / (p * B). Ratios are taken per round and the medians used:
``efficiency = (1 - median(Tp/T0)) / (p * (1 - median(T1/T0)))``. The reference row follows the
speed model of the notes: plain eager as T0 and the hand-detached eager step as T1.
"""

from __future__ import annotations

import gc
import logging
import random
import statistics

import torch
from tqdm import tqdm

from benchmarks.common import (ALL_DROPPED, Candidate, Sizes, Timer, make_batch, make_candidate, rate_key,
                               share_mask_names, spread)

log = logging.getLogger("benchmarks.step_time")


def step_index(round_: int, rate_index: int) -> int:
    """The mask step of a (round, rate): equal for every candidate, distinct across units."""
    return 1000 * (round_ + 1) + rate_index


def _dynamo_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def run(mode: str, sizes: Sizes, names: list[str], rates: list[float], *, rounds: int, warmup: int, seed: int,
        device: torch.device, lr: float = 1e-5) -> dict:
    torch._dynamo.reset()
    timer = Timer(device)
    candidates: dict[str, Candidate] = {}
    for name in tqdm(names, desc=f"{mode}: building", unit="model", leave=False):
        candidates[name] = make_candidate(name, sizes, mode, seed, device, lr=lr)
    batch = make_batch(sizes, seed, device)

    # The first step of every candidate (for compiled ones: Dynamo, the passes, the inner compiler's first pieces).
    compile_info: dict[str, dict] = {}
    for name, c in tqdm(candidates.items(), desc=f"{mode}: first steps", unit="model", leave=False):
        c.set_rate(0.0)
        seconds, _ = timer(lambda: c.train_step(batch))
        if c.compiled:
            compile_info[name] = {"first_step_s": seconds}
            log.info("%s %s: first step (compile) %.1f s", mode, name, seconds)
    share_mask_names(list(candidates.values()))
    gates = {name: list(c.dbp.gate_names) for name, c in candidates.items() if c.dbp is not None}
    for name, g in gates.items():
        log.info("%s %s: %d gates (%s ... %s)", mode, name, len(g), g[0] if g else "-", g[-1] if g else "-")
    gc.collect()
    gc.freeze()  # what exists now (models, compiled code) is never scanned again: a gc.collect() per unit is cheap

    all_rates = [0.0] + [r for r in rates if 0 < r < ALL_DROPPED] + [ALL_DROPPED]
    units = [(name, r) for name, c in candidates.items() for r in (all_rates if c.gated else [0.0])]
    times: dict[str, dict[str, list[float]]] = {n: {} for n in candidates}
    for name, r in units:
        times[name][rate_key(r)] = []
    fractions: dict[str, list[float]] = {rate_key(r): [] for r in all_rates}
    warm_seconds = {n: 0.0 for n in candidates}
    compiles_in_units: dict[str, list[str]] = {n: [] for n in candidates}
    graphs_at_start = None

    bar = tqdm(total=(warmup + rounds) * len(units), desc=f"{mode}: step time", unit="step", dynamic_ncols=True)
    for rnd in range(warmup + rounds):
        measured = rnd >= warmup
        if rnd == warmup:
            graphs_at_start = _dynamo_graphs()
            for name, c in candidates.items():
                if c.dbp is not None and c.dbp.compile_cache is not None:
                    compile_info[name]["compiles_after_warmup"] = c.dbp.compile_cache.compiles
        order = list(units)
        random.Random(seed * 7919 + rnd).shuffle(order)
        recorded_fraction = set()
        for name, r in order:
            c = candidates[name]
            c.set_rate(r)
            c.set_step(step_index(rnd, all_rates.index(r) if c.gated else 0))
            gc.collect()
            cache = c.dbp.compile_cache if c.dbp is not None else None
            before = cache.compiles if cache is not None else 0
            seconds, _ = timer(lambda: c.train_step(batch))
            if cache is not None and cache.compiles != before and measured:
                compiles_in_units[name].append(f"round {rnd - warmup} p={rate_key(r)}")
            if measured:
                times[name][rate_key(r)].append(seconds)
                mask = c.realised_mask()
                if mask and rate_key(r) not in recorded_fraction:
                    fractions[rate_key(r)].append(sum(mask.values()) / len(mask))
                    recorded_fraction.add(rate_key(r))
            else:
                warm_seconds[name] += seconds
            bar.update()
        if measured:
            bar.set_postfix(round=f"{rnd - warmup + 1}/{rounds}")
    bar.close()

    for name, c in candidates.items():
        if not c.compiled:
            continue
        info = compile_info[name]
        info["warmup_rounds_s"] = warm_seconds[name]
        if c.dbp is not None and c.dbp.compile_cache is not None:
            cache = c.dbp.compile_cache
            info.update(inner_compile_s=cache.seconds, pieces_compiled=cache.compiles, cache_hits=cache.hits,
                        pieces_compiled_during_measurement=cache.compiles - info.pop("compiles_after_warmup"),
                        units_with_a_compile=compiles_in_units[name])
    checks = {name: {"checked": c.masks_checked, "mismatches": c.mask_mismatches}
              for name, c in candidates.items() if c.gated}
    result = {
        "mode": mode, "sizes": sizes.__dict__, "rounds": rounds, "warmup": warmup, "rates": [rate_key(r) for r in all_rates],
        "candidates": list(candidates), "gates": gates, "times_s": times,
        "median_s": {n: {k: spread(v)["median"] for k, v in t.items()} for n, t in times.items()},
        "drop_fraction": {k: (statistics.fmean(v) if v else None) for k, v in fractions.items()},
        "mask_checks": checks, "compile": compile_info,
        "dynamo_graphs_compiled_during_measurement": _dynamo_graphs() - (graphs_at_start or 0),
    }
    result.update(derive(result))
    del candidates
    gc.unfreeze()
    gc.collect()
    torch._dynamo.reset()
    return result


def _paired(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b)]


def derive(res: dict) -> dict:
    """Ratios, the limit, overhead and comparisons from the recorded per-round times."""
    t = res["times_s"]
    rates = [k for k in res["rates"]]
    gated = [n for n in res["candidates"] if len(t[n]) > 1]
    out: dict = {}
    if "eager" in t:
        base = t["eager"]["0"]
        out["ratio_vs_eager"] = {n: {k: spread(_paired(v, base)) for k, v in tn.items()} for n, tn in t.items()}
    if "inductor" in t:
        base = t["inductor"]["0"]
        out["speedup_vs_inductor"] = {n: {k: spread(_paired(base, v)) for k, v in t[n].items()}
                                      for n in gated if n.startswith("dropbp")}
    if "hand-detach" in t:
        hand = t["hand-detach"]
        out["speedup_vs_hand"] = {n: {k: spread(_paired(hand[k], v)) for k, v in t[n].items() if k in hand}
                                  for n in gated if n != "hand-detach"}
    fractions = res["drop_fraction"]
    limit = {}
    for n in gated:
        limit[n] = _limit(t[n]["0"], t[n][rate_key(ALL_DROPPED)], t[n], rates, fractions)
    if "eager" in t and "hand-detach" in t:
        ref = _limit(t["eager"]["0"], t["hand-detach"][rate_key(ALL_DROPPED)], {}, [], fractions)
        ref["note"] = "T0 = plain eager, T1 = eager with every branch detached by hand (the notes' speed model)"
        ref["theory_ratio"] = {k: 1 - float(k) * ref["branch_share"] for k in rates if k not in ("0",)}
        limit["reference (eager pieces)"] = ref
    out["limit"] = limit
    overhead = {}
    for dbp, plain in (("dropbp-eager", "eager"), ("dropbp-aot_eager", "eager"), ("dropbp-inductor", "inductor")):
        if dbp in t and plain in t:
            overhead[f"{dbp} p=0 / {plain}"] = spread(_paired(t[dbp]["0"], t[plain]["0"]))
    out["overhead_p0"] = overhead
    return out


def _limit(t0: list[float], t1: list[float], tn: dict, rates: list[str], fractions: dict) -> dict:
    r1 = spread(_paired(t1, t0))
    share = 1 - r1["median"]
    out = {"T0_s": spread(t0)["median"], "T1_s": spread(t1)["median"], "T1_over_T0": r1, "branch_share": share,
           "per_rate": {}}
    for k in rates:
        p = float(k)
        if p <= 0 or p >= ALL_DROPPED or k not in tn:
            continue
        rp = spread(_paired(tn[k], t0))
        per_round = [(1 - a / b) / (p * (1 - c / b)) if c < b else None for a, b, c in zip(tn[k], t0, t1)]
        q = fractions.get(k)
        entry = {"theory_ratio": 1 - p * share, "measured_ratio": rp,
                 "efficiency": (1 - rp["median"]) / (p * share) if share > 0 else None,
                 "efficiency_per_round": spread(per_round)}
        if q:
            entry.update(realised_drop_fraction=q, theory_ratio_realised=1 - q * share,
                         efficiency_realised=(1 - rp["median"]) / (q * share) if share > 0 else None)
        out["per_rate"][k] = entry
    return out
