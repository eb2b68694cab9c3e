"""The ``dropbp`` torch.compile backend.

``torch.compile(model, backend="dropbp", options={...})`` resolves through the ``torch_dynamo_backends``
entry point to :func:`dropbp`; ``backend=DropBP(...)`` uses an object you keep. For every graph Dynamo
captures, :meth:`DropBP.__call__`:

1. finds the model and frame the graph belongs to (:mod:`dropbp_fx.discovery`) and registers this state
   for :func:`get_dropbp`;
2. leaves graphs traced with grad disabled unchanged (in eval mode the gates stay open);
3. refuses what DistributedDataParallel cannot train with per-step masks (:mod:`dropbp_fx.distributed`);
4. runs the passes of :data:`dropbp_fx.pipeline.PIPELINE` on the graph: find the residual branches, gate
   them, count their FLOPs, decide what each gate is; then commits what they found (:meth:`DropBP._commit`):
   the graph's record, the warnings, one ``controller.register(spec)`` per gate;
5. splits the trunk between the gates into segments and has the inner compiler compile every piece
   (:func:`dropbp_fx.pipeline.compile_pieces`); a graph with no gate goes to the inner compiler whole.

All graphs of one model share one :class:`~dropbp_fx.controller.DropController`, so a model with graph
breaks still draws one mask per training step.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.fx as fx

from dropbp_fx import discovery, distributed, pipeline
from dropbp_fx.branch_only import BranchOnlyGrads
from dropbp_fx.config import DropBPConfig, validate_options  # noqa: F401 (validate_options: public API)
from dropbp_fx.controller import DropController
from dropbp_fx.discovery import get_dropbp  # noqa: F401 (public API)
from dropbp_fx.flops_cache import FlopsCache
from dropbp_fx.gate_spec import flops_shares
from dropbp_fx.inner import CompileCache, inner_backend
from dropbp_fx.pipeline import GraphRecord, GraphResult, RewriteInputs
from dropbp_fx.reports import DropBPWarning, Reports, refuse_published_dropbp  # noqa: F401 (DropBPWarning: public)

log = logging.getLogger(__name__)


class DropBP:
    """A ``torch.compile`` backend that gives a model DropBP, and the handle on its drop state.

    >>> dbp = DropBP(drop_rate=0.5)
    >>> compiled = torch.compile(model, backend=dbp)
    >>> compiled(x).sum().backward()
    >>> dbp.gate_names, dbp.last_mask, dbp.step
    """

    def __init__(self, drop_rate: float = 0.5, **options) -> None:
        """``options``: the other fields of :class:`~dropbp_fx.DropBPConfig` (seed, policy, inner, schedule, ...)."""
        self._setup(DropBPConfig.from_options({"drop_rate": drop_rate, **options}))

    @classmethod
    def from_config(cls, config: DropBPConfig) -> DropBP:
        """From options checked already (``DropBPConfig`` checks when made)."""
        dbp = cls.__new__(cls)
        dbp._setup(config)
        return dbp

    def _setup(self, config: DropBPConfig) -> None:
        self.options = config  # as given; the controller owns what the masks depend on
        self.inner = config.inner
        self.calibrations: list = []  # (step, dropbp_fx.Calibration) of every calibration, in order
        self.optimizer_links: list = []  # dropbp_fx.optim.OptimizerLink per attached optimizer
        self.controller = DropController.from_config(config)  # owns the gates, rates, seed, policy and step
        self.graphs: list[GraphRecord] = []
        self.compile_cache = CompileCache(config.inner) if config.inner != "eager" else None
        self.flops = FlopsCache()
        self.reports = Reports()
        self.branch_only = BranchOnlyGrads(self.controller)  # trunk parameters the gates' branches alone train
        self._root = None  # weakref to the compiled model
        self._ddp_problem: str | None = None  # why the DDP wrapper cannot take a rate > 0 (see _check_distributed)

    @property
    def config(self) -> dict:
        """The options in force (the controller's after ``load_state_dict``)."""
        c = self.controller
        return {**self.options.as_dict(), **dict(drop_rate=c.drop_rate, seed=c.seed, policy=c.policy,
                                                 keep_one_open=c.keep_one_open, total_steps=c.schedule.total_steps)}

    def model(self):
        """The compiled model (None for a hand-traced graph or a compiled function)."""
        return self._root() if self._root is not None else None

    @property
    def weights(self) -> dict[str, int]:
        """Gate name -> parameter elements of its branch (the controller's record)."""
        return {g.name: g.weight for g in self.controller.gates}

    @property
    def side_outputs(self) -> dict[str, int]:
        """Gate name -> values it returns besides the branch output (the controller's record)."""
        return {g.name: g.side_outputs for g in self.controller.gates}

    # ------------------------------------------------------------------ backend
    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> fx.GraphModule:
        root, prefix = discovery.compiled_module(example_inputs)  # 1.
        if root is not None:
            discovery.register(root, self)
            self.controller.watch(root)
            self._root = weakref.ref(root)
        else:
            function = discovery.compiled_function()
            if function is not None:
                discovery.register(function, self)
        refuse_published_dropbp(root if root is not None else gm)
        if not torch.is_grad_enabled():  # 2.
            self.graphs.append(GraphRecord(len(self.graphs), [], [], [], "traced with grad disabled: no gates"))
            log.info("dropbp: graph %d traced with grad disabled; running it unchanged", len(self.graphs) - 1)
            return self._whole(gm, example_inputs)
        # A graph traced in eval mode gets gates too: Dynamo guards ``module.training`` only where the model's
        # code reads it, so the same graph may run after ``model.train()``. The gates stay open in eval mode.
        self._check_distributed()  # 3.
        if not self._commit(pipeline.rewrite(gm, example_inputs, prefix, self._rewrite_inputs())):  # 4.
            return self._whole(gm, example_inputs)
        if self.compile_cache is not None:  # 5.
            pipeline.compile_pieces(gm, self.compile_cache)
        return gm

    def transform(self, gm: fx.GraphModule, example_inputs: list | None = None, *,
                  name_prefix: str = "") -> fx.GraphModule:
        """Apply the passes to a traced ``GraphModule`` (Dynamo, ``symbolic_trace`` or ``torch.export``).

        The module is rewritten in place and returned; its gates report to this object.
        ``name_prefix`` is prepended to gate names (the module path of a traced sub-frame).
        """
        refuse_published_dropbp(gm)
        gated = self._commit(pipeline.rewrite(gm, example_inputs, name_prefix, self._rewrite_inputs()))
        if gated and self.compile_cache is not None:
            pipeline.compile_pieces(gm, self.compile_cache)
        return gm

    def _rewrite_inputs(self) -> RewriteInputs:
        return RewriteInputs(self.controller, self.flops, self.model(), self.options.recompute, len(self.graphs))

    def _commit(self, results: list[GraphResult]) -> int:
        """Take in what the pipeline found, graph by graph: the record, the warnings, each gate registered once
        (its module gets the slot), the mode of a graph without model. Returns how many gates were made."""
        gated = 0
        for result in results:
            self.graphs.append(result.record)
            if result.cut is not None:
                self.reports.graph_cut(result.cut.message, result.cut.key)
            if result.no_branch:
                record = result.record
                self.reports.no_branch(record.index, len(record.skipped), gated=bool(self.controller.gates))
            self.reports.stream_mutations(result.mutated_streams)
            for gate, spec in result.gates:
                gate.slot = self.controller.register(spec)
            for parameter, name, indices in result.branch_only:
                slots = None if indices is None else tuple(result.gates[i][0].slot for i in indices)
                self.branch_only.add(parameter, name, slots)
            if result.watch is not None:
                graph, trunk_inputs_train = result.watch
                self.controller.watch(graph)
                self.controller.trunk_inputs_train |= trunk_inputs_train
            gated += len(result.gates)
        return gated

    def _whole(self, gm, example_inputs):
        """A graph without gates: the inner compiler takes it whole."""
        return gm if self.inner == "eager" else inner_backend(self.inner)(gm, example_inputs)

    def _check_distributed(self) -> None:
        """Refuse, with the fix, what DDP cannot train with per-step masks (before torch fails obscurely).

        Graph fragments cut by Dynamo's DDPOptimizer, ``DistributedDataParallel(static_graph=True)``, and
        ``find_unused_parameters=False`` while a rate is above 0. The last two are remembered, so that
        :meth:`set_rates` (and calibration) refuses rates above 0 later.
        """
        if discovery.inside_ddp_optimizer():
            raise RuntimeError(distributed.DDP_OPTIMIZER_MESSAGE)
        ddp = distributed.active_ddp_module()
        if ddp is None:
            return
        self._ddp_problem = distributed.ddp_problem(ddp)
        self._refuse_rates_under_ddp([self.controller.drop_rate] + list(self.rates.values()))  # new gates get drop_rate

    def _refuse_rates_under_ddp(self, rates) -> None:
        if self._ddp_problem is not None and any(rate > 0 for rate in rates):
            raise RuntimeError(self._ddp_problem)

    # ------------------------------------------------------------------ state
    @property
    def gate_names(self) -> list[str]:
        return self.controller.names

    @property
    def rates(self) -> dict[str, float]:
        return self.controller.rates

    @property
    def last_mask(self) -> dict[str, bool]:
        return self.controller.last_mask

    @property
    def step(self) -> int:
        return self.controller.step

    def counts(self) -> dict[str, tuple[int, int]]:
        """Gate name -> (times dropped, training calls)."""
        return {g.name: (g.drops, g.calls) for g in self.controller.gates}

    def set_rates(self, rates) -> None:
        if not isinstance(rates, (dict, int, float)):
            rates = list(rates)
        self._refuse_rates_under_ddp(rates.values() if isinstance(rates, dict) else
                                     [rates] if isinstance(rates, (int, float)) else rates)
        self.controller.set_rates(rates)

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length in optimizer steps, for the ramp schedules (the callbacks set ``max_steps``)."""
        self.controller.schedule.total_steps = int(total_steps)
        self.controller._mask = []  # redraw the current step with it

    def attach_optimizer(self, optimizer):
        """Apply ``optimizer_mode`` to ``optimizer``'s steps (:mod:`dropbp_fx.optim`); returns the link (its
        ``remove()`` detaches it). The Trainer and Lightning callbacks attach theirs."""
        from dropbp_fx.optim import OptimizerLink

        if any(link.optimizer is optimizer for link in self.optimizer_links):
            return next(link for link in self.optimizer_links if link.optimizer is optimizer)
        link = OptimizerLink(self, optimizer, self.options.optimizer_mode, self.options.lr_scale_cap)
        self.optimizer_links.append(link)
        return link

    def state_dict(self) -> dict:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._refuse_rates_under_ddp([state["drop_rate"], *state["rates"].values()])
        self.controller.load_state_dict(state)

    def summary(self) -> str:
        """A table of the gates: name, share of the branches' backward FLOPs, rate, dropped/calls."""
        gates = self.controller.gates
        if not gates:
            notes = "; ".join(r.note for r in self.graphs if r.note) or "no graph compiled yet"
            return f"dropbp: no gates ({notes})"
        label, shares = flops_shares(gates)  # no shapes to count FLOPs on: parameters stand in
        width = max(len(g.name) for g in gates)
        lines = [f"{'gate':<{width}}  {label:>15}  rate   dropped/calls"]
        for g, share in zip(gates, shares):
            lines.append(f"{g.name:<{width}}  {share:15.1%}  {g.rate:.3f}  {g.drops}/{g.calls}")
        lines.append(f"{len(gates)} gates, mean rate {sum(g.rate for g in gates) / len(gates):.3f}, "
                     f"policy {self.controller.policy}, seed {self.controller.seed}, step {self.step}")
        return "\n".join(lines)

    def plot(self, path: str, title: str | None = None) -> str:
        """A PNG of the gates along the depth of the model: rate, realised drop fraction, share of backward
        FLOPs (see :func:`dropbp_fx.plotting.plot_gates`); returns ``path``."""
        from dropbp_fx.plotting import plot_gates

        return plot_gates(self, path, title)

    def __repr__(self) -> str:
        return f"DropBP({self.config}, gates={len(self.controller.gates)}, step={self.step})"


# id(torch.compile call) -> (weak reference to it, its DropBP); torch's _TorchCompileWrapper is not hashable
_STATES: dict[int, tuple[weakref.ref, DropBP]] = {}


def dropbp(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, mode: str | None = None):
    """Entry point of ``torch.compile(..., backend="dropbp", options={...})``: one :class:`DropBP` per
    ``torch.compile(...)`` call, shared by all its graphs."""
    if mode is not None:
        raise ValueError(f"dropbp takes options={{...}}, not mode={mode!r}; valid options: "
                         f"{sorted(DropBPConfig.from_options(None).as_dict())}")
    config = DropBPConfig.from_options(options)
    call = discovery.torch_compile_call()
    entry = _STATES.get(id(call)) if call is not None else None
    backend = entry[1] if entry is not None and entry[0]() is call else None
    if backend is None:
        backend = DropBP.from_config(config)
        if call is not None:
            key = id(call)
            _STATES[key] = (weakref.ref(call, lambda _, key=key: _STATES.pop(key, None)), backend)
    return backend(gm, example_inputs)
