"""Inner compilers: gradients equal the hook oracle under aot_eager and inductor, masks never recompile,
identical layers share compiled pieces, and no-grad / eval calls run without gates."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from torch import nn
from torch._dynamo.utils import counters

import dropbp_fx
from dropbp_fx.testing import assert_same_grads, detached, grads
from tests.test_runtime import Block
from tests.test_transformers import MODELS, _batch, _oracle_grads


def _force(dbp, closed):
    """Rates that close exactly ``closed`` this step (Bernoulli at ~1 vs 0)."""
    dbp.controller.policy = "bernoulli"
    dbp.controller.keep_one_open = False
    dbp.set_rates({g: (0.999999999 if g in closed else 0.0) for g in dbp.gate_names})


def _oracle_steps(arch, inner, steps, seed=3, **options):
    """``steps`` training steps of ``arch`` under ``inner`` (and ``options``), each checked against the hook
    oracle; masks must vary. Returns the DropBP."""
    factory, expected, renames, _ = MODELS[arch]
    torch.manual_seed(0)
    model = factory().train()
    oracle_model = copy.deepcopy(model)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, seed=seed, inner=inner, **options)
    compiled = torch.compile(model, backend=dbp)
    seen = set()
    for step in range(steps):
        batch = _batch(step)
        model.zero_grad(set_to_none=True)
        out = compiled(**batch)
        out.loss.backward()
        dropped = [g for g, d in dbp.last_mask.items() if d]
        seen.add(tuple(dropped))
        ref, ref_grads = _oracle_grads(oracle_model, batch, dropped, renames)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
        assert_same_grads(grads(model), ref_grads, rtol=1e-4, atol=1e-5)
    assert dbp.gate_names == expected
    assert len(seen) >= 3, "masks should vary, so that gates switch between open and closed"
    return dbp


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_inner_compiler_matches_hook_oracle(arch, inner):
    dbp = _oracle_steps(arch, inner, steps=6)
    assert dbp.compile_cache.compiles > 0 and dbp.compile_cache.hits > 0  # layer 1 reuses layer 0's pieces


class Net(nn.Module):
    def __init__(self, depth, d=16):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x).sum()


def _warmed(depth):
    """A compiled ``Net`` that has met every variant once: all gates open, all closed, alternating."""
    torch.manual_seed(0)
    model = Net(depth=depth)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="aot_eager")
    compiled = torch.compile(model, backend=dbp)
    x = torch.randn(8, 16)
    compiled(x).backward()
    names = dbp.gate_names
    for closed in ([], names, names[::2], names[1::2]):
        _force(dbp, closed)
        compiled(x).backward()
    return model, dbp, compiled, x


def test_changing_masks_never_recompile():
    _, dbp, compiled, x = _warmed(depth=4)
    frames, aot, pieces = (counters["stats"]["unique_graphs"], counters["aot_autograd"]["total"],
                           dbp.compile_cache.compiles)
    dbp.controller.policy = "topup"
    dbp.set_rates(0.5)
    masks = set()
    for _ in range(20):
        compiled(x).backward()
        masks.add(tuple(dbp.last_mask.values()))
    assert len(masks) >= 5
    assert counters["stats"]["unique_graphs"] == frames  # no Dynamo recompile
    assert counters["aot_autograd"]["total"] == aot  # no AOTAutograd compile
    assert dbp.compile_cache.compiles == pieces


def test_identical_layers_share_compiled_pieces():
    """An 8-layer model compiles as many pieces as a 2-layer one (the 1-layer model lacks only the segment
    between two layers); compile times are in benchmarks/."""
    compiled_pieces = {}
    for depth in (1, 2, 8):
        torch._dynamo.reset()
        _, dbp, _, _ = _warmed(depth)
        compiled_pieces[depth] = dbp.compile_cache.compiles
        assert len(dbp.gate_names) == depth
    assert compiled_pieces[8] == compiled_pieces[2] <= compiled_pieces[1] + 2


def test_no_grad_and_eval_run_without_gates_and_without_a_recompile_storm():
    model, dbp, compiled, x = _warmed(depth=3)
    step = dbp.step
    with torch.no_grad():
        first = compiled(x)
    frames = counters["stats"]["unique_graphs"]
    pieces = dbp.compile_cache.compiles
    with torch.no_grad():
        for _ in range(5):
            assert torch.equal(compiled(x), first)
    model.eval()
    for _ in range(5):
        compiled(x).backward()
    model.train()
    assert counters["stats"]["unique_graphs"] == frames  # one inference graph, compiled once
    assert dbp.compile_cache.compiles == pieces  # no piece compiled for the no-grad or eval calls
    assert dbp.step == step  # no mask drawn
    assert "traced with grad disabled: no gates" in [g.note for g in dbp.graphs]
    with torch.no_grad():
        torch.testing.assert_close(first, model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_gates_inside_checkpointed_layers(arch, inner):
    """``gradient_checkpointing_enable()``: Dynamo wraps each layer in a checkpoint op; the gates go
    inside, the region runs under eager checkpointing, and the recompute in backward drops the same
    branches as the forward. ``dropbp_fx.compile`` traces under the Dynamo setting that lets the checkpoint
    op hold transformers' context-variable writes (without it: a graph break inside every Llama layer)."""
    _checkpointed_steps(arch, inner, recompute=False)


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_gradient_checkpointing_with_recompute(inner):
    """The same with ``recompute=True``: gates inside a checkpointed layer leave the recompute to the layer
    (no second checkpoint); still oracle-exact, one mask per step."""
    _checkpointed_steps("llama", inner, recompute=True)


def _checkpointed_steps(arch, inner, recompute):
    factory, expected, renames, _ = MODELS[arch]
    torch.manual_seed(0)
    model = factory().train()
    model.gradient_checkpointing_enable()
    # transformers >= 5.25 logs "use_cache=True is incompatible with gradient checkpointing" from inside the
    # layer's forward: a logger call Dynamo breaks the graph on, so no layer holds a whole residual add
    model.config.use_cache = False
    oracle_model = copy.deepcopy(model)
    dbp = dropbp_fx.compile(model, dropbp_fx.DropBP(drop_rate=0.5, seed=3, inner=inner, recompute=recompute))
    for step in range(4):
        batch = _batch(step)
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", dropbp_fx.DropBPWarning)
            out = model(**batch)
        ours = [str(w.message) for w in caught if issubclass(w.category, dropbp_fx.DropBPWarning)]
        assert not ours, ours  # (Inductor's own deprecation warnings are not ours)
        out.loss.backward()
        assert dbp.step == step + 1  # the recompute in backward drew no mask
        dropped = [g for g, d in dbp.last_mask.items() if d]
        ref, ref_grads = _oracle_grads(oracle_model, batch, dropped, renames)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
        assert_same_grads(grads(model), ref_grads, rtol=1e-4, atol=1e-5)
    assert dbp.gate_names == expected
    assert all(calls == 4 for _, calls in dbp.counts().values())  # forward calls only


class _SharedNormBlock(nn.Module):
    """Falcon-style: one LayerNorm read by two parallel branches, ``x + attn(ln(x)) + mlp(ln(x))``."""

    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))

    def forward(self, x):
        h = self.ln(x)
        return x + self.attn(h) + self.mlp(h)


@pytest.mark.parametrize("inner", ["aot_eager"])
def test_trunk_value_read_only_by_closed_gates_gets_no_gradient(inner):
    """Regression: ``ln`` sat in a compiled trunk segment whose backward ran for the stream's sake and handed
    ``ln.weight`` zeros when both of its gates were closed (eager: ``None``). Zeros are not harmless: AdamW's
    momentum and weight decay still move the parameter."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), _SharedNormBlock(), nn.Linear(16, 1))
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner=inner)
    compiled = torch.compile(net, backend=dbp)
    x = torch.randn(4, 16)
    compiled(x).sum().backward()
    assert dbp.gate_names == ["1.attn", "1.mlp"]
    for closed, expect_none in ((["1.attn", "1.mlp"], True), (["1.mlp"], False)):
        dbp.set_rates({g: 0.999999 if g in closed else 0.0 for g in dbp.gate_names})
        dbp.controller.policy = "bernoulli"
        net.zero_grad(set_to_none=True)
        compiled(x).sum().backward()
        assert [g for g, d in dbp.last_mask.items() if d] == closed
        assert (net[1].ln.weight.grad is None) == expect_none
        assert net[0].weight.grad is not None  # the trunk below still trains through the skip


def _closed_gates_against_the_oracle(net, compiled, dbp, oracle, x, closings, modules=None) -> None:
    """For each list of closed gates: the compiled step's gradients equal the hook oracle's (``modules``: gate ->
    the module the oracle detaches, where the gate's name is not one)."""
    modules = modules or {}
    for closed in closings:
        _force(dbp, closed)
        net.zero_grad(set_to_none=True)
        compiled(x).sum().backward()
        assert [g for g, d in dbp.last_mask.items() if d] == closed
        oracle.zero_grad(set_to_none=True)
        with detached(oracle, [modules.get(g, g) for g in closed]):
            oracle(x).sum().backward()
        assert_same_grads(grads(net), grads(oracle), rtol=1e-4, atol=1e-5)


class _ProbsAttention(nn.Module):
    """An attention that also returns a view of its probabilities, which the caller discards (ProphetNet's
    n-gram self-attention returns ``main_attn_probs.view(...)``; output_attentions is off)."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        probs = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1), dim=-1)
        return self.o(probs @ self.v(x)), probs.view(probs.shape[0], -1)


class _DiscardedProbsBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = _ProbsAttention(d)

    def forward(self, x):
        out, _ = self.attn(self.ln(x))
        return x + out


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_discarded_view_of_a_branch_value_leaves_the_branch_whole(inner):
    """Regression (ProphetNet): Dynamo keeps the unread ``probs.view(...)``; read as a use outside the branch,
    it pulled ``q``, ``k`` and the softmax into the trunk (their backward never dropped), where an AOT-compiled
    trunk segment handed ``q``/``k`` zeros, not ``None``, when the gate was closed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), _DiscardedProbsBlock(), _DiscardedProbsBlock(), nn.Linear(16, 1))
    oracle_model = copy.deepcopy(net)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner=inner)
    compiled = torch.compile(net, backend=dbp)
    x = torch.randn(2, 5, 16)
    compiled(x).sum().backward()
    assert dbp.gate_names == ["1.attn", "2.attn"]
    for gate in dbp.controller.gates:  # the whole attention (and the norm before it) is the branch
        block = gate.name.split(".")[0]
        assert {f"{block}.attn.{p}.weight" for p in "qkvo"} | {f"{block}.ln.weight"} <= gate.params, gate.params
    _closed_gates_against_the_oracle(net, compiled, dbp, oracle_model, x, (["1.attn"], ["1.attn", "2.attn"], []))


class _RouterExperts(nn.Module):
    """``f2(relu(f1(h))) * sigmoid(r)``: experts weighted by a router value computed outside them."""

    def __init__(self, d=16):
        super().__init__()
        self.f1, self.f2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h, r):
        return self.f2(torch.relu(self.f1(h))) * torch.sigmoid(r)


class _RouterStateBlock(nn.Module):
    """Zaya-style MoE layer: the router reads ``ln(x)`` and the previous layer's router state and passes its
    own on (``r.clone()``); the last layer's copy is read by nobody, but Dynamo keeps it in the graph."""

    def __init__(self, d=16):
        super().__init__()
        self.ln, self.router, self.experts = nn.LayerNorm(d), nn.Linear(d, d), _RouterExperts(d)

    def forward(self, x, state):
        h = self.ln(x)
        r = self.router(h) if state is None else self.router(h) * torch.sigmoid(state)
        return x + self.experts(h, r), r.clone()


class _RouterStateNet(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.inp, self.blocks, self.out = nn.Linear(d, d), nn.ModuleList(_RouterStateBlock(d) for _ in range(2)), \
            nn.Linear(d, 1)

    def forward(self, x):
        x, state = self.inp(x), None
        for block in self.blocks:
            x, state = block(x, state)
        return self.out(x)


@pytest.mark.parametrize("inner", ["aot_eager"])
def test_trunk_value_read_by_a_closed_gate_and_a_dead_copy_gets_no_gradient(inner):
    """Regression (Zaya): the last layer's router sat in the trunk segment of the residual add before it, kept
    there by a copy of its output that nothing reads; that segment's backward ran for the stream's sake and
    handed the router and ``ln`` zeros when the experts' gate was closed (eager: ``None``)."""
    torch.manual_seed(0)
    net = _RouterStateNet()
    oracle = copy.deepcopy(net)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner=inner)
    compiled = torch.compile(net, backend=dbp)
    x = torch.randn(4, 16)
    compiled(x).sum().backward()
    # the last layer's router and norm are read by its experts alone once the dead copy is gone: in its branch
    last = "blocks.1.{router,experts}"
    assert dbp.gate_names == ["blocks.0.experts", last]
    _closed_gates_against_the_oracle(net, compiled, dbp, oracle, x, ([last], ["blocks.0.experts", last], []),
                                     modules={last: "blocks.1.experts"})
    assert net.blocks[0].router.weight.grad is not None  # block 1's router reads it through the state


class _ScanMixer(nn.Module):
    """Qwen3-Next's gated delta rule, in small: a decay ``exp(-softplus(a + dt_bias))`` and a state scanned over
    the sequence into an output buffer; the state is updated once more after the last output, for the cache
    alone (``zeros_like(s).copy_(s)``, kept by the caller)."""

    def __init__(self, d=16):
        super().__init__()
        self.inp, self.out = nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.dt_bias = nn.Parameter(torch.linspace(-1.0, 1.0, d))

    def forward(self, h, cache):
        v, a = self.inp(h).chunk(2, dim=-1)
        decay = torch.exp(-nn.functional.softplus(a + self.dt_bias))
        state, outs = torch.zeros_like(v[:, 0]), torch.zeros_like(v)
        for t in range(h.shape[1]):
            outs[:, t] = state + v[:, t]
            state = state * decay[:, t] + v[:, t]
        cache.append(torch.zeros_like(state).copy_(state))
        return self.out(outs)


class _ScanNet(nn.Module):
    """Two pre-norm ``x + mixer(ln(x))`` layers; the graph returns the caches the mixers write."""

    def __init__(self, d=16):
        super().__init__()
        self.inp, self.out = nn.Linear(d, d), nn.Linear(d, 1)
        self.lns, self.mixers = nn.ModuleList(nn.LayerNorm(d) for _ in range(2)), \
            nn.ModuleList(_ScanMixer(d) for _ in range(2))

    def forward(self, x):
        x, cache = self.inp(x), []
        for ln, mixer in zip(self.lns, self.mixers):
            x = x + mixer(ln(x), cache)
        return self.out(x), cache


class _Logits(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        logits, self.cache = self.net(x)
        return logits


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_final_state_computed_for_the_cache_alone_stays_in_the_branch(inner):
    """Regression (Qwen3-Next, transformers 5.25): the state update after the last output, written into a fresh
    buffer the graph returns, reads the decay and the values; it made their whole computation (``dt_bias``,
    ``inp``, ``ln``) leave the branch for the trunk, which gave ``dt_bias`` a gradient when the gate was closed."""
    torch.manual_seed(0)
    net = _Logits(_ScanNet())
    oracle = copy.deepcopy(net)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner=inner)
    compiled = torch.compile(net, backend=dbp)
    x = torch.randn(2, 4, 16)
    compiled(x).sum().backward()
    assert len(net.cache) == 2  # the graph returns both states
    assert dbp.gate_names == ["net.mixers.0", "net.mixers.1"]
    for gate in dbp.controller.gates:  # the whole mixer and the norm before it
        i = gate.name.split(".")[2]
        assert {f"net.mixers.{i}.dt_bias", f"net.mixers.{i}.inp.weight", f"net.lns.{i}.weight"} <= gate.params, \
            gate.params
    _closed_gates_against_the_oracle(net, compiled, dbp, oracle, x,
                                     (["net.mixers.0"], ["net.mixers.0", "net.mixers.1"], []))


def test_inductor_workaround_is_scoped_to_dropbp_compiles(monkeypatch):
    """The Inductor fix for pytorch/pytorch#191837 is in force while dropbp compiles a piece (forward and the lazily
    compiled backward) where the installed Inductor has the bug, and torch's own ``CppTile2DKernel.store`` is back
    afterwards, so the user's other ``torch.compile`` calls are untouched."""
    import torch._inductor.compile_fx as compile_fx
    from torch._inductor.codegen import cpp

    from dropbp_fx import inductor_fixes as inner

    original = cpp.CppTile2DKernel.store
    real, during = compile_fx.compile_fx_inner, []

    def spy(*args, **kwargs):
        during.append(cpp.CppTile2DKernel.store is not original)
        return real(*args, **kwargs)

    monkeypatch.setattr(compile_fx, "compile_fx_inner", spy)
    torch._dynamo.reset()
    torch.manual_seed(0)
    compiled = torch.compile(Net(depth=2), backend=dropbp_fx.DropBP(drop_rate=0.5, inner="inductor"))
    compiled(torch.randn(8, 16)).backward()
    assert len(during) >= 2  # forward and backward graphs of the pieces
    assert set(during) == {inner._has_tile2d_bug(cpp)}
    assert cpp.CppTile2DKernel.store is original
    torch._dynamo.reset()


def test_simplify_workaround_is_scoped_to_dropbp_compiles(monkeypatch):
    """pytorch/pytorch#186319 (``sympy.simplify`` without bound in the C++ vectorisation analysis; Funnel never
    finished compiling): while dropbp compiles a piece on an affected torch, Inductor's ``stride_at`` family is
    the ``expand`` variant and the cache key carries our tag; the user's own ``torch.compile(backend="inductor")``
    sees torch's functions and tag, and so do our compiles under ``DROPBP_NO_INDUCTOR_WORKAROUNDS=1``."""
    import sympy
    import torch._functorch.config
    from torch._inductor import config as inductor_config
    from torch._inductor import sizevars
    from torch._inductor.codegen import cpp
    from torch._inductor.graph import GraphLowering

    from dropbp_fx import inductor_fixes as inner

    names = ("stride_at", "simplify_index_in_vec_range", "stride_at_vec_range")
    originals = {n: getattr(sizevars, n) for n in names}
    original_cpp, original_tag = cpp.stride_at_vec_range, torch.compiler.config.cache_key_tag
    real, during = GraphLowering.codegen, []

    def spy(*args, **kwargs):  # Inductor generating code (plain torch.compile binds compile_fx_inner early)
        during.append((tuple(getattr(sizevars, n) is not originals[n] for n in names),
                       cpp.stride_at_vec_range is not original_cpp,
                       inner.CACHE_KEY_TAG in torch.compiler.config.cache_key_tag))
        return real(*args, **kwargs)

    monkeypatch.setattr(GraphLowering, "codegen", spy)

    def run(backend):
        during.clear()
        torch._dynamo.reset()
        torch.manual_seed(0)
        # each run generates code; config.patch, not monkeypatch: monkeypatch's undo of a torch config entry
        # hides the entry for the rest of the process ("... does not exist")
        with inductor_config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
            torch.compile(Net(depth=2), backend=backend)(torch.randn(8, 16)).backward()
        assert during  # compiled something
        seen = set(during)
        for n in names:
            assert getattr(sizevars, n) is originals[n]
        assert cpp.stride_at_vec_range is original_cpp and torch.compiler.config.cache_key_tag == original_tag
        return seen

    affected = inner._simplify_affected()
    assert run(dropbp_fx.DropBP(drop_rate=0.5, inner="inductor")) == {((affected,) * 3, affected, True)}
    assert run("inductor") == {((False,) * 3, False, False)}
    monkeypatch.setenv(inner.NO_WORKAROUNDS_ENV, "1")
    assert run(dropbp_fx.DropBP(drop_rate=0.5, inner="inductor")) == {((False,) * 3, False, False)}
    torch._dynamo.reset()
    # the variants: the strides of affine indices, as simplify finds them, without touching torch's caches
    x0, x1 = sympy.symbols("x0 x1", integer=True, nonnegative=True)
    variants = inner._expand_variants(sizevars)
    if variants:
        before = originals["stride_at"].cache_info().currsize
        assert variants["stride_at"](64 * x1 + x0, x1) == 64
        assert variants["stride_at_vec_range"](64 * x1 + 3 * x0 + 5, x0, 16) == 3
        assert originals["stride_at"].cache_info().currsize == before


def test_aliased_outputs_are_regenerated_without_view_replay_in_our_pieces_only():
    """A piece returning a value and a view of it (DeepSeek-V4's compressor: ``kv`` and ``kv[:, :16].view(...)``)
    is compiled with AOTAutograd's view replay off (replayed sizes came out as garbage under Inductor); the
    user's own compiles keep torch's setting, and the aliased outputs are still exact."""
    import torch._functorch.config as functorch_config

    seen = []

    def inner(gm, example_inputs):
        seen.append(functorch_config.view_replay_for_aliased_outputs)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    class Compressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.kv, self.mlp = nn.Linear(16, 16), nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

        def forward(self, x):
            kv = self.kv(x)
            x = x + self.mlp(kv)
            return x, kv, kv[:4].view(2, 2, -1)

    before = functorch_config.view_replay_for_aliased_outputs
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = Compressor()
    x = torch.randn(8, 16)
    out = torch.compile(net, backend=dropbp_fx.DropBP(drop_rate=0.5, inner=inner))(x)
    ref = Compressor()
    ref.load_state_dict(net.state_dict())
    for got, want in zip(out, ref(x)):
        torch.testing.assert_close(got, want)
    assert out[2]._base is not None  # still a view
    assert seen and not any(seen)
    assert functorch_config.view_replay_for_aliased_outputs == before
    torch._dynamo.reset()
