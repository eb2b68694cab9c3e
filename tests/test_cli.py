"""``python -m dropbp_fx explain MODEL``: a model type, a local directory, a factory, and a model with nothing to gate."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import dropbp_fx
from dropbp_fx import cli

transformers = pytest.importorskip("transformers")


def no_residual_model():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(2, 8),)


def residual_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

        def forward(self, x):
            return (x + self.mlp(x)).sum()

    return Net(), (torch.randn(2, 8),)


def test_model_type(capsys):
    torch._dynamo.reset()
    assert cli.main(["explain", "llama", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [g["name"] for g in report["gates"]]
    assert names[:2] == ["model.layers.0.self_attn", "model.layers.0.mlp"] and len(names) == 4
    assert sum(g["flops_share"] for g in report["gates"]) == pytest.approx(1.0)
    assert report["model"].startswith("LlamaForCausalLM (tiny, random init")


def test_local_directory(tmp_path, capsys):
    torch._dynamo.reset()
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dropbp_fx.DropBPWarning)
        assert cli.main(["explain", str(tmp_path)]) == 0
    # the loss graph after the break has no residual branch: a line of the report, no warning (the model is gated)
    assert not [w for w in caught if issubclass(w.category, dropbp_fx.DropBPWarning)], [str(w.message) for w in caught]
    out = capsys.readouterr().out
    assert "no residual branch" in out
    assert out.startswith(f"GPT2LMHeadModel from {tmp_path}")
    assert "transformer.h.0.attn" in out and "transformer.h.1.mlp" in out and "bwd FLOPs share" in out
    # Regression: transformers breaks the graph at its loss (a logging call); the KV cache the attention returns
    # and the logits of lm_head leave the graph there, but no residual branch was cut (all four are gated)
    assert "cut by a graph break" not in out


def test_factory_and_a_model_with_nothing_to_gate(capsys):
    torch._dynamo.reset()
    assert cli.main(["explain", "tests.test_cli:residual_model"]) == 0
    assert "mlp" in capsys.readouterr().out
    torch._dynamo.reset()
    assert cli.main(["explain", "tests.test_cli:no_residual_model"]) == 1
    err = capsys.readouterr().err
    assert "nothing in tests.test_cli:no_residual_model would be gated" in err


def test_bad_model_argument_exits_2(capsys):
    assert cli.main(["explain", "no-such-type"]) == 2
    assert "neither a directory, nor module:factory, nor a transformers model type" in capsys.readouterr().err
    assert cli.main(["explain", "tests.test_cli:missing"]) == 2
    assert "cannot load" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "dropbp_fx", "explain", "tests.test_cli:no_residual_model"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "would be gated" in out.stderr, out.stderr[-2000:]
