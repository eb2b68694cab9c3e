"""PEFT: LoRA models get the base model's gates, and the adapters get exactly the oracle's gradients."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import dropbp_fx  # noqa: E402
from dropbp_fx.testing import assert_same_grads, detached, grads  # noqa: E402

VOCAB = 96


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


# factory, LoRA target modules (attention and MLP projections), gate suffixes per layer, layer path
CASES = {
    "llama": (_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              ["self_attn", "mlp"], "model.layers"),
    "gpt2": (_gpt2, ["c_attn", "c_proj", "c_fc"], ["attn", "mlp"], "transformer.h"),  # Conv1D, fan_in_fan_out
}


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def _steps_against_the_oracle(model, inner: str, steps: int = 4):
    """Train ``model`` through ``backend=dropbp`` (rate 0.5) and, each step, the eager oracle with the same
    gates' modules detached: yields ``(dbp, dropped, out, ref, grads, oracle grads)``."""
    oracle = copy.deepcopy(model)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, seed=11, inner=inner)
    compiled = torch.compile(model, backend=dbp)
    for step in range(steps):
        batch = _batch(step)
        model.zero_grad(set_to_none=True)
        out = compiled(**batch)
        out.loss.backward()
        dropped = [g for g, d in dbp.last_mask.items() if d]
        oracle.zero_grad(set_to_none=True)
        with detached(oracle, dropped):
            ref = oracle(**batch)
        ref.loss.backward()
        yield dbp, dropped, out, ref, grads(model), grads(oracle)


def _base_gates(factory):
    torch.manual_seed(0)
    dbp = dropbp_fx.DropBP(drop_rate=0.0, inner="eager")
    compiled = torch.compile(factory().train(), backend=dbp)
    compiled(**_batch(0)).loss.backward()
    return dbp.gate_names


@pytest.mark.parametrize("arch", sorted(CASES))
def test_lora_gates_and_oracle_gradients(arch):
    factory, targets, suffixes, layers = CASES[arch]
    base_gates = _base_gates(factory)
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                             fan_in_fan_out=arch == "gpt2")
    model = peft.get_peft_model(factory(), config).train()
    for name, p in model.named_parameters():  # LoRA's B starts at zero; make gradients reach A as well
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    mixed = 0
    for dbp, dropped, out, ref, got, want in _steps_against_the_oracle(model, "eager"):
        mixed += 0 < len(dropped) < len(dbp.gate_names)
        assert torch.equal(out.logits, ref.logits)
        lora = {n for n in want if "lora_" in n}
        assert len(lora) == 2 * len(targets) * 3 if arch == "llama" else len(lora) > 0
        assert_same_grads(got, want)
        for gate in dropped:  # the adapters inside a dropped branch get no gradient at all
            inside = [n for n in lora if n.startswith(gate + ".")]
            assert inside and all(got[n] is None for n in inside)
        assert all(got[n] is None for n in want if "lora_" not in n)  # the frozen base stays frozen

    assert mixed >= 2
    assert dbp.gate_names == ["base_model.model." + g for g in base_gates]
    assert base_gates == [f"{layers}.{i}.{s}" for i in range(3) for s in suffixes]


def _qlora(device: str = "cpu"):
    """The LLaMA above saved and loaded back with a 4-bit NF4 base (bitsandbytes runs NF4 on CPU), then
    LoRA on all seven projections. ``train()`` matters on CPU: bitsandbytes repacks 4-bit weights for its
    CPU kernel in eval mode, which Dynamo cannot trace."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    compute = torch.float32 if device == "cpu" else torch.bfloat16
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=compute)
    model = transformers.LlamaForCausalLM.from_pretrained(_saved(_llama()), quantization_config=quant,
                                                          device_map=device if device == "cpu" else {"": 0})
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=CASES["llama"][1], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_qlora_4bit_base_gates_and_oracle_gradients(inner):
    """A 4-bit base: each projection is bitsandbytes' ``autograd.Function`` (Dynamo's
    ``autograd_function_apply``) reading a packed ``uint8`` weight. The residual branches are gated, not the
    LoRA adds beside the 4-bit projections, and the adapters get the oracle's gradients."""
    model = _qlora()
    mixed = 0
    for dbp, dropped, out, ref, got, want in _steps_against_the_oracle(model, inner):
        mixed += 0 < len(dropped) < len(dbp.gate_names)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
        assert sum(g is not None for g in want.values()) > 0
        assert_same_grads(got, want, rtol=1e-4, atol=1e-5)
    assert mixed >= 2
    assert dbp.gate_names == [f"base_model.model.model.layers.{i}.{s}" for i in range(3) for s in ("self_attn", "mlp")]
    for gate in dbp.controller.gates:  # the 4-bit matmuls are counted as the dense ones they stand for
        assert gate.flops[0] >= 2 * 2 * 12 * 32 * (64 * 3 if gate.name.endswith("mlp") else 32 * 3), gate.name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA run of the QLoRA test needs a GPU")
def test_qlora_4bit_base_oracle_gradients_cuda():
    """The same check on CUDA (bf16 compute), where a GPU is at hand."""
    model = _qlora("cuda")
    oracle = copy.deepcopy(model)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, seed=11, inner="inductor")
    compiled = torch.compile(model, backend=dbp)
    for step in range(3):
        batch = {k: v.cuda() for k, v in _batch(step).items()}
        model.zero_grad(set_to_none=True)
        compiled(**batch).loss.backward()
        dropped = [g for g, d in dbp.last_mask.items() if d]
        oracle.zero_grad(set_to_none=True)
        with detached(oracle, dropped):
            oracle(**batch).loss.backward()
        assert_same_grads(grads(model), grads(oracle), rtol=2e-2, atol=2e-3)
    assert len(dbp.gate_names) == 6


def _saved(model):
    import tempfile
    path = tempfile.mkdtemp()
    model.save_pretrained(path)
    return path
