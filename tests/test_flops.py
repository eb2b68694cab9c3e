"""FLOPs per gate, counted on the graph, against the analytic formulas of a LLaMA and a GPT-2 block."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dropbp_fx  # noqa: E402

B, T, H, HEADS, KV, INTER = 2, 32, 64, 4, 2, 176
D = H // HEADS


def _gate_flops(model):
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager")
    ids = torch.randint(0, 64, (B, T))
    torch.compile(model, backend=dbp)(input_ids=ids, labels=ids)
    return {g.name: g.flops for g in dbp.controller.gates}, dbp


def _close(measured, analytic):
    assert abs(measured - analytic) <= 0.05 * analytic, (measured, analytic)


def test_llama_block_flops_match_the_analytic_formulas():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=H, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV)).train()
    flops, dbp = _gate_flops(model)
    projections = 2 * B * T * H * (HEADS * D + 2 * KV * D) + 2 * B * T * HEADS * D * H  # q, k, v, o
    attention = 2 * 2 * B * HEADS * T * T * D  # QK^T and AV: the sequence-length term
    mlp = 3 * 2 * B * T * H * INTER  # SwiGLU: gate, up, down
    for layer in range(2):
        fwd, bwd = flops[f"model.layers.{layer}.self_attn"]
        _close(fwd, projections + attention)
        # weights train: 2x for the projections (dX and dW); flash-attention backward recomputes the scores: 2.5x
        _close(bwd, 2 * projections + 2.5 * attention)
        fwd, bwd = flops[f"model.layers.{layer}.mlp"]
        _close(fwd, mlp)
        _close(bwd, 2 * mlp)
    assert "bwd FLOPs share" in dbp.summary()


def test_gpt2_block_flops_match_the_analytic_formulas():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=H, n_layer=1, n_head=HEADS, n_positions=64, bos_token_id=0, eos_token_id=0)).train()
    flops, _ = _gate_flops(model)
    projections = 2 * B * T * H * 3 * H + 2 * B * T * H * H  # c_attn (q, k, v), c_proj
    attention = 2 * 2 * B * HEADS * T * T * D
    fwd, bwd = flops["transformer.h.0.attn"]
    _close(fwd, projections + attention)
    assert bwd > 1.9 * fwd
    fwd, bwd = flops["transformer.h.0.mlp"]
    _close(fwd, 2 * B * T * H * 4 * H * 2)  # c_fc (h -> 4h) and c_proj (4h -> h)
    _close(bwd, 2 * fwd)


def test_frozen_weights_halve_the_backward():
    """LoRA-style frozen base weights: backward computes only input gradients (1x, not 2x, the forward)."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=H, intermediate_size=INTER, num_hidden_layers=1, num_attention_heads=HEADS,
        num_key_value_heads=KV)).train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)  # something upstream trains: the stream needs grads
    flops, _ = _gate_flops(model)
    fwd, bwd = flops["model.layers.0.mlp"]
    _close(bwd, fwd)


MOE_INTER, EXPERTS, TOP_K = 96, 4, 2


def _moe(kind: str):
    common = dict(vocab_size=64, hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS,
                  num_key_value_heads=KV, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=MOE_INTER, **common))
    common["num_experts"] = common.pop("num_local_experts")
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        moe_intermediate_size=MOE_INTER, head_dim=D, decoder_sparse_step=1, mlp_only_layers=[], **common))


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_block_backward_share_matches_the_analytic_formula(kind):
    """transformers 5 runs the experts through ``aten._grouped_mm`` (or its fallback), which FlopCounterMode
    has no formula for: counted as router + top-k experts x 3 matmuls, not 0 (the MLP's share was 1.6%)."""
    torch.manual_seed(0)
    flops, _ = _gate_flops(_moe(kind).train())
    rows = B * T
    router = 2 * rows * H * EXPERTS
    experts = TOP_K * 3 * 2 * rows * H * MOE_INTER  # each token through top-k SwiGLU experts
    projections = 2 * rows * H * (HEADS * D + 2 * KV * D) + 2 * rows * HEADS * D * H
    attention = 2 * 2 * B * HEADS * T * T * D
    fwd, bwd = flops["model.layers.0.mlp"]
    _close(fwd, router + experts)
    _close(bwd, 2 * (router + experts))
    attn_bwd = flops["model.layers.0.self_attn"][1]
    analytic_share = 2 * (router + experts) / (2 * (router + experts) + 2 * projections + 2.5 * attention)
    share = bwd / (bwd + attn_bwd)
    assert abs(share - analytic_share) <= 0.05 * analytic_share, (share, analytic_share)
