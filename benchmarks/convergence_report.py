"""Time to target, quality at equal time, and the convergence benchmark's tables and plot.

The rules (``benchmarks/convergence.py`` runs the training; this module only reads its curves):

* a curve is a run's evaluations: the training clock at each (seconds of training steps and calibration;
  compile and evaluation left out) and the eval metrics there;
* every curve is smoothed by a trailing mean over ``window`` evaluations (defined from the ``window``-th
  evaluation on), so that one lucky evaluation does not count as arriving;
* the target of a seed is the baseline's last smoothed value (the mean of its last ``window`` evaluations);
* a run's time to target is the clock of its first evaluation whose smoothed value is at least as good as the
  target (the baseline's own is found by the same rule, so it is at most its total time); None if never;
* its quality at equal time is its smoothed value at its last evaluation at or before the baseline's total
  clock (a little conservative for the faster run);
* a seed's time-to-target speedup is the baseline's time to target over the run's; over seeds, the median,
  a seed that never reaches counting as speedup 0, and null where the median falls on such a seed.
"""

from __future__ import annotations

import statistics

from benchmarks.common import spread
from dropbp_fx.demo.curves import at_least_as_good, smoothed, time_to_target  # noqa: F401 (re-exported)


# ---------------------------------------------------------------------- rules
# smoothed, at_least_as_good and time_to_target are the demo's (dropbp_fx.demo.curves), here with no partial window
def target_of(values: list[float], window: int) -> float:
    """The baseline's target: its last smoothed value."""
    if len(values) < window:
        raise ValueError(f"the baseline has {len(values)} evaluations, fewer than the window {window}")
    return smoothed(values, window)[-1]


def value_at(clock: list[float], values: list[float], t: float, window: int) -> float | None:
    """The smoothed value at the last evaluation at or before clock ``t`` (None if there is none yet)."""
    best = None
    for c, v in zip(clock, smoothed(values, window)):
        if c <= t * (1 + 1e-9) and v is not None:
            best = v
    return best


def median_speedup(speedups: list[float | None]) -> float | None:
    """The median over seeds; a seed that never reached (None) counts as 0; None if the median touches one."""
    if not speedups:
        return None
    xs = sorted(0.0 if s is None else s for s in speedups)
    n = len(xs)
    middle = xs[(n - 1) // 2:n // 2 + 1]
    if any(x == 0.0 for x in middle):
        return None
    return statistics.fmean(middle)


# ---------------------------------------------------------------------- summary
def seed_figures(curve: dict, base: dict, metric: str, higher: bool, window: int) -> dict:
    """One run of one seed against that seed's baseline run, for ``metric``."""
    target = target_of(base["curve"][metric], window)
    base_ttt = time_to_target(base["curve"]["clock_s"], base["curve"][metric], target, higher, window)
    ttt = time_to_target(curve["clock_s"], curve[metric], target, higher, window)
    base_total = base["curve"]["clock_s"][-1]
    at_base = value_at(curve["clock_s"], curve[metric], base_total, window)
    return {"target": target, "time_to_target_s": ttt, "baseline_time_to_target_s": base_ttt,
            "speedup": None if ttt is None or not ttt else base_ttt / ttt,
            "at_baseline_time": at_base, "baseline_total_s": base_total,
            "better_at_baseline_time": None if at_base is None else at_least_as_good(at_base, target, higher)}


def summarise_config(runs: list[dict], bases: dict[int, dict], metrics: dict[str, bool], window: int) -> dict:
    """One configuration of one task over its seeds; ``metrics`` maps name -> higher is better (primary first)."""
    by_metric = {}
    for metric, higher in metrics.items():
        seeds = [seed_figures(r["curve"], bases[r["seed"]], metric, higher, window) for r in runs]
        speedups = [s["speedup"] for s in seeds]
        by_metric[metric] = {
            "time_to_target_speedup": median_speedup(speedups), "speedup_range": spread(speedups),
            "reached": sum(s is not None for s in speedups), "seeds": len(speedups),
            "at_baseline_time": spread(s["at_baseline_time"] for s in seeds),
            "target": spread(s["target"] for s in seeds),
            "better_at_baseline_time": sum(bool(s["better_at_baseline_time"]) for s in seeds),
            "per_seed": seeds,
        }
    primary = by_metric[next(iter(metrics))]
    base_steps = {seed: statistics.median(b["step_s"]) for seed, b in bases.items()}
    return {
        "kind": runs[0]["kind"], "rate": runs[0]["rate"], "metric": next(iter(metrics)),
        "time_to_target_speedup": primary["time_to_target_speedup"],
        "reached": f"{primary['reached']}/{primary['seeds']}",
        "step_time_speedup": statistics.median(base_steps[r["seed"]] / statistics.median(r["step_s"]) for r in runs),
        "realised_drop": spread(r.get("realised_drop") for r in runs),
        "compile_s": spread(r["compile_s"] for r in runs), "steps_run": [r["steps"] for r in runs],
        "by_metric": by_metric, "runs": runs,
    }


def summarise_task(runs: list[dict], metrics: dict[str, bool], window: int) -> dict:
    """Configuration name -> :func:`summarise_config`, the baseline first."""
    bases = {r["seed"]: r for r in runs if r["config"] == "baseline"}
    names = list(dict.fromkeys(r["config"] for r in runs))
    return {name: summarise_config([r for r in runs if r["config"] == name], bases, metrics, window)
            for name in names}


# ---------------------------------------------------------------------- tables
def _fmt(x, spec=".3f", none="-") -> str:
    return none if x is None else format(x, spec)


def _range(s: dict, spec=".2f") -> str:
    return "" if s["n"] < 2 else f" [{_fmt(s['min'], spec)}-{_fmt(s['max'], spec)}]"


def task_table(summary: dict, metric: str, higher: bool) -> list[str]:
    """Markdown rows: one configuration a row, time to target and quality at equal time for ``metric``."""
    arrow = "higher" if higher else "lower"
    lines = [f"| configuration | time-to-target speedup (median [range]) | reached | {metric} at the baseline's "
             f"wall-clock ({arrow} is better) | target | step-time speedup | realised drop |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in summary.items():
        m = s["by_metric"][metric]
        ttt = m["time_to_target_speedup"]
        speed = "not reached" if ttt is None else f"{ttt:.2f}x{_range(m['speedup_range'])}"
        drop = s["realised_drop"]
        lines.append(f"| {name} | {speed} | {m['reached']}/{m['seeds']} | "
                     f"{_fmt(m['at_baseline_time']['median'], '.4f')}{_range(m['at_baseline_time'], '.4f')} | "
                     f"{_fmt(m['target']['median'], '.4f')} | {s['step_time_speedup']:.2f}x | "
                     f"{_fmt(drop['median'])} |")
    return lines


def rules() -> str:
    """The rules of this module's docstring, as a markdown list."""
    return __doc__.split("\n\n")[2].replace("\n  ", " ").replace("* ", "- ")


def markdown(results: dict) -> str:
    """The whole report: what ran, the rules, one table per task and metric."""
    m = results["meta"]
    out = ["# dropbp-fx convergence benchmark: time to the baseline's quality", "",
           f"`{m['command']}` on {m['machine_text']}; {m['date']}, {m.get('run_s', 0) / 60:.1f} min.", "",
           m["setup"], "", "Rules:", "", rules(), ""]
    for task, info in m["tasks"].items():
        if task not in results:
            continue
        out += [f"## {task}: {info['title']}", "", info["description"], ""]
        for metric, higher in info["metrics"].items():
            out += [f"Metric `{metric}`{' (primary)' if metric == info['primary'] else ''}:", ""]
            out += task_table(results[task], metric, higher) + [""]
    if m.get("errors"):
        out += ["## Errors", ""] + [f"- {k}: `{v.strip().splitlines()[-1]}`" for k, v in m["errors"].items()] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------- plot
def _band(curves: list[tuple[list[float], list[float]]], points: int = 60):
    """Median, min and max over seeds of the curves interpolated on a common clock grid (to the shortest end)."""
    end = min(c[-1] for c, _ in curves)
    start = max(c[0] for c, _ in curves)
    if end <= start:
        return [], [], [], []
    grid = [start + (end - start) * i / (points - 1) for i in range(points)]
    at = [[_interp(t, c, v) for c, v in curves] for t in grid]
    return grid, [statistics.median(a) for a in at], [min(a) for a in at], [max(a) for a in at]


def _interp(t: float, xs: list[float], ys: list[float]) -> float:
    for i in range(1, len(xs)):
        if xs[i] >= t:
            span = xs[i] - xs[i - 1]
            w = 0.0 if span <= 0 else (t - xs[i - 1]) / span
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    return ys[-1]


def plot(results: dict, path: str, window: int) -> None:
    """Per task: the smoothed primary metric against the training clock, median and min-max band over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = [t for t in results["meta"]["tasks"] if t in results]
    fig = Figure(figsize=(6.2 * len(tasks), 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        info = results["meta"]["tasks"][task]
        metric = info["primary"]
        for i, (name, s) in enumerate(results[task].items()):
            curves = []
            for r in s["runs"]:
                sm = smoothed(r["curve"][metric], window)
                curves.append(([c for c, v in zip(r["curve"]["clock_s"], sm) if v is not None],
                               [v for v in sm if v is not None]))
            curves = [c for c in curves if len(c[0]) >= 2]
            if not curves:
                continue
            grid, med, lo, hi = _band(curves)
            ttt = s["time_to_target_speedup"]
            label = f"{name}: {'not reached' if ttt is None else f'{ttt:.2f}x to target'}"
            color = f"C{i}"
            ax.plot(grid, med, color=color, lw=2, label=label)
            ax.fill_between(grid, lo, hi, color=color, alpha=0.18, lw=0)
        target = results[task]["baseline"]["by_metric"][metric]["target"]["median"]
        if target is not None:
            ax.axhline(target, color="black", ls="--", lw=1, label="target (baseline's final, median)")
        ax.set_xlabel("training wall-clock (s; compile and evaluation left out)")
        ax.set_ylabel(f"{metric} (trailing mean of {window} evals)")
        ax.set_title(f"{task}: {info['title']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
