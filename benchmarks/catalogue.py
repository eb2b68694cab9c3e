"""The catalogue: every model type of transformers' auto mappings, built from its default config shrunk by
one generic rule (:mod:`dropbp_fx.shrink`), trained 4 steps through ``torch.compile(backend="dropbp")`` and
checked against the hook oracle each step (:mod:`benchmarks.catalogue_check`).

    python -m benchmarks.catalogue                          # the causal-LM mapping, default inner compiler
    python -m benchmarks.catalogue --mapping all            # causal-lm, masked-lm, seq2seq-lm, image-classification
    python -m benchmarks.catalogue --types llama,bloom      # re-run some types; merged into the JSON
    python -m benchmarks.catalogue --resume                 # only the types the JSON does not have yet
    python -m benchmarks.catalogue --sample 10 --seed 3     # a random sample
    python -m benchmarks.catalogue --multi                  # several models trained in turn in one process
    python -m benchmarks.catalogue --render                 # rewrite docs/catalogue.md from the JSON only
    python -m benchmarks.catalogue --one llama              # one check in this process: a JSON line on stdout

Each type runs in its own subprocess (``--one``) under ``--timeout``. Results are merged into
``benchmarks/results/catalogue.json`` (key ``mapping/type``) after every model, so an interrupted sweep
keeps what it finished; ``docs/catalogue.md`` is rewritten at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

log = logging.getLogger("benchmarks.catalogue")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_PATH = os.path.join(ROOT, "benchmarks", "results", "catalogue.json")
MD_PATH = os.path.join(ROOT, "docs", "catalogue.md")
# Failures looked at by hand, shown beside the status while the type still fails that way
NOTES: dict[tuple[str, str], str] = {}
# Causes of a compile time above SLOW_COMPILE x plain torch.compile's, found by hand, beside the generic one
COMPILE_CAUSES: dict[str, str] = {}
SLOW_COMPILE = 3.0
MULTI_TYPES = ("llama", "olmo2", "gpt2", "mistral", "qwen2", "opt", "gemma2", "falcon")


def default_inner() -> str:
    from dropbp_fx.config import DEFAULTS

    return DEFAULTS["inner"]


def parse_args(argv=None) -> argparse.Namespace:
    from benchmarks.catalogue_check import MAPPINGS

    p = argparse.ArgumentParser(prog="python -m benchmarks.catalogue", description=__doc__.split("\n\n")[0])
    p.add_argument("--mapping", default="causal-lm", choices=[*MAPPINGS, "all"])
    p.add_argument("--types", help="comma-separated model types (default: every type of the mapping)")
    p.add_argument("--inner", default=None, help="inner compiler of the dropbp backend (default: the backend's)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per model (default 240)")
    p.add_argument("--jobs", type=int, default=1, help="models checked at once (default 1)")
    p.add_argument("--sample", type=int, help="check a random sample of this many types")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--resume", action="store_true", help="skip types already in the JSON (same inner compiler)")
    p.add_argument("--multi", action="store_true", help="train --types (default: a fixed set) in one process")
    p.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    p.add_argument("--one", metavar="TYPE", help="check one type in this process, print its JSON record")
    p.add_argument("--json", default=JSON_PATH, help=f"results JSON (default {os.path.relpath(JSON_PATH, ROOT)})")
    p.add_argument("--md", default=MD_PATH, help=f"markdown report (default {os.path.relpath(MD_PATH, ROOT)})")
    args = p.parse_args(argv)
    args.inner = args.inner or default_inner()
    return args


# ----------------------------------------------------------------------------------------- running
def run_one_subprocess(model_type: str, mapping: str, inner: str, timeout: float) -> dict:
    """``--one`` in a fresh interpreter; a timeout or a dead interpreter becomes a record too."""
    from benchmarks.catalogue_check import Record, as_dict

    cmd = [sys.executable, "-m", "benchmarks.catalogue", "--one", model_type, "--mapping", mapping, "--inner", inner]
    start = time.perf_counter()
    rec = Record(mapping, model_type, inner, date=datetime.date.today().isoformat())
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "DROPBP_CATALOGUE_TIMEOUT": str(timeout - 5)})
    except subprocess.TimeoutExpired:
        rec.status, rec.reason = "timeout", f"no result within {timeout:.0f} s"
        rec.seconds = round(time.perf_counter() - start, 1)
        return as_dict(rec)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or [""]
    rec.status = "crash"
    rec.reason = f"exit code {proc.returncode}: {tail[0][:300]}"
    rec.seconds = round(time.perf_counter() - start, 1)
    return as_dict(rec)


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"meta": {}, "results": {}, "multi": {}}


def save(data: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def versions() -> dict:
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"torch": torch.__version__, "transformers": transformers.__version__, "commit": commit}


def selected(args) -> list[tuple[str, str]]:
    from benchmarks.catalogue_check import MAPPINGS, model_types

    mappings = list(MAPPINGS) if args.mapping == "all" else [args.mapping]
    chosen = []
    for mapping in mappings:
        types = model_types(mapping)
        if args.types:
            wanted = [t for t in args.types.split(",") if t]
            unknown = sorted(set(wanted) - set(types))
            if unknown and len(mappings) == 1:
                raise SystemExit(f"not in the {mapping} mapping: {unknown}")
            types = [t for t in wanted if t in types]
        chosen += [(mapping, t) for t in types]
    if args.sample:
        chosen = sorted(random.Random(args.seed).sample(chosen, min(args.sample, len(chosen))))
    return chosen


def sweep(args) -> dict:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    data = load(args.json)
    todo = selected(args)
    if args.resume:
        todo = [(m, t) for m, t in todo if data["results"].get(f"{m}/{t}", {}).get("inner") != args.inner]
    log.info("checking %d model types (inner %s, timeout %.0f s, %d job(s))", len(todo), args.inner, args.timeout,
             args.jobs)
    start = time.perf_counter()
    with logging_redirect_tqdm(), ThreadPoolExecutor(args.jobs) as pool, \
            tqdm(total=len(todo), unit="model", dynamic_ncols=True) as bar:
        futures = {pool.submit(run_one_subprocess, t, m, args.inner, args.timeout): (m, t) for m, t in todo}
        for future in as_completed(futures):
            mapping, model_type = futures[future]
            rec = future.result()
            data["results"][f"{mapping}/{model_type}"] = rec
            save(data, args.json)
            log.info("%s/%s: %s in %.0f s %s", mapping, model_type, rec["status"], rec["seconds"], rec["reason"][:120])
            bar.set_postfix_str(f"{model_type}: {rec['status']}")
            bar.update()
    data["meta"] = {**versions(), "date": datetime.date.today().isoformat(), "inner": args.inner,
                    "command": "python -m benchmarks.catalogue " + shlex.join(sys.argv[1:]),
                    "last_sweep_seconds": round(time.perf_counter() - start), "last_sweep_models": len(todo)}
    save(data, args.json)
    return data


def multi(args) -> dict:
    """One process, several different models compiled and trained in turn (as a notebook would)."""
    from benchmarks.catalogue_check import as_dict, check

    data = load(args.json)
    types = [t for t in (args.types.split(",") if args.types else MULTI_TYPES) if t]
    mapping = "causal-lm" if args.mapping == "all" else args.mapping
    results = []
    for model_type in types:
        rec = as_dict(check(model_type, mapping, args.inner))
        alone = data["results"].get(f"{mapping}/{model_type}", {})
        rec["alone"] = alone.get("status") if alone.get("inner") == args.inner else None
        results.append(rec)
        log.info("multi %s: %s (alone: %s) %s", model_type, rec["status"], rec["alone"], rec["reason"][:120])
    data["multi"] = {"mapping": mapping, "inner": args.inner, "date": datetime.date.today().isoformat(),
                     "results": results, **versions()}
    save(data, args.json)
    return data


# ----------------------------------------------------------------------------------------- the report
def reason_class(rec: dict) -> str:
    """The reason with names, numbers and quoted parts blanked: records failing the same way group together."""
    text = rec["reason"].split(": ", 1)[-1] if rec["status"] == "baseline-fails" else rec["reason"]
    text = re.sub(r"step \d+(, dropped \[.*?\])?: ", "", text)
    text = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "'…'", text)
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    return text[:110]


def compile_ratio(rec: dict) -> float | None:
    """dropbp's compile time over plain torch.compile's (same inner compiler), None where either is missing."""
    ours, plain = rec.get("compile_s"), rec.get("plain_compile_s")
    if ours is None or plain is None:
        return None
    return max(ours, 0.0) / max(plain, 0.1)  # under 0.1 s (the eager inner compiler: Dynamo alone) counts as 0.1


def compile_cell(rec: dict) -> str:
    ratio = compile_ratio(rec)
    if ratio is None:
        return ""
    text = f"{rec['compile_s']:.1f} / {rec['plain_compile_s']:.1f}"
    return f"{text} (**{ratio:.1f}x**)" if ratio > SLOW_COMPILE else f"{text} ({ratio:.1f}x)"


def compile_cause(rec: dict) -> str:
    """Why dropbp compiles longer: a cause found by hand (COMPILE_CAUSES), else the number of pieces."""
    if rec["type"] in COMPILE_CAUSES:
        return COMPILE_CAUSES[rec["type"]]
    if rec.get("pieces"):
        return (f"{rec['pieces']} pieces compiled one by one (trunk segments and branches, each open and closed), "
                "where plain torch.compile compiles one graph")
    return "Dynamo tracing and dropbp's graph passes (nothing compiled per piece)"


def render(data: dict) -> str:
    from benchmarks.catalogue_check import FAILURES, MAPPINGS, STATUSES

    rows = sorted(data["results"].values(), key=lambda r: (list(MAPPINGS).index(r["mapping"]), r["type"]))
    meta = data.get("meta", {})
    lines = ["# Model catalogue", ""]
    for mapping in MAPPINGS:
        recs = [r for r in rows if r["mapping"] == mapping]
        if not recs:
            continue
        counts = {s: sum(r["status"] == s for r in recs) for s in STATUSES}
        buildable = len(recs) - counts["unbuildable"] - counts["baseline-fails"]
        others = ", ".join(f"{n} {s}" for s, n in counts.items() if n and s != "pass")
        lines.append(f"- **{counts['pass']} of {buildable} buildable {mapping} types pass** ({len(recs)} types in "
                     f"the mapping{'; ' + others if others else ''})")
    inners = sorted({r["inner"] for r in rows})
    lines += ["", f"Generated {meta.get('date', '?')} with torch {meta.get('torch', '?')}, transformers "
              f"{meta.get('transformers', '?')}, inner compiler {', '.join(inners)}, code at "
              f"`{meta.get('commit', '?')}` (each record carries its own date). Last sweep: "
              f"`{meta.get('command', '?')}` ({meta.get('last_sweep_models', '?')} models in "
              f"{meta.get('last_sweep_seconds', 0) / 60:.0f} min on {os.cpu_count()} CPU cores).", "",
              "Each type: `AutoConfig.for_model(type)` shrunk by one generic rule (`dropbp_fx/shrink.py`: 2 layers, "
              "hidden 64, 4 heads, vocabulary 256, dropout 0, ...), fp32, train mode, seed 0; "
              f"`torch.compile(model, backend=\"dropbp\", options={{\"drop_rate\": 0.5, ...}})`, 4 SGD steps; each "
              "step the forward must equal the eager model's and the gradients the hook oracle's "
              "(`dropbp_fx/testing.py`: the eager model with the dropped gates' modules detached), within rtol 1e-4 / "
              "atol 1e-5.", "",
              "Statuses: " + "; ".join([
                  "**WRONG GRADIENT** (the worst: silently wrong training)", "**wrong forward**",
                  "**fail** (dropbp raised)", "**no gates (silent)** (nothing gated, no warning)",
                  "crash / timeout (the subprocess died or ran past `--timeout`)",
                  "oracle cannot map gate (a gate the oracle cannot turn into a module to detach; the other steps "
                  "were checked)", "warned (no gates) (nothing gated, a DropBPWarning said so)",
                  "baseline-fails (plain `torch.compile` cannot train it either; not counted)",
                  "unbuildable (the rule's config or the eager model fails; not counted)",
                  "pass in float64 (in float32 some gradient is apart from the oracle's by rounding the model amplifies; "
                  "with the model and inputs in float64 every step equals it)"]) + ".", ""]
    timed = [r for r in rows if compile_ratio(r) is not None]
    slow = [r for r in timed if compile_ratio(r) > SLOW_COMPILE]
    lines += ["## Compile time", "",
              f"Compile time of dropbp beside plain `torch.compile` with the same inner compiler, for {len(timed)} of "
              f"{len(rows)} types (the others: no record of it, or the check did not reach step 4): the seconds of "
              "the first 4 training steps (forward + backward) above 4 warm steps of plain `torch.compile`, Inductor's "
              "FX-graph and AOTAutograd caches off for both, on one CPU core (`benchmarks/catalogue_check.py`: "
              "`compile_seconds`). Dropbp compiles lazily, each piece on the first step that needs it, so its "
              f"figure covers the pieces 4 steps needed. Above {SLOW_COMPILE:.0f}x: {len(slow)} types.", ""]
    if slow:
        lines += ["| mapping | type | compile s (dropbp / plain) | cause |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['mapping']} | {r['type']} | {compile_cell(r)} | {_cell(compile_cause(r))} |"
                  for r in sorted(slow, key=lambda r: -compile_ratio(r))]
        lines.append("")
    failing = [r for r in rows if r["status"] in FAILURES + ("crash", "timeout")]
    others = [r for r in rows if r["status"] != "pass" and r not in failing]
    for title, recs_of in (("Failures by reason", failing), ("Not counted or not fully checked, by reason", others)):
        if not recs_of:
            continue
        lines += [f"## {title}", "", "| status | reason (class) | types |", "| --- | --- | --- |"]
        groups: dict[tuple, list] = {}
        for r in recs_of:
            groups.setdefault((STATUSES.index(r["status"]), r["status"], reason_class(r)), []).append(r)
        for (_, status, cls), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
            types = ", ".join(f"{r['type']}" + ("" if r["mapping"] == "causal-lm" else f" ({r['mapping']})")
                              for r in recs)
            notes = sorted({NOTES[(r["type"], r["status"])] for r in recs if (r["type"], r["status"]) in NOTES})
            lines.append(f"| {status} | {_cell(cls)}{''.join('<br>*' + n + '*' for n in notes)} | {types} |")
        lines.append("")
    if data.get("multi", {}).get("results"):
        m = data["multi"]
        lines += ["## Several models in one process", "",
                  f"`python -m benchmarks.catalogue --multi` ({m['date']}, inner {m['inner']}): the models below "
                  "compiled and trained in turn in one process, without `torch._dynamo.reset()`, each checked as above.",
                  "", "| type | status | alone | gates | reason |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['type']} | {r['status']} | {r.get('alone') or '-'} | {r['gates']} | {_cell(r['reason'])} |"
                  for r in m["results"]]
        lines.append("")
    lines += ["## All types", "", "| mapping | type | status | gates | gates/layer | drop fraction | s | "
              "compile s (dropbp / plain) | reason |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        status = f"**{r['status']}**" if r["status"] in FAILURES else r["status"]
        reason = r["reason"] + (f" (at {r['where']})" if r.get("where") else "")
        lines.append(f"| {r['mapping']} | {r['type']} | {status} | {r['gates'] or ''} | {r['gates_per_layer'] or ''} | "
                     f"{'' if r['drop_fraction'] is None else r['drop_fraction']} | {r['seconds']:.0f} | "
                     f"{compile_cell(r)} | {_cell(reason)} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def write_report(data: dict, path: str) -> str:
    text = render(data)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        logging.basicConfig(level=logging.WARNING)
        from benchmarks.catalogue_check import as_dict, check

        print(json.dumps(as_dict(check(args.one, args.mapping, args.inner, time_plain=True))), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("dropbp_fx").setLevel(logging.WARNING)
    if args.render:
        data = load(args.json)
    elif args.multi:
        data = multi(args)
    else:
        data = sweep(args)
    text = write_report(data, args.md)
    print(text.split("## All types")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
