"""Run every benchmark and write the results.

    python -m benchmarks.run                   # full run: ~25 min on 2 CPU cores; updates docs/benchmarks.md
    python -m benchmarks.run --quick           # tiny model, 1 warm-up + 2 rounds: a smoke test
    python -m benchmarks.run --device cuda     # on a GPU (CUDA-event timing, torch.cuda peak memory)
    python -m benchmarks.run --candidates eager,hand-detach,dropbp-eager --only step

Writes ``benchmarks/results/results.json`` and ``results.md`` (``quick.*`` in quick mode) and, for a
full run, the summary between the ``bench`` markers of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from benchmarks import memory, report, step_time
from benchmarks.common import ALL_MODES, CANDIDATES, FULL_SIZES, MODES, QUICK_SIZES, RATES, Sizes, machine, sizes_dict

log = logging.getLogger("benchmarks")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DOC = os.path.join(ROOT, "docs", "benchmarks.md")  # its bench markers hold the summary of the last full run
STAGES = ("step", "memory", "seq")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few rounds (smoke test)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help=f"comma-separated subset of {CANDIDATES}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {ALL_MODES} (default: full,lora)")
    p.add_argument("--only", default=",".join(STAGES), help=f"stages to run: {STAGES}")
    p.add_argument("--rates", default=",".join(map(str, RATES)), help="drop rates (0 and 'all detached' are added)")
    p.add_argument("--rounds", type=int, help="measured rounds (default 6; quick 2)")
    p.add_argument("--warmup", type=int, help="warm-up rounds (default 2; quick 1)")
    p.add_argument("--masks", type=int, help="masks per rate for memory and the sequence search (default 2)")
    p.add_argument("--seq-modes", help="modes for the sequence search (default: full)")
    p.add_argument("--granule", type=int, help="sequence-length step of the search (default 32; quick 8)")
    p.add_argument("--max-probes", type=int, default=8, help="probes per sequence search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", metavar="JSON", help="rewrite the markdown (and docs/benchmarks.md) from a results JSON")
    p.add_argument("--cold-compile", action="store_true",
                   help="compile into a fresh, empty inductor cache (compile times without the on-disk caches)")
    p.add_argument("--out", help="output folder (default benchmarks/results)")
    p.add_argument("--readme", dest="readme", action="store_true", default=None,
                   help="update the bench section of docs/benchmarks.md (default: full runs only)")
    p.add_argument("--no-readme", dest="readme", action="store_false")
    for field in Sizes.__dataclass_fields__:
        p.add_argument(f"--{field}", type=int, help=f"model/input size override ({field})")
    args = p.parse_args(argv)
    base = QUICK_SIZES if args.quick else FULL_SIZES
    args.sizes = Sizes(**{f: getattr(args, f) or getattr(base, f) for f in Sizes.__dataclass_fields__})
    args.rounds = args.rounds or (2 if args.quick else 6)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.masks = args.masks or 2
    args.granule = args.granule or (8 if args.quick else 32)
    args.seq_modes = args.seq_modes or "full"
    args.candidates = [c for c in args.candidates.split(",") if c]
    unknown = sorted(set(args.candidates) - set(CANDIDATES))
    if unknown:
        p.error(f"unknown candidates {unknown}; choose from {CANDIDATES}")
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.modes) - set(ALL_MODES):
        p.error(f"unknown modes {sorted(set(args.modes) - set(ALL_MODES))}; choose from {ALL_MODES}")
    args.seq_modes = [m for m in args.seq_modes.split(",") if m]
    args.only = [s for s in args.only.split(",") if s]
    if set(args.only) - set(STAGES):
        p.error(f"unknown stages {sorted(set(args.only) - set(STAGES))}; choose from {STAGES}")
    args.rates = [float(r) for r in args.rates.split(",") if float(r) > 0]
    if not all(0 < r < 1 for r in args.rates):
        p.error("rates must be in (0, 1)")
    if args.readme is None:
        args.readme = not args.quick
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results")
    return args


def _load() -> float | None:
    """The 1-minute load average (how busy the machine was: other work slows every candidate)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _git_state() -> dict:
    """The commit measured, and whether dropbp_fx/ or passes/ differ from it."""
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "library_modified": bool(git("status", "--porcelain", "--", "dropbp_fx", "passes"))}


def rewrite_report(args) -> dict:
    """The markdown and the docs/benchmarks.md section again, from saved results (after a change to the report)."""
    with open(args.report_only) as f:
        results = json.load(f)
    results["targets"] = report.targets(results)
    with open(args.report_only, "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.splitext(args.report_only)[0] + ".md", "w") as f:
        f.write(report.full_report(results))
    if args.readme and not results["meta"]["quick"]:  # the docs hold full runs only
        report.update_bench_section(BENCH_DOC, report.readme_section(results))
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report_only:
        results = rewrite_report(args)
        print("\n".join(report.main_table(results)))
        print("\n".join(report.targets_table(results["targets"], detail=False)))
        return results
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    os.makedirs(args.out, exist_ok=True)
    stem = "quick" if args.quick else "results"
    json_path, md_path = os.path.join(args.out, f"{stem}.json"), os.path.join(args.out, f"{stem}.md")
    if args.cold_compile:  # read lazily by inductor (and inherited by the memory workers)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dropbp-bench-inductor-")
    cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    command = "python -m benchmarks.run" + ("" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(
        sys.argv[1:] if argv is None else argv))
    results: dict = {
        "meta": {"date": datetime.date.today().isoformat(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
                 "command": command, "quick": args.quick, "machine": machine(device), "sizes": sizes_dict(args.sizes),
                 "sizes_description": args.sizes.describe(), "candidates": args.candidates, "modes": args.modes,
                 "rates": args.rates, "rounds": args.rounds, "warmup": args.warmup, "masks": args.masks,
                 "seed": args.seed, "inductor_cache_dir": cache_dir,
                 "inductor_cache_warm": bool(cache_dir and os.path.isdir(cache_dir) and os.listdir(cache_dir))},
        "step_time": {}, "memory": {}, "seq_search": {}, "errors": {},
    }
    results["meta"]["git"] = _git_state()
    results["meta"]["load"] = [_load()]
    start = time.perf_counter()

    def save():
        results["meta"]["run_s"] = time.perf_counter() - start
        results["targets"] = report.targets(results)
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        with open(md_path, "w") as f:
            f.write(report.full_report(results))

    def stage(key: str, fn, section: str, mode: str):
        """Run one benchmark; its result (or its error) is saved at once."""
        began = time.perf_counter()
        try:
            res = results[section][mode] = fn()
            return res
        except Exception as e:  # noqa: BLE001: record and go on with the other benchmarks
            results["errors"][key] = traceback.format_exc()
            log.error("%s failed: %s", key, e)
            return None
        finally:
            results["meta"].setdefault("stage_s", {})[key] = time.perf_counter() - began
            results["meta"]["load"].append(_load())
            save()

    with logging_redirect_tqdm():
        log.info("%s; %s; candidates %s; %d warm-up + %d rounds", args.sizes.describe(), results["meta"]["machine"]["cpu"],
                 ",".join(args.candidates), args.warmup, args.rounds)
        if "step" in args.only:
            for mode in args.modes:
                stage(f"step_time {mode}", lambda: step_time.run(
                    mode, args.sizes, args.candidates, args.rates, rounds=args.rounds, warmup=args.warmup,
                    seed=args.seed, device=device), "step_time", mode)
        if "memory" in args.only:
            names = [c for c in args.candidates if c != "dropbp-aot_eager"]  # left out to keep the run short
            for mode in args.modes:
                res = stage(f"memory {mode}", lambda: memory.run(
                    mode, args.sizes, names, args.rates, masks=args.masks, seed=args.seed, device=device),
                    "memory", mode)
                for name, err in (res or {}).get("errors", {}).items():
                    results["errors"][f"memory {mode} {name}"] = err
        if "seq" in args.only and {"eager", "dropbp-eager"} <= set(args.candidates):
            for mode in args.seq_modes:
                stage(f"seq_search {mode}", lambda: memory.seq_search(
                    mode, args.sizes, args.rates, masks=args.masks, granule=args.granule,
                    max_probes=args.max_probes, seed=args.seed, device=device), "seq_search", mode)
    save()
    if args.cold_compile:
        shutil.rmtree(cache_dir, ignore_errors=True)
    log.info("wrote %s and %s (%.1f min)", json_path, md_path, results["meta"]["run_s"] / 60)
    if args.readme:
        report.update_bench_section(BENCH_DOC, report.readme_section(results))
        log.info("updated the benchmark section of %s", BENCH_DOC)
    # The final table, on stdout.
    print("\n".join(report.main_table(results)))
    print("\n".join(report.targets_table(results["targets"], detail=False)))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main()
