"""The per-model check of the catalogue (``benchmarks/catalogue.py``): build one model type from its default
config shrunk by :mod:`dropbp_fx.shrink`, train it 4 steps through ``torch.compile(backend="dropbp")`` and
compare every step with the independent hook oracle of ``dropbp_fx/testing.py``.

The oracle needs, for every gate, the module whose output is exactly the branch value (the oracle detaches
it on the steps that gate was dropped). It is found from the gate name and one recorded eager forward,
with plain PyTorch (nothing of dropbp's analysis): the gate's module (for a union ``p.{a,b}``: its first
member to run), then, while the value it returned is the *only* tensor input of a later module (and has not
been changed in place), that module -- a sandwich post-norm (Gemma2, OLMo2), BERT's output dense and
dropout. From there the branch goes on through the ops that read only its value and parameters broadcast
onto it (``(f(x) + b) * s`` inside a module that also takes the skip: Zaya's residual scaling), which
``dropbp_fx/testing.py`` runs detached too. A chain link must be the only reader of the value, functional ops
included (the recorded forward notes every op's inputs and module). A gate module that holds its own
residual add -- its output, or its post-norm leaf's only input, was made by ``x + b`` with ``x`` one of its
inputs (XLNet's attention: ``layer_norm(dropout(attn) + h)``) -- is an :class:`OwnResidual`: the oracle keeps
that sum's value with its gradient to ``x`` alone, and the post-norm keeps its gradient. A union whose
members all read the same input and none another's output (parallel terms: GraniteMoeHybrid's ``moe(h) +
shared_mlp(h)``) is detached member by member. A union whose members are not all on that chain, a gate that is not a module path, or a module that runs more than once
per forward: "oracle cannot map gate" (the gradients of the steps that dropped no such gate are still
checked).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

import dropbp_fx
from dropbp_fx.models import MAPPINGS, SEQ, batch_fn, build, model_types  # noqa: F401 (re-exported)
from dropbp_fx.testing import assert_same_grads, detached, grads

STEPS = 4
DROP_RATE = 0.5
# eager / aot_eager run the model's own ops; inductor fuses and reorders float ops (rounding ~1e-4 on these models)
TOLERANCES = {"eager": (1e-4, 1e-5), "aot_eager": (1e-4, 1e-5), "inductor": (1e-4, 1e-4)}


def tolerance(inner: str) -> dict:
    rtol, atol = TOLERANCES.get(inner, TOLERANCES["inductor"])
    return {"rtol": rtol, "atol": atol}
# statuses, worst first; the first four are dropbp failures
FAILURES = ("WRONG GRADIENT", "wrong forward", "fail", "no gates (silent)")
STATUSES = FAILURES + ("crash", "timeout", "oracle cannot map gate", "warned (no gates)", "baseline-fails",
                       "unbuildable", "pass in float64", "pass")
STRUCTURAL = r"([\w.]+): grad is (None|set), oracle (None|set)"  # a gradient set where the oracle has none, or the reverse


@dataclass
class Record:
    mapping: str
    type: str
    inner: str
    status: str = "pass"
    reason: str = ""
    gates: int = 0
    layers: int = 0
    gates_per_layer: float | None = None
    drop_fraction: float | None = None
    checked_steps: int = 0  # steps whose gradients were compared with the oracle
    seconds: float = 0.0
    attn: str = ""
    gate_names: list = field(default_factory=list)
    oracle: dict = field(default_factory=dict)  # gate -> the module the oracle detaches, where they differ
    warnings: list = field(default_factory=list)
    dropbp_reason: str = ""  # for baseline-fails: what dropbp did
    baseline: str = ""  # why plain torch.compile failed too (checked after a failure only)
    where: str = ""  # for fail: the innermost dropbp_fx/passes frame of the exception
    not_compared: list = field(default_factory=list)  # parameters plain torch.compile gets wrong the same way
    # compile time (see compile_seconds): dropbp's, plain torch.compile's with the same inner compiler, and the
    # number of pieces dropbp compiled (trunk segments and branches, per gate state and grad pattern; None for
    # the eager inner compiler: nothing is compiled per piece)
    compile_s: float | None = None
    plain_compile_s: float | None = None
    plain_compile: str = ""  # why plain torch.compile's time is missing
    pieces: int | None = None
    step_s: list = field(default_factory=list)  # wall time of each dropbp step (forward + backward)
    date: str = ""


def first_line(exc: BaseException) -> str:
    """The exception's type and first line (and the next, where the first only introduces it)."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    shown = " ".join(text[:2]) if len(text) > 1 and text[0].endswith(":") else (text[0] if text else "")
    return f"{type(exc).__name__}: {shown}"[:300]


# ----------------------------------------------------------------------------------------- building
def loss_of(out) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise RuntimeError(f"the model returned no loss ({type(out).__name__})")
    return loss


def output_of(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return next(t for t in tree_flatten(out.to_tuple() if hasattr(out, "to_tuple") else out)[0]
                if isinstance(t, torch.Tensor))


def sanity(model: nn.Module, batches) -> None:
    """Eager training steps work and are deterministic (no randomness left in train mode)."""
    losses = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss = loss_of(model(**batches(0)))
        loss.backward()
        losses.append(loss.detach())
    model.zero_grad(set_to_none=True)
    if not torch.isfinite(losses[0]):
        raise RuntimeError(f"eager loss is {losses[0].item()}")
    if not torch.equal(losses[0], losses[1]):
        raise RuntimeError("eager forward is not deterministic in train mode (randomness the rule did not zero)")


# ----------------------------------------------------------------------------------------- the oracle
@dataclass
class Call:
    path: str
    pre: int
    post: int = -1
    inputs: list = field(default_factory=list)  # (tensor, version)
    out: object = None
    out_version: int = -1
    made_by: list = field(default_factory=list)  # per input: the op that made it (see _Ops), None if none did
    out_made_by: tuple | None = None  # the op that made ``out`` (see _Ops), None if none did
    readers: list = field(default_factory=list)  # the innermost module of each op that read ``out`` afterwards


class _Ops(TorchFunctionMode):
    """Records, for one forward, which op made each tensor (name, tensor operands, whether it took just two
    positional arguments) and, for each tensor the ops
    read, when and in which module call (the innermost open one). An op that only returns its operand
    (``x.to(x.dtype)``) or only reads its shape (``zeros_like``, ``new_ones``) reads nothing; every tensor seen
    is kept alive, so ids stay unique."""

    def __init__(self, clock: list, stack: list):
        super().__init__()
        self.clock, self.stack = clock, stack
        self.made: dict[int, tuple] = {}
        self.reads: dict[int, list] = {}
        self.alive: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        name = getattr(func, "__name__", "")
        if outs and not (name.startswith("new_") or name.endswith("_like")):
            self.clock[0] += 1
            where = self.stack[-1] if self.stack else ""
            for t in ins:
                if not any(o is t for o in outs):
                    self.reads.setdefault(id(t), []).append((self.clock[0], where))
            for o in outs:
                if not any(o is t for t in ins):
                    self.made[id(o)] = (name, ins, len(args) == 2 and not kwargs)
            self.alive += ins + outs
        return out


def record_calls(model: nn.Module, batch: dict) -> list[Call]:
    """Every module call of one eager forward: order, tensor inputs (and the op that made each), first tensor
    output (kept alive) and the modules whose ops read it afterwards.

    A first forward, unrecorded, lets a model swap its submodules as it does on its first call (BigBird
    replaces ``attention.self`` by full attention for short inputs): the recorded one sees the modules
    that will run."""
    with torch.no_grad():
        model(**batch)
    names = {m: n for n, m in model.named_modules()}
    calls, open_calls, clock, handles, stack = [], {}, [0], [], []
    ops = _Ops(clock, stack)

    def pre(mod, args, kwargs):
        clock[0] += 1
        call = Call(names[mod], clock[0])
        call.inputs = [(t, t._version) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        call.made_by = [ops.made.get(id(t)) for t, _ in call.inputs]
        open_calls.setdefault(mod, []).append(call)
        calls.append(call)
        stack.append(call.path)

    def post(mod, args, kwargs, out):
        clock[0] += 1
        call = open_calls[mod].pop()
        call.post = clock[0]
        stack.pop()
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if tensors:
            call.out, call.out_version = tensors[0], tensors[0]._version
            call.out_made_by = ops.made.get(id(tensors[0]))

    for mod in names:
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad(), ops:
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    for call in calls:  # until a call started after it returns the same tensor (a dropout of p=0): that one's
        if call.out is not None:
            until = min((c.post for c in calls if c.pre > call.post and c.out is call.out), default=clock[0] + 1)
            call.readers = [where for when, where in ops.reads.get(id(call.out), ()) if call.post < when < until]
    return calls


def _members(gate: str) -> list[str]:
    m = re.fullmatch(r"(?:(.*)\.)?\{([^{}]*)\}", gate)
    if not m:
        return [gate]
    prefix = f"{m.group(1)}." if m.group(1) else ""
    return [prefix + part for part in m.group(2).split(",")]


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def oracle_target(gate: str, calls: list[Call], modules: set[str], with_params: set[str],
                  leaves: set[str], gate_names=()) -> tuple[str | None, str]:
    """(module path to detach, "") or (None, why the oracle cannot map this gate).

    ``name#k`` is the k-th call of a module run several times per forward: ``(path, k)``. A module run once
    with several gates (``gate_names`` holds ``name#1``: PEGASUS-X's attention returns its local and its global
    tokens, each added to its own stream) gives one gate per tensor output: ``(path, 0, k)``."""
    base, _, nth = gate.partition("#")
    members, k = _members(base), int(nth or 0)
    missing = [m for m in members if m not in modules]
    if missing:
        return None, f"gate {gate!r}: {missing[0]!r} is not a module path"
    inner = sorted(g for g in gate_names if g.partition("#")[0].startswith(base + "."))
    if len(members) == 1 and inner and any(c.path == members[0] for c in calls):  # (a ModuleList has no frame)
        # Gemma3n's AltUp: ``predictions = coefs(h) @ h + h`` runs in a method of the layer's ``altup`` called
        # from the layer's forward, so its gate is named after the layer, beside the layer's other gates. Its
        # branch is code of the layer's own frame; detaching the layer's output would also detach those gates
        # and the skip. Forward hooks cannot reach it (tests/test_catalogue.py checks Gemma3n by hand).
        return None, (f"gate {gate!r} is named after a module that holds other gates ({inner[0]!r}, ...): its "
                      "branch is code in that module's own frame (a method, not a module call)")
    members = _called_members(members, calls)
    by_path = {m: [c for c in calls if c.path == m] for m in members}
    outputs = 1 + max((int(g.partition("#")[2]) for g in gate_names if g.partition("#")[0] == base and "#" in g),
                      default=0)
    if len(members) == 1 and len(by_path[members[0]]) == 1 and outputs > 1:  # ``a.{b}`` is one member too
        return (members[0], 0, k), ""
    counts = {len(cs) for cs in by_path.values()}
    if len(counts) != 1 or counts.pop() <= k:
        m = next(iter(by_path))
        return None, f"gate {gate!r}: module {m!r} runs {len(by_path[m])} times per forward"
    ran = sorted((cs[k] for cs in by_path.values()), key=lambda c: c.pre)
    target, why = _target_of(gate, members, ran, calls, with_params, leaves)
    if isinstance(target, list):  # parallel members: each detached
        return [_per_call(t, calls) for t in target], ""
    return (target, why) if target is None else (_per_call(target, calls), "")


def _called_members(members: list[str], calls: list[Call]) -> list[str]:
    """A member that is never called itself but whose submodules are (a ``ModuleList``: HGNetV2's
    ``{layers,aggregation}``, ``aggregation(cat([h, layers[0](h), layers[1](...), ...]))``) stands for its
    outermost called submodules, in call order."""
    called = {c.path for c in calls}
    out = []
    for m in members:
        below = [p for p in dict.fromkeys(c.path for c in calls) if p.startswith(m + ".")]
        outermost = [p for p in below if not any(p.startswith(q + ".") for q in below)]
        out += outermost if m not in called and outermost else [m]
    return out


def _per_call(target, calls: list[Call]):
    """A module path to detach, or ``(path, k)`` when the chosen call is the k-th of a module run more than once."""
    if not isinstance(target, Call):
        return target
    same = [c for c in calls if c.path == target.path]
    return target.path if len(same) == 1 else (target.path, same.index(target))


def _target_of(gate, members, ran, calls, with_params, leaves):
    """The call (or :class:`OwnResidual`) whose output is the gate's branch value, or (None, why not)."""
    own = _own_residual(ran[0], calls, leaves) if len(members) == 1 else None
    if own is not None:
        return own, ""
    chain, why = _chain(ran[0], calls, with_params, leaves)
    on_chain = [c.path for c in chain]
    if all(any(p == m or p.startswith(m + ".") for p in on_chain) for m in members):
        return (None, f"gate {gate!r}: {why}") if why else (chain[-1], "")
    # a union of parallel terms, every member reading the same input and none another's output
    # (GraniteMoeHybrid's ``moe(h) + shared_mlp(h)``, scaled before the add): the branch value is their sum,
    # the oracle detaches each
    first = ran[0].inputs[0][0] if ran[0].inputs else None
    if first is not None and len(ran) > 1 and all(c.post < ran[-1].pre for c in ran[:-1]) \
            and all(any(t is first for t, _ in c.inputs) for c in ran[1:]) \
            and not any(any(t is d.out for t, _ in c.inputs) for c in ran for d in ran if d is not c):
        ends = []
        for c in ran:
            chain, why = _chain(c, calls, with_params, leaves)
            if why:
                return None, f"gate {gate!r}: {why}"
            ends.append(chain[-1])
        return ends, ""
    # a union whose members meet through functional ops (Bloom's attention: qkv -> ... -> dense): the value
    # of the last member to run, when every other member had finished before it started
    if all(c.post < ran[-1].pre for c in ran[:-1]):
        # ... and when that member holds the gate's residual add itself (MobileBERT's ``{bottleneck,attention}``:
        # the attention adds its projected skip to what the bottleneck's queries computed, and norms the sum),
        # the sum with its gradient to the skip alone. Not when the earlier members reach it only as that skip:
        # its add is then inside the branch (Inkling's ``{self_attn,attn_sconv}``: ``(h + conv(h)) / s`` of
        # the attention's output ``h``), and the whole value is the branch.
        own = _own_residual(ran[-1], calls, leaves)
        if own is not None and any(any(t is c.out for c in ran[:-1])
                                   for j, (t, _) in enumerate(ran[-1].inputs) if j != own.skip):
            return own, ""
        chain, why = _chain(ran[-1], calls, with_params, leaves)
        return (None, f"gate {gate!r}: {why}") if why else (chain[-1], "")
    return None, f"gate {gate!r}: {members[-1]!r} is neither on the module chain {' -> '.join(on_chain)} nor after it"


def _chain(start: Call, calls: list[Call], params: set[str], leaves: set[str]) -> tuple[list[Call], str]:
    """``start``, then each later leaf module whose only tensor input is the previous one's (unchanged) output
    and whose ops are the only ones to read it (a module with children may hold a residual add of its own:
    XLNet's feed-forward reads its input in ``layer_1`` and in ``output + inp``; a value read by several
    modules, a norm's output that feeds an attention's projections, is no chain); and why the oracle cannot
    use it ("" if it can). A module that runs more than once per forward (a shared dropout) ends the chain
    before it; one with parameters goes on it (the oracle detaches that one call)."""
    chain = [start]
    while chain[-1].out is not None:
        cur = chain[-1]
        readers = [c for c in calls if c.pre > cur.post and c.path in leaves and not _related(c.path, cur.path)
                   and any(t is cur.out for t, _ in c.inputs)]
        nxt = readers[0] if len(readers) == 1 else None
        if nxt is None or len(nxt.inputs) != 1 or nxt.inputs[0][1] != cur.out_version:
            break
        if any(where != nxt.path for where in cur.readers):
            break  # an op outside it reads the value too (XLNet's feed-forward adds its input back)
        if sum(c.path == nxt.path for c in calls) > 1 and nxt.path not in params:
            break  # a shared dropout; a module with parameters is detached per call
        chain.append(nxt)
    return chain, ""


ADDS = ("add", "__add__", "__radd__")


@dataclass(frozen=True)
class OwnResidual:
    """A gate named after a module that holds its own residual add of its input ``x`` (its ``skip``-th tensor
    input) and a branch value, and returns that sum (``norm`` empty) or a leaf module of its own applied to
    the sum alone (``norm``: its post-norm, XLNet's attention ``layer_norm(dropout(attn) + h)``). The oracle
    keeps the sum's value and its gradient to ``x`` and detaches the rest (the branch); the post-norm keeps
    its gradient."""
    module: str
    norm: str
    skip: int

    def __str__(self) -> str:
        return f"{self.module}'s branch before its residual add" + (f" and {self.norm}" if self.norm else "")


def _own_residual(call: Call, calls: list[Call], leaves: set[str]) -> OwnResidual | None:
    """The :class:`OwnResidual` of a module call, from the recorded ops alone: its output was made by an add
    of one of its tensor inputs and another value of the same shape, or is the output of a leaf module inside
    it (run once per forward, maybe returned through the submodule holding it) whose only input is such an
    add. None otherwise."""
    if call.out is None or sum(c.path == call.path for c in calls) > 1:  # its hooks would act on every call
        return None
    returned = [c for c in calls if c.path.startswith(call.path + ".") and call.pre < c.pre and c.post < call.post
                and c.out is call.out]
    leaf = [c for c in returned if c.path in leaves]  # the norm, maybe inside a wrapper (MobileBERT's ``output``)
    if not returned:
        made, norm = call.out_made_by, ""
    elif len(leaf) == 1 and all(leaf[0].path.startswith(c.path + ".") for c in returned if c is not leaf[0]) \
            and len(leaf[0].inputs) == 1 and sum(c.path == leaf[0].path for c in calls) == 1:
        made, norm = leaf[0].made_by[0], leaf[0].path
    else:
        return None
    if made is None or made[0] not in ADDS or len(made[1]) != 2 or not made[2]:
        return None
    a, b = made[1][:2]
    for skip, (x, _) in enumerate(call.inputs):
        if (x is a) != (x is b) and a.shape == b.shape == x.shape:
            return OwnResidual(call.path, norm, skip)
    return None


def count_layers(calls: list[Call], model: nn.Module) -> int:
    """Repeated blocks that ran: children of a ModuleList whose class name ends in Layer or Block."""
    lists = {n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    ran = {c.path for c in calls}
    return sum(1 for n, m in model.named_modules() if n in ran and n.rpartition(".")[0] in lists
               and re.search(r"(layer|block)$", type(m).__name__, re.I))


# ----------------------------------------------------------------------------------------- the check
def _oracle_step(oracle, batch, dropped, targets, kept):
    """The oracle's forward and backward for one step's mask (``targets``: gate -> module path or
    :class:`OwnResidual`; ``kept``: gate -> how a gate named after a module that contains its own residual add
    the recorded ops did not show is detached, "skip" or "leaves")."""
    oracle.zero_grad(set_to_none=True)
    plain = [t for g in dropped if g not in kept
             for t in (targets.get(g) if isinstance(targets.get(g), list) else [targets.get(g)])
             if isinstance(t, (str, tuple))]
    own = [targets[g] for g in dropped if isinstance(targets.get(g), OwnResidual)]
    leaves = [leaf for g in dropped if kept.get(g) == "leaves" for leaf in parametric_leaves(oracle, g)]
    with detached(oracle, plain, through_constants=True), leaves_detached(oracle, leaves), \
            own_residual_detached(oracle, own), skip_detached(oracle, [g for g in dropped if kept.get(g) == "skip"]):
        ref = oracle(**batch)
    loss_of(ref).backward()
    return ref


@contextlib.contextmanager
def skip_detached(model: nn.Module, module_paths):
    """Forward hooks for modules that contain their own residual add (``return x + f(x)``): the output becomes
    ``x + (y - x).detach()``, x the module's first tensor input of the output's shape (its skip kept)."""
    def hook(mod, args, kwargs, out):
        tensors = tree_flatten(out)[0]
        y = next(t for t in tensors if isinstance(t, torch.Tensor))
        x = next(t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.shape == y.shape)
        kept = x + (y - x).detach()
        return tree_map(lambda t: kept if t is y else (t.detach() if isinstance(t, torch.Tensor) else t), out)

    handles = [model.get_submodule(p).register_forward_hook(hook, with_kwargs=True) for p in module_paths]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def own_residual_detached(model: nn.Module, targets):
    """Hooks for :class:`OwnResidual` targets: the sum ``s = x + branch`` (the module's output, or its post-norm's
    input) becomes ``s.detach() + (x - x.detach())``: the same value, gradient to the skip ``x`` only. The
    module's other tensor outputs are detached."""
    skips, handles = {}, []

    def keep(s, x):
        return s.detach() + (x - x.detach())

    def tensors(value):
        return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]

    for t in targets:
        def pre(mod, args, kwargs, t=t):
            skips[t.module] = tensors((args, kwargs))[t.skip]

        def post(mod, args, kwargs, out, t=t):
            y = tensors(out)[0]
            y_kept = y if t.norm else keep(y, skips[t.module])
            return tree_map(lambda v: y_kept if v is y else _detach(v), out)

        def norm_pre(mod, args, kwargs, t=t):
            return tree_map(lambda v: keep(v, skips[t.module]) if isinstance(v, torch.Tensor) else v, (args, kwargs))

        module = model.get_submodule(t.module)
        handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                    module.register_forward_hook(post, with_kwargs=True)]
        if t.norm:
            handles.append(model.get_submodule(t.norm).register_forward_pre_hook(norm_pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def parametric_leaves(model: nn.Module, path: str) -> list[str]:
    """The leaf submodules with parameters of a module that has none of its own (Inkling's short convolution:
    ``(x + conv1d(x)) / s``): detaching them (:func:`leaves_detached`) detaches all the compute of its branch
    and none of its skip.
    Empty when the module holds parameters itself (XLNet's attention) or has no such leaf."""
    module = model.get_submodule(path)
    if any(True for _ in module.parameters(recurse=False)):
        return []
    return [f"{path}.{n}" for n, m in module.named_modules() if n and not any(True for _ in m.children())
            and any(True for _ in m.parameters())]


@contextlib.contextmanager
def leaves_detached(model: nn.Module, leaf_paths):
    """Detach what the leaf modules at ``leaf_paths`` compute: their outputs where they are called (forward
    hooks), and where their parameters are read directly instead, the output of every op that reads one of
    them (or a value made from them alone, ``w.squeeze(1)``) together with other tensors. Inkling's short
    convolutions pass ``conv1d.weight`` to ``F.conv1d`` (a kernel-hub function): ``conv1d`` never runs."""
    params = [p for path in leaf_paths for p in model.get_submodule(path).parameters()]
    with detached(model, leaf_paths), (_ParameterOps(params) if params else contextlib.nullcontext()):
        yield


class _ParameterOps(TorchFunctionMode):
    """Detaches the outputs of an op that reads one of ``params`` (or a value made from them alone) and any
    other tensor: the parameters' compute, with no gradient to its inputs or to the parameters."""

    def __init__(self, params):
        super().__init__()
        self.derived = {id(p): p for p in params}  # id -> tensor (kept alive: ids stay unique)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not any(id(t) in self.derived for t in tensors):
            return out
        if all(id(t) in self.derived for t in tensors):  # ``w.squeeze(1)``, ``w.T``
            self.derived.update((id(t), t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
            return out
        return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)


def _same_shape_io(calls: list[Call], path: str) -> bool:
    c = next((c for c in calls if c.path == path), None)
    return c is not None and c.out is not None and any(t.shape == c.out.shape for t, _ in c.inputs)


def _without(grad_dict: dict, names) -> dict:
    return {n: g for n, g in grad_dict.items() if n not in names}


def _train(model, oracle, batches, inner: str, rec: Record, seed: int) -> None:
    """Four steps, each checked; sets rec.status / rec.reason (raises what dropbp raised)."""
    compiled = torch.compile(model, backend="dropbp", options={"drop_rate": DROP_RATE, "inner": inner, "seed": seed})
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    tol = tolerance(inner)
    targets, unmapped, kept, dropped_total = {}, {}, {}, 0
    for step in range(STEPS):
        batch = batches(step)
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = compiled(**batch)
        loss_of(out).backward()
        rec.step_s.append(round(time.perf_counter() - start, 3))
        try:
            dbp = dropbp_fx.get_dropbp(compiled)
        except LookupError:
            rec.status, rec.reason = "no gates (silent)", "the dropbp backend was never called (Dynamo compiled no graph)"
            return
        if step == 0:
            rec.gate_names = list(dbp.gate_names)
            rec.gates = len(rec.gate_names)
            calls = record_calls(oracle, batch)
            rec.layers = count_layers(calls, oracle)
            rec.gates_per_layer = round(rec.gates / rec.layers, 2) if rec.layers else None
            modules = {n for n, _ in oracle.named_modules()}
            with_params = {n for n, m in oracle.named_modules() if any(True for _ in m.parameters())}
            leaves = {n for n, m in oracle.named_modules() if not any(True for _ in m.children())}
            for g in rec.gate_names:
                target, why = oracle_target(g, calls, modules, with_params, leaves, rec.gate_names)
                if target is None:
                    unmapped[g] = why
                else:
                    targets[g] = target
        dropped = [g for g, d in dbp.last_mask.items() if d]
        dropped_total += len(dropped)
        checkable = not any(g in unmapped for g in dropped)
        ref = _oracle_step(oracle, batch, dropped, targets, kept)
        try:
            torch.testing.assert_close(output_of(out), output_of(ref), **tol)
            torch.testing.assert_close(loss_of(out), loss_of(ref), **tol)
        except AssertionError as exc:
            rec.status, rec.reason = "wrong forward", f"step {step}: " + " ".join(str(exc).split())[:300]
            return
        if checkable:
            try:
                assert_same_grads(_without(grads(model), rec.not_compared), _without(grads(oracle), rec.not_compared),
                                  **tol)
            except AssertionError as exc:
                # A gate named after a module that contains its own residual add (Inkling's short convolutions
                # return (x + conv(x)) / s): does the oracle that detaches its parametric leaves, or the one
                # that keeps its skip (``x + (y - x).detach()``), agree?
                maybe = {g for g in dropped if targets.get(g) == g and _same_shape_io(calls, g)} - kept.keys()
                for mode in ("leaves", "skip") if maybe else ():
                    if mode == "leaves" and not all(parametric_leaves(oracle, g) for g in maybe):
                        continue
                    _oracle_step(oracle, batch, dropped, targets, {**kept, **dict.fromkeys(maybe, mode)})
                    try:
                        assert_same_grads(_without(grads(model), rec.not_compared),
                                          _without(grads(oracle), rec.not_compared), **tol)
                    except AssertionError:
                        continue
                    kept.update(dict.fromkeys(maybe, mode))
                    break
                else:
                    rec.status = "WRONG GRADIENT"
                    rec.reason = f"step {step}, dropped {dropped}: " + " ".join(str(exc).split())[:300]
                    return
            rec.checked_steps += 1
        opt.step()  # the oracle continues from the compiled model's updated parameters (checked or not)
        with torch.no_grad():
            for p, q in zip(model.parameters(), oracle.parameters()):
                q.copy_(p)
    rec.pieces = dbp.compile_cache.compiles if dbp.compile_cache is not None else None
    rec.oracle = {g: str(t) for g, t in targets.items() if t != g}
    rec.oracle.update({g: f"{g} with its skip kept" if mode == "skip" else f"{g}'s parametric leaves"
                       for g, mode in sorted(kept.items())})
    skip_kept = sorted(g for g, mode in kept.items() if mode == "skip")
    rec.drop_fraction = round(dropped_total / (rec.gates * STEPS), 3) if rec.gates else 0.0
    if not rec.gates:
        rec.status = "warned (no gates)" if rec.warnings else "no gates (silent)"
        rec.reason = rec.warnings[0] if rec.warnings else "no gate and no DropBPWarning"
    elif unmapped:
        rec.status, rec.reason = "oracle cannot map gate", next(iter(unmapped.values()))
    elif skip_kept:
        rec.status = "oracle cannot map gate"
        rec.reason = (f"{len(skip_kept)} gate(s) named after a module that contains its own residual add "
                      f"({skip_kept[0]}, ...): the gradients match the oracle that keeps the module's skip")


def baseline(model_type: str, mapping: str, backend: str) -> str:
    """Plain ``torch.compile(model, backend=...)``: "" when it trains 2 steps with the eager model's
    forward and gradients, else why not."""
    torch._dynamo.reset()
    try:
        model, _ = build(model_type, mapping)  # it built for the check; a model that keeps state may not again
        batches = batch_fn(model, mapping)
        ref_model = copy.deepcopy(model)
        compiled = torch.compile(model, backend=backend)
        for step in range(2):
            model.zero_grad(set_to_none=True)
            ref_model.zero_grad(set_to_none=True)
            out = compiled(**batches(step))
            loss_of(out).backward()
            ref = ref_model(**batches(step))
            loss_of(ref).backward()
            torch.testing.assert_close(output_of(out), output_of(ref), **tolerance(backend))
            actual, expected = grads(model), grads(ref_model)
            wrong = [f"{n}: grad is {'None' if actual[n] is None else 'set'}, oracle "
                     f"{'None' if expected[n] is None else 'set'}" for n in expected
                     if (actual[n] is None) != (expected[n] is None)]
            if wrong:  # every such parameter, so that check() can tell which ones dropbp shares with it
                return f"plain torch.compile(backend={backend!r}): AssertionError: " + "; ".join(wrong)[:1000]
            assert_same_grads(actual, expected, **tolerance(backend))
    except Exception as exc:  # noqa: BLE001 - any failure of the plain compile is the answer
        return f"plain torch.compile(backend={backend!r}): " + " ".join(first_line(exc).split())[:300]
    return ""


def plain_step_seconds(model_type: str, mapping: str, inner: str, steps: int = STEPS) -> list[float]:
    """Wall time of each of ``steps`` training steps (forward + backward) of plain ``torch.compile`` with the
    inner compiler dropbp uses (:func:`dropbp_fx.inner.inner_backend`: the same Inductor, with the same
    workarounds), from a reset Dynamo, on a freshly built model."""
    from dropbp_fx.inner import inner_backend

    torch._dynamo.reset()
    model, _ = build(model_type, mapping)
    batches = batch_fn(model, mapping)
    compiled = torch.compile(model, backend=inner_backend(inner))
    times = []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss_of(compiled(**batches(step))).backward()
        times.append(round(time.perf_counter() - start, 3))
    torch._dynamo.reset()
    return times


def compile_seconds(dropbp_steps: list[float], plain_steps: list[float]) -> tuple[float, float]:
    """(dropbp's, plain's) compile time: the seconds of their first ``len(plain_steps)`` steps above as many
    warm steps, a warm step being plain's fastest (these models compute a step in milliseconds; dropbp compiles
    lazily, a piece on the first step that needs it, so its steps after the first may still compile)."""
    warm = min(plain_steps)
    n = len(plain_steps)
    return round(sum(dropbp_steps[:n]) - n * warm, 2), round(sum(plain_steps) - n * warm, 2)


@contextlib.contextmanager
def no_compile_caches():
    """Inductor's FX-graph cache and AOTAutograd's cache off: compile times that do not depend on what an
    earlier run left in ``TORCHINDUCTOR_CACHE_DIR`` (the C++ kernels' own build cache stays, for both)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def check(model_type: str, mapping: str = "causal-lm", inner: str = "inductor", seed: int = 1,
          run_baseline: bool = True, not_compared: tuple = (), time_plain: bool = False,
          dtype: torch.dtype | None = None) -> Record:
    """The catalogue's check of one model type (never raises).

    ``time_plain``: also time plain ``torch.compile`` with the same inner compiler (after the check, on a
    fresh model) and fill the compile-time fields; compile caches are off for both (:func:`no_compile_caches`).

    A parameter whose gradient plain ``torch.compile`` gets wrong the same way (set where eager has none:
    AOTAutograd hands a parameter read only for an output the loss ignores zeros, BigBird's pooler) is left
    out of the comparison and the check runs again (``not_compared`` in the record), up to three of them.

    A numeric WRONG GRADIENT (values apart, none set where the oracle has none) is checked again with the model
    and its inputs in float64 (``dtype``): where every step then equals the oracle, the float32 difference is
    rounding that the model amplifies (LeViT's BatchNorm over a batch of two images: 1 of 216 elements of its
    first convolution's gradient 5e-4 apart), and the status is "pass in float64" with both reasons."""
    rec = Record(mapping, model_type, inner, date=time.strftime("%Y-%m-%d"), not_compared=list(not_compared))
    start = time.perf_counter()
    try:
        model, rec.attn = build(model_type, mapping)
        batches = batch_fn(model, mapping)
        if dtype is not None:
            model, batches = model.to(dtype), _cast_batches(batches, dtype)
        oracle = copy.deepcopy(model)  # before any forward: some models keep non-leaf tensors afterwards
        sanity(copy.deepcopy(model), batches)
    except Exception as exc:  # noqa: BLE001 - whatever the rule cannot build is listed, with the reason
        rec.status, rec.reason = "unbuildable", first_line(exc)
        rec.seconds = round(time.perf_counter() - start, 1)
        return rec
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dropbp_fx.DropBPWarning)
        try:
            with no_compile_caches() if time_plain else contextlib.nullcontext():
                _train(model, oracle, batches, inner, rec, seed)
        except Exception as exc:  # noqa: BLE001
            rec.status, rec.reason = "fail", first_line(exc)
            rec.where = _where(exc)
        finally:
            msgs = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, dropbp_fx.DropBPWarning)]
            rec.warnings = list(dict.fromkeys(msgs))
    if not rec.gates and rec.status in ("no gates (silent)",) and rec.warnings:
        rec.status, rec.reason = "warned (no gates)", rec.warnings[0]
    if run_baseline and rec.status in ("fail", "wrong forward", "WRONG GRADIENT"):
        # a gradient that is None where the oracle's is set (or the reverse) is the mask's doing, whatever
        # plain torch.compile does; an exception or a numeric difference may be torch.compile's own
        structural = re.search(STRUCTURAL, rec.reason)
        for backend in ["aot_eager"] + ([inner] if inner not in ("eager", "aot_eager") else []):
            rec.baseline = baseline(model_type, mapping, backend)
            if rec.baseline and structural and structural.group(0) in rec.baseline and len(not_compared) < 3:
                # every parameter plain torch.compile gets wrong the same way (DeepSeek-V4's compressors: six),
                # left out at once
                shared = re.findall(r"([\w.]+): grad is (?:None|set), oracle (?:None|set)", rec.baseline)
                return check(model_type, mapping, inner, seed, run_baseline,
                             (*not_compared, *[n for n in shared if n not in not_compared]), time_plain)
            if rec.baseline:
                if not structural:
                    rec.dropbp_reason = f"{rec.status}: {rec.reason}"
                    rec.status, rec.reason = "baseline-fails", rec.baseline
                break
    if rec.status == "WRONG GRADIENT" and dtype is None and not re.search(STRUCTURAL, rec.reason):
        wide = check(model_type, mapping, inner, seed, run_baseline=False, not_compared=tuple(rec.not_compared),
                     time_plain=time_plain, dtype=torch.float64)
        if wide.status == "pass":
            rec.status, rec.reason = "pass in float64", (f"float32: {rec.reason}; float64: every step equals the "
                                                         "oracle")
            # the float32 check stopped early: the compile times are those of the float64 check (plain's in float32)
            rec.compile_s, rec.plain_compile_s, rec.plain_compile = wide.compile_s, wide.plain_compile_s, \
                wide.plain_compile
    left = float(os.environ.get("DROPBP_CATALOGUE_TIMEOUT", "inf")) - (time.perf_counter() - start)
    if time_plain and len(rec.step_s) == STEPS and left < 1.2 * sum(rec.step_s):
        # plain torch.compile would likely run past the per-type limit and lose the whole record
        rec.plain_compile = f"not timed: {left:.0f} s left of the per-type limit"
    elif time_plain and len(rec.step_s) == STEPS:
        try:
            with no_compile_caches():
                plain = plain_step_seconds(model_type, mapping, inner)
            rec.compile_s, rec.plain_compile_s = compile_seconds(rec.step_s, plain)
        except Exception as exc:  # noqa: BLE001 - plain torch.compile failing leaves its time missing, with why
            rec.plain_compile = first_line(exc)
    if rec.not_compared and not rec.reason:
        rec.reason = (f"not compared: {', '.join(rec.not_compared)} (plain torch.compile gets its gradient wrong "
                      "the same way)")
    rec.seconds = round(time.perf_counter() - start, 1)
    return rec


def _cast_batches(batches, dtype: torch.dtype):
    """``batches`` with its floating-point tensors in ``dtype`` (ids and labels as they are)."""
    def cast(i):
        return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batches(i).items()}
    return cast


def _where(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame in dropbp_fx/ or passes/ (following causes)."""
    found = ""
    while exc is not None:
        for frame in traceback.extract_tb(exc.__traceback__):
            if "/dropbp_fx/" in frame.filename or "/passes/" in frame.filename:
                path = frame.filename[frame.filename.rfind("/dropbp_fx/") + 1:] if "/dropbp_fx/" in frame.filename \
                    else frame.filename[frame.filename.rfind("/passes/") + 1:]
                found = f"{path}:{frame.lineno} in {frame.name}"
        exc = exc.__cause__ or exc.__context__
    return found


def as_dict(rec: Record) -> dict:
    return asdict(rec)
