"""DropBP under TRL's trainers (built on transformers' ``Trainer``): real ``SFTTrainer.train()`` and
``DPOTrainer.train()`` runs on a tiny Llama, with a tokenizer built offline and data made here."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import dropbp_fx  # noqa: E402
from dropbp_fx.integrations import DropBPCallback  # noqa: E402

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "log", "a", "big", "small", "red", "blue", "and", "yes", "no"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    fast.chat_template = None
    return fast


def _llama(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return transformers.LlamaForCausalLM(config)


def _sentences(n, seed):
    g = torch.Generator().manual_seed(seed)
    pattern = ["the", "cat", "sat", "on", "the", "mat", "and", "the", "dog", "ran"]
    out = []
    for _ in range(n):
        start = int(torch.randint(0, 4, (1,), generator=g))
        out.append(" ".join(pattern[start:start + 6]))
    return out


def _common(tmp_path, steps, **defaults):
    return dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-3,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0, **({"gradient_checkpointing": False} | defaults))


def _logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer(tmp_path):
    torch._dynamo.reset()
    tokenizer = _tokenizer()
    data = datasets.Dataset.from_dict({"text": _sentences(64, 0)})
    callback = DropBPCallback(drop_rate=0.5, calibrate="fast", calibrate_at=0.25, inner="eager")
    config = trl.SFTConfig(**_common(tmp_path, 16), max_length=16, packing=False)
    trainer = trl.SFTTrainer(model=_llama(tokenizer), args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[callback])
    trainer.train()
    dbp = dropbp_fx.get_dropbp(trainer.model)
    assert dbp.gate_names == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp")]
    logs = _logs(trainer)
    assert len(logs) == 16 and sum(h["loss"] for h in logs[-4:]) < 0.7 * sum(h["loss"] for h in logs[:4])
    assert all("dropbp_drop_fraction" in h and "dropbp_bwd_flops_saved" in h for h in logs)
    assert 0.2 < sum(h["dropbp_drop_fraction"] for h in logs) / len(logs) < 0.8
    assert callback.calibrated and (tmp_path / "dropbp_gates.png").exists()


def test_sft_trainer_with_trls_default_gradient_checkpointing(tmp_path):
    """TRL's own default (gradient checkpointing on): the checkpointed layers are gated, calibration runs."""
    torch._dynamo.reset()
    tokenizer = _tokenizer()
    data = datasets.Dataset.from_dict({"text": _sentences(64, 0)})
    callback = DropBPCallback(drop_rate=0.5, calibrate="fast", inner="eager")
    common = _common(tmp_path, 16)
    del common["gradient_checkpointing"]  # as TRL sets it
    config = trl.SFTConfig(**common, max_length=16, packing=False)
    assert config.gradient_checkpointing  # TRL's default, which this test is about
    trainer = trl.SFTTrainer(model=_llama(tokenizer), args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[callback])
    trainer.train()
    assert trainer.model.is_gradient_checkpointing
    dbp = dropbp_fx.get_dropbp(trainer.model)
    assert len(dbp.gate_names) == 4 and all(n.endswith(("self_attn", "mlp")) for n in dbp.gate_names), dbp.gate_names
    logs = _logs(trainer)
    assert len(logs) == 16 and callback.calibrated
    assert 0.3 < sum(h["dropbp_drop_fraction"] for h in logs) / len(logs) < 0.7


def test_dpo_trainer_gates_the_policy_only_one_mask_per_step(tmp_path):
    torch._dynamo.reset()
    tokenizer = _tokenizer()
    prompts = _sentences(32, 1)
    data = datasets.Dataset.from_dict({"prompt": [" ".join(p.split()[:3]) for p in prompts],
                                       "chosen": [" ".join(p.split()[3:]) for p in prompts],
                                       "rejected": ["no no no" for _ in prompts]})
    callback = DropBPCallback(drop_rate=0.5, calibrate=None, inner="eager")
    config = trl.DPOConfig(**_common(tmp_path, 8), max_length=16, beta=0.1)
    policy = _llama(tokenizer)
    trainer = trl.DPOTrainer(model=policy, ref_model=_llama(tokenizer), args=config, train_dataset=data,
                             processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    dbp = callback.dropbp
    assert dropbp_fx.get_dropbp(trainer.model) is dbp
    # chosen and rejected go through the policy in one forward per step: one mask per step, each gate called
    # once per step; the reference model runs without grad and is never gated
    assert dbp.step == 8 and all(calls == 8 for _, calls in dbp.counts().values())
    assert len(dbp.gate_names) == 4
    with pytest.raises(LookupError):
        dropbp_fx.get_dropbp(trainer.ref_model)
    logs = _logs(trainer)
    assert len(logs) == 8 and all("dropbp_drop_fraction" in h for h in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
