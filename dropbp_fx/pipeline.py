"""The rewrite of one captured graph, as a list of passes.

    >>> print("\\n".join(map(str, PIPELINE)))       # the order, one line per pass

Each pass does one job on a :class:`GraphJob` (the graph, its example inputs, what the runtime hands in as
:class:`RewriteInputs`, and what earlier passes found) and returns a :class:`StepResult` (torch's
``PassResult``: the graph, whether it changed, and what the pass found); :func:`rewrite` stores each finding in
the job for the passes after it and returns a :class:`GraphResult` per graph. No pass writes to the runtime:
the backend commits the results once (``DropBP._commit``: records, warnings, one ``controller.register(spec)``
per gate). The graph passes themselves live in :mod:`dropbp_fx.passes` (pure ``GraphModule -> GraphModule``);
``docs/architecture.md`` draws the pipeline.

``DROPBP_DUMP_GRAPHS=1`` (or ``logging.getLogger("dropbp_fx.graphs").setLevel(logging.DEBUG)``) logs the
graph after every pass that changed it, and every piece the inner compiler receives.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch
import torch.fx as fx

from dropbp_fx import naming, shapes
from dropbp_fx.checkpoint import Checkpointed
from dropbp_fx.gate import DropGate
from dropbp_fx.gate_spec import GateSpec
from dropbp_fx.graph_job import (  # noqa: F401 (GraphRecord, RewriteInputs: the backend's)
    GateCall, GraphCut, GraphJob, GraphRecord, GraphResult, Pass, RewriteInputs, StepResult)
from dropbp_fx.passes.branch_names import BranchPath, gate_name

log = logging.getLogger(__name__)
graph_log = logging.getLogger("dropbp_fx.graphs")
if os.environ.get("DROPBP_DUMP_GRAPHS", "") not in ("", "0"):
    graph_log.setLevel(logging.DEBUG)
    if not graph_log.handlers:
        graph_log.addHandler(logging.StreamHandler())


# ------------------------------------------------------------------------------------------ the passes
def gate_checkpointed_regions(job: GraphJob) -> StepResult:
    """Rewrite the bodies of checkpointed layers with this same pipeline; call them through ``Checkpointed``."""
    from dropbp_fx.passes.checkpoints import checkpoint_calls, replace_checkpoint_calls

    values = shapes.placeholder_values(job.gm, job.example_inputs)
    bodies: list[GraphResult] = []
    for call, body in checkpoint_calls(job.gm):
        inputs = replace(job.inputs, first_index=job.inputs.first_index + len(bodies))
        bodies += rewrite(body, [values.get(a) for a in call.args[1:]], job.prefix, inputs)
    gated = any(body.gates for body in bodies)
    if gated:
        replace_checkpoint_calls(job.gm, Checkpointed)
    return StepResult(job.gm, gated, bodies)


def drop_dead_code(job: GraphJob) -> StepResult:
    """Remove values nothing reads (a module's returned attention probabilities): they are no reader."""
    from dropbp_fx.passes.dead_code import remove_dead_code

    return StepResult(job.gm, bool(remove_dead_code(job.gm)))


def find_branches(job: GraphJob) -> StepResult:
    """Find the residual branches ``x + f(x)`` (analysis only), with their module paths in the traced frame."""
    from dropbp_fx.passes.residuals import find_residual_branches

    return StepResult(job.gm, False, find_residual_branches(job.gm, frame=job.prefix))


def choose_nests(job: GraphJob) -> StepResult:
    """Per nest of residuals, gate the level that leaves the most backward FLOPs droppable."""
    from dropbp_fx.passes.nesting import choose_nest_levels

    if job.analysis.nested:
        shapes.propagate_shapes(job.gm, job.example_inputs)
        choose_nest_levels(job.analysis, lambda branch: job.inputs.flops.of_branch(job.gm, branch))
    return StepResult(job.gm, False, job.analysis)


def find_graph_cut(job: GraphJob) -> StepResult:
    """Find the residual branch a graph break cut in two (no graph holds its whole ``x + f(x)``: not gated)."""
    from dropbp_fx.passes.breaks import cut_branches, describe_break

    why = describe_break(job.gm)
    if why is None:
        return StepResult(job.gm, False)
    analysis, prefix = job.analysis, job.prefix
    adds = {b.add for b in analysis.branches + analysis.nested} | {b.partial_sum for b in analysis.branches}
    inside = {n for b in analysis.branches + analysis.nested for n in b.nodes}
    cut = cut_branches(job.gm, adds - {None}, job.inputs.model, inside, _heads(job.model, prefix))
    if not cut:
        return StepResult(job.gm, False)
    cut = [gate_name(BranchPath(prefix, c)) or "<root>" for c in cut]
    modules = ", ".join(cut[:3]) + (f" (+{len(cut) - 3} more)" if len(cut) > 3 else "")
    message = (f"graph {job.index} ends inside a residual branch, at {modules}: Dynamo broke the graph there "
               f"({why.describe()}), so no graph holds that branch's whole `x + f(x)` and it is not gated (it "
               f"trains every step). Fix: {why.fix}")
    return StepResult(job.gm, False, GraphCut(message, (tuple(cut), why.op, why.detail)))


def record_findings(job: GraphJob) -> StepResult:
    """Record what was found (gates, nests, skipped adds and why); a graph without branch stops here."""
    analysis = job.analysis
    record = GraphRecord(job.index, [b.name for b in analysis.branches], [b.name for b in analysis.nested],
                         [(s.add.name, s.module, s.reason) for s in analysis.skipped],
                         nests=[n.describe() for n in analysis.nests], cut=job.cut.message if job.cut else "")
    if not analysis.branches and not job.gated:
        record.note = "no residual branch: unchanged"
        log.info("dropbp: graph %d has no residual branch (%d adds looked at); running it unchanged", record.index,
                 len(analysis.skipped))
    return StepResult(job.gm, False, record, done=not analysis.branches)


def find_mutated_streams(job: GraphJob) -> StepResult:
    """Find the branches whose residual stream is changed in place (``x.mul_(s)``) before the add."""
    from dropbp_fx.passes import graph_view as gv

    found = [b for b in job.analysis.branches if gv.mutates_first_arg(b.skip) and not gv.is_add(b.skip)]
    return StepResult(job.gm, False, found)


def gate_branches(job: GraphJob) -> StepResult:
    """Move each branch into a ``DropGate`` that knows its stream argument; name the parameters it consumes."""
    from dropbp_fx.passes.gating import gate_residual_branches

    shapes.propagate_shapes(job.gm, job.example_inputs)
    names, values = job.parameter_names, shapes.placeholder_values(job.gm, job.example_inputs)
    made: dict[int, tuple] = {}  # id(gate) -> (branch, its parameters)

    def make_gate(sub_gm, branch):
        gate = DropGate(sub_gm, job.inputs.controller, recompute=job.inputs.recompute)
        made[id(gate)] = (branch, naming.branch_parameters(job.gm, branch.inputs, sub_gm, values, names))
        return gate

    gate_residual_branches(job.gm, job.analysis.branches, make_gate)
    found = {}  # id(gate) -> its call; the gates are registered in the order they were made (the branches')
    for call in job.gm.graph.nodes:
        gate = job.gm.get_submodule(call.target) if call.op == "call_module" else None
        if id(gate) in made:
            gate.stream_arg = call.meta.get("dropbp_stream_arg")  # the gating pass's note on the call it made
            found[id(gate)] = (call, gate)
    calls = [GateCall(*found[key], *made[key]) for key in made]
    log.info("dropbp: graph %d: %d residual branches gated (%s)%s", job.index, len(calls),
             ", ".join(c.branch.name for c in calls),
             f"; {len(job.analysis.nested)} nested branches left ungated" if job.analysis.nested else "")
    return StepResult(job.gm, True, calls)


def count_flops(job: GraphJob) -> StepResult:
    """Count each gate's forward and backward FLOPs on the graph's shapes (identical layers counted once)."""
    found = []
    for c in job.gates:
        values = [shapes.node_value(a) for a in c.call.args]
        # no shapes: a symbolic_trace graph transformed without example inputs
        found.append(None if any(v is None for v in values) else job.inputs.flops.of_gate(c.gate.branch, values))
    return StepResult(job.gm, False, found)


def make_specs(job: GraphJob) -> StepResult:
    """What each gate is: name, parameters, FLOPs, parameter elements, side outputs (registered by the backend)."""
    specs = [GateSpec(c.branch.name, frozenset(n for _, n, _ in c.params), flops, c.branch.weight,
                      len(c.branch.side_outputs)) for c, flops in zip(job.gates, job.flops)]
    return StepResult(job.gm, False, specs)


def find_branch_only_params(job: GraphJob) -> StepResult:
    """Find the trunk's trainable parameters whose gradient comes only through some gates' branches."""
    from dropbp_fx.passes.grad_paths import gates_on_every_path

    index = {c.call: i for i, c in enumerate(job.gates)}
    anchored = any(c.gate.anchor is not None for c in job.gates)
    sources = {}  # placeholder / get_attr node -> its trainable parameter, read by the trunk
    for node, value in shapes.placeholder_values(job.gm, job.example_inputs).items():
        sources[node] = value
    for node in job.gm.graph.nodes:
        if node.op == "get_attr":
            sources[node] = shapes.attr(job.gm, node.target)
    sources = {n: v for n, v in sources.items() if isinstance(v, torch.nn.Parameter) and v.requires_grad
               and id(v) in job.parameter_names and any(u not in index for u in n.users)}
    found = []  # (parameter, its name, indices of the gates every path enters, or None)
    for node, gates in gates_on_every_path(job.gm, sources, lambda n: n in index).items():
        # a layer-frame graph's gates change with the layer: its parameters are left as they are
        usable = gates is not None and gates and not anchored
        found.append((sources[node], job.parameter_names[id(sources[node])],
                      tuple(sorted(index[g] for g in gates)) if usable else None))
    return StepResult(job.gm, False, found)


def watch_graph(job: GraphJob) -> StepResult:
    """A graph with no compiled model around it (hand-traced, a compiled function): follow its own mode."""
    if job.inputs.model is not None:
        return StepResult(job.gm, False)
    return StepResult(job.gm, False, (job.gm, _grad_input_feeds_trunk(job.gm, job.example_inputs)))


def anchor_layer_gates(job: GraphJob) -> StepResult:
    """In a graph traced for one layer's frame, give each gate the gates of the layers that run through it."""
    found = []
    if job.prefix:
        values = shapes.placeholder_values(job.gm, job.example_inputs)
        for c, spec in zip(job.gates, job.specs):
            params = naming.branch_parameters(job.gm, c.call.args, c.gate.branch, values, job.parameter_names)
            anchored = naming.layer_siblings(spec, c.branch.path, params, job.parameter_names, job.model)
            if anchored is not None:
                c.gate.anchor_on(*anchored)
                found.append(anchored[1])
    return StepResult(job.gm, False, found)


PIPELINE: tuple[Pass, ...] = (
    Pass("checkpoints", gate_checkpointed_regions, "bodies"),
    Pass("dead code", drop_dead_code),
    Pass("find", find_branches, "analysis"),
    Pass("nests", choose_nests, "analysis"),
    Pass("breaks", find_graph_cut, "cut"),
    Pass("record", record_findings, "record"),
    Pass("streams", find_mutated_streams, "mutated_streams"),
    Pass("gate", gate_branches, "gates"),
    Pass("flops", count_flops, "flops"),
    Pass("specs", make_specs, "specs"),
    Pass("watch", watch_graph, "watch"),
    Pass("anchor", anchor_layer_gates, "siblings"),
    Pass("branch-only", find_branch_only_params, "branch_only"),
)


def rewrite(gm: fx.GraphModule, example_inputs, prefix: str, inputs: RewriteInputs) -> list[GraphResult]:
    """Run :data:`PIPELINE` on ``gm`` (in place); returns what it found per graph (checkpointed bodies first)."""
    job = GraphJob(gm, example_inputs, prefix, inputs)
    for step in PIPELINE:
        result = step.run(job)
        if step.into is not None:
            setattr(job, step.into, result.found)
        if result.modified and graph_log.isEnabledFor(logging.DEBUG):
            graph_log.debug("dropbp: graph %d after %r:\n%s", job.index, step.name,
                            gm.print_readable(print_output=False))
        if result.done:
            break
    return [*job.bodies, job.result()]


def _heads(model, prefix: str) -> frozenset[str]:
    """The module path (in the graph's frame) of the model's output head (transformers' ``get_output_embeddings``):
    a graph ending at it ends at the model's output, not inside a residual branch."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return frozenset()
    path = next((n for n, m in model.named_modules() if m is head), None)
    if path is None:
        return frozenset()
    if prefix:
        path = path[len(prefix) + 1:] if path.startswith(prefix + ".") else None
    return frozenset() if path is None else frozenset({path})


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

