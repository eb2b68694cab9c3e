"""Benchmark 3: activation memory per drop rate, and the longest sequence that fits a fixed budget.

Each candidate is measured in a worker subprocess of its own (``python -m benchmarks.memory
--worker ...``), so compile state and allocator history of one candidate never count for another.
In the worker, after warm-up forwards with exactly the masks measured later (every piece an inner
compiler compiles exists before anything is measured), one training step per (rate, mask) gives both:

* **saved bytes**: the forward runs under ``saved_tensors_hooks`` (see
  :class:`benchmarks.common.SavedBytes`): the bytes held for backward at the end of the forward, each
  storage once, parameters excluded. ``masks`` masks per rate (the same step indices for every
  candidate, so the same masks); the summary is their mean. Two more steps with every attention
  branch / every MLP branch dropped give per-branch bytes, from which a mask's *exact* expectation
  ``S0 - dropped_attn * b_attn - dropped_mlp * b_mlp`` follows;
* **peak memory**: the step's peak, as the rise over what the process held just before it
  (:class:`benchmarks.common.PeakMemory`); the summary is the max over the masks of a rate.

The sequence search (``--seq-search``, one more worker) finds, for plain eager and for ``dropbp``
(inner eager) at every rate, the longest sequence (a multiple of ``granule``, batch as in the step-time
benchmark) whose saved activation bytes fit the budget: what plain eager saves at the benchmark's
sequence length. For a rate, a sequence fits when the mean over ``masks`` masks fits (the average,
not the worst mask). Probes are forward passes; the search brackets the boundary by secant steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from benchmarks.common import (ALL_DROPPED, PeakMemory, SavedBytes, Sizes, canonical, make_batch, make_candidate,
                               rate_key, sizes_dict, sizes_from, spread, with_seq)

log = logging.getLogger("benchmarks.memory")

MASK_STEP = 5000  # masks of the memory benchmark: steps MASK_STEP + m


# ====================================================================== worker side
def _forward_saved(c, batch) -> tuple[int, int, dict]:
    rec = SavedBytes(c.model)
    with rec.hooks():
        loss = c.forward(batch)
    act, total = rec.live()
    mask = c.realised_mask() or {}
    del loss
    return act, total, mask


def _masks_for(c, rates, masks):
    """(rate, mask step) pairs measured for candidate ``c``."""
    pairs = []
    for r in rates:
        n = 1 if r in (0.0, ALL_DROPPED) else masks
        pairs += [(r, MASK_STEP + m) for m in range(n)]
    return pairs


def _measured_step(c, batch, probe) -> dict:
    """One training step: saved bytes at the end of its forward, and its peak rise over what was held before."""
    before = probe.reset()
    rec = SavedBytes(c.model)
    with rec.hooks():
        loss = c.forward(batch)
    act, total = rec.live()
    mask = c.realised_mask() or {}
    if loss.requires_grad:
        loss.backward()
    c.opt.step()
    c.opt.zero_grad(set_to_none=True)
    del loss
    top = probe.peak()
    return {"bytes": act, "bytes_with_params": total, "dropped": sorted(k for k, d in mask.items() if d),
            "branches": len(mask), "before": before, "peak": top, "rise": top - before}


def worker(args) -> dict:
    device = torch.device(args.device)
    sizes = sizes_from(json.loads(args.sizes))
    rates = [float(r) for r in args.rates.split(",")]
    start = time.perf_counter()
    c = make_candidate(args.candidate, sizes, args.mode, args.seed, device)
    batch = make_batch(sizes, args.seed, device)
    probe = PeakMemory(device)
    if not probe.available():
        raise SystemExit("peak memory: /proc/self/clear_refs or libc not available on this system")

    c.set_rate(0.0)
    c.train_step(batch)  # compiles; allocates the optimizer state
    if c.hand is not None and args.mask_names:
        names = json.loads(args.mask_names)
        by_canonical = {canonical(n): n for n in names}
        c.hand.names = [by_canonical[canonical(p)] for p in c.hand.paths]
    all_rates = [0.0] + [r for r in rates if 0 < r < ALL_DROPPED] + [ALL_DROPPED] if c.gated else [0.0]
    pairs = _masks_for(c, all_rates, args.masks)
    attn = {canonical(n) for n in c.branch_names() if canonical(n).endswith("self_attn")}
    mlp = {canonical(n) for n in c.branch_names() if canonical(n).endswith("mlp")}
    forced = [("attention", attn), ("mlp", mlp)] if c.gated else []

    # Where an inner compiler compiles per grad pattern: forwards with exactly the masks measured below
    # (a training forward compiles the backward too), so that nothing compiles while measuring.
    if c.dbp is not None and c.dbp.compile_cache is not None:
        for r, step in pairs:
            c.set_rate(r)
            c.set_step(step)
            c.forward(batch)
        for _, dropped in forced:
            c.set_mask(dropped)
            c.forward(batch)
    cache = c.dbp.compile_cache if c.dbp is not None else None
    compiles_before = cache.compiles if cache is not None else 0
    setup_s = time.perf_counter() - start

    saved: dict[str, list] = {}
    for r, step in pairs:
        c.set_rate(r)
        c.set_step(step)
        saved.setdefault(rate_key(r), []).append(_measured_step(c, batch, probe))
    saved_forced = {}
    for label, dropped in forced:
        c.set_mask(dropped)
        saved_forced[label] = _measured_step(c, batch, probe)
    c.set_rate(0.0)
    return {
        "candidate": args.candidate, "mode": args.mode, "sizes": sizes_dict(sizes), "saved": saved,
        "saved_forced": saved_forced, "peak_method": probe.method,
        "mask_checks": {"checked": c.masks_checked, "mismatches": c.mask_mismatches},
        "gate_names": list(c.dbp.gate_names) if c.dbp is not None else None,
        "pieces_compiled_while_measuring": (cache.compiles - compiles_before) if cache is not None else None,
        "setup_s": setup_s, "worker_s": time.perf_counter() - start,
    }


def search_worker(args) -> dict:
    """The longest sequence whose saved activations fit the budget, plain eager vs dropbp (inner eager) per rate."""
    device = torch.device(args.device)
    sizes = sizes_from(json.loads(args.sizes))
    rates = [float(r) for r in args.rates.split(",") if float(r) > 0]
    # Every new sequence length is a new static graph; do not let Dynamo give up (it would run ungated).
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 1000)
    start = time.perf_counter()
    eager = make_candidate("eager", sizes, args.mode, args.seed, device)
    dbp = make_candidate("dropbp-eager", sizes, args.mode, args.seed, device, dynamic=False)
    dbp.set_rate(0.0)
    dbp.forward(make_batch(sizes, args.seed, device))  # creates the gates

    probes: list[dict] = []

    def saved(c, rate: float, seq: int) -> float:
        batch = make_batch(with_seq(sizes, seq), args.seed, device)
        values = []
        n = 1 if rate == 0 else args.masks
        for m in range(n):
            c.set_rate(rate)
            c.set_step(MASK_STEP + m)
            act, _, _ = _forward_saved(c, batch)
            values.append(act)
        value = statistics.fmean(values)
        probes.append({"candidate": c.name, "rate": rate, "seq": seq, "bytes": value, "per_mask": values})
        return value

    budget = saved(eager, 0.0, sizes.seq)
    results = {}
    configs = [("eager", eager, 0.0)] + [(f"dropbp p={rate_key(r)}", dbp, r) for r in [0.0] + rates]
    for label, c, rate in tqdm(configs, desc=f"{args.mode}: sequence search", unit="rate", leave=False):
        found = _search(lambda s: saved(c, rate, s), budget, sizes.seq, args.granule, args.max_probes,
                        args.max_seq)
        found["label"] = label
        found["rate"] = rate
        results[label] = found
        log.info("%s %s: longest sequence within the budget %d (%d probes)", args.mode, label, found["seq"],
                 found["probes"])
    return {"mode": args.mode, "sizes": sizes_dict(sizes), "budget_bytes": budget, "granule": args.granule,
            "masks": args.masks, "results": results, "probes": probes,
            "mask_checks": {"checked": dbp.masks_checked, "mismatches": dbp.mask_mismatches},
            "dynamo_graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
            "worker_s": time.perf_counter() - start}


def _search(f, budget: float, start: int, granule: int, max_probes: int, max_seq: int) -> dict:
    """Largest multiple of ``granule`` with ``f(seq) <= budget``, bracketed as (fits, next does not)."""
    seen: dict[int, float] = {}

    def value(s):
        if s not in seen:
            seen[s] = f(s)
        return seen[s]

    lo = start - start % granule or granule
    while value(lo) > budget and lo > granule:
        lo = max(granule, (lo // 2) // granule * granule)
    hi = None
    while len(seen) < max_probes:
        if hi is not None and hi - lo <= granule:
            break
        fits = sorted((s for s in seen if seen[s] <= budget))
        if hi is None:
            if len(fits) >= 2:  # secant through the two largest fitting probes
                s1, s2 = fits[-2], fits[-1]
                slope = (seen[s2] - seen[s1]) / (s2 - s1)
                guess = s2 + (budget - seen[s2]) / slope if slope > 0 else 2 * s2
            else:  # proportional
                guess = lo * budget / value(lo)
            guess = int(guess // granule * granule)
            if guess <= lo:
                guess = lo + granule
            guess = min(guess, max_seq)
            if guess <= lo:
                break  # at the cap
        else:
            slope = (value(hi) - value(lo)) / (hi - lo)
            guess = lo + (budget - value(lo)) / slope if slope > 0 else (lo + hi) / 2
            guess = int(guess // granule * granule)
            guess = min(max(guess, lo + granule), hi - granule)
            if guess in seen:
                guess = (lo + hi) // 2 // granule * granule
        if value(guess) <= budget:
            lo = guess
        else:
            hi = guess
    return {"seq": lo, "bytes": value(lo), "next_seq": hi, "next_bytes": seen.get(hi),
            "bracketed": hi is not None and hi - lo <= granule, "probes": len(seen),
            "capped": hi is None and lo >= max_seq}


def _parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description="memory benchmark worker")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--seq-search", action="store_true")
    p.add_argument("--candidate", default="eager")
    p.add_argument("--mode", default="full")
    p.add_argument("--sizes", required=True)
    p.add_argument("--rates", default="0,0.5,0.75,0.875")
    p.add_argument("--masks", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mask-names", default="")
    p.add_argument("--granule", type=int, default=32)
    p.add_argument("--max-probes", type=int, default=8)
    p.add_argument("--max-seq", type=int, default=16384)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = _parse(argv)
    result = search_worker(args) if args.seq_search else worker(args)
    with open(args.out, "w") as f:
        json.dump(result, f)


# ====================================================================== orchestrator side
def _spawn(argv: list[str], desc: str, timeout: float | None = None) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "benchmarks.memory", *argv, "--out", out]
        proc = subprocess.run(cmd, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = "\n".join((proc.stderr or "").splitlines()[-30:])
            raise RuntimeError(f"memory worker for {desc} failed (exit {proc.returncode}):\n{tail}")
        with open(out) as f:
            return json.load(f)


def run(mode: str, sizes: Sizes, names: list[str], rates: list[float], *, masks: int, seed: int,
        device: torch.device) -> dict:
    """One worker per candidate; backend candidates first (the hand-wrapped one reuses their gate names)."""
    order = sorted(names, key=lambda n: (not n.startswith("dropbp"), n != "hand-detach"))
    workers: dict[str, dict] = {}
    errors: dict[str, str] = {}
    mask_names = ""
    common = ["--mode", mode, "--sizes", json.dumps(sizes_dict(sizes)), "--rates", ",".join(map(str, rates)),
              "--masks", str(masks), "--seed", str(seed), "--device", str(device)]
    for name in tqdm(order, desc=f"{mode}: memory workers", unit="candidate", dynamic_ncols=True):
        argv = ["--worker", "--candidate", name, *common]
        if name == "hand-detach" and mask_names:
            argv += ["--mask-names", mask_names]
        try:
            workers[name] = _spawn(argv, f"{mode} {name}")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            errors[name] = str(e)
            log.error("%s", e)
            continue
        if workers[name].get("gate_names") and not mask_names:
            mask_names = json.dumps(workers[name]["gate_names"])
        log.info("%s %s: memory worker done in %.0f s", mode, name, workers[name]["worker_s"])
    return {"mode": mode, "workers": workers, "errors": errors, **summarise(workers, rates)}


def seq_search(mode: str, sizes: Sizes, rates: list[float], *, masks: int, granule: int, max_probes: int,
               seed: int, device: torch.device) -> dict:
    argv = ["--seq-search", "--mode", mode, "--sizes", json.dumps(sizes_dict(sizes)), "--rates",
            ",".join(map(str, rates)), "--masks", str(masks), "--granule", str(granule), "--max-probes",
            str(max_probes), "--max-seq", str(64 * sizes.seq), "--seed", str(seed), "--device", str(device)]
    with tqdm(total=1, desc=f"{mode}: sequence search (worker)", unit="run", dynamic_ncols=True) as bar:
        result = _spawn(argv, f"{mode} sequence search")
        bar.update()
    base = result["results"]["eager"]["seq"]
    for r in result["results"].values():
        r["seq_vs_eager"] = r["seq"] / base if base else None
    return result


def _ratio(a: float, b: float) -> float | None:
    """a / b; 1 when both are 0 (nothing saved by either), None when only b is."""
    if b:
        return a / b
    return 1.0 if not a else None


def summarise(workers: dict[str, dict], rates: list[float]) -> dict:
    saved_summary, peak_summary = {}, {}
    for name, w in workers.items():
        saved = w["saved"]
        s0 = saved["0"][0]["bytes"]
        entry = {"baseline_bytes": s0, "per_rate": {}}
        s1 = saved.get(rate_key(ALL_DROPPED))
        share = None
        if s1:
            share = 1 - s1[0]["bytes"] / s0
            entry["all_dropped_bytes"] = s1[0]["bytes"]
            entry["branch_share"] = share
        forced = w.get("saved_forced") or {}
        per_branch = {}
        for label, suffix in (("attention", "self_attn"), ("mlp", "mlp")):
            if label in forced and forced[label]["dropped"]:
                per_branch[suffix] = (s0 - forced[label]["bytes"]) / len(forced[label]["dropped"])
        for key, items in saved.items():
            values = [i["bytes"] for i in items]
            ratio = [v / s0 for v in values]
            e = {"bytes_mean": statistics.fmean(values), "ratio": spread(ratio), "ratio_mean": statistics.fmean(ratio),
                 "masks": len(items)}
            branches = items[0]["branches"]
            if branches:
                e["drop_fraction"] = statistics.fmean(len(i["dropped"]) / i["branches"] for i in items)
            p = float(key)
            if share is not None and 0 < p < ALL_DROPPED:
                e["expected_nominal"] = 1 - p * share
                e["deviation_nominal"] = e["ratio_mean"] / e["expected_nominal"] - 1
                if "drop_fraction" in e:
                    e["expected_realised_fraction"] = 1 - e["drop_fraction"] * share
                if len(per_branch) == 2:
                    exact = [(s0 - sum(per_branch[d.rsplit(".", 1)[1]] for d in i["dropped"])) / s0 for i in items]
                    e["expected_mask_exact"] = statistics.fmean(exact)
                    e["deviation_mask_exact"] = e["ratio_mean"] / e["expected_mask_exact"] - 1
            entry["per_rate"][key] = e
        if per_branch:
            entry["per_branch_bytes"] = per_branch
        saved_summary[name] = entry
        peak_summary[name] = {k: {"rise": spread([x["rise"] for x in v]), "peak": spread([x["peak"] for x in v])}
                              for k, v in w["saved"].items()}
    comparisons = {}
    if "hand-detach" in workers:
        for name in workers:
            if not name.startswith("dropbp"):
                continue
            comp = {}
            for key, hand_items in workers["hand-detach"]["saved"].items():
                mine = workers[name]["saved"].get(key)
                if not mine:
                    continue
                same = [a["dropped"] for a in mine] == [b["dropped"] for b in hand_items]
                hand_rise = peak_summary["hand-detach"][key]["rise"]["max"]
                my_rise = peak_summary[name][key]["rise"]["max"]
                comp[key] = {"same_masks": same,
                             "saved_vs_hand": _ratio(statistics.fmean(a["bytes"] for a in mine),
                                                     statistics.fmean(b["bytes"] for b in hand_items)),
                             "peak_rise_vs_hand": _ratio(my_rise, hand_rise)}
            comparisons[name] = comp
    return {"saved": saved_summary, "peak": peak_summary, "vs_hand": comparisons}


if __name__ == "__main__":
    main()
