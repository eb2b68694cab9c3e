"""Sensitivities and calibration: the exact method equals the paper's definition computed with the hook
oracle, the fast one ranks like it, and neither leaves a trace (RNG, .grad, parameters, mode, steps)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dropbp_fx  # noqa: E402
from dropbp_fx.allocate import flops_weighted_rate  # noqa: E402
from dropbp_fx.testing import detached  # noqa: E402


def _spearman(a, b):
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0] * len(x)
        for k, i in enumerate(order):
            r[i] = k
        return r
    ra, rb, n = ranks(a), ranks(b), len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def _llama(layers=4):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2)).train()


def _compiled(model, **options):
    compiled = torch.compile(model, backend=dropbp_fx.DropBP(drop_rate=0.5, **options, inner="eager"))
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    compiled(**batch).loss.backward()  # compile, register the gates
    model.zero_grad(set_to_none=True)
    return compiled, batch


def _norms(model):
    return [0.0 if p.grad is None else float(p.grad.norm()) for p in model.parameters()]


def test_exact_sensitivity_is_the_papers_definition():
    model = _llama()
    reference_model = copy.deepcopy(model)
    compiled, batch = _compiled(model)
    exact, passes = dropbp_fx.sensitivities(compiled, batch, method="exact")
    assert passes == len(exact) + 1 == 9

    reference_model(**batch).loss.backward()
    g_ref = _norms(reference_model)
    for gate, value in exact.items():
        reference_model.zero_grad(set_to_none=True)
        with detached(reference_model, [gate]):
            reference_model(**batch).loss.backward()
        expected = sum((a - b) ** 2 for a, b in zip(g_ref, _norms(reference_model)))
        assert value == pytest.approx(expected, rel=1e-4)
    assert len(set(exact.values())) == len(exact)  # the gates really differ


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_fast_sensitivity_ranks_like_exact_with_one_backward(arch):
    torch.manual_seed(0)
    model = {
        "llama": lambda: _llama(layers=6),
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=96, n_embd=48, n_layer=6, n_head=4, bos_token_id=0, eos_token_id=0)).train(),
        "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=96, hidden_size=48, num_hidden_layers=6, num_attention_heads=4,
            intermediate_size=128)).train(),
    }[arch]()
    compiled, batch = _compiled(model)
    fast, fast_passes = dropbp_fx.sensitivities(compiled, batch, method="fast")
    exact, _ = dropbp_fx.sensitivities(compiled, batch, method="exact")
    names = list(exact)
    assert fast_passes == 1
    assert _spearman([fast[n] for n in names], [exact[n] for n in names]) >= 0.8


@pytest.mark.parametrize("method", ["fast", "exact"])
def test_calibration_leaves_no_trace(method):
    model = _llama()
    compiled, batch = _compiled(model)
    dbp = dropbp_fx.get_dropbp(compiled)
    compiled(**batch).loss.backward()  # user gradients that must survive
    grads_before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    assert any(g is not None for g in grads_before)
    params_before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(1234)
    random.seed(99)
    rng_torch, rng_py = torch.get_rng_state(), random.getstate()
    step = dbp.step
    counts = dbp.counts()

    dropbp_fx.calibrate(compiled, batch, target=0.75, method=method)

    assert torch.equal(torch.get_rng_state(), rng_torch) and random.getstate() == rng_py
    assert all((p.grad is None and g is None) or torch.equal(p.grad, g)
               for p, g in zip(model.parameters(), grads_before))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before))
    assert model.training and dbp.step == step and dbp.counts() == counts


def test_calibrate_applies_rates_that_meet_the_flops_budget():
    model = _llama()
    compiled, batch = _compiled(model)
    dbp = dropbp_fx.get_dropbp(compiled)
    table = dropbp_fx.calibrate(compiled, batch, target=0.75)
    rates = [row.rate for row in table]
    flops = [g.flops[1] for g in dbp.controller.gates]
    assert [row.gate for row in table] == dbp.gate_names
    assert list(dbp.rates.values()) == rates
    assert flops_weighted_rate(rates, flops) >= 0.75 - 1e-6
    assert len(set(round(r, 6) for r in rates)) > 1  # sensitivity-based: not uniform
    assert abs(sum(row.flops_share for row in table) - 1) < 1e-9
    assert "sensitivity" in str(table) and "fast" in str(table)
    compiled(**batch).loss.backward()  # trains with the new rates


def test_schedule_calibrates_once_at_ten_percent():
    model = _llama(layers=2)
    compiled, batch = _compiled(model)
    dbp = dropbp_fx.get_dropbp(compiled)
    schedule = dropbp_fx.CalibrationSchedule(compiled, total_steps=30, target=0.5)
    results = []
    for _ in range(30):
        results.append(schedule.step(batch))
        compiled(**batch).loss.backward()
    assert results[:3] == [None] * 3 and results[3] is not None
    assert all(r is results[3] for r in results[3:])
    assert list(dbp.rates.values()) == [row.rate for row in results[3]]


def test_calibration_errors_name_the_problem():
    model = _llama(layers=2)
    compiled, batch = _compiled(model)
    with pytest.raises(ValueError, match="method must be one of"):
        dropbp_fx.sensitivities(compiled, batch, method="fastest")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        dropbp_fx.calibrate(compiled, batch)


def test_fast_sensitivity_with_tied_embeddings_after_training():
    """Regression (found by benchmarks/calibration.py): GPT-2 ties its input embeddings to the output head;
    the head's large gradient on that weight must not count as 'upstream' of every branch."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=258, n_embd=64, n_layer=6, n_head=4, bos_token_id=0, eos_token_id=0)).train()
    assert model.transformer.wte.weight is model.lm_head.weight
    compiled = torch.compile(model, backend=dropbp_fx.DropBP(drop_rate=0.0, inner="eager"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(11):
        ids = torch.randint(0, 258, (4, 32), generator=g)
        batch = {"input_ids": ids, "labels": ids}
        compiled(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    fast, _ = dropbp_fx.sensitivities(compiled, batch, method="fast")
    exact, _ = dropbp_fx.sensitivities(compiled, batch, method="exact")
    assert _spearman([fast[n] for n in exact], [exact[n] for n in exact]) >= 0.8
