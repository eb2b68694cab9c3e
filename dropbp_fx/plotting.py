"""A picture of the gates along the depth of the model: per gate, its drop rate, the fraction of its training
calls actually dropped, and its share of the branches' backward FLOPs (``DropBP.plot(path)``)."""

from __future__ import annotations

from dropbp_fx.gate_spec import flops_shares


def plot_gates(dbp, path: str, title: str | None = None) -> str:
    """Write the PNG to ``path`` (needs matplotlib); returns ``path``. One row per gate, in model order, so that
    64 gates stay readable (the figure grows with the gate count). Drawn on a figure of its own with the Agg
    canvas, outside pyplot: the user's matplotlib backend and pyplot's figures are left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import PercentFormatter
    except ImportError as error:
        raise ImportError("DropBP.plot needs matplotlib: pip install matplotlib") from error

    gates = dbp.controller.gates
    if not gates:
        raise ValueError("DropBP.plot: no gates yet (compile the model and run one training step first)")
    names = [g.name for g in gates]
    rates = [g.rate for g in gates]
    realised = [g.drops / g.calls if g.calls else float("nan") for g in gates]
    label, shares = flops_shares(gates)

    n = len(gates)
    height = max(3.0, 0.22 * n + 1.4)
    fig = Figure(figsize=(11, height))
    FigureCanvasAgg(fig)
    ax_rate, ax_flops = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    rows = list(range(n))
    ax_rate.barh(rows, rates, color="tab:orange", alpha=0.55, height=0.7, label="drop rate")
    ax_rate.plot(realised, rows, "o", color="tab:red", ms=4, label="dropped / training calls")
    ax_rate.set_xlim(-0.01, 1.03)
    ax_rate.set_xlabel("probability the branch is left out of backward")
    ax_rate.legend(loc="lower right", fontsize=8)
    ax_flops.barh(rows, shares, color="tab:blue", alpha=0.7, height=0.7)
    ax_flops.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax_flops.set_xlabel("share of the gated branches' backward FLOPs" if label == "bwd FLOPs share"
                        else "share of the gated branches' parameter elements (no shapes to count FLOPs on)")
    ax_rate.set_yticks(rows)
    ax_rate.set_yticklabels(names, fontsize=7 if n > 24 else 9)
    ax_rate.invert_yaxis()  # the first layer on top
    for ax in (ax_rate, ax_flops):
        ax.grid(axis="x", alpha=0.3)
    dropped = sum(g.drops for g in gates)
    calls = sum(g.calls for g in gates)
    fig.suptitle(title or f"{n} gates, policy {dbp.controller.policy}, step {dbp.step}; "
                 f"{dropped}/{calls} branch calls dropped", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
