"""Training modes a real loop mixes in: varying shapes (dynamic and automatic dynamic), eval / no_grad /
inference_mode calls mid-training, autocast, gradient accumulation, graph breaks.

Every check compares gradients with the independent oracle (``dropbp_fx/testing.py``: the original module run
eagerly, the dropped gates' modules ``.detach()``-ed by forward hooks; the dropped set is
``get_dropbp(compiled).last_mask``), and bounds the compiles with torch's counters:
``counters["stats"]["unique_graphs"]`` (Dynamo graphs), ``counters["aot_autograd"]["total"]`` (AOTAutograd
compiles: the pieces, or a whole gate-free graph) and ``compile_cache.compiles`` (pieces).

What one *step* is: every training-mode forward draws a fresh mask (a new step starts when a gate is called
a second time). With gradient accumulation, each micro-batch is a step of its own, with its own mask, and
the accumulated gradient is the sum of the micro-batches' gradients, each under its own mask.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import dropbp_fx
from dropbp_fx.testing import assert_same_grads, detached, grads

D = 16


# ---------------------------------------------------------------------------- models
class Attention(nn.Module):
    """Pre-norm causal self-attention: the whole module is the residual branch."""

    def __init__(self, d=D, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(self.norm(x))))


class Layer(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.attn = Attention(d)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Net(nn.Module):
    """``brk``: what sits between layer 0 and layer 1: nothing, ``torch._dynamo.graph_break()``, a ``print``,
    or a Python branch on a tensor's value (Dynamo traces none of the three: each ends the graph, and the
    code after it runs in a resume function, a second graph). ``"loop_break"``: a graph break inside the loop
    over the layers, where Dynamo gives up on ``forward`` and compiles each layer's frame instead (one graph,
    shared by the identical layers)."""

    def __init__(self, depth=2, d=D, brk=None):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.layers = nn.ModuleList(Layer(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, d)
        self.brk = brk

    def forward(self, x):
        x = self.inp(x)
        if self.brk == "loop_break":
            for layer in self.layers:
                x = layer(x)
                torch._dynamo.graph_break()
            return self.head(self.norm(x))
        x = self.layers[0](x)
        if self.brk == "graph_break":
            torch._dynamo.graph_break()
        elif self.brk == "print":
            print("between layers")
        elif self.brk == "branch" and x.sum() > 0:  # data-dependent: layer 1 sees -x
            x = -x
        for layer in self.layers[1:]:
            x = layer(x)
        return self.head(self.norm(x))


NET_GATES = [f"layers.{i}.{b}" for i in range(2) for b in ("attn", "mlp")]


def net_batch(step, b=2, t=5):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(b, t, D, generator=g),), {}


def net_loss(out):
    return out.float().pow(2).mean()


def llama():
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False))


LLAMA_GATES = [f"model.layers.{i}.{b}" for i in range(2) for b in ("self_attn", "mlp")]


def llama_batch(step, b=2, t=8):
    g = torch.Generator().manual_seed(200 + step)
    ids = torch.randint(0, 96, (b, t), generator=g)
    return (), {"input_ids": ids, "labels": ids}


def llama_loss(out):
    return out.loss


# ---------------------------------------------------------------------------- harness
class Counts:
    """Dynamo graphs, AOTAutograd compiles and pieces compiled since the snapshot."""

    def __init__(self, dbp=None):
        self.dbp = dbp
        self.start = self._now()

    def _now(self):
        pieces = self.dbp.compile_cache.compiles if self.dbp is not None and self.dbp.compile_cache else 0
        return counters["stats"]["unique_graphs"], counters["aot_autograd"]["total"], pieces

    @property
    def graphs(self):
        return self._now()[0] - self.start[0]

    @property
    def aot(self):
        return self._now()[1] - self.start[1]

    @property
    def pieces(self):
        return self._now()[2] - self.start[2]

    def __repr__(self):
        return f"Counts(graphs={self.graphs}, aot={self.aot}, pieces={self.pieces})"


def tolerances(inner, dtype=None):
    if dtype == torch.bfloat16:
        return dict(rtol=2e-2, atol=2e-3)
    return dict(rtol=1e-5, atol=1e-6) if inner == "eager" else dict(rtol=1e-4, atol=1e-5)


class Run:
    """A compiled model and its oracle twin (same initial weights), stepped together."""

    def __init__(self, model, inner, loss=net_loss, seed=3, dynamic=None, **options):
        self.model = model.train()
        self.oracle = copy.deepcopy(model)
        self.loss = loss
        self.inner = inner
        self.dbp = dropbp_fx.DropBP(drop_rate=0.5, seed=seed, inner=inner, **options)
        self.compiled = torch.compile(self.model, backend=self.dbp, dynamic=dynamic)
        self.masks = []

    def dropped(self):
        assert dropbp_fx.get_dropbp(self.compiled) is self.dbp
        return [g for g, d in self.dbp.last_mask.items() if d]

    def oracle_grads(self, batch, dropped, zero=True, autocast=None):
        args, kwargs = batch
        if zero:
            self.oracle.zero_grad(set_to_none=True)
        with detached(self.oracle, dropped), _autocast(autocast):
            out = self.oracle(*args, **kwargs)
        self.loss(out).backward()
        return out, grads(self.oracle)

    def step(self, batch, autocast=None):
        """One training step (zeroed grads, forward, backward), checked against the oracle."""
        args, kwargs = batch
        before = self.dbp.step
        self.model.zero_grad(set_to_none=True)
        with _autocast(autocast):
            out = self.compiled(*args, **kwargs)
        self.loss(out).backward()
        assert self.dbp.step == before + 1  # one mask per training forward, across graph breaks too
        dropped = self.dropped()
        self.masks.append(tuple(dropped))
        ref, ref_grads = self.oracle_grads(batch, dropped, autocast=autocast)
        tol = tolerances(self.inner, autocast)
        torch.testing.assert_close(_logits(out), _logits(ref), **tol)
        assert_same_grads(grads(self.model), ref_grads, **tol)
        for gate in dropped:  # a dropped branch's parameters get no gradient at all (None, not zeros)
            params = dict(self.model.get_submodule(gate).named_parameters())
            assert params and all(p.grad is None for p in params.values()), gate
        return out

    def assert_masks_varied(self):
        assert len(set(self.masks)) >= 2, f"masks should vary between steps: {self.masks}"
        assert any(self.masks), "some step should drop a branch"


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _net(brk=None):
    torch.manual_seed(0)
    return Net(brk=brk)


# ---------------------------------------------------------------------------- 1. varying shapes
# batch, sequence. The second pass repeats some shapes and brings new ones: it must compile nothing.
NET_SHAPES = ([(2, 5), (3, 7), (4, 6), (2, 9)], [(3, 7), (5, 4), (2, 5), (6, 11)])
# with a batch of 1: Dynamo specialises sizes 0 and 1 (any backend), so that shape gets a graph of its own
LLAMA_SHAPES = ([(2, 8), (3, 11), (1, 13)], [(2, 6), (1, 5), (4, 7)])


def _two_passes(run, batch, shapes, bound):
    """First pass: at most ``bound`` Dynamo graphs; the second pass (new sizes too) compiles nothing."""
    counts = Counts(run.dbp)
    step = 0
    for b, t in shapes[0]:
        run.step(batch(step, b, t))
        step += 1
    assert counts.graphs <= bound, counts
    counts = Counts(run.dbp)
    for b, t in shapes[1]:
        run.step(batch(step, b, t))
        step += 1
    assert (counts.graphs, counts.aot, counts.pieces) == (0, 0, 0), f"compiled again for new shapes: {counts}"
    run.assert_masks_varied()


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_varying_batch_and_sequence_net(inner, dynamic):
    """Bounds: ``dynamic=True``: one Dynamo graph for all shapes; the default (automatic dynamic): two, the
    first static, the second with symbolic batch and sequence sizes. The pieces of a symbolic graph compile
    with it, from its fake tensors, once for all sizes: after that no shape compiles anything."""
    run = Run(_net(), inner, dynamic=dynamic)
    _two_passes(run, net_batch, NET_SHAPES, bound=1 if dynamic else 2)
    assert run.dbp.gate_names == NET_GATES


def test_varying_batch_and_sequence_llama():
    """The default (automatic dynamic) on a tiny Llama with inner="aot_eager". Bound: three Dynamo graphs:
    static, symbolic, and one for the batch of 1 (0/1 specialisation); nothing compiled in the second pass."""
    run = Run(llama(), "aot_eager", loss=llama_loss)
    _two_passes(run, llama_batch, LLAMA_SHAPES, bound=3)
    assert run.dbp.gate_names == LLAMA_GATES


# ---------------------------------------------------------------------------- 2, 3. eval / no_grad / inference_mode
def _no_train_call(run, batch, how):
    """A call that must draw no mask and drop nothing: its output (and, in eval mode with grad on, its
    gradients) equal the oracle's with nothing dropped."""
    args, kwargs = batch
    step, counts_before = run.dbp.step, run.dbp.counts()
    mask = run.dbp.last_mask
    if how == "eval":
        run.model.eval()
        run.oracle.eval()
    context = {"eval": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[how]
    run.model.zero_grad(set_to_none=True)
    with context():
        out = run.compiled(*args, **kwargs)
    tol = tolerances(run.inner)
    if how == "eval":  # grad on, model in eval mode: every gate open
        run.loss(out).backward()
        ref, ref_grads = run.oracle_grads(batch, [])
        assert_same_grads(grads(run.model), ref_grads, **tol)
        run.model.train()
        run.oracle.train()
    else:
        assert not out.requires_grad if isinstance(out, torch.Tensor) else not out.logits.requires_grad
        with torch.no_grad():
            ref = run.oracle(*args, **kwargs)
    torch.testing.assert_close(_logits(out), _logits(ref), **tol)
    assert run.dbp.step == step, f"{how}: the step counter advanced"
    counted = {name: c for name, c in run.dbp.counts().items() if c != (0, 0)}  # an eval-first graph adds gates
    assert counted == {n: c for n, c in counts_before.items() if c != (0, 0)}, f"{how}: gate calls were counted"
    assert run.dbp.last_mask == mask


MODES = ["eval", "no_grad", "inference_mode"]


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_eval_no_grad_and_inference_mode_between_training_steps(inner):
    """train, eval, train, no_grad, train, inference_mode, train; then the whole cycle again.

    Bounds: the first cycle compiles at most one Dynamo graph per mode (train, eval, grad off; no_grad and
    inference_mode may share one); the second cycle compiles nothing at all."""
    run = Run(_net(), inner)
    counts = Counts(run.dbp)
    step = 0
    for cycle in range(2):
        for how in MODES:
            run.step(net_batch(step))
            step += 1
            _no_train_call(run, net_batch(step), how)
            step += 1
        run.step(net_batch(step))
        step += 1
        if cycle == 0:
            assert counts.graphs <= 4, counts
            counts = Counts(run.dbp)
    assert (counts.graphs, counts.aot, counts.pieces) == (0, 0, 0), f"second cycle compiled: {counts}"
    assert run.dbp.step == 8  # training forwards only
    assert all(calls == 8 for _, calls in run.dbp.counts().values())
    run.assert_masks_varied()


@pytest.mark.parametrize("first", ["inference_mode", "no_grad", "eval"])
def test_first_call_outside_training_then_training(first):
    """The model's very first call is an inference_mode / no_grad / eval one (Dynamo compiles that graph
    first); training afterwards still finds every gate and matches the oracle. Inference tensors made by
    that call do not leak into training.

    Regression (eval): a graph traced in eval mode used to get no gates; Dynamo does not guard
    ``module.training`` unless the model's code reads it, so after ``model.train()`` that gate-free graph
    kept running and nothing was ever dropped."""
    run = Run(_net(), "eager")
    counts = Counts(run.dbp)
    _no_train_call(run, net_batch(0), first)
    assert run.dbp.step == 0 and run.dbp.gate_names in ([], NET_GATES)
    for step in range(1, 4):
        run.step(net_batch(step))
    assert run.dbp.gate_names == NET_GATES
    _no_train_call(run, net_batch(4), first)
    run.step(net_batch(5))
    assert counts.graphs <= 2, counts
    run.assert_masks_varied()


def test_llama_eval_no_grad_inference_mode_between_training_steps():
    """The transformers model reads ``self.training`` (Dynamo guards it: eval mode is a graph of its own)."""
    run = Run(llama(), "eager", loss=llama_loss)
    counts = Counts(run.dbp)
    step = 0
    for how in MODES:
        run.step(llama_batch(step))
        _no_train_call(run, llama_batch(step + 1), how)
        step += 2
    run.step(llama_batch(step))
    assert counts.graphs <= 4, counts
    assert run.dbp.step == 4
    run.assert_masks_varied()


# ---------------------------------------------------------------------------- 4. autocast
@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_autocast_bf16_matches_oracle_under_the_same_autocast(inner):
    """fp32 steps, bf16 autocast steps, fp32 again: each compared with the oracle run the same way
    (bf16 tolerance under autocast); dropped branches' parameters get ``grad=None``. The autocast state is
    part of what a compiled piece is specialised on: an fp32 artifact must not serve an autocast call.
    Bound: two Dynamo graphs (fp32, autocast)."""
    run = Run(_net(), inner)
    counts = Counts(run.dbp)
    plan = [torch.bfloat16, None, None, torch.bfloat16, torch.bfloat16, None]
    for step, dtype in enumerate(plan):
        out = run.step(net_batch(step), autocast=dtype)
        assert out.dtype == (dtype or torch.float32)
    assert counts.graphs <= 2, counts
    run.assert_masks_varied()


# ---------------------------------------------------------------------------- 5. gradient accumulation
@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_gradient_accumulation_each_micro_batch_has_its_own_mask(inner):
    """Two micro-batches per optimizer step: two training forwards, so two steps of the drop schedule, each
    with its own mask. The accumulated gradients equal the oracle's accumulated over the two micro-batches,
    each with its own mask; after SGD the weights stay equal. Also with both forwards before one backward."""
    run = Run(_net(), inner)
    opt = torch.optim.SGD(run.model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(run.oracle.parameters(), lr=0.1)
    tol = tolerances(inner)
    counts = Counts(run.dbp)
    step = 0
    for update in range(4):
        run.model.zero_grad(set_to_none=True)
        run.oracle.zero_grad(set_to_none=True)
        batches = [net_batch(step), net_batch(step + 1)]
        step += 2
        masks = []
        if update % 2 == 0:  # forward, backward, forward, backward
            for batch in batches:
                run.loss(run.compiled(*batch[0])).backward()
                masks.append(run.dropped())
        else:  # both forwards, then one backward of the summed loss
            losses = []
            for batch in batches:
                losses.append(run.loss(run.compiled(*batch[0])))
                masks.append(run.dropped())
            (losses[0] + losses[1]).backward()
        for batch, dropped in zip(batches, masks):
            run.oracle_grads(batch, dropped, zero=False)
        assert_same_grads(grads(run.model), grads(run.oracle), **tol)
        run.masks += [tuple(m) for m in masks]
        opt.step()
        ref_opt.step()
        for p, q in zip(run.model.parameters(), run.oracle.parameters()):
            torch.testing.assert_close(p, q, **tol)
    assert run.dbp.step == 8  # one step per micro-batch
    assert any(run.masks[i] != run.masks[i + 1] for i in range(0, 8, 2)), "micro-batches should differ"
    assert counts.graphs == 1, counts


# ---------------------------------------------------------------------------- 6. graph breaks
@pytest.mark.parametrize("inner,brk", [("eager", "graph_break"), ("eager", "print"), ("eager", "branch"),
                                       ("eager", "loop_break"), ("aot_eager", "graph_break")])
def test_graph_break_between_layers(inner, brk):
    """Gates in every frame, one mask per step across the frames, oracle gradients.

    Bounds: two Dynamo graphs (before and after the break); ``branch``: three (before it, and one resume
    function for each side); ``loop_break``: one (each layer's frame, one graph for both layers)."""
    run = Run(_net(brk), inner)
    counts = Counts(run.dbp)
    signs = set()
    for step in range(6):
        args, _ = net_batch(step)
        run.step(net_batch(step))
        with torch.no_grad():
            signs.add(bool(run.oracle.layers[0](run.oracle.inp(args[0])).sum() > 0))
    assert run.dbp.gate_names == NET_GATES  # gates from both frames, named by module path
    assert all(calls == 6 for _, calls in run.dbp.counts().values())
    assert counts.graphs <= {"loop_break": 1, "branch": 3}.get(brk, 2), counts
    if brk != "loop_break":  # layer 0's gates in the first graph, layer 1's in the resumed one(s)
        assert len([g for g in run.dbp.graphs if g.gates]) == counts.graphs
    if brk == "branch":
        assert signs == {True, False}, "the test should take both sides of the branch"
    run.assert_masks_varied()


# ---------------------------------------------------------------------------- 7. inductor (one small test)
class Block(nn.Module):
    """No norm: a norm's ``eps`` is a float that ``dynamic=True`` leaves unspecialised; the first trace then
    restarts to specialise it (torch's own float handling, any backend), which would compile every piece twice."""

    def __init__(self, d=D):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(x)


class SmallNet(nn.Module):
    def __init__(self, depth=2, d=D):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_inductor_varying_shapes_compiles_pieces_once():
    """inner="inductor", ``dynamic=True``, a 2-block residual MLP: one Dynamo graph, its pieces compiled
    once with symbolic sizes (shared by both blocks), nothing compiled for any later shape, oracle gradients.
    (More than 16 rows per matmul everywhere: inductor picks a different mm lowering for tiny inputs and
    guards on it, which would be one more graph.)"""
    torch.manual_seed(0)
    run = Run(SmallNet(), "inductor", dynamic=True)
    _two_passes(run, net_batch, ([(2, 9), (3, 7)], [(4, 6), (2, 9), (5, 5)]), bound=1)
    assert run.dbp.gate_names == ["blocks.0.mlp", "blocks.1.mlp"]
    assert run.dbp.compile_cache.hits > 0  # block 1 reuses block 0's pieces
