"""What flows through :data:`dropbp_fx.pipeline.PIPELINE`: the job of one graph (what it is given, what the passes
found), what a pass returns, and what the pipeline hands the backend to commit."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from dropbp_fx import naming
from dropbp_fx.gate import DropGate
from dropbp_fx.gate_spec import GateSpec


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


@dataclass(frozen=True)
class RewriteInputs:
    """What the runtime hands the pipeline. The pipeline writes to none of it."""

    controller: object  # DropController: handed to the gates it builds, which call it at run time
    flops: object  # dropbp_fx.flops_cache.FlopsCache (identical layers share one count)
    model: nn.Module | None = None  # the compiled model (None: a hand-traced graph or a compiled function)
    recompute: bool = False  # DropBPConfig.recompute, for the gates
    first_index: int = 0  # the index the first graph record of this rewrite gets


@dataclass(frozen=True)
class StepResult:
    """What a pass returns (the shape of ``torch.fx.passes.infra.pass_base.PassResult``, with its finding)."""

    graph_module: fx.GraphModule
    modified: bool  # the graph changed (logged under DROPBP_DUMP_GRAPHS)
    found: object = None  # what the pass found, stored in the job's field the pass names
    done: bool = False  # nothing more to do in this graph


@dataclass(frozen=True)
class GateCall:
    """A gate the gate pass built: its call in the graph, the module, the branch and the parameters it consumes
    (``naming.branch_parameters``)."""

    call: fx.Node
    gate: DropGate
    branch: object  # passes.residuals.ResidualBranch
    params: list


@dataclass(frozen=True)
class GraphCut:
    """A residual branch a graph break cut in two (``record.cut`` words it), warned once per ``key``."""

    message: str
    key: tuple


@dataclass
class GraphResult:
    """What the pipeline found in one graph, for the backend to commit."""

    record: GraphRecord
    gates: list[tuple[DropGate, GateSpec]] = field(default_factory=list)
    cut: GraphCut | None = None
    no_branch: bool = False  # a graph without residual branch (nor gated checkpointed region)
    mutated_streams: list = field(default_factory=list)  # branches whose stream is changed in place before the add
    watch: tuple[fx.GraphModule, bool] | None = None  # a graph with no model: (it, does a grad input feed the trunk)
    # trunk parameters: (parameter, name, indices into ``gates`` of the gates every gradient path enters, or None)
    branch_only: list = field(default_factory=list)


@dataclass
class GraphJob:
    """One graph on its way through :data:`PIPELINE`: what it is given, and what the passes found so far
    (each field below ``inputs`` is the finding of the pass that names it)."""

    gm: fx.GraphModule
    example_inputs: list | None
    prefix: str  # module path of the traced frame (the frame of the gates' names)
    inputs: RewriteInputs
    bodies: list[GraphResult] = field(default_factory=list)  # checkpoints
    analysis: object = None  # find, nests: passes.residuals.ResidualAnalysis
    cut: GraphCut | None = None  # breaks
    record: GraphRecord | None = None  # record
    mutated_streams: list = field(default_factory=list)  # streams
    gates: list[GateCall] = field(default_factory=list)  # gate
    flops: list = field(default_factory=list)  # flops: (fwd, bwd) or None per gate
    specs: list[GateSpec] = field(default_factory=list)  # specs: one per gate
    watch: tuple | None = None  # watch
    siblings: list = field(default_factory=list)  # anchor: naming.LayerSiblings of the anchored gates
    branch_only: list = field(default_factory=list)  # branch-only: (parameter, name, gate indices or None)

    @property
    def model(self) -> nn.Module:
        return self.inputs.model or self.gm

    @property
    def index(self) -> int:
        """This graph's record index (the checkpointed bodies it holds come first)."""
        return self.inputs.first_index + len(self.bodies)

    @property
    def gated(self) -> int:
        """Gates made so far, checkpointed regions included."""
        return sum(len(body.gates) for body in self.bodies) + len(self.gates)

    @functools.cached_property
    def parameter_names(self) -> dict[int, str]:
        """``id(parameter)`` -> name in :attr:`model`, read once per graph (gating and anchoring both need it)."""
        return naming.parameter_names(self.model)

    def result(self) -> GraphResult:
        return GraphResult(self.record, [(c.gate, spec) for c, spec in zip(self.gates, self.specs)], self.cut,
                           self.record is not None and not self.analysis.branches and not self.gated,
                           self.mutated_streams, self.watch, self.branch_only)


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[GraphJob], StepResult]
    into: str | None = None  # the GraphJob field its finding goes to

    def __str__(self) -> str:
        return f"{self.name}: {(self.run.__doc__ or '').strip().splitlines()[0]}"
