"""The ``dropbp`` torch.compile backend.

``torch.compile(model, backend="dropbp", options={...})`` resolves through the
``torch_dynamo_backends`` entry point to :func:`dropbp`; ``backend=DropBP(...)``
uses an object you keep. Either way, for every graph Dynamo captures:

1. graphs traced with grad disabled run unchanged (in eval mode the gates stay open);
2. :func:`passes.residuals.find_residual_branches` finds the residual branches;
3. :func:`passes.gating.gate_residual_branches` moves each into a ``DropGate``;
4. the rewritten graph runs (eagerly, in this version).

All graphs of one model share one :class:`~dropbp_fx.controller.DropController`,
so a model with graph breaks still draws one mask per training step.
"""

from __future__ import annotations

import logging
import sys
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from dropbp_fx.checkpoint import Checkpointed
from dropbp_fx.controller import POLICIES, DropController, check_rate
from dropbp_fx.gate import DropGate
from dropbp_fx.probe import Probe
from dropbp_fx.inner import INNER_COMPILERS, CompileCache, Compiled, inner_backend, input_key

log = logging.getLogger("dropbp_fx")


OPTIONS = {
    "drop_rate": "float in [0, 1): target average fraction of residual branches dropped per step (default 0.5)",
    "seed": "int: masks are a function of (seed, step, gate); the same seed gives the same masks everywhere "
            "(default 0)",
    "policy": f"one of {POLICIES}: 'topup' = the published rule (Bernoulli, then force drops up to the target "
              "count), 'bernoulli' = independent coin flips (default 'topup')",
    "keep_one_open": "'auto', True or False: when a step's mask closes every gate, reopen one; 'auto' does so "
                     "only when nothing outside the gates trains (LoRA-style) (default 'auto')",
    "inner": f"one of {INNER_COMPILERS}: the compiler for the trunk segments and the branches (each branch "
             "twice: a training and an inference graph) (default 'inductor', the fastest on CPU)",
}
# inductor: the fastest inner compiler on CPU in benchmarks/results/results.md
DEFAULTS = {"drop_rate": 0.5, "seed": 0, "policy": "topup", "keep_one_open": "auto", "inner": "inductor"}


def validate_options(options: dict | None) -> dict:
    """Defaults filled in; a ``ValueError`` naming the valid keys and ranges for anything else."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        valid = "\n".join(f"  {k}: {v}" for k, v in OPTIONS.items())
        raise ValueError(f"dropbp: unknown option(s) {unknown}. Valid options:\n{valid}")
    config = {**DEFAULTS, **options}
    check_rate("dropbp option drop_rate", config["drop_rate"])
    if isinstance(config["seed"], bool) or not isinstance(config["seed"], int):
        raise ValueError(f"dropbp option seed must be an int, got {config['seed']!r}")
    if config["policy"] not in POLICIES:
        raise ValueError(f"dropbp option policy must be one of {POLICIES}, got {config['policy']!r}")
    if config["keep_one_open"] not in ("auto", True, False):
        raise ValueError(f"dropbp option keep_one_open must be 'auto', True or False, got {config['keep_one_open']!r}")
    if config["inner"] not in INNER_COMPILERS:
        raise ValueError(f"dropbp option inner must be one of {INNER_COMPILERS}, got {config['inner']!r}")
    return config


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


class DropBP:
    """A ``torch.compile`` backend that gives a model DropBP, and the handle on its drop state.

    >>> dbp = DropBP(drop_rate=0.5)
    >>> compiled = torch.compile(model, backend=dbp)
    >>> compiled(x).sum().backward()
    >>> dbp.gate_names, dbp.last_mask, dbp.step
    """

    def __init__(self, drop_rate: float = 0.5, *, seed: int = 0, policy: str = "topup",
                 keep_one_open: bool | str = "auto", inner: str = "inductor") -> None:
        self.config = validate_options(dict(drop_rate=drop_rate, seed=seed, policy=policy,
                                            keep_one_open=keep_one_open, inner=inner))
        self.controller = DropController(drop_rate, seed=seed, policy=policy, keep_one_open=keep_one_open)
        self.graphs: list[GraphRecord] = []
        self._weights: dict[str, int] = {}
        self.side_outputs: dict[str, int] = {}  # gate name -> values it returns besides the branch output
        self._root = None
        self.compile_cache = CompileCache(inner) if inner != "eager" else None
        self._flops_cache: dict[tuple, tuple[int, int]] = {}
        self._warned_no_branch = False
        self._warned_cuts: set[tuple] = set()
        self._ddp_problem: str | None = None  # why the DDP wrapper cannot take a rate > 0 (see _check_distributed)

    # ------------------------------------------------------------------ backend
    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> fx.GraphModule:
        root, prefix = _compiled_module(example_inputs)
        if root is not None:
            _REGISTRY[root] = self
            self.controller.watch(root)
            self._root = weakref.ref(root)
        else:
            function = _compiled_function()
            if function is not None:
                _REGISTRY[function] = self
        _refuse_published_dropbp(root if root is not None else gm)
        index = len(self.graphs)
        if not torch.is_grad_enabled():
            return self._unchanged(gm, example_inputs, index, "traced with grad disabled: no gates")
        # A graph traced in eval mode gets gates too: Dynamo guards ``module.training`` only where the model's
        # code reads it, so the same graph may run after ``model.train()``. The gates stay open in eval mode.
        self._check_distributed()
        if not self._rewrite(gm, example_inputs, prefix):
            return self._whole(gm, example_inputs)
        if self.compile_cache is not None:
            self._compile_pieces(gm)
        return gm

    def transform(self, gm: fx.GraphModule, example_inputs: list | None = None, *,
                  name_prefix: str = "") -> fx.GraphModule:
        """Apply the passes to a traced ``GraphModule`` (Dynamo, ``symbolic_trace`` or ``torch.export``).

        The module is rewritten in place and returned; its gates report to this object.
        ``name_prefix`` is prepended to gate names (the module path of a traced sub-frame).
        """
        _refuse_published_dropbp(gm)
        if self._rewrite(gm, example_inputs, name_prefix) and self.compile_cache is not None:
            self._compile_pieces(gm)
        return gm

    def _rewrite(self, gm: fx.GraphModule, example_inputs, name_prefix: str) -> int:
        """Gate the residual branches of ``gm`` and of its checkpointed regions; returns how many."""
        from dropbp_fx.passes.checkpoints import checkpoint_calls, replace_checkpoint_calls
        from dropbp_fx.passes.dead_code import remove_dead_code
        from dropbp_fx.passes.gating import gate_residual_branches
        from dropbp_fx.passes.instrument import insert_probes
        from dropbp_fx.passes.nesting import choose_nest_levels
        from dropbp_fx.passes.residuals import find_residual_branches

        gated = 0
        values = dict(zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs or ()))
        for call, body in checkpoint_calls(gm):  # layers under gradient checkpointing
            gated += self._rewrite(body, [values.get(a) for a in call.args[1:]], name_prefix)
        if gated:
            replace_checkpoint_calls(gm, Checkpointed)

        index = len(self.graphs)
        remove_dead_code(gm)  # a discarded value (a module's returned attention probabilities) is no reader
        analysis = find_residual_branches(gm)
        if name_prefix:
            for branch in analysis.branches + analysis.nested:
                branch.name = f"{name_prefix}.{branch.name}" if branch.name else name_prefix
        if analysis.nested:
            _propagate_shapes(gm, example_inputs)
            choose_nest_levels(analysis, lambda branch: self._branch_backward_flops(gm, branch))
        record = GraphRecord(index, [b.name for b in analysis.branches], [b.name for b in analysis.nested],
                             [(s.add.name, s.module, s.reason) for s in analysis.skipped],
                             nests=[n.describe() for n in analysis.nests])
        self.graphs.append(record)
        self._check_cut(gm, analysis, record, name_prefix)
        if not analysis.branches:
            if not gated:
                record.note = "no residual branch: unchanged"
                log.info("dropbp: graph %d has no residual branch (%d adds looked at); running it unchanged",
                         index, len(analysis.skipped))
                self._warn_no_branch(index, len(analysis.skipped))
            return gated
        _warn_stream_mutations(analysis.branches)
        for branch in analysis.branches:
            self._weights[branch.name] = branch.weight
            self.side_outputs[branch.name] = len(branch.side_outputs)
        _propagate_shapes(gm, example_inputs)
        gate_residual_branches(gm, analysis.branches, lambda sub_gm, branch: DropGate(sub_gm, branch.name,
                                                                                     self.controller))
        insert_probes(gm, lambda node: _is_gate_call(gm, node),
                      lambda target, side: Probe(gm.get_submodule(target), side, self.controller.recorder))
        self._count_flops(gm)
        if self._root is None:  # a hand-traced GraphModule or a compiled function: its own parameters and mode
            self.controller.watch(gm)
            self.controller.trunk_inputs_train |= _grad_input_feeds_trunk(gm, example_inputs)
        model = self._root() if self._root is not None else gm
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        _record_gate_params(gm, example_inputs, names, self.controller)
        if name_prefix:
            _anchor_gates(gm, example_inputs, names, name_prefix, model)
        log.info("dropbp: graph %d: %d residual branches gated (%s)%s", index, len(analysis.branches),
                 ", ".join(record.gates),
                 f"; {len(analysis.nested)} nested branches left ungated" if analysis.nested else "")
        return gated + len(analysis.branches)

    def _check_distributed(self) -> None:
        """Refuse, with the fix, what DDP cannot train with per-step masks (before torch fails obscurely).

        Graph fragments cut by Dynamo's DDPOptimizer, ``DistributedDataParallel(static_graph=True)``, and
        ``find_unused_parameters=False`` while a rate is above 0. The last two are remembered, so that
        :meth:`set_rates` (and calibration) refuses rates above 0 later.
        """
        if _inside_ddp_optimizer():
            raise RuntimeError(DDP_OPTIMIZER_MESSAGE)
        ddp = _active_ddp_module()
        if ddp is None:
            return
        self._ddp_problem = _ddp_problem(ddp)
        self._refuse_rates_under_ddp([self.controller.drop_rate] + list(self.rates.values()))  # new gates get drop_rate

    def _refuse_rates_under_ddp(self, rates) -> None:
        if self._ddp_problem is not None and any(rate > 0 for rate in rates):
            raise RuntimeError(self._ddp_problem)

    def _check_cut(self, gm: fx.GraphModule, analysis, record: GraphRecord, prefix: str) -> None:
        """A graph break inside a residual branch: no graph holds its whole ``x + f(x)``, so it is not gated.
        Said by name (the module, the op that broke the graph, Dynamo's fix), once per module and op."""
        from dropbp_fx.passes.breaks import cut_branches, describe_break

        why = describe_break(gm)
        if why is None:
            return
        adds = {b.add for b in analysis.branches + analysis.nested} | {b.partial_sum for b in analysis.branches}
        cut = cut_branches(gm, adds - {None}, self._root() if self._root is not None else None)
        if not cut:
            return
        cut = [f"{prefix}.{c}" if prefix and c else (c or prefix or "<root>") for c in cut]
        modules = ", ".join(cut[:3]) + (f" (+{len(cut) - 3} more)" if len(cut) > 3 else "")
        record.cut = (f"graph {record.index} ends inside a residual branch, at {modules}: Dynamo broke the graph "
                      f"there ({why.describe()}), so no graph holds that branch's whole `x + f(x)` and it is not "
                      f"gated (it trains every step). Fix: {why.fix}")
        key = (tuple(cut), why.op, why.detail)
        if key not in self._warned_cuts:
            self._warned_cuts.add(key)
            log.warning("dropbp: %s", record.cut)
            warnings.warn(f"dropbp: {record.cut}", DropBPWarning, stacklevel=2)

    def _warn_no_branch(self, index: int, adds: int) -> None:
        """Once per backend: a graph without residual branch is almost always a model DropBP cannot help."""
        if self._warned_no_branch:
            return
        self._warned_no_branch = True
        warnings.warn(
            f"dropbp: graph {index} has no residual branch ({adds} adds looked at), so nothing in it is ever "
            "dropped and it trains exactly as without DropBP. DropBP needs residual adds `x + f(x)` whose branch "
            "f holds a matmul, linear, conv or attention; dropbp_fx.explain(model, *inputs) lists every add and why "
            "it was not gated.", DropBPWarning, stacklevel=2)

    def _count_flops(self, gm: fx.GraphModule) -> None:
        """FLOPs of every gate's branch, from the shapes the graph carries (identical layers counted once)."""
        from dropbp_fx.passes.flops import count_flops
        from dropbp_fx.passes.graph_view import structure_key

        for node in gm.graph.nodes:
            if not _is_gate_call(gm, node):
                continue
            values = [a.meta.get("example_value", a.meta.get("val")) if isinstance(a, fx.Node) else a
                      for a in node.args]
            if any(v is None for v in values):
                continue  # no shapes (a symbolic_trace graph transformed without example inputs)
            gate = gm.get_submodule(node.target)
            key = (structure_key(gate.branch), input_key(values))
            if key not in self._flops_cache:
                self._flops_cache[key] = _concrete(count_flops(gate.branch, values))
            gate.flops = self._flops_cache[key]
            self.controller.gates[gate.slot].flops = gate.flops

    def _branch_backward_flops(self, gm: fx.GraphModule, branch) -> int:
        """Backward FLOPs of a branch not gated yet (to choose a nest's level), from the graph's shapes; its
        parameter elements where the graph has none."""
        from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule

        from dropbp_fx.passes.flops import count_flops
        from dropbp_fx.passes.graph_view import structure_key

        sub_gm, inputs, _ = fuse_as_graphmodule(gm, branch.nodes, "Nested", dict.fromkeys(branch.nodes))
        values = [n.meta.get("example_value", n.meta.get("val")) for n in inputs]
        if any(v is None for v in values):
            return branch.weight
        key = (structure_key(sub_gm), input_key(values))  # identical layers counted once, as in _count_flops
        if key not in self._flops_cache:
            self._flops_cache[key] = _concrete(count_flops(sub_gm, values))
        return self._flops_cache[key][1]

    def _unchanged(self, gm, example_inputs, index, note):
        self.graphs.append(GraphRecord(index, [], [], [], note))
        log.info("dropbp: graph %d %s; running it unchanged", index, note)
        return self._whole(gm, example_inputs)

    def _whole(self, gm, example_inputs):
        """A graph without gates: the inner compiler takes it whole."""
        inner = self.config["inner"]
        return gm if inner == "eager" else inner_backend(inner)(gm, example_inputs)

    def _compile_pieces(self, gm: fx.GraphModule) -> None:
        """Trunk segments and both variants of every branch compile with the inner compiler on first call."""
        from dropbp_fx.passes.segments import split_trunk

        cache = self.compile_cache
        regions = [gm] + [m.body for m in gm.modules() if isinstance(m, Checkpointed)]
        for module in gm.modules():
            if isinstance(module, DropGate):
                module.run_open = Compiled(module.branch, cache, training=True)
                module.run_closed = Compiled(module.branch, cache, training=False)
        for region in regions:
            split_trunk(region, lambda node, r=region: _is_opaque_call(r, node),
                        lambda sub_gm: Compiled(sub_gm, cache, training=True))

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
        if all(g.flops for g in gates):
            label, weights = "bwd FLOPs share", {g.name: g.flops[1] for g in gates}
        else:  # no shapes to count FLOPs on: parameters stand in
            label, weights = "params share", {g.name: self._weights.get(g.name, 0) for g in gates}
        total = sum(weights.values()) or 1
        width = max(len(g.name) for g in gates)
        lines = [f"{'gate':<{width}}  {label:>15}  rate   dropped/calls"]
        for g in gates:
            lines.append(f"{g.name:<{width}}  {weights[g.name] / total:15.1%}  {g.rate:.3f}  {g.drops}/{g.calls}")
        lines.append(f"{len(gates)} gates, mean rate {sum(g.rate for g in gates) / len(gates):.3f}, "
                     f"policy {self.controller.policy}, seed {self.controller.seed}, step {self.step}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"DropBP({self.config}, gates={len(self.controller.gates)}, step={self.step})"


# ---------------------------------------------------------------------- helpers
class DropBPWarning(UserWarning):
    """Something about the model that DropBP handles, but that the user most likely did not intend."""


def _warn_stream_mutations(branches) -> None:
    """The residual stream changed in place (``x.mul_(s)``, ``relu_``) where a branch reads it.

    The skip then sees the mutated value too, so the mutation is part of the trunk: it stays outside
    the gate and always gets gradient. That is what the model computes, but rarely what was meant.
    """
    from dropbp_fx.passes import graph_view as gv

    for branch in branches:
        if gv.mutates_first_arg(branch.skip) and not gv.is_add(branch.skip):
            warnings.warn(
                f"dropbp: the residual stream of branch {branch.name!r} is modified in place "
                f"({branch.skip.name} = {branch.skip.target}) before the residual add, so the skip sees the "
                "modified value as well: the in-place op stays outside the gate and is never dropped. If the "
                "branch meant to change only its own input, use the out-of-place op (x = x.mul(s), not x.mul_(s)).",
                DropBPWarning, stacklevel=3)


# The class of the published DropBP library's layer (github.com/WooSunghyeon/dropbp, ``dropbp.layer.DropBP``):
# ``forward`` returns ``input`` or ``input.detach()`` after a Python ``random.random()`` draw.
def _is_published_dropbp_layer(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "DropBP" and (cls.__module__.split(".")[0] == "dropbp"
                                         or all(hasattr(module, a) for a in ("p", "flops", "count")))


def _refuse_published_dropbp(model: nn.Module) -> None:
    """A model already edited for the published DropBP library would be dropped twice, and wrongly."""
    found = [name for name, m in model.named_modules() if _is_published_dropbp_layer(m)]
    if found:
        shown = ", ".join(found[:4]) + (f", ... ({len(found)} in all)" if len(found) > 4 else "")
        raise ValueError(
            f"dropbp: the model already contains layers of the published DropBP library ({shown}). Their Python "
            "random.random() draw is frozen into the graph when Dynamo traces it (the same branches would be "
            "dropped, or kept, on every step), and the backend would gate the branches a second time. Use the "
            "unmodified model: the dropbp backend finds the residual branches itself (set the rates with "
            "options={'drop_rate': ...} or dropbp_fx.calibrate, instead of DropBPHandler).")


_REGISTRY: "weakref.WeakKeyDictionary[object, DropBP]" = weakref.WeakKeyDictionary()  # model or function


def get_dropbp(model) -> DropBP:
    """The :class:`DropBP` state of a model (or function) compiled with ``backend="dropbp"``, after its first call.

    ``torch.compile(DistributedDataParallel(model))`` and ``DistributedDataParallel(torch.compile(model))`` work too.
    """
    target = _unwrap_ddp(model)
    target = _unwrap_ddp(getattr(target, "_orig_mod", None) or getattr(target, "_torchdynamo_orig_callable", target))
    try:
        found = _REGISTRY.get(target)
    except TypeError:  # not weak-referenceable: never registered
        found = None
    if found is None:
        raise LookupError("no dropbp state for this model: compile it with torch.compile(model, backend='dropbp') "
                          "and run one forward first (Dynamo compiles lazily)")
    return found


def dropbp(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, mode: str | None = None):
    """Entry point of ``torch.compile(..., backend="dropbp", options={...})``."""
    if mode is not None:
        raise ValueError(f"dropbp takes options={{...}}, not mode={mode!r}; valid options: {sorted(OPTIONS)}")
    config = validate_options(options)
    call = _torch_compile_call()  # one state per torch.compile(...) call, shared by all its graphs
    backend = getattr(call, "_dropbp_state", None)
    if backend is None:
        backend = DropBP(**config)
        if call is not None:
            call._dropbp_state = backend
    return backend(gm, example_inputs)


# ---------------------------------------------------------------------- distributed
DDP_OPTIMIZER_MESSAGE = (
    "dropbp: Dynamo's DDPOptimizer (torch._dynamo.config.optimize_ddp, on by default) has split this graph at "
    "DistributedDataParallel bucket boundaries, which cuts residual branches apart: dropbp would leave some of them "
    "ungated and train with other masks than you asked for. Fix: set torch._dynamo.config.optimize_ddp = False "
    "before the first forward. dropbp compiles the trunk segments and branches as separate pieces, so DDP still "
    "overlaps its gradient all-reduce with the backward pass.")


def _ddp_class():
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DistributedDataParallel


def _unwrap_ddp(module):
    """The model inside ``DistributedDataParallel`` wrappers (gate names must not depend on the wrapping)."""
    ddp = _ddp_class()
    while ddp is not None and isinstance(module, ddp):
        module = module.module
    return module


def _active_ddp_module():
    """The ``DistributedDataParallel`` whose forward is running (DDP sets it around its module's forward)."""
    ddp = _ddp_class()
    return None if ddp is None else ddp._get_active_ddp_module()


def _inside_ddp_optimizer() -> bool:
    """Is this graph a fragment that Dynamo's DDPOptimizer cut (its ``SubmodCompiler`` is on the call stack)?"""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "SubmodCompiler" and type(owner).__module__.endswith("backends.distributed"):
            return True
        frame = frame.f_back
    return False


def _ddp_problem(ddp) -> str | None:
    """Why this DDP wrapper cannot train with branches dropped (None: it can)."""
    if getattr(ddp, "static_graph", False):
        return ("dropbp: DistributedDataParallel(static_graph=True) assumes the same parameters get gradients every "
                "step, but DropBP drops different residual branches each step (DDP fails at the second step). Fix: "
                "DistributedDataParallel(model, find_unused_parameters=True), without static_graph.")
    if not getattr(ddp, "find_unused_parameters", True):
        return ("dropbp: DistributedDataParallel(find_unused_parameters=False) expects a gradient for every "
                "parameter every step, but the parameters of a dropped residual branch get none (DDP would leave "
                "that step's gradient reduction unfinished and fail at the next one: 'Expected to have finished "
                "reduction in the prior iteration'). Fix: DistributedDataParallel(model, find_unused_parameters=True), or drop_rate=0.")
    return None


def _compiled_function():
    """The function passed to ``torch.compile`` (found on the call stack), when no module was."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "compile_wrapper" and "fn" in frame.f_locals:
            fn = frame.f_locals["fn"]
            try:
                weakref.ref(fn)
            except TypeError:
                return None
            return fn
        frame = frame.f_back
    return None


def _torch_compile_call():
    """The ``torch._TorchCompileWrapper`` of the ``torch.compile(...)`` call whose graph is being compiled."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "_TorchCompileWrapper":
            return owner
        frame = frame.f_back
    return None


def _compiled_module(example_inputs) -> tuple[nn.Module | None, str]:
    """The model being compiled, and the module path of the frame Dynamo is tracing inside it.

    The model is the ``_orig_mod`` of the outermost ``OptimizedModule`` on the call stack (or, when a
    function was compiled, the frame local that owns the graph's parameters). When Dynamo falls back
    to compiling nested frames (a graph break inside a loop over layers), the traced frame is a layer,
    and its path (``blocks.1``) prefixes the gate names so that they stay model-wide.
    """
    try:
        from torch._dynamo.eval_frame import OptimizedModule
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # not inside Dynamo (a hand call of the backend)
        return None, ""
    if tx is None:
        return None, ""
    params = {id(t) for t in example_inputs or () if isinstance(t, nn.Parameter)}
    candidates = []
    for value in tx.f_locals.values():  # ``self``, or ``args[0]`` of a decorated forward
        candidates.extend(value if isinstance(value, (tuple, list)) else [value])
    frame_module, best_owned = None, -1
    for value in candidates:
        if isinstance(value, nn.Module):
            owned = sum(id(p) in params for p in value.parameters())
            if owned > best_owned:
                frame_module, best_owned = value, owned

    root, frame = None, sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, OptimizedModule) and isinstance(owner._orig_mod, nn.Module):
            root = _unwrap_ddp(owner._orig_mod)  # gate names without DDP's "module." prefix
        frame = frame.f_back
    if root is None or frame_module is None or root is frame_module:
        return root or frame_module, ""
    prefix = next((name for name, m in root.named_modules() if m is frame_module), "")
    return root, prefix


def _gate_parameters(gm: fx.GraphModule, example_inputs, names: dict[int, str]):
    """Yield ``(gate, [(argument index or None, parameter name, parameter)])`` for each gate of ``gm``.

    ``names`` maps ``id(parameter)`` to its name in the model. Parameters reach a gate as arguments
    (Dynamo placeholders, ``get_attr`` nodes: the index is set) or inside its branch (``call_module``).
    """
    values = dict(zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs or ()))
    for node in gm.graph.nodes:
        if not _is_gate_call(gm, node):
            continue
        gate = gm.get_submodule(node.target)
        params = []
        for index, arg in enumerate(node.args):
            value = values.get(arg)
            if value is None and isinstance(arg, fx.Node) and arg.op == "get_attr":
                value = _attr(gm, arg.target)
            if isinstance(value, nn.Parameter) and id(value) in names:
                params.append((index, names[id(value)], value))
        params += [(None, names[id(p)], p) for p in gate.branch.parameters() if id(p) in names]
        yield gate, params


def _record_gate_params(gm, example_inputs, names, controller) -> None:
    """Tell the controller which parameters each gate consumes (for ``keep_one_open='auto'``)."""
    for gate, params in _gate_parameters(gm, example_inputs, names):
        controller.register(gate.gate_name, [name for _, name, _ in params])


def _anchor_gates(gm: fx.GraphModule, example_inputs, names: dict[int, str], prefix: str, model=None) -> None:
    """Let the gates of a layer-frame graph (``blocks.0``) name themselves after the layer they run for.

    Dynamo reuses such a graph for every identical layer; each gate is told which argument is one of
    its parameters, and names a new layer's gate by swapping the layer prefix: ``blocks.0.mlp`` was
    compiled with ``blocks.0.mlp.0.weight``; called with ``blocks.1.mlp.0.weight`` it is ``blocks.1.mlp``.
    """
    for gate, params in _gate_parameters(gm, example_inputs, names):
        anchors = [(i, n, p) for i, n, p in params if i is not None and n.startswith(prefix + ".")]
        if not anchors:
            continue
        index, anchor, parameter = anchors[0]
        owned = [n[len(prefix):] for _, n, _ in params if n.startswith(prefix + ".")]  # ".mlp.0.weight", ...
        gate.anchor, gate.namer = index, _layer_namer(names, anchor[len(prefix):], gate.gate_name[len(prefix):], owned,
                                                      model)
        gate._slots[id(parameter)] = gate.slot


def _layer_namer(names: dict[int, str], suffix: str, relative: str, owned: list[str], model=None):
    model = weakref.ref(model) if model is not None else None

    def namer(parameter):
        if id(parameter) not in names and model is not None and model() is not None:
            # FSDP2 registers a layer's unsharded parameters only around its forward (sharded ones otherwise)
            names.update({id(p): n for n, p in model().named_parameters(remove_duplicate=False)})
        full = names.get(id(parameter))
        if full is None or not full.endswith(suffix):
            return None, ()
        layer = full[: len(full) - len(suffix)]
        return layer + relative, [layer + n for n in owned]
    return namer


def _concrete(flops: tuple) -> tuple[int, int]:
    """FLOPs counted on a graph with symbolic sizes, at the sizes it was traced with."""
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    return tuple(optimization_hint(v, fallback=0) if isinstance(v, torch.SymInt) else v for v in flops)


def _propagate_shapes(gm: fx.GraphModule, example_inputs) -> None:
    """Give a graph without shape metadata (``symbolic_trace``) fake values, when inputs are known."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not example_inputs or any("example_value" in n.meta or "val" in n.meta for n in placeholders):
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    _grad_fake_tensor_prop(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)


def _grad_fake_tensor_prop(gm, mode):
    """``FakeTensorProp`` whose values keep ``requires_grad`` (its snapshots are detached): branch FLOPs are
    counted on these values, and a weight read through ``get_attr`` (``x @ self.w.T``) or an input that
    requires grad would otherwise get no gradient there, halving that matmul's backward."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class Prop(FakeTensorProp):
        def run_node(self, n):
            result = super().run_node(n)
            _keep_requires_grad(n.meta.get("val"), result)
            return result

    return Prop(gm, mode)


def _keep_requires_grad(val, value) -> None:
    """Mark the (detached, leaf) fake ``val`` as requiring grad where the value it stands for does."""
    if isinstance(val, (tuple, list)) and isinstance(value, (tuple, list)) and len(val) == len(value):
        for v, w in zip(val, value):
            _keep_requires_grad(v, w)
    elif (isinstance(val, torch.Tensor) and isinstance(value, torch.Tensor) and value.requires_grad
          and val.is_floating_point() and val.is_leaf and not val.requires_grad):
        val.requires_grad_(True)


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _grad_input_feeds_trunk(gm: fx.GraphModule, example_inputs) -> bool:
    """Does an input that requires grad (a function's weight) feed a node outside the gates?"""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs or ()):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            if any(not _is_gate_call(gm, user) for user in node.users):
                return True
    return False


def _is_gate_call(gm, node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), DropGate)


def _is_opaque_call(gm, node) -> bool:
    """Calls an inner compiler must not trace into: gates, probes and checkpointed regions."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), (DropGate, Probe, Checkpointed))
