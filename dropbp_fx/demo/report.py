"""The demo's report: the realised drop, the table (step time, time to the baseline's final loss, accuracy) and the
plot of the two runs' losses against training time and against steps."""

from __future__ import annotations

import platform
import statistics
import textwrap

from dropbp_fx.allocate import flops_weighted_rate
from dropbp_fx.demo import data
from dropbp_fx.demo.curves import smoothed, time_to_target

SMOOTH = 10  # the train loss is read as the mean of the last 10 steps (fewer at the start)


def realised_drop(dbp) -> float:
    """The fraction of the branches' backward FLOPs actually skipped, over all training calls."""
    gates = dbp.controller.gates
    if not gates or not any(g.calls for g in gates):
        return 0.0
    flops = [g.flops[1] if g.flops else 1.0 for g in gates]
    return flops_weighted_rate([g.drops / g.calls if g.calls else 0.0 for g in gates], flops)


def summarise(runs: list, eval_t: dict, warmup: int) -> dict:
    """Per run (:class:`~dropbp_fx.demo.run.Run`, the baseline first): step times, speedup, losses, eval
    accuracy, and the training time to the baseline's final loss (the mean of its last 10 steps)."""
    base_times = runs[0].step_s[warmup:]
    lockstep = len(base_times)
    out = {}
    for run in runs:
        times = run.step_s[warmup:]
        acc, eval_loss = data.evaluate(run.model, data.model_inputs(run.model, eval_t))
        clock, t = [], 0.0  # training time after the warm-up: steps + calibration
        for s, e in zip(run.step_s[warmup:], run.extra_s[warmup:]):
            t += s + e
            clock.append(t)
        out[run.name] = {
            "median_step_s": statistics.median(times),
            "speedup": statistics.median(b / s for b, s in zip(base_times, times[:lockstep])),
            "steps": len(run.losses), "final_train_loss": smoothed(run.losses, SMOOTH, partial=True)[-1],
            "eval_acc": acc, "eval_loss": eval_loss,
            "train_s": clock[-1], "first_step_s": run.step_s[0], "calibration_s": sum(run.extra_s),
            "calibrated_at_step": run.calibrated_at,
            "losses": run.losses, "step_s": run.step_s, "clock_s": clock,
        }
    target = out[runs[0].name]["final_train_loss"]  # the baseline's final loss: the quality to reach
    for name, r in out.items():
        r["target_loss"] = target
        r["time_to_target_s"] = time_to_target(r["clock_s"], r["losses"], target, False, SMOOTH, partial=True)
    base_time = out[runs[0].name]["time_to_target_s"]
    for r in out.values():
        r["time_to_target_speedup"] = (base_time / r["time_to_target_s"]
                                       if base_time is not None and r["time_to_target_s"] else None)
    return out


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
    """Loss against training time and against steps, to ``path`` (PNG; matplotlib's backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_t, ax_s = fig.subplots(1, 2, sharey=True)
    for (name, r), color in zip(results.items(), ("tab:blue", "tab:orange")):
        warm = len(r["losses"]) - len(r["clock_s"])  # the warm-up steps have no place on the clock
        mean = smoothed(r["losses"], SMOOTH, partial=True)
        label = f"{name} ({r['speedup']:.2f}x, acc {r['eval_acc']:.3f})"
        ax_t.plot(r["clock_s"], r["losses"][warm:], color=color, alpha=0.25, lw=0.8)
        ax_t.plot(r["clock_s"], mean[warm:], color=color, lw=2, label=label)
        ax_s.plot(r["losses"], color=color, alpha=0.25, lw=0.8)
        ax_s.plot(mean, color=color, lw=2, label=name)
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
    fig.suptitle(textwrap.fill(title, 130), fontsize=10)  # one long line would run past the figure's edge
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


