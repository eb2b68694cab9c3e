"""The runtime: what a closed gate costs, mask statistics, determinism across processes, modes,
graph breaks, the all-closed case, option validation and the pass-through of graphs without branches."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import dropbp_fx
from dropbp_fx.controller import DropController
from dropbp_fx.testing import assert_same_grads, detached, grads


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Net(nn.Module):
    def __init__(self, depth=2, d=16, graph_break=False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.graph_break = graph_break

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.graph_break and i == 0:
                torch._dynamo.graph_break()
        return x


def _closed(dbp, names):
    """Rates that close exactly ``names`` (Bernoulli with rate ~1 vs 0), checked against the drawn mask."""
    dbp.controller.policy = "bernoulli"
    dbp.controller.keep_one_open = False
    dbp.set_rates({g: (0.999999999 if g in names else 0.0) for g in dbp.gate_names})


def _reachable_backward_nodes(tensor):
    seen, stack = [], [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.append(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return [type(fn).__name__ for fn in seen]


@pytest.mark.parametrize("via", ["transform", "compile"])
def test_closed_gate_saves_no_activations_and_has_no_backward(via):
    torch.manual_seed(0)
    model = Net(depth=2)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager")
    run = dbp.transform(torch.fx.symbolic_trace(model)) if via == "transform" else torch.compile(model, backend=dbp)
    x = torch.randn(4, 16, requires_grad=True)
    run(x)  # compile / register the gates
    assert dbp.gate_names == ["blocks.0.mlp", "blocks.1.mlp"]

    def saved_and_graph(closed):
        _closed(dbp, closed)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = run(x)
        assert {g for g, d in dbp.last_mask.items() if d} == set(closed)
        return sum(saved), _reachable_backward_nodes(out.sum()), out

    open_saved, open_graph, _ = saved_and_graph([])
    one_saved, one_graph, _ = saved_and_graph(["blocks.0.mlp"])
    all_saved, all_graph, out = saved_and_graph(["blocks.0.mlp", "blocks.1.mlp"])

    # The trunk (two adds) saves nothing: every saved element belongs to a branch.
    assert open_saved > 0 and all_saved == 0
    assert one_saved == open_saved / 2  # identical blocks: closing one halves what is kept
    # No backward node of a closed branch: no matmul, GELU or norm backward is left in the graph.
    assert sum("Addmm" in n for n in open_graph) == 4
    assert sum("Addmm" in n for n in one_graph) == 2
    assert not any(k in n for n in all_graph for k in ("Addmm", "Gelu", "LayerNorm"))
    out.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))
    assert all(p.grad is None for p in model.parameters())


def test_forward_identical_and_gradients_match_oracle_for_every_mask():
    torch.manual_seed(0)
    model = Net(depth=3).double()
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager")
    gm = dbp.transform(torch.fx.symbolic_trace(model))
    names = dbp.gate_names
    x = torch.randn(5, 16, dtype=torch.double)
    for bits in range(2 ** len(names)):
        closed = [n for i, n in enumerate(names) if bits >> i & 1]
        _closed(dbp, closed)
        for p in model.parameters():
            p.grad = None
        xa = x.clone().requires_grad_()
        out = gm(xa)
        (out ** 2).sum().backward()
        got, got_x = grads(model), xa.grad
        for p in model.parameters():
            p.grad = None
        xb = x.clone().requires_grad_()
        with detached(model, closed):
            ref = model(xb)
        (ref ** 2).sum().backward()
        assert torch.equal(out, ref)
        assert_same_grads(got, grads(model), rtol=0, atol=0)
        torch.testing.assert_close(got_x, xb.grad, rtol=0, atol=0)


class ScaledAttn(nn.Module):
    """SwiftFormer's additive attention, reduced: an inner residual ``h + proj(tanh(h @ w))`` between two
    projections; its compute sits in this module (``w``) and one child (``proj``), so it is named ``attn``."""

    def __init__(self, d=8):
        super().__init__()
        self.q, self.proj, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        h = self.q(x)
        h = h + self.proj(torch.tanh(h @ self.w))
        return self.out(h)


class ScaledBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(d), ScaledAttn(d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        return x + self.gamma * self.attn(self.norm(x))


def test_outer_branch_sharing_its_module_with_the_add_is_named_by_its_parts_and_matches_the_oracle():
    """Regression (SwiftFormer): the outer branch of a nest (the attention and the block's layer scale) took the
    inner branch's name ``attn`` and was renamed after the module all its nodes share, ``blocks.0``, which holds
    the residual add too: a name that reads as the whole block, skip included. It is ``blocks.0.{attn}``."""
    torch.manual_seed(0)
    model = nn.Sequential(*(ScaledBlock() for _ in range(2))).double()
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager")
    gm = dbp.transform(torch.fx.symbolic_trace(model))
    assert dbp.gate_names == ["0.{attn}", "1.{attn}"]  # the outer level: 2x the inner's backward FLOPs
    x = torch.randn(3, 5, 8, dtype=torch.double)
    for bits in range(4):
        closed = [n for i, n in enumerate(dbp.gate_names) if bits >> i & 1]
        _closed(dbp, closed)
        model.zero_grad(set_to_none=True)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        (gm(xa) ** 2).sum().backward()
        got = grads(model)
        model.zero_grad(set_to_none=True)
        with detached(model, [n.replace("{attn}", "attn") for n in closed], through_constants=True):
            (model(xb) ** 2).sum().backward()
        assert_same_grads(got, grads(model), rtol=0, atol=0)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
        assert (got["0.gamma"] is None) == ("0.{attn}" in closed)


class CrossAttn(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, k, v):
        return self.o(torch.softmax(self.q(x) @ k.transpose(-2, -1), -1) @ v)


class CrossDecoder(nn.Module):
    """A self-attention-free decoder: an MLP block, then a cross-attention block whose keys and values are
    projected from the encoder output outside the branch and returned as its cache (SwitchTransformers)."""

    def __init__(self, d=8):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.cross = CrossAttn(d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x, enc):
        h = x + self.mlp(self.norm(x))
        k, v = self.cross.k(enc), self.cross.v(enc)
        return h + self.cross(h, k, v), k, v


def test_cache_values_beside_the_stream_get_no_gradient_when_their_gate_is_closed():
    """Regression (SwitchTransformers): the keys and values a cross-attention reads go to its gate and to the
    graph output (the cache), like the stream before it (to the gate and, through the add, to the output).
    Grouped by "gate + output" with the stream in one trunk segment, they got zero gradients, not none, when
    the gate was closed; each output position is now a consumer of its own."""
    torch.manual_seed(0)
    model = CrossDecoder().double()
    x, enc = torch.randn(2, 5, 8, dtype=torch.double), torch.randn(2, 5, 8, dtype=torch.double)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="aot_eager")
    compiled = torch.compile(model, backend=dbp)
    compiled(x, enc)
    assert dbp.gate_names == ["mlp", "cross"]
    for closed in ([], ["cross"], ["mlp"], ["mlp", "cross"]):
        _closed(dbp, closed)
        model.zero_grad(set_to_none=True)
        xa = x.clone().requires_grad_()
        (compiled(xa, enc)[0] ** 2).sum().backward()
        got = grads(model)
        model.zero_grad(set_to_none=True)
        xb = x.clone().requires_grad_()
        with detached(model, closed):
            (model(xb, enc)[0] ** 2).sum().backward()
        assert_same_grads(got, grads(model))
        assert (got["cross.k.weight"] is None) == ("cross" in closed)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- mask statistics
def _run_steps(controller, n_gates, steps):
    slots = [controller.register(f"g{i}") for i in range(n_gates)]
    masks = []
    for _ in range(steps):
        masks.append([controller.is_dropped(s) for s in slots])
    return masks


def _binomial_pmf(n, p, k):
    return math.comb(n, k) * p ** k * (1 - p) ** (n - k)


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75, 0.875])
def test_bernoulli_fraction_over_1000_steps(p):
    n, steps = 16, 1000
    masks = _run_steps(DropController(p, seed=1, policy="bernoulli", keep_one_open=False), n, steps)
    fraction = sum(map(sum, masks)) / (n * steps)
    sigma = math.sqrt(p * (1 - p) / (n * steps))
    assert abs(fraction - p) < 4 * sigma
    counts = [sum(m) for m in masks]
    assert min(counts) < math.floor(p * n)  # plain coin flips do fall below the target


@pytest.mark.parametrize("p", [0.5, 0.75, 0.875])
def test_topup_fraction_over_1000_steps(p):
    n, steps = 16, 1000
    target = math.floor(p * n)
    masks = _run_steps(DropController(p, seed=2, policy="topup", keep_one_open=False), n, steps)
    counts = [sum(m) for m in masks]
    assert min(counts) >= target  # never below the target count
    expected = sum(max(k, target) * _binomial_pmf(n, p, k) for k in range(n + 1)) / n
    variance = sum((max(k, target) / n - expected) ** 2 * _binomial_pmf(n, p, k) for k in range(n + 1))
    fraction = sum(counts) / (n * steps)
    assert abs(fraction - expected) < 4 * math.sqrt(variance / steps)
    assert fraction > p  # the top-up rule overshoots the target on average
    per_gate = [sum(m[i] for m in masks) / steps for i in range(n)]
    assert max(per_gate) - min(per_gate) < 0.15  # uniform rates: no gate is favoured


def test_realised_fraction_through_a_model_matches_the_rule():
    model = Net(depth=8, d=4)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, seed=0, inner="eager")
    gm = dbp.transform(torch.fx.symbolic_trace(model))
    x = torch.randn(1, 4)
    for _ in range(1000):
        gm(x)
    fractions = dbp.controller.drop_fractions()
    assert len(fractions) == 1000 and dbp.step == 1000
    assert min(fractions) >= 0.5
    expected = sum(max(k, 4) * _binomial_pmf(8, 0.5, k) for k in range(9)) / 8
    assert abs(sum(fractions) / 1000 - expected) < 0.02


_MASK_SCRIPT = textwrap.dedent("""
    import json, random, torch
    from dropbp_fx.controller import DropController
    random.seed(12345); torch.manual_seed(777)  # other RNG use must not matter
    c = DropController(0.5, seed=42)
    slots = [c.register(f"model.layers.{i}.mlp") for i in range(12)]
    print(json.dumps([[c.is_dropped(s) for s in slots] for _ in range(50)]))
""")


def test_two_processes_with_the_same_seed_draw_identical_masks():
    runs = []
    for hash_seed in ("0", "1"):
        env = {"PYTHONHASHSEED": hash_seed, "PATH": ""}
        out = subprocess.run([sys.executable, "-c", _MASK_SCRIPT], capture_output=True, text=True, check=True,
                             env=env)
        runs.append(json.loads(out.stdout))
    assert runs[0] == runs[1]
    local = DropController(0.5, seed=42)
    slots = [local.register(f"model.layers.{i}.mlp") for i in range(12)]
    assert [[local.is_dropped(s) for s in slots] for _ in range(50)] == runs[0]
    other = DropController(0.5, seed=43)
    slots = [other.register(f"model.layers.{i}.mlp") for i in range(12)]
    assert [[other.is_dropped(s) for s in slots] for _ in range(50)] != runs[0]


# --------------------------------------------------------------------------- modes
def test_no_dropping_in_eval_mode_or_without_grad():
    torch.manual_seed(0)
    model = Net(depth=2)
    dbp = dropbp_fx.DropBP(drop_rate=0.9, policy="bernoulli", inner="eager")
    compiled = torch.compile(model, backend=dbp)
    x = torch.randn(3, 16)
    compiled(x).sum().backward()
    assert dbp.step == 1
    with torch.no_grad():
        compiled(x)
    model.eval()
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.train()
    assert dbp.step == 1  # neither the no-grad call nor the eval-mode call drew a mask
    notes = [g.note for g in dbp.graphs]
    assert "traced with grad disabled: no gates" in notes  # eval mode alone may reuse the training graph
    compiled(x)
    assert dbp.step == 2

    gm = dbp.transform(torch.fx.symbolic_trace(Net(depth=2)))
    gm.eval()
    before = dbp.step
    gm(x)
    assert dbp.step == before


class TwoStage(Net):
    def forward(self, x):
        x = self.blocks[0](x)
        torch._dynamo.graph_break()  # Dynamo: one graph before, one in the resume function
        return self.blocks[1](x)


@pytest.mark.parametrize("model_cls", [Net, TwoStage])
def test_graph_break_still_one_mask_per_step(model_cls):
    """A break in straight-line code gives two graphs; a break inside the loop over layers makes Dynamo
    compile the layer's frame once and reuse it for both layers: either way one mask per step, model-wide names."""
    torch.manual_seed(0)
    model = model_cls(depth=2, graph_break=True)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, seed=1, inner="eager")
    compiled = torch.compile(model, backend=dbp)
    x = torch.randn(3, 16, requires_grad=True)
    for step in range(6):
        model.zero_grad(set_to_none=True)
        compiled(x).sum().backward()
        assert dbp.step == step + 1
        dropped = [g for g, d in dbp.last_mask.items() if d]
        assert len(dropped) >= 1  # top-up: floor(0.5 * 2) = 1 drop per step, across both graphs
        got = grads(model)
        model.zero_grad(set_to_none=True)
        with detached(model, dropped):
            model(x).sum().backward()
        assert_same_grads(got, grads(model))
    assert len([g for g in dbp.graphs if g.gates]) == (2 if model_cls is TwoStage else 1)
    assert dbp.gate_names == ["blocks.0.mlp", "blocks.1.mlp"]
    assert dbp.counts()["blocks.0.mlp"][1] == dbp.counts()["blocks.1.mlp"][1] == 6
    assert dropbp_fx.get_dropbp(compiled) is dbp


def test_all_gates_closed_keeps_one_open_when_nothing_else_trains():
    torch.manual_seed(0)
    model = Net(depth=2)
    for name, p in model.named_parameters():  # LoRA-style: only the branches' last layer trains
        p.requires_grad_(name.endswith("mlp.2.weight"))
    dbp = dropbp_fx.DropBP(drop_rate=0.9, policy="bernoulli", inner="eager")
    compiled = torch.compile(model, backend=dbp)
    x = torch.randn(3, 16)
    for _ in range(100):
        loss = compiled(x).sum()
        loss.backward()  # never "element 0 of tensors does not require grad"
        assert sum(dbp.last_mask.values()) == 1  # rate 0.9 on 2 gates: both drawn closed on 81% of steps
    assert dbp.controller.trunk_trains() is False

    full = nn.Sequential(Net(depth=2), nn.Linear(16, 4))  # full fine-tuning: the head trains on every step,
    x = torch.randn(3, 16)  # so a step may close every gate
    dbp_full = dropbp_fx.DropBP(drop_rate=0.9, policy="bernoulli", inner="eager")
    compiled_full = torch.compile(full, backend=dbp_full)
    all_closed = 0
    for _ in range(50):
        compiled_full(x).sum().backward()
        all_closed += all(dbp_full.last_mask.values())
    assert dbp_full.controller.trunk_trains() is True and all_closed > 20


# --------------------------------------------------------------------------- options and pass-through
@pytest.mark.parametrize("options, message", [
    ({"dropp_rate": 0.5}, "unknown option"),
    ({"drop_rate": 1.0}, r"drop_rate must be a number in \[0, 1\)"),
    ({"drop_rate": -0.1}, r"drop_rate must be a number in \[0, 1\)"),
    ({"drop_rate": "half"}, r"drop_rate must be a number in \[0, 1\)"),
    ({"policy": "random"}, "policy must be one of"),
    ({"inner": "tvmm"}, "inner must be one of"),
    ({"seed": 1.5}, "seed must be an int"),
])
def test_bad_options_raise_value_error_naming_valid_choices(options, message):
    with pytest.raises(ValueError, match=message) as info:
        dropbp_fx.validate_options(options)
    if "unknown" in message:
        assert all(key in str(info.value) for key in ("drop_rate", "seed", "policy", "keep_one_open", "inner"))
    with pytest.raises(Exception, match=message):  # the same error through torch.compile
        torch.compile(Net(depth=1), backend="dropbp", options=options)(torch.randn(2, 16))


def test_graph_without_residual_branch_runs_unchanged_with_one_log_line(caplog):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    dbp = dropbp_fx.DropBP(inner="eager")
    with caplog.at_level(logging.INFO, logger="dropbp_fx"):
        out = torch.compile(model, backend=dbp)(torch.randn(3, 8))
    lines = [r.getMessage() for r in caplog.records if r.name.split(".")[0] == "dropbp_fx"]
    assert len(lines) == 1 and "no residual branch" in lines[0]
    assert dbp.gate_names == [] and out.shape == (3, 2)


def test_summary_names_gates_and_rates(caplog):
    dbp = dropbp_fx.DropBP(drop_rate=0.25, inner="eager")
    with caplog.at_level(logging.INFO, logger="dropbp_fx"):
        torch.compile(Net(depth=2), backend=dbp)(torch.randn(2, 16))
    assert any("2 residual branches gated (blocks.0.mlp, blocks.1.mlp)" in r.getMessage() for r in caplog.records)
    table = dbp.summary()
    assert "blocks.0.mlp" in table and "blocks.1.mlp" in table and "0.250" in table and "50.0%" in table


def _residual_fn(x, w0, w1, w2):
    h = torch.nn.functional.linear(x, w0)
    return h + torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(h, w1)), w2)


def _residual_fn_copy(x, w0, w1, w2):
    h = torch.nn.functional.linear(x, w0)
    return h + torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(h, w1)), w2)


def test_compiled_function_drops_when_its_trunk_trains():
    """A compiled function has no module to inspect: a weight that requires grad feeding the trunk
    (``w0`` here) means the only gate may be closed; it is not kept open every step."""
    x = torch.randn(4, 8)
    w = [torch.randn(8, 8, requires_grad=True) for _ in range(3)]
    dbp = dropbp_fx.DropBP(drop_rate=0.5, policy="bernoulli", inner="eager")
    compiled = torch.compile(_residual_fn, backend=dbp)
    for _ in range(50):
        compiled(x, *w).sum().backward()
    drops, calls = dbp.counts()["branch_add"]
    assert calls == 50 and 10 < drops < 40
    assert dbp.controller.trunk_trains()


def test_each_torch_compile_call_gets_its_own_state():
    x = torch.randn(4, 8)
    w = [torch.randn(8, 8, requires_grad=True) for _ in range(3)]
    first = torch.compile(_residual_fn, backend="dropbp", options={"drop_rate": 0.5, "inner": "eager"})
    second = torch.compile(_residual_fn_copy, backend="dropbp", options={"drop_rate": 0.5, "inner": "eager"})
    for _ in range(3):
        first(x, *w).sum().backward()
    second(x, *w).sum().backward()
    assert dropbp_fx.get_dropbp(first).step == 3
    assert dropbp_fx.get_dropbp(second).step == 1
