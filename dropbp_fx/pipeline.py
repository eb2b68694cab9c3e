"""The rewrite of one captured graph, as a list of passes.

    >>> print("\\n".join(map(str, PIPELINE)))       # the order, one line per pass

Each pass does one job on a :class:`GraphJob` (the graph, its example inputs, and what earlier passes
found) and reports to the :class:`~dropbp_fx.DropBP` state it was given. The graph passes themselves live
in :mod:`dropbp_fx.passes` (pure ``GraphModule -> GraphModule``); the steps here hand them what the runtime
owns: the gate factory, the controller, the model's parameter names. ``docs/architecture.md`` draws the
pipeline.

``DROPBP_DUMP_GRAPHS=1`` (or ``logging.getLogger("dropbp_fx.graphs").setLevel(logging.DEBUG)``) logs the
graph after every pass that changed it, and every piece the inner compiler receives.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from dropbp_fx import naming, shapes
from dropbp_fx.checkpoint import Checkpointed
from dropbp_fx.gate import DropGate

log = logging.getLogger(__name__)
graph_log = logging.getLogger("dropbp_fx.graphs")
if os.environ.get("DROPBP_DUMP_GRAPHS", "") not in ("", "0"):
    graph_log.setLevel(logging.DEBUG)
    if not graph_log.handlers:
        graph_log.addHandler(logging.StreamHandler())


@dataclass
class GraphRecord:
    """What the backend did with one captured graph."""

    index: int
    gates: list[str]
    nested: list[str]  # the levels of nests not gated
    skipped: list[tuple[str, str, str]]  # (add node, module path, reason)
    note: str = ""
    nests: list[str] = field(default_factory=list)  # per nest: the level gated and why
    cut: str = ""  # a residual branch this graph ends inside of, at a graph break (see passes.breaks)


@dataclass
class GraphJob:
    """One graph on its way through :data:`PIPELINE`."""

    dbp: object  # the DropBP the gates report to
    gm: fx.GraphModule
    example_inputs: list | None
    prefix: str  # module path of the traced frame, prefixed to gate names
    analysis: object = None  # passes.residuals.ResidualAnalysis
    record: GraphRecord | None = None
    gated: int = 0  # gates made so far (checkpointed regions included)
    done: bool = False  # a pass found nothing more to do

    @property
    def model(self) -> nn.Module:
        return self.dbp.model() or self.gm

    @functools.cached_property
    def parameter_names(self) -> dict[int, str]:
        """``id(parameter)`` -> name in :attr:`model`, read once per graph (gating and anchoring both need it)."""
        return naming.parameter_names(self.model)

    def gate_calls(self) -> list[tuple[fx.Node, DropGate]]:
        return [(n, self.gm.get_submodule(n.target)) for n in self.gm.graph.nodes if is_gate_call(self.gm, n)]


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[GraphJob], bool | None]  # True: the graph changed

    def __str__(self) -> str:
        return f"{self.name}: {(self.run.__doc__ or '').strip().splitlines()[0]}"


# ------------------------------------------------------------------------------------------ the passes
def gate_checkpointed_regions(job: GraphJob) -> bool:
    """Rewrite the bodies of checkpointed layers with this same pipeline; call them through ``Checkpointed``."""
    from dropbp_fx.passes.checkpoints import checkpoint_calls, replace_checkpoint_calls

    values = shapes.placeholder_values(job.gm, job.example_inputs)
    for call, body in checkpoint_calls(job.gm):
        job.gated += rewrite(job.dbp, body, [values.get(a) for a in call.args[1:]], job.prefix)
    if job.gated:
        replace_checkpoint_calls(job.gm, Checkpointed)
    return bool(job.gated)


def drop_dead_code(job: GraphJob) -> bool:
    """Remove values nothing reads (a module's returned attention probabilities): they are no reader."""
    from dropbp_fx.passes.dead_code import remove_dead_code

    return bool(remove_dead_code(job.gm))


def find_branches(job: GraphJob) -> None:
    """Find the residual branches ``x + f(x)`` (analysis only) and name them by module path."""
    from dropbp_fx.passes.residuals import find_residual_branches

    job.analysis = find_residual_branches(job.gm, frame=job.prefix)


def choose_nests(job: GraphJob) -> None:
    """Per nest of residuals, gate the level that leaves the most backward FLOPs droppable."""
    from dropbp_fx.passes.nesting import choose_nest_levels

    if job.analysis.nested:
        shapes.propagate_shapes(job.gm, job.example_inputs)
        choose_nest_levels(job.analysis, lambda branch: job.dbp.flops.of_branch(job.gm, branch))


def record_findings(job: GraphJob) -> None:
    """Record what was found; say which branches a graph break cut and which graphs have no branch."""
    analysis = job.analysis
    job.record = GraphRecord(len(job.dbp.graphs), [b.name for b in analysis.branches],
                             [b.name for b in analysis.nested],
                             [(s.add.name, s.module, s.reason) for s in analysis.skipped],
                             nests=[n.describe() for n in analysis.nests])
    job.dbp.graphs.append(job.record)
    job.dbp.reports.graph_cut(job)
    if not analysis.branches:
        if not job.gated:
            job.record.note = "no residual branch: unchanged"
            job.dbp.reports.no_branch(job.record.index, len(analysis.skipped), gated=bool(job.dbp.controller.gates))
        job.done = True
        return
    job.dbp.reports.stream_mutations(analysis.branches)
    for branch in analysis.branches:
        job.dbp.weights[branch.name] = branch.weight
        job.dbp.side_outputs[branch.name] = len(branch.side_outputs)


def gate_branches(job: GraphJob) -> bool:
    """Move each branch into a ``DropGate`` that knows the parameters it consumes and its stream argument."""
    from dropbp_fx.passes.gating import gate_residual_branches

    shapes.propagate_shapes(job.gm, job.example_inputs)
    names, values = job.parameter_names, shapes.placeholder_values(job.gm, job.example_inputs)
    controller = job.dbp.controller
    recompute = getattr(getattr(job.dbp, "options", None), "recompute", False)

    def make_gate(sub_gm, branch):
        params = naming.branch_parameters(job.gm, branch.inputs, sub_gm, values, names)
        return DropGate(sub_gm, branch.name, controller, [name for _, name, _ in params], recompute=recompute)

    gate_residual_branches(job.gm, job.analysis.branches, make_gate)
    for call, gate in job.gate_calls():
        gate.stream_arg = call.meta.get("dropbp_stream_arg")
    job.gated += len(job.analysis.branches)
    log.info("dropbp: graph %d: %d residual branches gated (%s)%s", job.record.index, len(job.analysis.branches),
             ", ".join(job.record.gates),
             f"; {len(job.analysis.nested)} nested branches left ungated" if job.analysis.nested else "")
    return True


def count_flops(job: GraphJob) -> None:
    """Count each gate's forward and backward FLOPs on the graph's shapes (identical layers counted once)."""
    for call, gate in job.gate_calls():
        values = [shapes.node_value(a) for a in call.args]
        if any(v is None for v in values):
            continue  # no shapes (a symbolic_trace graph transformed without example inputs)
        job.dbp.controller.gates[gate.slot].flops = job.dbp.flops.of_gate(gate.branch, values)


def watch_graph(job: GraphJob) -> None:
    """A graph with no compiled model around it (hand-traced, a compiled function): follow its own mode."""
    if job.dbp.model() is None:
        job.dbp.controller.watch(job.gm)
        job.dbp.controller.trunk_inputs_train |= _grad_input_feeds_trunk(job.gm, job.example_inputs)


def anchor_layer_gates(job: GraphJob) -> None:
    """In a graph traced for one layer's frame, let each gate name itself after the layer it runs for."""
    if job.prefix:
        naming.anchor_gates(job.gm, job.gate_calls(), job.example_inputs, job.parameter_names, job.prefix, job.model)


PIPELINE: tuple[Pass, ...] = (
    Pass("checkpoints", gate_checkpointed_regions),
    Pass("dead code", drop_dead_code),
    Pass("find", find_branches),
    Pass("nests", choose_nests),
    Pass("record", record_findings),
    Pass("gate", gate_branches),
    Pass("flops", count_flops),
    Pass("watch", watch_graph),
    Pass("anchor", anchor_layer_gates),
)


def rewrite(dbp, gm: fx.GraphModule, example_inputs, prefix: str) -> int:
    """Run :data:`PIPELINE` on ``gm`` (in place); returns how many gates it made."""
    job = GraphJob(dbp, gm, example_inputs, prefix)
    for step in PIPELINE:
        changed = step.run(job)
        if changed and graph_log.isEnabledFor(logging.DEBUG):
            graph_log.debug("dropbp: graph %d after %r:\n%s", job.record.index if job.record else len(dbp.graphs),
                            step.name,
                            gm.print_readable(print_output=False))
        if job.done:
            break
    return job.gated


# ------------------------------------------------------------------------------------------ compiling
def compile_pieces(gm: fx.GraphModule, cache) -> None:
    """After the rewrite: both variants of every branch, and the trunk split into segments between the gates,
    compile with the inner compiler (each on its first call)."""
    from dropbp_fx.inner import Compiled
    from dropbp_fx.passes.segments import split_trunk

    for module in gm.modules():
        if isinstance(module, DropGate):
            module.run_open = Compiled(module.branch, cache, training=True)
            module.run_closed = Compiled(module.branch, cache, training=False)
    for region in [gm] + [m.body for m in gm.modules() if isinstance(m, Checkpointed)]:
        split_trunk(region, lambda node, r=region: is_opaque_call(r, node),
                    lambda sub_gm: Compiled(sub_gm, cache, training=True))


def is_gate_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), DropGate)


def is_opaque_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Calls an inner compiler must not trace into: gates and checkpointed regions."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), (DropGate, Checkpointed))


def _grad_input_feeds_trunk(gm: fx.GraphModule, example_inputs) -> bool:
    """Does an input that requires grad (a function's weight) feed a node outside the gates?"""
    for node, value in shapes.placeholder_values(gm, example_inputs).items():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            if any(not is_gate_call(gm, user) for user in node.users):
                return True
    return False

