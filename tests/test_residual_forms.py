"""What a closed gate closes in residual forms beyond ``x + f(x)`` (docs/residuals.md): each form written twice,
once as a model and once with the documented branch value ``.detach()``ed by hand (the reference), and the
backend's gradients equal the reference's for every mask."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropbp_fx
from dropbp_fx.testing import assert_same_grads, grads

D = 8


def _mlp():
    return nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))


class Interpolating(nn.Module):
    """nGPT / Dory: ``h + a * (f(h) - h)``. The gate closes ``a * (f(h) - h)`` whole: ``f`` and ``a`` get no
    gradient, the skip carries the identity."""

    def __init__(self):
        super().__init__()
        self.f, self.a = _mlp(), nn.Parameter(torch.full((D,), 0.3))

    def forward(self, h, closed=False):
        branch = self.a * (self.f(h) - h)
        return F.normalize(h + (branch.detach() if closed else branch), dim=-1)


class ScaledBias(nn.Module):
    """Zaya's residual scaling: ``(f(x) + b) * s + (x + c) * t``. The gate closes ``(f(x) + b) * s``: ``f``, ``b``
    and ``s`` get no gradient; ``c`` and ``t`` (the skip's own scaling) keep theirs."""

    def __init__(self):
        super().__init__()
        self.f = _mlp()
        self.b, self.s, self.c, self.t = (nn.Parameter(torch.randn(D) * 0.1 + (i % 2)) for i in range(4))

    def forward(self, x, closed=False):
        branch = (self.f(x) + self.b) * self.s
        return (branch.detach() if closed else branch) + (x + self.c) * self.t


class SharedGate(nn.Module):
    """Ergo: ``g(w) * f(x) + r(w) * x`` with one weight ``w``. The gate closes ``g(w) * f(x)``: ``f`` gets no
    gradient and ``w`` only the skip's ``r(w) * x`` part."""

    def __init__(self):
        super().__init__()
        self.f, self.w = _mlp(), nn.Parameter(torch.zeros(D))

    def forward(self, x, closed=False):
        branch = torch.sigmoid(self.w) * self.f(x)
        return (branch.detach() if closed else branch) + (1 - torch.sigmoid(self.w)) * x


class StreamScaled(nn.Module):
    """HY-V4: ``x + s(x) * f(x)``, ``s`` a light factor computed from the stream beside ``f``. The gate closes
    ``f`` alone: ``s`` keeps its gradient (see DeepSeek-V4's hyper-connections, tests/test_properties.py)."""

    def __init__(self):
        super().__init__()
        self.f, self.gate = _mlp(), nn.Linear(D, 1)

    def forward(self, x, closed=False):
        out = self.f(x)
        return x + torch.sigmoid(self.gate(x)) * (out.detach() if closed else out)


class Net(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.inp, self.out = nn.Linear(D, D), nn.Linear(D, 1)
        self.blocks = nn.ModuleList(block() for _ in range(2))

    def forward(self, x, closed=()):
        h = self.inp(x)
        for i, block in enumerate(self.blocks):
            h = block(h, closed=i in closed)
        return self.out(h).pow(2).mean()


@pytest.mark.parametrize("block", [Interpolating, ScaledBias, SharedGate, StreamScaled])
def test_closed_gate_closes_the_documented_branch(block):
    torch.manual_seed(0)
    net = Net(block).double()
    reference = copy.deepcopy(net)
    x = torch.randn(4, D, dtype=torch.double)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager", policy="bernoulli", keep_one_open=False)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend=dbp)
    compiled(x)
    assert dbp.gate_names == ["blocks.0.f", "blocks.1.f"]
    for closed in itertools.chain.from_iterable(itertools.combinations(range(2), k) for k in range(3)):
        dbp.set_rates({g: (1 - 1e-12 if int(g.split(".")[1]) in closed else 0.0) for g in dbp.gate_names})
        net.zero_grad(set_to_none=True), reference.zero_grad(set_to_none=True)
        compiled(x).backward()
        reference(x, closed=closed).backward()
        assert_same_grads(grads(net), grads(reference), rtol=1e-9, atol=1e-12)
    torch._dynamo.reset()


class GlobalAttention(nn.Module):
    """The tokens attend to themselves and to the global tokens ``g``."""

    def __init__(self):
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, D)

    def forward(self, x, g):
        k, v = self.kv(torch.cat([x, g], dim=1)).chunk(2, dim=-1)
        return self.o(torch.softmax(self.q(x) @ k.transpose(1, 2) / D ** 0.5, dim=-1) @ v)


class GlobalTokens(nn.Module):
    """PEGASUS-X's global tokens, reduced: the trunk computes them once from their embedding and every layer's
    attention branch reads them; nothing else does. On a step that closes every ``attn``, the embedding gets no
    gradient (``None``), as in the eager model with those branches detached. In this model autograd never runs the
    trunk segment's backward for it (PEGASUS-X, where a compiled segment does hand it zeros, is checked in
    tests/test_catalogue.py); here the test pins what the branch-only pass finds and the oracle on every mask."""

    def __init__(self, layers=2):
        super().__init__()
        self.inp, self.out = nn.Linear(D, D), nn.Linear(D, 1)
        self.embed_global = nn.Embedding(3, D)
        self.attn = nn.ModuleList(GlobalAttention() for _ in range(layers))
        self.mlp = nn.ModuleList(_mlp() for _ in range(layers))

    def forward(self, x, closed=frozenset()):
        h = self.inp(x)
        g = self.embed_global.weight.unsqueeze(0).expand(x.shape[0], -1, -1) * 2.0
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            a = attn(h, g)
            h = h + (a.detach() if f"attn.{i}" in closed else a)
            m = mlp(h)
            h = h + (m.detach() if f"mlp.{i}" in closed else m)
        return self.out(h).pow(2).mean()


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_trunk_parameter_read_only_by_closed_branches_gets_no_gradient(inner):
    torch.manual_seed(0)
    net = GlobalTokens().double()
    reference = copy.deepcopy(net)
    x = torch.randn(2, 5, D, dtype=torch.double)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner=inner, policy="bernoulli", keep_one_open=False)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend=dbp)
    compiled(x)
    gates = ["attn.0", "attn.1", "mlp.0", "mlp.1"]
    assert sorted(dbp.gate_names) == gates
    assert dict(dbp.branch_only.names) == {"embed_global.weight": frozenset(
        dbp.gate_names.index(g) for g in ("attn.0", "attn.1"))}
    tol = dict(rtol=1e-9, atol=1e-12) if inner != "inductor" else dict(rtol=1e-6, atol=1e-9)
    for k in range(len(gates) + 1):
        for closed in itertools.combinations(gates, k):
            dbp.set_rates({g: (1 - 1e-12 if g in closed else 0.0) for g in dbp.gate_names})
            net.zero_grad(set_to_none=True), reference.zero_grad(set_to_none=True)
            compiled(x).backward()
            reference(x, closed=closed).backward()
            assert_same_grads(grads(net), grads(reference), **tol)
    # gradient accumulation: a gradient from an earlier micro-step is kept, whatever this step closes
    dbp.set_rates(0.0)
    net.zero_grad(set_to_none=True)
    compiled(x).backward()
    before = net.embed_global.weight.grad.clone()
    dbp.set_rates(1 - 1e-12)
    compiled(x).backward()
    torch.testing.assert_close(net.embed_global.weight.grad, before)
    torch._dynamo.reset()


def test_gates_on_every_path_skips_paths_that_end_nowhere():
    """A gate whose output the graph drops (PEGASUS-X's last global-stream branch) is not on a gradient path;
    a path to the output without a gate makes the answer ``None``."""
    from dropbp_fx.passes.grad_paths import gates_on_every_path

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.g0, self.g1, self.dead = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

        def forward(self, h, w, v):
            e, u = w * 2.0, v * 3.0
            h = h + self.g0(h + e)
            unused = e + self.dead(e)  # a stream the graph computes and drops
            h = h + self.g1(h * e)
            return h + u

    gm = torch.fx.symbolic_trace(Net())  # the tracer keeps the dropped stream
    nodes = {n.name: n for n in gm.graph.nodes}
    found = gates_on_every_path(gm, [nodes["w"], nodes["v"], nodes["h"]], lambda n: n.op == "call_module")
    assert found[nodes["w"]] == frozenset({nodes["g0"], nodes["g1"]})
    assert found[nodes["v"]] is None and found[nodes["h"]] is None


def test_gates_on_every_path_follows_an_in_place_write_into_an_intermediate():
    """Gemma3n's ``per_layer_projection *= scale``: a write into a value the graph made (no view) reaches that
    value's later readers only, so the path goes on; a write into an input may be read elsewhere (``None``)."""
    from dropbp_fx.passes.grad_paths import gates_on_every_path

    class Record(torch.fx.Interpreter):  # each node's value in its meta, as Dynamo's graphs have them
        def run_node(self, n):
            n.meta["val"] = super().run_node(n)
            return n.meta["val"]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.g0 = nn.Linear(D, D)

        def forward(self, h, w, v):
            e = w * 2.0
            e.mul_(3.0)  # an intermediate: fine
            v.mul_(3.0)  # an input: a sink
            return h + self.g0(h * e * v)

    gm = torch.fx.symbolic_trace(Net())
    Record(gm).run(*(torch.randn(2, D) for _ in range(3)))
    nodes = {n.name: n for n in gm.graph.nodes}
    found = gates_on_every_path(gm, [nodes["w"], nodes["v"]], lambda n: n.op == "call_module")
    assert found[nodes["w"]] == frozenset({nodes["g0"]})
    assert found[nodes["v"]] is None


class NoGradSteps(nn.Module):
    """HRM's recurrence: the first steps run under ``torch.no_grad()``, only the last one trains."""

    def __init__(self):
        super().__init__()
        self.f, self.g = _mlp(), _mlp()

    def forward(self, x, closed=frozenset()):
        with torch.no_grad():
            for _ in range(2):
                x = x + self.f(x)
        f = self.f(x)
        x = x + (f.detach() if "f#2" in closed else f)
        g = self.g(x)
        return (x + (g.detach() if "g" in closed else g)).pow(2).mean()


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_branches_under_no_grad_are_not_gated_and_grad_mode_is_kept(inner):
    """A residual add under ``torch.no_grad()`` has no backward: it is skipped (not gated), so no compiled piece
    ends inside the region (a piece restores the grad mode it was entered with: grad stayed off after the
    call), and the gradients of the trained steps equal the hook-free reference for every mask."""
    torch.manual_seed(0)
    net = NoGradSteps().double()
    reference = copy.deepcopy(net)
    x = torch.randn(2, 5, D, dtype=torch.double)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner=inner, policy="bernoulli", keep_one_open=False)
    compiled = torch.compile(net, backend=dbp)
    compiled(x).backward()
    assert torch.is_grad_enabled()
    assert dbp.gate_names == ["f#2", "g"]
    assert any("torch.no_grad()" in reason for record in dbp.graphs for _, _, reason in record.skipped)
    for k in range(2):  # both closed: nothing the loss reads trains (no backward, as in the reference)
        for closed in itertools.combinations(dbp.gate_names, k):
            dbp.set_rates({g: (1 - 1e-12 if g in closed else 0.0) for g in dbp.gate_names})
            net.zero_grad(set_to_none=True), reference.zero_grad(set_to_none=True)
            loss = compiled(x)
            assert torch.is_grad_enabled() and loss.requires_grad
            loss.backward()
            reference(x, closed=closed).backward()
            assert_same_grads(grads(net), grads(reference), rtol=1e-9, atol=1e-12)
    torch._dynamo.reset()
