"""transformers ``Trainer`` with ``DropBPCallback``: real ``Trainer.train()`` runs on a tiny Llama."""

from __future__ import annotations

import json
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dropbp_fx  # noqa: E402
from dropbp_fx.integrations import DropBPCallback  # noqa: E402

VOCAB = 64


def _model(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False))


def _dataset(n=64, seq=16):
    """A learnable toy language: each row counts up from a random start, modulo the vocabulary."""
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (starts + torch.arange(seq)) % VOCAB
    return [{"input_ids": row, "labels": row} for row in ids]


def _args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                  dataloader_num_workers=0, seed=0)
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def _gpt2(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False))


def _train(tmp_path, callback, model=None, **overrides):
    trainer = transformers.Trainer(model=model or _model(), args=_args(tmp_path, **overrides), train_dataset=_dataset(),
                                   callbacks=[callback])
    trainer.train()
    return trainer


def _train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_trainer_trains_with_dropbp_and_logs_its_fields(tmp_path):
    callback = DropBPCallback(drop_rate=0.5, calibrate="fast", calibrate_at=0.25, inner="eager")
    trainer = _train(tmp_path, callback)

    dbp = dropbp_fx.get_dropbp(trainer.model)
    assert dbp is callback.dropbp
    assert dbp.gate_names == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp")]
    assert dbp.step == 20 + 0  # one mask per training forward; calibration draws none

    logs = _train_logs(trainer)
    assert len(logs) == 20
    first, last = sum(h["loss"] for h in logs[:4]) / 4, sum(h["loss"] for h in logs[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    fractions = [h["dropbp_drop_fraction"] for h in logs]
    saved = [h["dropbp_bwd_flops_saved"] for h in logs]
    assert all(0.0 <= f <= 1.0 for f in fractions + saved)
    total_dropped = sum(d for d, _ in dbp.counts().values())
    assert sum(fractions) * 4 == pytest.approx(total_dropped)  # 4 gate calls per step, one log per step
    assert 0.3 < sum(fractions) / len(fractions) < 0.8

    # calibrated at step 5: per-gate rates, FLOPs-weighted to the target
    assert callback.calibrated and len(callback.calibration) == 4
    assert len(set(dbp.rates.values())) > 1
    flops = {g.name: g.flops[1] for g in dbp.controller.gates}
    weighted = sum(dbp.rates[n] * f for n, f in flops.items()) / sum(flops.values())
    assert weighted == pytest.approx(0.5, abs=0.01)
    # the FLOPs saved per log line follow the mask: a line with drops saved a positive share
    assert all((f > 0) == (s > 0) for f, s in zip(fractions, saved))
    # the picture of the gates, in the output directory
    png = (tmp_path / "dropbp_gates.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_callback_defaults_are_the_recommended_configuration(tmp_path):
    """Without options the callback runs drop_rate="auto" with lr_scale (docs/schedules.md): the automatic rule
    chooses the target at the calibration, and the learning-rate compensation reaches the optimizer the Trainer
    steps (accelerate's AcceleratedOptimizer wraps it; the hooks go on the torch optimizer inside)."""
    callback = DropBPCallback(calibrate_at=0.25, inner="eager")
    assert callback.options["drop_rate"] == "auto" and callback.options["optimizer_mode"] == "lr_scale"
    trainer = _train(tmp_path, callback)
    dbp = callback.dropbp
    [link] = dbp.optimizer_links
    assert link.mode == "lr_scale" and type(link.optimizer).__module__.startswith("torch.optim")
    assert link.optimizer is trainer.optimizer.optimizer
    assert link.scaled_steps > 0
    assert callback.calibrated and callback.calibration.auto is not None  # the rule chose the target


def test_gradient_accumulation_draws_a_mask_per_micro_batch(tmp_path):
    callback = DropBPCallback(drop_rate=0.5, calibrate=None, inner="eager")
    trainer = _train(tmp_path, callback, max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    dbp = callback.dropbp
    assert dbp.step == 12
    assert all(calls == 12 for _, calls in dbp.counts().values())
    assert len(_train_logs(trainer)) == 6


def test_gradient_checkpointing_puts_gates_inside_the_layers(tmp_path):
    callback = DropBPCallback(drop_rate=0.5, calibrate="fast", calibrate_at=0.5, inner="eager")
    # GPT-2: with transformers 5.25, Dynamo breaks the graph inside each checkpointed Llama layer
    # (tests/test_inner.py::test_gradient_checkpointing_gates_inside_checkpointed_layers)
    trainer = _train(tmp_path, callback, model=_gpt2(), max_steps=6, gradient_checkpointing=True)
    dbp = callback.dropbp
    assert trainer.model.is_gradient_checkpointing
    assert len(dbp.gate_names) == 4
    assert dbp.step == 6  # the recompute in backward draws no new mask
    assert all(calls == 6 for _, calls in dbp.counts().values())
    assert callback.calibrated


@pytest.mark.parametrize("trainer_restores", [False, True], ids=["from-trainer-state", "restore-callback-flag"])
def test_resume_from_checkpoint_restores_the_drop_state(tmp_path, trainer_restores):
    callback = DropBPCallback(drop_rate=0.5, calibrate="fast", calibrate_at=0.25, inner="eager")
    _train(tmp_path, callback, max_steps=8, save_strategy="steps", save_steps=4)
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    state = saved["stateful_callbacks"]["DropBPCallback"]
    assert state["attributes"]["_resume_state"]["step"] == 4
    assert state["attributes"]["calibrated"] is True

    torch._dynamo.reset()
    resumed = DropBPCallback(drop_rate=0.5, calibrate="fast", calibrate_at=0.25, inner="eager")
    trainer = transformers.Trainer(model=_model(), args=_args(tmp_path, max_steps=8, save_strategy="no",
                                                                   restore_callback_states_from_checkpoint=trainer_restores),
                                   train_dataset=_dataset(), callbacks=[resumed])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    restored = next(c for c in trainer.callback_handler.callbacks if isinstance(c, DropBPCallback))
    assert restored.calibrated  # not calibrated a second time
    assert restored.dropbp.step == 8
    assert restored.dropbp.rates == callback.dropbp.rates  # the calibrated rates came back
    assert restored.dropbp.last_mask == callback.dropbp.last_mask  # and step 8 drew the same mask


def test_torch_compile_flag_is_refused_with_the_recipe(tmp_path):
    callback = DropBPCallback(drop_rate=0.5, inner="eager")
    with pytest.raises(ValueError, match="remove torch_compile=True"):
        transformers.Trainer(model=_model(), args=_args(tmp_path, torch_compile=True, torch_compile_backend="inductor"),
                             train_dataset=_dataset(), callbacks=[callback]).train()


def test_accelerate_refuses_the_backend_name(tmp_path):
    """Why the callback exists: the flag route ends in accelerate's DynamoBackend enum."""
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        transformers.Trainer(model=_model(), args=_args(tmp_path, torch_compile=True, torch_compile_backend="dropbp"),
                             train_dataset=_dataset())


@pytest.mark.parametrize("kwargs, message", [
    (dict(drop_rate=1.0), r"drop_rate"),
    (dict(calibrate="slow"), r"calibrate must be one of \('fast', 'exact'\) or None"),
    (dict(calibrate_at=1.5), r"calibrate_at is a fraction"),
])
def test_bad_callback_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DropBPCallback(**kwargs)


def test_calibration_logs_its_table(tmp_path, caplog):
    callback = DropBPCallback(drop_rate=0.75, calibrate="fast", calibrate_at=0.0, inner="eager")
    with caplog.at_level(logging.INFO, logger="dropbp_fx"):
        _train(tmp_path, callback, max_steps=2)
    assert any("calibrated at step" in r.getMessage() and "bwd FLOPs share" in r.getMessage()
               for r in caplog.records)


class _NoResidual(torch.nn.Module):
    """A model with nothing to gate (no residual add), in the Trainer's calling convention."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = torch.nn.Embedding(VOCAB, 16), torch.nn.Linear(16, VOCAB)

    def forward(self, input_ids, labels=None):
        logits = self.out(torch.tanh(self.emb(input_ids)))
        return {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


def test_a_model_with_no_gate_is_refused_at_the_first_step_not_at_calibration(tmp_path):
    """calibrate_at=0.5 of 20 steps: without the first-step check the run died at step 10 (LookupError)."""
    torch._dynamo.reset()
    callback = DropBPCallback(drop_rate=0.5, calibrate="fast", calibrate_at=0.5, inner="eager")
    trainer = transformers.Trainer(model=_NoResidual(), args=_args(tmp_path), train_dataset=_dataset(),
                                   callbacks=[callback])
    with pytest.raises(RuntimeError, match=r"first training step reached no residual branch.*on_no_gates='warn'"):
        trainer.train()
    assert trainer.state.global_step == 1


def test_on_no_gates_warn_trains_without_dropbp(tmp_path):
    torch._dynamo.reset()
    callback = DropBPCallback(drop_rate=0.5, calibrate="fast", calibrate_at=0.5, inner="eager", on_no_gates="warn")
    with pytest.warns(dropbp_fx.DropBPWarning, match="first training step reached no residual branch"):
        trainer = _train(tmp_path, callback, model=_NoResidual())
    assert trainer.state.global_step == 20 and not callback.calibrated
    with pytest.raises(ValueError, match="on_no_gates must be one of"):
        DropBPCallback(on_no_gates="ignore")
