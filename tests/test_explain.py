"""``dropbp_fx.explain``: the gates, skipped adds and graph breaks, as data and as text, without training."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import dropbp_fx

transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


class BrokenNet(nn.Module):
    """Two residual branches with a graph break between them, a BatchNorm, and a non-residual add."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(8, 8), nn.Linear(8, 32), nn.BatchNorm1d(8)
        self.c = nn.Linear(32, 8)

    def forward(self, x):
        x = x + self.a(x)
        torch._dynamo.graph_break()
        x = self.bn(x + self.c(torch.relu(self.b(x))))
        return x + 1.0


def test_llama_gates_flops_and_skipped_adds():
    model = _llama().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 96, (2, 10))
    rng = torch.get_rng_state(), random.getstate()
    report = dropbp_fx.explain(model, input_ids=ids, labels=ids, options={"drop_rate": 0.75})

    names = [g.name for g in report.gates]
    assert names == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp")]
    assert sum(g.flops_share for g in report.gates) == pytest.approx(1.0)
    attn, mlp = report.gates[0], report.gates[1]
    assert mlp.flops_share > attn.flops_share > 0  # intermediate 64 vs hidden 32 at seq 10
    assert all(g.rate == 0.75 for g in report.gates)
    assert attn.params == 32 * 32 * 2 + 32 * 16 * 2 + 32  # q, o; k, v (2 KV heads); the input norm
    reasons = {s.reason for s in report.skipped}
    assert any("Python constant" in r for r in reasons)  # the norms' eps
    assert any(s.module == "model.layers.0.self_attn" and "no matmul" in s.reason for s in report.skipped)  # RoPE
    assert report.graph_breaks == [] and report.graphs == 1

    # no trace left: mode, parameters, gradients, RNG
    assert not model.training
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]

    text = str(report)
    assert "model.layers.1.mlp" in text and "bwd FLOPs share" in text and "0.750" in text
    assert "4 gates in 1 graph(s), 0 graph break(s)" in text


def test_graph_break_buffers_and_frames():
    net = BrokenNet()
    running = net.bn.running_mean.clone()
    report = dropbp_fx.explain(net, torch.randn(4, 8))
    assert [g.name for g in report.gates] == ["a", "{b,c}"]  # a branch over two sibling modules names both
    assert report.graphs == 2
    assert len(report.graph_breaks) == 1 and "graph_break" in report.graph_breaks[0]
    assert torch.equal(net.bn.running_mean, running)  # BatchNorm statistics put back
    assert "1 graph break(s)" in str(report)


def test_model_without_residual_branch():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    report = dropbp_fx.explain(mlp, torch.randn(3, 4))
    assert report.gates == []
    assert "no residual branch found" in str(report)
    assert any("no residual branch" in n for n in report.notes)


def test_explain_accepts_a_compiled_model_and_rejects_other_things():
    net = BrokenNet()
    report = dropbp_fx.explain(torch.compile(net, backend="eager"), torch.randn(4, 8))
    assert len(report.gates) == 2
    with pytest.raises(TypeError, match="explain takes the \\(uncompiled\\) model"):
        dropbp_fx.explain(lambda x: x, torch.randn(2))
    with pytest.raises(ValueError, match="unknown option"):
        dropbp_fx.explain(net, torch.randn(4, 8), options={"droprate": 0.5})


def test_gate_plot_grows_with_the_gates(tmp_path):
    """``DropBP.plot``: one readable row per gate (the figure grows with the gate count), or a clear error."""
    import struct

    pytest.importorskip("matplotlib")

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))

        def forward(self, x):
            x = x + self.attn(x)
            return x + self.mlp(x)

    heights = {}
    for layers in (2, 32):
        torch._dynamo.reset()
        dbp = dropbp_fx.DropBP(0.5, inner="eager")
        compiled = torch.compile(nn.Sequential(*(Layer() for _ in range(layers))), backend=dbp)
        for _ in range(3):
            compiled(torch.randn(4, 8)).sum().backward()
        png = (tmp_path / f"{layers}.png")
        assert dbp.plot(str(png)) == str(png)
        heights[layers] = struct.unpack(">II", png.read_bytes()[16:24])[1]
    assert len(dbp.gate_names) == 64 and heights[32] > 4 * heights[2]
    with pytest.raises(ValueError, match="no gates yet"):
        dropbp_fx.DropBP(inner="eager").plot(str(tmp_path / "none.png"))
    torch._dynamo.reset()


def test_explain_says_what_a_closed_gate_takes_the_gradient_from():
    """Per gate, the parameters a closed gate takes the gradient from, grouped across layers: a Llama's
    projections and the norm before them; for DeepSeek-V4's hyper-connection (``post * f(pre . H) + comb^T @ H``)
    ``f``'s modules and the
    ``pre`` slice's bias, never the projection ``fn`` that ``post`` and ``comb`` are computed from (trunk)."""
    from tests import random_nets as rn
    from tests.test_properties import EXAMPLES

    model = _llama()
    ids = torch.randint(0, 96, (2, 8))
    text = str(dropbp_fx.explain(model, input_ids=ids, labels=ids))
    assert ("model.layers.*.self_attn (2 gates): model.layers.*.input_layernorm.weight, k_proj, o_proj, q_proj, "
            "v_proj") in text, text
    mlp = "model.layers.*.mlp (2 gates): down_proj, gate_proj, up_proj, model.layers.*.post_attention_layernorm"
    assert mlp in text, text

    torch._dynamo.reset()
    net, _ = rn.build(EXAMPLES["hyper_connection"])
    report = dropbp_fx.explain(net, *net.inputs())
    hyper = [g for g in report.gates if g.name.endswith(".f")]
    assert hyper, [g.name for g in report.gates]
    for g in hyper:
        assert any(".f." in n for n in g.reads) and not any(n.endswith(".fn") for n in g.reads), g.reads
    assert "blocks.*.f: blocks.*.base, fc1, fc2, norm_in" in str(report), str(report)
    torch._dynamo.reset()
