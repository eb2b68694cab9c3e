"""Property tests over random residual networks (``tests/random_nets.py``).

1. Detection: on ``torch.fx.symbolic_trace`` graphs and on Dynamo graphs, the gated
   (innermost) and outer branch names, and their kinds, are exactly those the network was
   built with; none of the decoy adds is taken for a residual.
2. Rewrite: after ``DropBP.transform`` the graph lints and its forward output is bit-identical
   to the original module's, whatever the mask.
3. Gradients: parameter and input gradients equal those of the oracle, the original module run
   eagerly with the outputs of the dropped branches' modules detached, for the mask the gates
   drew (``dbp.last_mask``); the parameters of a dropped branch get no gradient at all.
"""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch._dynamo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_map

import dropbp_fx
from dropbp_fx.passes import find_residual_branches
from dropbp_fx.testing import assert_same_grads, detached, grads
from tests import random_nets as rn

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def budget(n: int, share: float = 1.0) -> int:
    """``n`` examples under the default profile; a share of a larger profile's ``max_examples`` (fuzz)."""
    return max(n, int(settings.default.max_examples * share))


# ``HYPOTHESIS_PROFILE=fuzz`` (README, "Fuzzing"): random seeds, a large budget, deeper networks (up to
# FUZZ_BLOCKS blocks, each of up to two branches, plus nesting), and every inner compiler.
FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
MAX_BLOCKS = int(os.environ.get("DROPBP_FUZZ_BLOCKS", "12")) if FUZZ else 4
INNERS = ("eager", "aot_eager", "inductor") if FUZZ else ("eager", "aot_eager")

ALWAYS = 0.999999  # with policy="bernoulli": dropped unless the uniform draw is >= 0.999999


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The networks are tiny: intra-op threads only add overhead (10x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def found(analysis) -> tuple[dict[str, str], dict[str, str]]:
    """(gated name -> kind, outer name -> kind) of a ``ResidualAnalysis``."""
    gated = {b.name: b.kind for b in analysis.branches}
    outer = {b.name: b.kind for b in analysis.nested}
    assert len(gated) == len(analysis.branches) and len(outer) == len(analysis.nested), "duplicate branch names"
    return gated, outer


def expected(truth: rn.Truth) -> tuple[dict[str, str], dict[str, str]]:
    return {g.name: g.kind for g in truth.gates}, dict(truth.outer)


def gated(net: rn.Net, truth: rn.Truth) -> rn.Truth:
    """The gates the backend must build: per nest, the level :func:`rn.resolve` picks from eager FLOPs."""
    if not truth.nests:
        return truth
    paths = {g.detach for g in truth.gates} | {o.detach for o, _ in rn._all_nests(truth)}
    return rn.resolve(truth, rn.module_backward_flops(net, net.inputs(seed=0), sorted(paths)))


def explain(analysis) -> str:
    return "skipped adds: " + "; ".join(f"{s.add.name} in {s.module!r}: {s.reason}" for s in analysis.skipped)


@contextlib.contextmanager
def detached_calls(model: nn.Module, calls: dict[str, set[int]]):
    """Like ``oracle.detached``, but only for the given calls (0, 1, ...) of each module.

    Needed when a block runs twice with shared weights and only one of its calls is dropped.
    """
    handles = []
    for path, which in calls.items():
        counter = {"n": 0}

        def hook(mod, args, out, which=which, counter=counter):
            n = counter["n"]
            counter["n"] += 1
            return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out) if n in which else out

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def oracle_context(model: nn.Module, truth: rn.Truth, mask: dict[str, bool]):
    dropped = [g for g in truth.gates if mask[g.name]]
    if not any(g.call for g in truth.gates):  # every branch module runs once: the plain oracle
        return detached(model, [g.detach for g in dropped])
    calls: dict[str, set[int]] = {}
    for g in dropped:
        calls.setdefault(g.detach, set()).add(g.call)
    return detached_calls(model, calls)


def outputs(out) -> tuple[torch.Tensor, ...]:
    """The network's output, and its KV cache if it returns one."""
    return out if isinstance(out, tuple) else (out,)


def same(out, expected) -> bool:
    out, expected = outputs(out), outputs(expected)
    return len(out) == len(expected) and all(torch.equal(a, e) for a, e in zip(out, expected))


def close(out, expected, rtol: float, atol: float) -> bool:
    out, expected = outputs(out), outputs(expected)
    return len(out) == len(expected) and all(torch.allclose(a, e, rtol=rtol, atol=atol) for a, e in zip(out, expected))


def loss_of(out) -> torch.Tensor:
    """A loss over every output (the cache too: side outputs of the gates must be right as well)."""
    return sum((t * torch.linspace(-1.0, 2.0, t.numel(), dtype=t.dtype).reshape(t.shape)).sum() for t in outputs(out))


def input_grads(inputs) -> list[torch.Tensor | None]:
    return [None if t.grad is None else t.grad.clone() for t in inputs[:2]]


def check_step(run, sut: nn.Module, ref: nn.Module, net: rn.Net, truth: rn.Truth, dbp, step: int,
               tolerance: tuple[float, float] | None = None) -> dict:
    """One training step of ``run`` (the rewritten module) against the eager original and the oracle.

    Exact forward and 1e-9 gradients by default; an inner compiler (fused, reordered kernels) passes a
    ``(rtol, atol)`` tolerance for both.
    """
    rtol, atol = tolerance or (1e-9, 1e-12)
    for p in (*sut.parameters(), *ref.parameters()):
        p.grad = None
    inputs = net.inputs(seed=step)
    with torch.no_grad():
        plain = net(*net.inputs(seed=step, requires_grad=False))

    out = run(*inputs)
    mask = dbp.last_mask
    assert set(mask) == truth.gated_names
    assert same(out, plain) if tolerance is None else close(out, plain, rtol, atol), \
        f"forward differs from the original module (mask {mask})"
    loss_of(out).backward()

    ref_inputs = net.inputs(seed=step)
    with oracle_context(ref, truth, mask):
        ref_out = ref(*ref_inputs)
    assert same(ref_out, plain)
    loss_of(ref_out).backward()

    actual = grads(sut)
    assert_same_grads(actual, grads(ref), rtol=rtol, atol=atol)
    for a, e in zip(input_grads(inputs), input_grads(ref_inputs)):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol)

    # a dropped branch's own parameters get no gradient (unless another call of its module was open)
    open_modules = {g.detach for g in truth.gates if not mask[g.name]}
    for g in truth.gates:
        if mask[g.name] and g.detach not in open_modules:
            for name, p in ref.get_submodule(g.detach).named_parameters():
                assert actual[f"{g.detach}.{name}"] is None, f"{g.detach}.{name} got a gradient, {g.name} dropped"
    return mask


masks = st.one_of(
    st.tuples(st.just("drawn"), st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]), st.sampled_from(["topup", "bernoulli"]),
              st.integers(0, 1000)),
    st.tuples(st.just("forced"), st.lists(st.booleans(), min_size=16, max_size=16)),
)


def make_dropbp(mask_spec, keep_one_open, recompute=False) -> dropbp_fx.DropBP:
    if mask_spec[0] == "drawn":
        _, rate, policy, seed = mask_spec
        return dropbp_fx.DropBP(drop_rate=rate, policy=policy, seed=seed, keep_one_open=keep_one_open, inner="eager",
                                recompute=recompute)
    return dropbp_fx.DropBP(drop_rate=0.5, policy="bernoulli", keep_one_open=keep_one_open, inner="eager",
                            recompute=recompute)


def force(dbp, mask_spec) -> None:
    if mask_spec[0] == "forced":
        bits = mask_spec[1]
        dbp.controller.set_rates({n: ALWAYS if bits[i % len(bits)] else 0.0 for i, n in enumerate(dbp.gate_names)})


def fx_transform(net: rn.Net, dbp) -> tuple[nn.Module, torch.fx.GraphModule]:
    sut = copy.deepcopy(net)
    gm = dbp.transform(torch.fx.symbolic_trace(sut), list(net.inputs(seed=0)))  # shapes: FLOPs choose nest levels
    gm.graph.lint()
    return sut, gm


def dynamo_capture(module: nn.Module, inputs, then=None):
    """Compile ``module`` with a backend that records the analysis of the Dynamo graph (before ``then`` runs on it)."""
    torch._dynamo.reset()
    analyses = []

    def backend(gm, example_inputs):
        analyses.append(find_residual_branches(gm))
        return then(gm, example_inputs) if then is not None else gm

    compiled = torch.compile(module, backend=backend, fullgraph=True)
    out = compiled(*inputs)
    assert len(analyses) == 1
    return compiled, out, analyses[0]


def check_everything(spec: rn.NetSpec, mask_spec=("drawn", 0.5, "topup", 0), keep_one_open="auto", steps=2,
                     detection=True, recompute=False):
    """Detection on symbolic_trace, the rewrite and the gradients, for one network."""
    net, truth = rn.build(spec)
    if detection:
        analysis = find_residual_branches(torch.fx.symbolic_trace(net))
        assert found(analysis) == expected(truth), explain(analysis)

    dbp = make_dropbp(mask_spec, keep_one_open, recompute)
    sut, gm = fx_transform(net, dbp)
    truth = gated(net, truth)
    assert set(dbp.gate_names) == truth.gated_names
    gates = [m for m in gm.modules() if isinstance(m, dropbp_fx.DropGate)]
    assert len(gates) == len(truth.gates)
    ref = copy.deepcopy(net)
    force(dbp, mask_spec)
    return [check_step(gm, sut, ref, net, truth, dbp, step) for step in range(steps)]


# ---------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------
@settings(max_examples=budget(200), **SETTINGS)
@given(rn.net_specs(max_blocks=MAX_BLOCKS))
def test_detection_symbolic_trace(spec):
    net, truth = rn.build(spec)
    analysis = find_residual_branches(torch.fx.symbolic_trace(net))
    assert found(analysis) == expected(truth), explain(analysis)


@settings(max_examples=budget(150), **SETTINGS)
@given(rn.net_specs(max_blocks=MAX_BLOCKS), masks, st.sampled_from(["auto", True, False]), st.booleans())
def test_transform_forward_and_gradients(spec, mask_spec, keep_one_open, recompute):
    check_everything(spec, mask_spec, keep_one_open, recompute=recompute)


@settings(max_examples=budget(20, 0.05), **SETTINGS)
@given(rn.net_specs(max_blocks=3 if not FUZZ else MAX_BLOCKS), masks, st.booleans())
def test_dynamo_detection_and_gradients(spec, mask_spec, recompute):
    net, truth = rn.build(spec)
    dbp = make_dropbp(mask_spec, "auto", recompute)
    sut, ref = copy.deepcopy(net), copy.deepcopy(net)
    inputs = net.inputs(seed=0)
    # the first call compiles; its analysis is of the Dynamo graph, before the gates go in
    compiled, _, analysis = dynamo_capture(sut, inputs, then=dbp)
    assert found(analysis) == expected(truth), explain(analysis)
    truth = gated(net, truth)
    assert set(dbp.gate_names) == truth.gated_names
    force(dbp, mask_spec)
    for step in (1, 2):
        check_step(compiled, sut, ref, net, truth, dbp, step)
    torch._dynamo.reset()


@settings(max_examples=budget(10, 0.01), **SETTINGS)
@given(rn.net_specs(max_blocks=2 if not FUZZ else MAX_BLOCKS), st.sampled_from(INNERS),
       st.sampled_from([0.25, 0.5, 0.75]), st.integers(0, 1000), st.booleans())
def test_inner_compilers_gradients(spec, inner, rate, seed, recompute):
    """The compiled pieces (trunk segments, both variants of each branch) against the oracle, over 3 drawn masks;
    ``recompute`` drawn too (the open variant run under per-gate checkpointing).

    float64, so the tolerance is that of the inner compiler's reordering, not of float32.
    """
    check_compiled(spec, dropbp_fx.DropBP(drop_rate=rate, policy="bernoulli", seed=seed, keep_one_open=True,
                                          inner=inner, recompute=recompute))


def check_compiled(spec: rn.NetSpec, dbp, mask_spec=None) -> None:
    """``torch.compile(backend=dbp)`` (with its inner compiler) against the oracle over 3 steps."""
    net, truth = rn.build(spec)
    sut, ref = copy.deepcopy(net), copy.deepcopy(net)
    torch._dynamo.reset()
    compiled = torch.compile(sut, backend=dbp)
    compiled(*net.inputs(seed=0))  # compiles (the pieces compile on their first call)
    truth = gated(net, truth)
    assert set(dbp.gate_names) == truth.gated_names
    if mask_spec is not None:
        force(dbp, mask_spec)
    for step in (1, 2, 3):
        check_step(compiled, sut, ref, net, truth, dbp, step, tolerance=(1e-7, 1e-9))
    torch._dynamo.reset()


# ---------------------------------------------------------------------------
# examples, one per shape, readable when they fail
# ---------------------------------------------------------------------------
B = rn.BranchSpec
ALL_DROPPED, NONE_DROPPED, ALTERNATE = ("forced", [True] * 16), ("forced", [False] * 16), ("forced", [True, False] * 8)


def seq(*branches, **kw):
    return rn.BlockSpec("seq", tuple(branches), **kw)


EXAMPLES = {
    "pre_norm": rn.NetSpec((seq(B("mlp")), seq(B("mlp", norm_in_block=True, norm="rms")))),
    "post_norm": rn.NetSpec((seq(B("mlp", style="post"), B("single", style="post")),)),
    "sandwich": rn.NetSpec((seq(B("attn", style="sandwich"), B("mlp", style="sandwich", layer_scale=True)),)),
    "single_linear_named_after_it": rn.NetSpec((seq(B("single"), B("single", layer_scale=True)),)),
    "flat_bert_style": rn.NetSpec((seq(B("mlp", flat=True), B("single", flat=True, style="sandwich")),
                                   seq(B("mlp", flat=True, style="post")))),
    "parallel_left": rn.NetSpec((rn.BlockSpec("parallel", (B("attn"), B("mlp")), assoc="left"),)),
    "parallel_right": rn.NetSpec((rn.BlockSpec("parallel", (B("attn"), B("mlp")), assoc="right"),)),
    "parallel_sum_first": rn.NetSpec((rn.BlockSpec("parallel", (B("func"), B("mlp")), assoc="sum_first",
                                                   shared_ln=False, sum_add="iadd_out"),)),
    "projection": rn.NetSpec((rn.BlockSpec("projection", (B("mlp", hidden=8, skip_first=False),), d_out=12),
                              seq(B("mlp")))),
    "projection_nested": rn.NetSpec((rn.BlockSpec("projection", (B("nested", inner=B("single")),), d_out=6,
                                                  post_norm=True),)),
    "nested": rn.NetSpec((seq(B("nested", inner=B("mlp"))), seq(B("nested", inner=B("attn"), inner_post=True)))),
    "nested_twice": rn.NetSpec((seq(B("nested", inner=B("nested", inner=B("single")))),)),
    # an outer branch with no compute of its own around its inner residual: the inner level is gated
    "nested_light": rn.NetSpec((seq(B("nested", inner=B("mlp", hidden=16), light=True)),
                                seq(B("nested", inner=B("attn"), light=True, style="post")))),
    "nested_light_in_heavy": rn.NetSpec((seq(B("nested", inner=B("nested", inner=B("mlp"), light=True))),)),
    "nested_in_parallel": rn.NetSpec((rn.BlockSpec("parallel", (B("nested", inner=B("mlp")), B("attn")),
                                                   assoc="right"),)),
    # ``y = g(x); y += x`` around a nest: the in-place add re-points the eager module hooks, so FlopCounterMode
    # credited g's backward to g.norm_in and the truth gated the inner level (the truth now detaches and subtracts
    # totals); beside it a ``func`` branch, whose get_attr weights the symbolic_trace path counted without their
    # gradient (half its backward)
    "nested_iadd_out_in_parallel": rn.NetSpec((rn.BlockSpec("parallel", (
        B("func", hidden=6, add="iadd_clone", skip_first=False, layer_scale=True),
        B("nested", hidden=4, add="iadd_out", skip_first=False, inner=B("single", hidden=4, skip_first=False))),
        shared_ln=False),), d_in=4, width=4),
    "repeated_block": rn.NetSpec((seq(B("mlp")), seq(B("nested", inner=B("single")), B("mlp", flat=True))),
                                 repeat_last=True),
    "decoys": rn.NetSpec((seq(B("attn", rope=True, mask="input", norm="rms"), after="relu_half"),
                          seq(B("func", relu_half=True), B("attn", mask="bias", sdpa=True, rope=True)),
                          seq(B("mlp", relu_half=True), B("attn", mask="buffer"))), stem="tied", head=True),
    "kv_cache": rn.NetSpec((seq(B("attn", cache=True, rope=True), B("mlp")),
                            rn.BlockSpec("parallel", (B("attn", cache=True, sdpa=True), B("mlp")), assoc="right")),
                           repeat_last=True),
    "kv_build": rn.NetSpec((seq(B("attn", kv_build=True, rope=True), B("mlp")),
                            seq(B("attn", kv_build=True, sdpa=True, cache=True)))),
    # ``f(x) + b.expand_as(x)``: the bias reads only the stream's shape, so it is part of the branch
    "bias_shaped_by_stream": rn.NetSpec((seq(B("attn", bias_as=True), B("mlp", bias_as=True, style="post")),
                                         rn.BlockSpec("projection", (B("mlp", bias_as=True),), d_out=12))),
    # XLM: ``scores.masked_fill_(mask.expand_as(scores), v)``, a value shaped by the branch and read by it
    "mask_shaped_by_branch": rn.NetSpec((seq(B("attn", mask="fill"), B("mlp")),)),
    "mask_from_integer_ids": rn.NetSpec((seq(B("attn", mask="ids"), B("mlp")), seq(B("attn", mask="ids", sdpa=True)))),
    # DeepSeek-V4's hyper-connections: ``post * f(pre . H) + comb^T @ H``, the skip a mix of the streams
    "hyper_connection": rn.NetSpec((rn.BlockSpec("hyper", (B("mlp"),)), rn.BlockSpec("hyper", (B("attn", rope=True),)),
                                    seq(B("mlp"))), repeat_last=True),
    # Qwen4-exp's gated residual: ``H + (f ⊗ post).flatten(-2)``, the streams kept flat, no comb
    "hyper_injection": rn.NetSpec((rn.BlockSpec("hyper", (B("mlp"),), hyper_skip="identity"),
                                   rn.BlockSpec("hyper", (B("attn", rope=True),), hyper_skip="identity")),
                                  repeat_last=True),
    "pos_embedding": rn.NetSpec((seq(B("mlp")),), stem="pos"),
    "arange_offset": rn.NetSpec((seq(B("mlp")),), stem="arange_pos"),
}
for kernel in rn.KERNELS:  # opaque kernels: autograd.Function (once_differentiable), custom op, uint8 weight
    EXAMPLES[f"kernel_{kernel}"] = rn.NetSpec((seq(B("kernel", kernel=kernel), B("mlp")),
                                               rn.BlockSpec("projection", (B("kernel", kernel=kernel, hidden=8),),
                                                            d_out=8)))
for spelling in rn.ADDS:
    EXAMPLES[f"add_{spelling}"] = rn.NetSpec((seq(B("mlp", add=spelling), B("attn", add=spelling, skip_first=False)),
                                              seq(B("nested", add=spelling, inner=B("single", add=spelling)))))


@pytest.mark.parametrize("mask_spec", [ALL_DROPPED, NONE_DROPPED, ALTERNATE], ids=["all", "none", "alternate"])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example(name, mask_spec):
    masks_seen = check_everything(EXAMPLES[name], mask_spec, keep_one_open=False, steps=1)
    if mask_spec is ALL_DROPPED:
        assert all(masks_seen[0].values())
    if mask_spec is NONE_DROPPED:
        assert not any(masks_seen[0].values())


def test_example_names():
    """The ground truth of a few examples, spelled out (the naming rule, checked by hand)."""
    truths = {k: rn.build(EXAMPLES[k])[1] for k in ("flat_bert_style", "single_linear_named_after_it", "nested_twice",
                                                    "repeated_block", "projection")}
    assert expected(truths["flat_bert_style"]) == ({"blocks.0.{b0_fc1,b0_fc2}": "identity",
                                                    "blocks.0.b1_fc": "identity",
                                                    "blocks.1.{b0_fc1,b0_fc2}": "identity"}, {})
    assert truths["single_linear_named_after_it"].gated_names == {"blocks.0.b0.fc", "blocks.0.b1.fc"}
    assert expected(truths["nested_twice"]) == ({"blocks.0.b0.inner.inner.fc": "identity"},
                                                {"blocks.0.b0.inner": "identity", "blocks.0.b0": "identity"})
    assert truths["repeated_block"].gated_names == {"blocks.0.b0", "blocks.1.b0.inner.fc", "blocks.1.{b1_fc1,b1_fc2}",
                                                    "blocks.1.b0.inner.fc#1", "blocks.1.{b1_fc1,b1_fc2}#1"}
    assert truths["repeated_block"].outer_names == {"blocks.1.b0", "blocks.1.b0#1"}
    assert expected(truths["projection"])[0] == {"blocks.0.f": "projection", "blocks.1.b0": "identity"}


class Decoys(nn.Module):
    """Every add here is a decoy: tied weights, position embedding, ``arange + offset``, ``var + eps``,
    bias add, RoPE, an input mask, a buffer mask and ``x + relu(x) * 0.5``; nothing is a residual."""

    def __init__(self, d=8):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.pos = nn.Parameter(torch.randn(rn.T + 2, d))
        self.norm = rn.RMSNorm(d)
        self.w = nn.Parameter(torch.randn(d, d))
        self.b = nn.Parameter(torch.randn(d))
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        pos = torch.arange(rn.T, dtype=torch.float32)[:, None] * torch.arange(d)[None, :] / d
        self.register_buffer("cos", torch.cos(pos))
        self.register_buffer("sin", torch.sin(pos))
        self.register_buffer("causal", torch.triu(torch.full((rn.T, rn.T), -5.0), 1))

    def forward(self, x, ctx, mask):
        h = self.inp(x) + self.inp(ctx)                                   # tied weights
        h = h + self.pos[torch.arange(h.shape[1], device=h.device) + 1]   # arange + offset, position embedding
        h = self.norm(h)                                                  # var + eps
        h = h @ self.w.T + self.b                                         # bias add
        q, k = self.q(h), self.k(h)
        q = q * self.cos + rn.rotate_half(q) * self.sin                   # RoPE
        scores = q @ k.transpose(-2, -1) + mask                           # input mask
        scores = scores + self.causal                                     # buffer mask
        h = torch.softmax(scores, -1) @ h
        return h + torch.relu(h) * 0.5                                    # no parametric compute


def test_example_decoys_only():
    net = Decoys().double()
    inputs = rn.Net(rn.NetSpec(stem="tied")).double().inputs()
    gm = torch.fx.symbolic_trace(copy.deepcopy(net))
    analysis = find_residual_branches(gm)
    assert not analysis.branches and not analysis.nested, [b.name for b in analysis.branches + analysis.nested]
    assert len(analysis.skipped) == 9 and all(s.reason for s in analysis.skipped), explain(analysis)
    dbp = dropbp_fx.DropBP(inner="eager")
    out = dbp.transform(gm)(*inputs)
    assert not dbp.gate_names and same(out, net(*inputs))


@pytest.mark.parametrize("name", ["decoys", "nested_in_parallel", "repeated_block", "projection_nested",
                                  "flat_bert_style", "hyper_connection"])
def test_example_dynamo(name):
    net, truth = rn.build(EXAMPLES[name])
    sut, ref = copy.deepcopy(net), copy.deepcopy(net)
    dbp = make_dropbp(ALTERNATE, False)
    compiled, _, analysis = dynamo_capture(sut, net.inputs(seed=0), then=dbp)
    assert found(analysis) == expected(truth), explain(analysis)
    force(dbp, ALTERNATE)
    mask = check_step(compiled, sut, ref, net, gated(net, truth), dbp, 1)
    assert list(mask.values())[:2] == [True, False][:len(mask)]
    torch._dynamo.reset()


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("kernel", rn.KERNELS)
def test_kernel_branches_under_every_inner_compiler(kernel, inner):
    """Branches whose only compute is an opaque kernel: Dynamo captures the ``autograd.Function``s as
    ``autograd_function_apply`` (bodies as submodules, which must travel inside their piece) and the
    custom op as one node; both are gated from data flow (they read a weight) and give oracle gradients."""
    spec = rn.NetSpec((seq(B("kernel", kernel=kernel), B("mlp")), seq(B("kernel", kernel=kernel, style="post"))))
    check_compiled(spec, dropbp_fx.DropBP(drop_rate=0.5, policy="bernoulli", seed=3, keep_one_open=True, inner=inner),
                   mask_spec=ALTERNATE)


def test_kernel_branch_flops_are_counted():
    """A kernel's FLOPs are never a silent zero: the ``autograd.Function`` runs aten matmuls (counted), the
    custom op has no formula (estimated as 2 x weight elements x rows), the uint8 weight is dequantized."""
    for kernel in rn.KERNELS:
        net, truth = rn.build(rn.NetSpec((seq(B("kernel", kernel=kernel, hidden=8)),), width=8))
        dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager")
        torch._dynamo.reset()
        torch.compile(net, backend=dbp)(*net.inputs())
        (gate,) = dbp.controller.gates
        dense = 2 * 2 * rn.BATCH * rn.T * 8 * 8  # two 8x8 layers over BATCH x T rows
        assert gate.flops[0] == dense, (kernel, gate.flops)
        # backward: input and weight gradients (2x); the frozen uint8 weight: input gradients only (1x)
        assert gate.flops[1] == (dense if kernel == "quant" else 2 * dense), (kernel, gate.flops)
    torch._dynamo.reset()


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_writes_into_fresh_returned_buffers_stay_in_the_branch(inner):
    """A state written into ``zeros_like`` and returned (Mamba's cache): left in the trunk, the key projection
    would sit in a compiled trunk segment and get a zero gradient, not none, when its gate is closed."""
    check_compiled(EXAMPLES["kv_build"], dropbp_fx.DropBP(drop_rate=0.5, policy="bernoulli", seed=3,
                                                          keep_one_open=True, inner=inner))


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_sizes_given_as_number_tensors_are_computed_inside_the_piece(inner):
    """Regression (Longformer, LED): ``h.view(b, torch.div(n, 2 * w, rounding_mode="trunc"), ...)``. The 0-d
    tensor is made from numbers in the trunk; handed to the branch's piece as an input, AOTAutograd made it a
    fake tensor of unknown value and the ``view`` failed (``DataDependentOutputException``)."""
    spec = rn.NetSpec((seq(B("mlp", shape_tensor=True), B("mlp", shape_tensor=True, style="post")),))
    check_compiled(spec, dropbp_fx.DropBP(drop_rate=0.5, policy="bernoulli", seed=3, keep_one_open=True,
                                          inner=inner), mask_spec=ALTERNATE)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_values_shaped_by_the_branch_stay_in_it(inner):
    """Regression (XLM): ``scores.masked_fill_(mask.expand_as(scores), v)``. The expanded mask reads only the
    scores' shape (no data edge), so it was left in the trunk while the branch read it: the branch fed the
    trunk and read it back, and outlining failed ("Invalid partition, found dependency cycles")."""
    check_compiled(EXAMPLES["mask_shaped_by_branch"], dropbp_fx.DropBP(drop_rate=0.5, policy="bernoulli", seed=3,
                                                                       keep_one_open=True, inner=inner),
                   mask_spec=ALTERNATE)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_values_nothing_reads_stay_in_the_branch(inner):
    """Regression (RWKV): a value computed from the branch and never read (Dynamo keeps dead code; RWKV's WKV
    loop updates its state after the last token and drops it) made the branch values it reads shared with the
    trunk, so the norm and the first projection left the branch: trained in the trunk segment, and under
    ``aot_eager`` given zero gradients, not none, when the gate was closed."""
    spec = rn.NetSpec((seq(B("mlp", unread=True)), seq(B("mlp", unread=True, norm_in_block=True))))
    dbp = dropbp_fx.DropBP(drop_rate=0.5, policy="bernoulli", seed=3, keep_one_open=True, inner=inner)
    check_compiled(spec, dbp, mask_spec=ALTERNATE)
    consumed = {g.name: sorted(g.params) for g in dbp.controller.gates}
    assert all(any(".fc1." in p for p in params) and any("norm" in p for p in params)
               for params in consumed.values()), consumed


def test_writes_into_views_stay_in_the_branch():
    """DeepSeek's MLA builds its keys by ``k[..., :h].copy_(k_pass)`` into ``k.new_empty``: the write into a
    view writes ``k``, so the key projection is part of the attention branch and its FLOPs are counted."""
    flops = {}
    for kv_build in (False, True):
        net, truth = rn.build(rn.NetSpec((seq(B("attn", kv_build=kv_build, sdpa=True)),), width=8))
        dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager")
        torch._dynamo.reset()
        torch.compile(net, backend=dbp)(*net.inputs())
        (gate,) = dbp.controller.gates
        assert gate.name == "blocks.0.b0", gate.name
        flops[kv_build] = gate.flops
    assert flops[True] == flops[False], flops  # tanh and the copies count 0, as torch's pointwise ops do
    torch._dynamo.reset()


# ---------------------------------------------------------------------------
# regressions: four bugs these property tests found, kept as named examples
# ---------------------------------------------------------------------------
MASK_TWICE = rn.NetSpec((seq(B("attn", mask="input")), seq(B("attn", mask="input"))))
PARALLEL_SINGLE = {assoc: rn.NetSpec((rn.BlockSpec("parallel", (B("mlp"), B("single")), assoc=assoc),))
                   for assoc in ("right", "sum_first")}
PROJECTION_FUNC = rn.NetSpec((rn.BlockSpec("projection", (B("func", hidden=8),), d_out=8),))
CAST_TO_OUT = rn.NetSpec((seq(B("mlp", add="cast_to_out")),))


def test_neighbours_of_the_regressions():
    """The shapes next to the regressions below: one mask-input layer, ``(x + f) + g`` with a
    single-Linear g, a projection branch of Linear modules."""
    check_everything(rn.NetSpec((seq(B("attn", mask="input")), seq(B("attn", mask="buffer")))), ALTERNATE)
    check_everything(rn.NetSpec((rn.BlockSpec("parallel", (B("mlp"), B("single")), assoc="left"),)), ALTERNATE)
    check_everything(rn.NetSpec((rn.BlockSpec("projection", (B("mlp", hidden=8),), d_out=8),)), ALL_DROPPED)


def test_regression_mask_input_in_two_layers():
    """An additive mask used by two attention layers reaches the second through the stream: not a stream."""
    net, truth = rn.build(MASK_TWICE)
    analysis = find_residual_branches(torch.fx.symbolic_trace(net))
    assert found(analysis) == expected(truth), explain(analysis)


def test_regression_mask_input_in_two_layers_gradients():
    check_everything(MASK_TWICE, ALL_DROPPED, keep_one_open=False, steps=1, detection=False)


@pytest.mark.parametrize("assoc", sorted(PARALLEL_SINGLE))
def test_regression_parallel_single_linear_term(assoc):
    """``x + (f + g)`` with g a single Linear: two parallel gates, not a projection inside a parallel sum."""
    check_everything(PARALLEL_SINGLE[assoc], ALTERNATE, detection=False)


def test_regression_projection_transposed_weights():
    """A functional ``f(x) + proj(x)`` (``h @ W.T + b``): weights read through ``W.T`` still count."""
    net, truth = rn.build(PROJECTION_FUNC)
    analysis = find_residual_branches(torch.fx.symbolic_trace(net))
    assert found(analysis) == expected(truth), explain(analysis)


def test_regression_shape_query_of_branch_output():
    """``x.to(y.dtype) + y``: a dtype query of the branch output is not a use of its value."""
    net, truth = rn.build(CAST_TO_OUT)
    analysis = find_residual_branches(torch.fx.symbolic_trace(net))
    assert found(analysis) == expected(truth), explain(analysis)


def test_shape_query_of_branch_output_dynamo():
    """The same network is fine in a Dynamo graph (static shapes: no query node)."""
    net, truth = rn.build(CAST_TO_OUT)
    _, _, analysis = dynamo_capture(net, net.inputs())
    assert found(analysis) == expected(truth), explain(analysis)
    torch._dynamo.reset()


SHARED_LN_INPLACE = rn.NetSpec((seq(B("mlp", add="method_inplace")),
                                rn.BlockSpec("parallel", (B("mlp"), B("func")), shared_ln=True)))


@pytest.mark.parametrize("mask_spec", [ALL_DROPPED, ALTERNATE], ids=["all-dropped", "alternate"])
def test_regression_shared_norm_with_inplace_residual_add(mask_spec):
    """Found by the fuzz profile (inner="inductor"): ``y = x.clone(); y.add_(f(x))``, then a parallel block
    ``y + f(ln(y)) + g(ln(y))``. Dynamo's graph reads ``ln(y)`` from the clone's node, not from the ``add_``,
    so ``ln`` was kept in the stream's segment to stay after the write, and with both parallel gates closed
    ``ln.weight`` got zeros from that segment's compiled backward instead of ``None``. Readers now read the
    write's value (a data edge), and ``ln`` gets its own segment."""
    check_compiled(SHARED_LN_INPLACE, dropbp_fx.DropBP(drop_rate=0.5, policy="bernoulli", keep_one_open=False,
                                                       inner="aot_eager"), mask_spec)


class StreamMix(nn.Module):
    """A hyper-connection's weights (HY-V4, DeepSeek-V4), computed from ``n`` residual streams: ``pre`` mixes
    them into the branch input, ``post`` spreads the branch output back over them."""

    def __init__(self, n=3, d=8):
        super().__init__()
        self.n = n
        self.fn = nn.Parameter(0.3 * torch.randn(2 * n, n * d))
        self.base = nn.Parameter(torch.zeros(2 * n))

    def forward(self, x):  # x: (..., n, d)
        mixes = nn.functional.linear(x.flatten(-2), self.fn) * torch.rsqrt(x.flatten(-2).pow(2).mean(-1, True) + 1e-6)
        pre, post = torch.sigmoid(mixes + self.base).split(self.n, dim=-1)
        return post, (pre.unsqueeze(-1) * x).sum(-2)


class HyperConnected(nn.Module):
    """``x + post(x) ⊗ f(mix_pre(x))`` per block, ``f`` the MLP. ``post`` is computed from the stream outside
    ``f``: with ``f`` dropped it keeps its gradient, as in eager with ``f`` detached (``mix.fn`` still trains
    through its ``post`` rows)."""

    def __init__(self, depth=2, n=3, d=8):
        super().__init__()
        self.n = n
        self.blocks = nn.ModuleList(nn.ModuleDict({"mix": StreamMix(n, d), "norm": rn.RMSNorm(d), "mlp": nn.Sequential(
            nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))}) for _ in range(depth))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        x = x.unsqueeze(-2).expand(*x.shape[:-1], self.n, x.shape[-1]).contiguous()
        for block in self.blocks:
            post, h = block["mix"](x)
            x = x + post.unsqueeze(-1) * block["mlp"](block["norm"](h)).unsqueeze(-2)
        return self.head(x.sum(-2)).pow(2).mean()


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_regression_hyper_connection_weights_stay_in_the_trunk(inner):
    """HY-V4 (catalogue): the branch's output scaled by weights computed from the streams was gated whole, so a
    dropped branch left the hyper-connection's ``fn`` with no gradient (the oracle's: set), and the gate was
    named ``{attn_hc,self_attn}`` or ``self_attn`` by layer. The factor now stays in the trunk."""
    torch.manual_seed(0)
    net = HyperConnected().double()
    reference = copy.deepcopy(net)
    x = torch.randn(rn.BATCH, rn.T, 8, dtype=torch.double)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner=inner, policy="bernoulli", keep_one_open=False)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend=dbp)
    compiled(x)
    assert dbp.gate_names == ["blocks.0.mlp", "blocks.1.mlp"], dbp.gate_names
    for dropped in ({"blocks.0.mlp"}, {"blocks.1.mlp"}, {"blocks.0.mlp", "blocks.1.mlp"}, set()):
        net.zero_grad(set_to_none=True), reference.zero_grad(set_to_none=True)
        dbp.controller.set_rates({name: ALWAYS if name in dropped else 0.0 for name in dbp.gate_names})
        compiled(x).backward()
        assert {g for g, d in dbp.last_mask.items() if d} == dropped
        with detached(reference, sorted(dropped)):
            reference(x).backward()
        assert_same_grads(grads(net), grads(reference), rtol=1e-9, atol=1e-12)
        assert all(net.blocks[i]["mix"].fn.grad is not None for i in range(2))
    torch._dynamo.reset()


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_regression_hyper_connection_mix_skip_keeps_post_and_comb_in_the_trunk(inner):
    """DeepSeek-V4 (catalogue, issue 24): ``post * f(pre . H) + comb^T @ H`` was read as a projection residual
    whose branch was the whole product, so a closed gate took ``post``'s gradient away (the hyper-connection's
    weights and the embeddings differed from the oracle that detaches ``f``). The factor now stays in the trunk
    with the skip's mix, and the branch ends at ``f``'s output (its broadcast view belongs to the product)."""
    spec = EXAMPLES["hyper_connection"]
    check_compiled(spec, dropbp_fx.DropBP(drop_rate=0.5, inner=inner, policy="bernoulli", keep_one_open=False,
                                          seed=3), ALTERNATE)
    net, _ = rn.build(spec)
    assert all(p.grad is None for p in net.parameters())  # the built net itself never trained


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_regression_hyper_injection_keeps_post_in_the_trunk(inner):
    """Qwen4-exp (catalogue, issue 24): ``H + (f.unsqueeze(-2) * post.unsqueeze(-1)).flatten(-2)``; the view
    after the product hid it, so the whole product was the branch and a closed gate took ``post``'s gradient
    (``block_inject_weight``, ``hc_norm`` and the embeddings differed from the oracle). The product is now
    found through the view, ``post`` stays in the trunk, and the branch ends at ``f``'s output."""
    spec = EXAMPLES["hyper_injection"]
    net, truth = rn.build(spec)
    assert {g.name for g in truth.gates} == {"blocks.0.f", "blocks.1.f", "blocks.1.f#1"}
    check_compiled(spec, dropbp_fx.DropBP(drop_rate=0.5, inner=inner, policy="bernoulli", keep_one_open=False,
                                          seed=3), ALTERNATE)


@pytest.mark.parametrize("name", ["nested_iadd_out_in_parallel", "pre_norm", "post_norm", "parallel_left", "decoys",
                                  "kernel_fn", "nested"])
def test_symbolic_trace_gate_flops_are_the_eager_droppable_flops(name):
    """On the symbolic_trace path each gate's backward FLOPs are those its branch's detach saves in eager. The
    shapes propagated there once lost ``requires_grad``: no gradient for get_attr weights (``x @ self.w.T``) nor
    for a branch input made by a module, so the first matmul's backward was counted half."""
    net, truth = rn.build(EXAMPLES[name])
    truth = gated(net, truth)
    dbp = make_dropbp(("drawn", 0.5, "topup", 0), False)
    fx_transform(net, dbp)
    eager = rn.module_backward_flops(net, net.inputs(seed=0), sorted({g.detach for g in truth.gates}))
    counted = {g.name: g.flops[1] for g in dbp.controller.gates}
    assert counted == {g.name: eager[g.detach] for g in truth.gates}


@pytest.mark.parametrize("name, level", [("nested", "outer"), ("nested_twice", "outer"), ("nested_light", "inner"),
                                         ("nested_light_in_heavy", "outer")])
def test_nest_levels(name, level):
    """Per nest, the level gated is the one the eager FLOPs say leaves the most backward droppable (the outer
    branch at >= 1.25x the inner's), both levels occur, ``explain`` says which and why, and the gradients equal
    the oracle's at that level."""
    net, truth = rn.build(EXAMPLES[name])
    want = gated(net, truth)
    top_level = {o.name for o, _ in truth.nests}
    assert (top_level <= want.gated_names) == (level == "outer")
    report = dropbp_fx.explain(copy.deepcopy(net), *net.inputs(seed=0))
    assert {g.name for g in report.gates} == want.gated_names
    assert len(report.nests) == len(truth.nests) and all(f"({level})" in n for n in report.nests), report.nests
    assert "one level per nest is gated" in str(report)
    check_compiled(EXAMPLES[name], dropbp_fx.DropBP(drop_rate=0.5, policy="bernoulli", seed=2, keep_one_open=True,
                                                    inner="aot_eager"))

