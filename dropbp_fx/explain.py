"""``dropbp_fx.explain(model, *inputs)``: what the backend would rewrite, without training.

    >>> report = dropbp_fx.explain(model, **batch)
    >>> print(report)            # gates (name, backward FLOPs share, rate), skipped adds and why, graph breaks
    >>> report.gates[0].name     # or use it as data

One training-mode forward runs through ``torch.compile(model, backend=DropBP(...))`` with grad on
(that is what Dynamo needs to capture the graphs a training step would), and no backward. Nothing
of the model changes: parameters are not touched, buffers (BatchNorm statistics) and the RNG
state are put back, and the model's mode is restored.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from dropbp_fx._torch import graph_break_counters, orig_mod
from dropbp_fx.backend import DropBP, validate_options
from dropbp_fx.gate_spec import flops_shares
from dropbp_fx.rng import same_randomness


@dataclass
class GateRow:
    name: str
    flops_share: float  # share of all gates' backward FLOPs (``Explanation.share_of`` says of what)
    rate: float
    params: int  # parameters the branch consumes
    reads: tuple[str, ...] = ()  # names of those parameters: a closed gate takes their gradient away


@dataclass
class SkippedRow:
    graph: int
    node: str
    module: str
    reason: str


@dataclass
class Explanation:
    """What ``torch.compile(model, backend="dropbp")`` does with this model; prints as tables."""

    gates: list[GateRow] = field(default_factory=list)
    nested: list[str] = field(default_factory=list)  # the levels of nested branches left ungated
    nests: list[str] = field(default_factory=list)  # per nest: the level gated and why
    skipped: list[SkippedRow] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)  # residual branches a graph break cut in two (not gated)
    graphs: int = 0
    notes: list[str] = field(default_factory=list)
    share_of: str = "bwd FLOPs share"  # "params share" where a graph had no shapes to count FLOPs on

    def __str__(self) -> str:
        lines = []
        if self.gates:
            width = max(len(g.name) for g in self.gates)
            lines.append(f"{'gate':<{width}}  {self.share_of:>15}  rate   params")
            lines += [f"{g.name:<{width}}  {g.flops_share:15.1%}  {g.rate:.3f}  {g.params:,}" for g in self.gates]
        else:
            lines.append("no residual branch found: the model would run unchanged")
        lines.append(f"{len(self.gates)} gates in {self.graphs} graph(s), {len(self.graph_breaks)} graph break(s)")
        if any(g.reads for g in self.gates):
            lines.append("what a closed gate takes the gradient from (the skip carries the identity gradient; "
                         "a parameter also read outside the branch keeps that use's gradient):")
            lines += [f"  {pattern}: {reads}" for pattern, reads in closes_by_pattern(self.gates)]
        if self.nests:
            lines.append("nested residual branches (one level per nest is gated):")
            lines += [f"  {n}" for n in self.nests]
        if self.skipped:
            lines.append(f"{len(self.skipped)} adds looked at and not gated (by reason; .skipped has each one):")
            by_reason: dict[str, list[str]] = {}
            for s in self.skipped:
                by_reason.setdefault(s.reason, []).append(f"{s.module or '-'} ({s.node})")
            for reason, where in by_reason.items():
                shown = ", ".join(where[:3]) + (f", ... {len(where) - 3} more" if len(where) > 3 else "")
                lines.append(f"  {len(where)} x {reason}: {shown}")
        if self.cut:
            lines.append("residual branches cut by a graph break (not gated):")
            lines += [f"  {c}" for c in self.cut]
        if self.graph_breaks:
            lines.append("graph breaks:")
            lines += [f"  {_first_lines(reason)}" for reason in self.graph_breaks]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def explain(model: nn.Module, *example_inputs, options: dict | None = None, **example_kwargs) -> Explanation:
    """The gates ``backend="dropbp"`` would build for ``model`` on these inputs, the adds it skipped, graph breaks.

    ``options`` are the backend's options (``drop_rate``, ...); the inner compiler is not run.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"explain takes the (uncompiled) model, got {type(model).__name__}")
    model = orig_mod(model, model)
    config = validate_options(options)
    config["inner"] = "eager"  # the analysis does not depend on the inner compiler
    dbp = DropBP(**config)
    breaks_before = dict(graph_break_counters())
    with _no_trace(model):
        torch.compile(model, backend=dbp)(*example_inputs, **example_kwargs)
    breaks = [f"{reason} (x{count - breaks_before.get(reason, 0)})" if count - breaks_before.get(reason, 0) > 1
              else reason for reason, count in graph_break_counters().items()
              if count > breaks_before.get(reason, 0)]

    gates = dbp.controller.gates
    label, shares = flops_shares(gates)
    report = Explanation(graphs=len(dbp.graphs), graph_breaks=breaks, share_of=label)
    report.gates = [GateRow(g.name, share, g.rate, _param_count(model, g.params), tuple(sorted(g.params)))
                    for g, share in zip(gates, shares)]
    for record in dbp.graphs:
        report.nested += record.nested
        report.nests += record.nests
        report.cut += [record.cut] if record.cut else []
        report.skipped += [SkippedRow(record.index, node, module, reason) for node, module, reason in record.skipped]
        if record.note and not record.gates:
            report.notes.append(f"graph {record.index}: {record.note}")
    return report


def closes_by_pattern(gates: list[GateRow], shown: int = 6) -> list[tuple[str, str]]:
    """Gates that close the same parameters relative to their own name (layer numbers as ``*``), one line each:
    ``("model.layers.*.self_attn (32 gates)", "q_proj, k_proj, v_proj, o_proj")``."""
    groups: dict[tuple[str, tuple[str, ...]], int] = {}
    for g in gates:
        base = g.name.split("#")[0].split("{")[0].rstrip(".")
        rel = tuple(dict.fromkeys(_relative(n, base) for n in sorted(g.reads)))
        key = (re.sub(r"\.\d+(?=\.|$)", ".*", g.name), tuple(re.sub(r"\.\d+(?=\.|$)", ".*", r) for r in rel))
        groups[key] = groups.get(key, 0) + 1
    lines = []
    for (pattern, rel), count in groups.items():
        text = ", ".join(rel[:shown]) + (f", ... {len(rel) - shown} more" if len(rel) > shown else "")
        lines.append((f"{pattern}" + (f" ({count} gates)" if count > 1 else ""), text or "-"))
    return lines


def _relative(parameter: str, base: str) -> str:
    """The module owning ``parameter`` relative to the gate's module ``base`` (``q_proj`` of ``...self_attn``);
    a parameter outside the gate's module (a hyper-connection's mix) by its whole name."""
    module = parameter.rsplit(".", 1)[0]
    if module == base:
        return "(its own parameters)"
    return module[len(base) + 1:] if module.startswith(base + ".") else parameter


def _first_lines(reason: str, n: int = 2) -> str:
    return " / ".join([line.strip() for line in reason.splitlines() if line.strip()][:n])


def _param_count(model: nn.Module, names) -> int:
    params = dict(model.named_parameters(remove_duplicate=False))
    return sum(params[n].numel() for n in names if n in params)


@contextlib.contextmanager
def _no_trace(model: nn.Module):
    """Training mode with grad on for the forward; mode, buffers and RNG state put back afterwards."""
    training = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        model.train()
        with torch.enable_grad(), same_randomness():
            yield
    finally:
        for m, mode in training.items():
            m.training = mode
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
