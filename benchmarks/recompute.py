"""Benchmark: DropBP's ``recompute=True`` against HF gradient checkpointing, in one process, side by side.

    python -m benchmarks.recompute                      # LLaMA-style suite config + QLoRA variant
    python -m benchmarks.recompute --quick              # tiny sizes (a smoke run)

Candidates, for full fine-tuning and QLoRA (NF4 base via bitsandbytes, LoRA r=8, prefixed ``qlora_``):

* ``plain``: the model, eager; ``hf_checkpoint``: the same after ``model.gradient_checkpointing_enable()``
  (non-reentrant); ``dropbp`` / ``dropbp_recompute``: ``torch.compile(model, backend=DropBP(inner=...,
  recompute=False/True))``.

Per candidate and rate p in (0, 0.5, 0.875) (``plain`` and ``hf_checkpoint`` drop nothing: one measurement per
round, the same figure under every p):

* ``saved_bytes``: bytes autograd holds for backward at the end of the forward (``saved_tensors_hooks``,
  :class:`benchmarks.common.SavedBytes`: each storage once, parameters excluded), mean over ``--masks`` masks
  (the same mask steps for both DropBP candidates);
* ``peak_rise_bytes``: a step's peak resident set over what the process held before it (VmHWM reset through
  ``/proc/self/clear_refs``; the process re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
  tensors leave the resident set);
* ``step_s``: median of ``--rounds`` interleaved rounds (candidate order rotated per round) after
  ``--warmup`` steps of each; ``step_ratio`` = over plain's median in the same mode (the figure to compare);
* ``longest_seq_ratio``: saved bytes measured at ``seq * (1, 2, 4, 8, 10)`` (batch as given), the longest sequence
  whose saved bytes fit plain's at ``seq`` and p = 0 (piecewise-linear interpolation; beyond the last point,
  the last segment extended, flagged ``extrapolated``), over ``seq``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
from dataclasses import replace

import torch
from tqdm import tqdm

import dropbp_fx
from benchmarks.common import (FULL_SIZES, QUICK_SIZES, Candidate, PeakMemory, SavedBytes, Timer, build_model,
                               describe_machine, machine, make_batch, sizes_dict, spread, with_seq)

log = logging.getLogger("benchmarks.recompute")

CANDIDATES = ("plain", "hf_checkpoint", "dropbp", "dropbp_recompute")
RATES = (0.0, 0.5, 0.875)
SEQ_FACTORS = (1, 2, 4, 8, 10)
MASK_STEP = 7000  # memory masks: steps MASK_STEP + m; timing round r uses step MASK_STEP + 100 + r
PAPER_SEQ_RATIO = 6.2


def key(rate: float) -> str:
    return f"p{rate:g}"


def make(name: str, mode: str, sizes, seed: int, inner: str) -> Candidate:
    model = build_model(sizes, mode, seed, torch.device("cpu"))
    model.config.use_cache = False
    label = f"{'qlora_' if mode == 'qlora' else ''}{name}"
    if name == "plain":
        return Candidate(label, model, model, seed=seed)
    if name == "hf_checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        c = Candidate(label, model, model, seed=seed)
        c.closure_tensors = _watch_checkpoint_keywords(model)
        return c
    dbp = dropbp_fx.DropBP(drop_rate=0.0, inner=inner, seed=seed, policy="topup",
                           recompute=name == "dropbp_recompute")
    return Candidate(label, model, torch.compile(model, backend=dbp, dynamic=False), dbp=dbp, seed=seed)


def _watch_checkpoint_keywords(model) -> list:
    """transformers' checkpointed layers pass their keyword inputs (the rotary cos/sin, the mask) to
    ``checkpoint`` inside a ``functools.partial``: held for backward, but never through ``saved_tensors_hooks``
    (only positional inputs are). Record them, so that they count as DropBP's checkpoint inputs do."""
    seen: list = []
    for module in model.modules():
        original = getattr(module, "_gradient_checkpointing_func", None)
        if original is None:
            continue

        def watched(function, *args, _original=original, **kwargs):
            values = list(getattr(function, "keywords", {}).values()) + list(kwargs.values())
            flat = [v for x in values for v in (x if isinstance(x, (tuple, list)) else (x,))]
            seen.extend(t for t in flat if isinstance(t, torch.Tensor))
            return _original(function, *args, **kwargs)
        module._gradient_checkpointing_func = watched
    return seen


def _quant_state_storages(model) -> set[int]:
    """The 4-bit weights' quantisation state (``absmax``, ``code``, nested): model tensors, not activations. A
    gate's checkpoint receives them as inputs (Dynamo lifts them), bitsandbytes holds them by reference."""
    out = set()
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            out |= {t.untyped_storage().data_ptr() for t in (getattr(state, "absmax", None),
                                                             getattr(state, "code", None))
                    if isinstance(t, torch.Tensor)}
            state = getattr(state, "state2", None)
    return out


def saved_bytes(c: Candidate, batch, rate: float, masks: int) -> list[int]:
    """Saved activation bytes at the end of the forward, one per mask (one mask where nothing is dropped)."""
    values = []
    closure = getattr(c, "closure_tensors", None)
    for m in range(masks if c.dbp is not None and rate > 0 else 1):
        c.set_rate(rate)
        c.set_step(MASK_STEP + m)
        rec = SavedBytes(c.model)
        if closure is not None:
            closure.clear()
        with rec.hooks():
            loss = c.forward(batch)
        storages = {ptr: n for ref, ptr, n in rec.items if ref() is not None}
        for t in closure or ():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        exclude = rec.exclude | _quant_state_storages(c.model)
        values.append(sum(n for ptr, n in storages.items() if ptr not in exclude))
        del loss
    if closure is not None:
        closure.clear()
    return values


def peak_rise(c: Candidate, batch, rate: float, probe: PeakMemory) -> int | None:
    if not probe.available():
        return None
    c.set_rate(rate)
    c.set_step(MASK_STEP)
    before = probe.reset()
    c.train_step(batch)
    return probe.peak() - before


def longest(points: dict[int, float], budget: float) -> tuple[float, bool]:
    """The sequence where the bytes reach ``budget``, by piecewise-linear interpolation (extrapolated: flag)."""
    xs = sorted(points)
    if points[xs[0]] > budget:  # over the budget at once: the first segment, towards 0
        return xs[0] * budget / points[xs[0]], False
    for a, b in zip(xs, xs[1:]):
        if points[b] > budget:
            return a + (budget - points[a]) * (b - a) / (points[b] - points[a]), False
    a, b = xs[-2], xs[-1]
    slope = (points[b] - points[a]) / (b - a)
    return (b + (budget - points[b]) / slope if slope > 0 else float("inf")), True


def run_mode(mode: str, sizes, args) -> dict:
    batch = make_batch(sizes, args.seed, torch.device("cpu"))
    timer, probe = Timer(torch.device("cpu")), PeakMemory(torch.device("cpu"))
    cands = {}
    for name in tqdm(CANDIDATES, desc=f"{mode}: build + compile", unit="candidate", leave=False):
        c = cands[name] = make(name, mode, sizes, args.seed, args.inner)
        for r in RATES if c.dbp is not None else (0.0,):  # compiles every piece both mask kinds need
            for _ in range(args.warmup):
                c.set_rate(r)
                c.train_step(batch)
        log.info("%s %s: built and warmed up", mode, c.name)
    # --- memory at the benchmark's sequence
    saved = {n: {key(r): saved_bytes(c, batch, r, args.masks) for r in (RATES if c.dbp is not None else (0.0,))}
             for n, c in cands.items()}
    peaks = {n: {key(r): peak_rise(c, batch, r, probe) for r in (RATES if c.dbp is not None else (0.0,))}
             for n, c in cands.items()}
    # --- step time: interleaved rounds, order rotated per round
    slots = [(n, r) for n, c in cands.items() for r in (RATES if c.dbp is not None else (0.0,))]
    times: dict[tuple, list] = {s: [] for s in slots}
    for rnd in tqdm(range(args.rounds), desc=f"{mode}: timed rounds", unit="round", leave=False):
        shift = rnd % len(slots)
        for n, r in slots[shift:] + slots[:shift]:
            c = cands[n]
            c.set_rate(r)
            c.set_step(MASK_STEP + 100 + rnd)
            dt, _ = timer(lambda: c.train_step(batch))
            times[(n, r)].append(dt)
    # --- saved bytes against the sequence length
    for key_name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key_name):
            setattr(torch._dynamo.config, key_name, 1000)
    curves: dict[tuple, dict] = {}
    for n, r in tqdm(slots, desc=f"{mode}: saved bytes vs sequence", unit="config", leave=False):
        curves[(n, r)] = {}
        for f in SEQ_FACTORS:
            seq_batch = make_batch(with_seq(sizes, sizes.seq * f), args.seed, torch.device("cpu"))
            curves[(n, r)][sizes.seq * f] = statistics.fmean(saved_bytes(cands[n], seq_batch, r, args.masks))
    budget = curves[("plain", 0.0)][sizes.seq]
    plain_time = statistics.median(times[("plain", 0.0)])
    prefix = "qlora_" if mode == "qlora" else ""
    out = {}
    for n, c in cands.items():
        entry = {}
        for r in RATES:
            slot = (n, r if c.dbp is not None else 0.0)
            seq, extrapolated = longest(curves[slot], budget)
            t = times[slot]
            entry[key(r)] = {
                "saved_bytes": statistics.fmean(saved[n][key(slot[1])]), "saved_bytes_per_mask": saved[n][key(slot[1])],
                "saved_vs_plain_p0": statistics.fmean(saved[n][key(slot[1])]) / saved["plain"]["p0"][0],
                "peak_rise_bytes": peaks[n][key(slot[1])],
                "step_s": statistics.median(t), "step_s_range": spread(t), "step_ratio": statistics.median(t) / plain_time,
                "longest_seq": seq, "longest_seq_ratio": seq / sizes.seq, "longest_seq_extrapolated": extrapolated,
                "saved_bytes_vs_seq": {str(s): b for s, b in curves[slot].items()},
                "rate_independent": c.dbp is None,
            }
        if c.dbp is not None:
            entry["mask_checks"] = {"checked": c.masks_checked, "mismatches": c.mask_mismatches}
            entry["gates"] = len(c.dbp.gate_names)
        out[prefix + n] = entry
    return out


def acceptance(candidates: dict) -> dict:
    result = {}
    for prefix in ("", "qlora_"):
        rec, hf = candidates.get(prefix + "dropbp_recompute"), candidates.get(prefix + "hf_checkpoint")
        if rec is None or hf is None:
            continue
        result[prefix + "recompute"] = {
            "saved_p0.5_le_hf_checkpoint": rec["p0.5"]["saved_bytes"] <= hf["p0.5"]["saved_bytes"],
            "saved_p0.5_vs_hf_checkpoint": rec["p0.5"]["saved_bytes"] / hf["p0.5"]["saved_bytes"],
            "step_below_hf_checkpoint_at_p_ge_0.5": all(rec[k]["step_s"] < hf[k]["step_s"] for k in ("p0.5", "p0.875")),
            "step_vs_hf_checkpoint": {k: rec[k]["step_s"] / hf[k]["step_s"] for k in ("p0", "p0.5", "p0.875")},
            "longest_seq_ratio_p0.875": rec["p0.875"]["longest_seq_ratio"],
            "longest_seq_p0.875_ge_6.2x": rec["p0.875"]["longest_seq_ratio"] >= PAPER_SEQ_RATIO,
        }
    return result


def table(results: dict) -> str:
    lines = ["| candidate | p | saved MB | saved / plain p0 | peak rise MB | step / plain (range) | longest seq / plain |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in results["candidates"].items():
        for r in RATES:
            e = entry[key(r)]
            rng = e["step_s_range"]
            plain = e["step_s"] / e["step_ratio"]
            peak = "n/a" if e["peak_rise_bytes"] is None else f"{e['peak_rise_bytes'] / 2**20:.1f}"
            seq = f"{e['longest_seq_ratio']:.2f}x" + (" (extrapolated)" if e["longest_seq_extrapolated"] else "")
            lines.append(f"| {name} | {r:g}{' (no drop)' if e['rate_independent'] else ''} | "
                         f"{e['saved_bytes'] / 2**20:.1f} | {e['saved_vs_plain_p0']:.3f} | {peak} | "
                         f"{e['step_ratio']:.2f} ({rng['min'] / plain:.2f}-{rng['max'] / plain:.2f}) | {seq} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5))
    FigureCanvasAgg(fig)
    names = list(results["candidates"])
    panels = (("saved_vs_plain_p0", "saved activation bytes / plain p=0"), ("step_ratio", "step time / plain"),
              ("longest_seq_ratio", "longest sequence / plain p=0"))
    width = 0.8 / len(names)
    for i, (field, title) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for j, name in enumerate(names):
            ys = [results["candidates"][name][key(r)][field] for r in RATES]
            ax.bar([k + j * width for k in range(len(RATES))], ys, width, label=name)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(RATES))], [f"p={r:g}" for r in RATES])
        ax.set_title(title)
        if field == "longest_seq_ratio":
            ax.axhline(PAPER_SEQ_RATIO, color="k", ls="--", lw=0.8, label="paper: 6.2x")
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(results["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # freed tensors leave the resident set (peak RSS)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.recompute", *argv],
                  dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    p = argparse.ArgumentParser(prog="python -m benchmarks.recompute", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes")
    p.add_argument("--seq", type=int, help="sequence length (default: the suite's)")
    p.add_argument("--batch", type=int, help="batch size (default: the suite's)")
    p.add_argument("--modes", default="full,qlora")
    p.add_argument("--inner", default="eager", help="DropBP's inner compiler (eager: the same kernels as plain)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--masks", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/recompute")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    sizes = replace(sizes, seq=args.seq or sizes.seq, batch=args.batch or sizes.batch)
    candidates = {}
    for mode in args.modes.split(","):
        candidates.update(run_mode(mode, sizes, args))
    info = machine(torch.device("cpu"))
    results = {
        "candidates": candidates, "acceptance": acceptance(candidates),
        "title": f"{sizes.describe()}; inner {args.inner}; {describe_machine(info)}",
        "sizes": sizes_dict(sizes), "inner": args.inner, "rates": list(RATES), "seq_factors": list(SEQ_FACTORS),
        "rounds": args.rounds, "warmup": args.warmup, "masks": args.masks, "machine": info,
        "date": datetime.date.today().isoformat(), "command": "python -m benchmarks.recompute " + " ".join(argv),
        "notes": "plain and hf_checkpoint drop nothing: one measurement, shown under every p (rate_independent)",
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    md = table(results)
    with open(args.out + ".md", "w") as f:
        f.write(f"# DropBP recompute vs HF gradient checkpointing\n\n{results['title']}\n\n`{results['command']}`, "
                f"{results['date']}\n\n{md}\n\nAcceptance: `{json.dumps(results['acceptance'])}`\n")
    plot(results, args.out + ".png")
    log.info("wrote %s.{json,md,png}", args.out)
    print(md)


if __name__ == "__main__":
    main()
