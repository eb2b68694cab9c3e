"""A model zoo: transformers architectures from tiny configs (random init, hidden 32, 2 layers, dropout 0),
each compiled with ``torch.compile(model, backend=dropbp_fx.DropBP(...))`` and checked for

1. the gate names (module paths) and hence the gate count;
2. a forward equal to the eager model's;
3. gradients equal to the independent oracle (``dropbp_fx/testing.py``): the original module, run eagerly,
   with the outputs of the modules whose gates were dropped that step ``.detach()``-ed by forward hooks;
   and every parameter of the repeated blocks consumed inside some gate, not in the trunk, unless the row
   names it (a value shared by several gates, or computed from another stream, stays in the trunk);
4. an optimizer step through the compiled model that changes the parameters, then a second forward
   that still equals the eager model's.

Adding an architecture is adding one row to ``ZOO``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dropbp_fx  # noqa: E402
from dropbp_fx.testing import assert_same_grads, detached, grads  # noqa: E402

T = transformers
V = 96  # vocabulary
H = 32  # hidden size
LAYERS = 2
STEPS = 3


# ----------------------------------------------------------------------------------------- inputs
def _tokens(seed: int, length: int = 10):
    return torch.randint(3, V, (2, length), generator=torch.Generator().manual_seed(seed))


def lm_batch(seed):
    ids = _tokens(seed)
    return {"input_ids": ids, "labels": ids}


def seq2seq_batch(seed):
    return {"input_ids": _tokens(seed), "labels": _tokens(seed + 100, length=8)}


def image_batch(size):
    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(2, 3, size, size, generator=g),
                "labels": torch.randint(0, 5, (2,), generator=g)}
    return batch


# ----------------------------------------------------------------------------------------- the table
def layers(fmt: str, *suffixes: str, n: int = LAYERS) -> list[str]:
    """``layers("model.layers.{}", ".self_attn", ".mlp")`` -> the gate names of ``n`` layers, in order."""
    return [fmt.format(i) + s for i in range(n) for s in suffixes]


@dataclass
class Arch:
    build: Callable[[], torch.nn.Module]
    gates: list[str]  # expected gate names, in graph order
    batch: Callable[[int], dict] = lm_batch
    # gate-name suffix -> module (suffix) whose output the oracle detaches, where the gate name is not a
    # module whose every output is exactly the branch value
    oracle: dict[str, str] = field(default_factory=dict)
    # substrings of block parameters that are computed in the trunk, outside every gate (see the module doc)
    trunk: tuple[str, ...] = ()
    inner: str = "eager"
    marks: tuple = ()


DECODER_KW = dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
LLAMA_GATES = layers("model.layers.{}", ".self_attn", ".mlp")

ZOO: dict[str, Arch] = {
    "llama": Arch(lambda: T.LlamaForCausalLM(T.LlamaConfig(**DECODER_KW)), LLAMA_GATES),
    # the default sliding window: the KV cache returns keys[:, :, -W:], a slice, which stays in the branch
    "mistral": Arch(lambda: T.MistralForCausalLM(T.MistralConfig(**DECODER_KW)), LLAMA_GATES),
    "qwen2": Arch(lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**DECODER_KW)), LLAMA_GATES),
    # sandwich norms: x + post_norm(attn(pre_norm(x))); the post-norm is part of the branch, so the oracle
    # detaches its output (detaching self_attn's would still train post_attention_layernorm.weight).
    # Its norms scale by (1 + w), and layer 0 is a sliding-window layer: both stay inside the gates.
    "gemma2": Arch(lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**DECODER_KW, head_dim=8, sliding_window=16)),
                   LLAMA_GATES,
                   oracle={".self_attn": ".post_attention_layernorm", ".mlp": ".post_feedforward_layernorm"}),
    "phi3": Arch(lambda: T.Phi3ForCausalLM(T.Phi3Config(**DECODER_KW, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                        resid_pdrop=0.0, embd_pdrop=0.0)), LLAMA_GATES),
    # Conv1D projections (x @ W + b through addmm)
    "gpt2": Arch(lambda: T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)), layers("transformer.h.{}", ".attn", ".mlp")),
    # fc1/fc2 sit directly in the decoder layer, beside its residual adds: the gate names the parts
    "opt": Arch(lambda: T.OPTForCausalLM(T.OPTConfig(
        vocab_size=V, hidden_size=H, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=H, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        layerdrop=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)),
        layers("model.decoder.layers.{}", ".self_attn", ".{fc1,fc2}"), oracle={".{fc1,fc2}": ".fc2"}),
    # parallel residual x + attn(ln1(x)) + mlp(ln2(x)): two gates on one residual add
    "gpt_neox": Arch(lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0)),
        layers("gpt_neox.layers.{}", ".mlp", ".attention")),
    # parallel attention (Falcon-7B style): x + dropout(mlp(ln(x)) + attn(ln(x))); the layernorm is shared
    # by both branches, so it stays in the trunk
    "falcon": Arch(lambda: T.FalconForCausalLM(T.FalconConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, parallel_attn=True,
        new_decoder_architecture=False, multi_query=True, alibi=False, bias=False, hidden_dropout=0.0,
        attention_dropout=0.0)), layers("transformer.h.{}", ".mlp", ".self_attention"), trunk=(".input_layernorm.",)),
    # post-norm: norm(x + f(x)); the branches are unions of modules, mapped to the module ending each branch
    "bert": Arch(lambda: T.BertForMaskedLM(T.BertConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        layers("bert.encoder.layer.{}", ".attention.{self,output}", ".{intermediate,output}"),
        oracle={".attention.{self,output}": ".attention.output.dropout", ".{intermediate,output}": ".output.dropout"},
        trunk=(".LayerNorm.",)),  # post-norm: after the residual add
    # encoder-decoder: two gates per encoder block, three per decoder block (self, cross, FFN). T5Attention
    # also returns the relative position bias that later blocks reuse (not part of the branch), so the
    # oracle detaches the block-layer's dropout, whose output is exactly the branch value. In the trunk:
    # that bias (block 0, shared by all blocks) and the cross-attention K/V projections of the encoder output.
    "t5": Arch(lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=V, d_model=H, d_kv=8, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
        layers("encoder.block.{}", ".layer.0.SelfAttention", ".layer.1.DenseReluDense")
        + layers("decoder.block.{}", ".layer.0.SelfAttention", ".layer.1.EncDecAttention", ".layer.2.DenseReluDense"),
        batch=seq2seq_batch,
        oracle={".SelfAttention": ".dropout", ".EncDecAttention": ".dropout", ".DenseReluDense": ".dropout"},
        trunk=(".relative_attention_bias.", ".EncDecAttention.k.", ".EncDecAttention.v.")),
    "vit": Arch(lambda: T.ViTForImageClassification(T.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=5)),
        layers("vit.layers.{}", ".attention", ".mlp"), batch=image_batch(16)),
    # convolutions with batch norm; stage 0: identity shortcuts, stage 1: a strided 1x1-conv projection shortcut
    "resnet": Arch(lambda: T.ResNetForImageClassification(T.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type="basic", num_labels=5,
        downsample_in_first_stage=False)),
        ["resnet.encoder.stages.0.layers.0.layer", "resnet.encoder.stages.0.layers.1.layer",
         "resnet.encoder.stages.1.layers.0.layer"], batch=image_batch(32), trunk=(".shortcut.",)),
    # bottleneck blocks: every block of this config has a projection shortcut (8 -> 16 -> 32 channels)
    "resnet_bottleneck": Arch(lambda: T.ResNetForImageClassification(T.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck",
        num_labels=5)),
        ["resnet.encoder.stages.0.layers.0.layer", "resnet.encoder.stages.1.layers.0.layer"], batch=image_batch(32),
        trunk=(".shortcut.",)),
    # mixture of experts: router + experts (transformers' grouped_mm, on CPU its custom-op fallback) = one branch
    "mixtral": Arch(lambda: T.MixtralForCausalLM(T.MixtralConfig(**DECODER_KW, num_local_experts=4,
                                                                 num_experts_per_tok=2)), LLAMA_GATES),
    # routed experts + a gated shared expert, summed inside the block: still one branch, model.layers.i.mlp
    "qwen2_moe": Arch(lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        **DECODER_KW, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
        num_experts_per_tok=2)), LLAMA_GATES),
    # the residual add sits inside the attention and MLP modules (dropout_add), so the gates name their parts;
    # the MLP's GeLU is an autograd.Function (Dynamo's autograd_function_apply, bodies as submodules)
    "bloom": Arch(lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=V, hidden_size=H, n_layer=LAYERS, n_head=4,
                                                           hidden_dropout=0.0, attention_dropout=0.0)),
                  layers("transformer.h.{}", ".self_attention.{query_key_value,dense}",
                         ".mlp.{dense_h_to_4h,dense_4h_to_h}"),
                  oracle={".self_attention.{query_key_value,dense}": ".self_attention.dense",
                          ".mlp.{dense_h_to_4h,dense_4h_to_h}": ".mlp.dense_4h_to_h"}),
}
# Regressions, under an AOT-based inner compiler: a trunk value that feeds only gates (Falcon's shared layernorm,
# T5's cross-attention K/V of the encoder output) got a zero gradient instead of None when all of those gates were
# closed (the trunk segment holding it still ran its compiled backward). Such values now get segments of their own.
ZOO["falcon_aot_eager"] = dataclasses.replace(ZOO["falcon"], inner="aot_eager")
ZOO["t5_aot_eager"] = dataclasses.replace(ZOO["t5"], inner="aot_eager")
# Regression, under inductor: the backward of Falcon's attention branch (index_put of fused_qkv[..., [-2], :], fused
# with a transposed load) wrote out of bounds on more than one thread (pytorch/pytorch#191837; see
# dropbp_fx.inductor_fixes.tile2d_atomic_add_fix): segfaults within a few steps.
ZOO["falcon_inductor"] = dataclasses.replace(ZOO["falcon"], inner="inductor")
# A branch holding an autograd.Function (BLOOM's GeLU) under the AOT-based inner compilers: its bodies travel
# inside the piece (they reached AOTAutograd as arguments: "all flat_args must be KNOWN_TYPES").
ZOO["bloom_aot_eager"] = dataclasses.replace(ZOO["bloom"], inner="aot_eager")
ZOO["bloom_inductor"] = dataclasses.replace(ZOO["bloom"], inner="inductor")


# ----------------------------------------------------------------------------------------- the test
def _oracle_path(gate: str, oracle: dict[str, str]) -> str:
    for suffix, target in oracle.items():
        if gate.endswith(suffix):
            return gate[: -len(suffix)] + target
    return gate


def _output(out) -> torch.Tensor:
    return out.logits


def _assert_same(actual, expected, arch: Arch) -> None:
    """Bit-for-bit under eager and aot_eager (the same ops on the same values); inductor fuses and reorders
    float ops, so there: equal up to rounding."""
    if arch.inner == "inductor":
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(actual, expected)


def _check_block_params_in_gates(model, dbp, arch: Arch) -> None:
    """Parameters of the repeated blocks (``model.layers.``: gate names up to their first index) are read
    inside the gates, except the row's ``trunk`` ones (and those are indeed outside: no stale entries)."""
    blocks = tuple({re.match(r"^(.*?\.)\d+\.", g).group(1) for g in arch.gates})
    outside = [n for n, _ in model.named_parameters() if n.startswith(blocks) and n not in dbp.controller.gate_params]
    assert [n for n in outside if not any(t in n for t in arch.trunk)] == []
    assert [t for t in arch.trunk if not any(t in n for n in outside)] == []


@pytest.mark.parametrize("name", [pytest.param(n, marks=a.marks) for n, a in ZOO.items()])
def test_zoo(name):
    arch = ZOO[name]
    torch.manual_seed(0)
    model = arch.build().train()
    oracle_model = copy.deepcopy(model)
    compiled = torch.compile(model, backend=dropbp_fx.DropBP(drop_rate=0.5, inner=arch.inner, seed=1))

    mixed = 0
    for step in range(STEPS):
        batch = arch.batch(step)
        model.zero_grad(set_to_none=True)
        out = compiled(**batch)
        out.loss.backward()
        dbp = dropbp_fx.get_dropbp(compiled)
        if step == 0:  # 1. the gates, by module path (and so their count)
            assert dbp.gate_names == arch.gates, f"{len(dbp.gate_names)} gates: {dbp.gate_names}"
            _check_block_params_in_gates(model, dbp, arch)
        dropped = [g for g, d in dbp.last_mask.items() if d]
        assert dbp.last_mask.keys() == set(arch.gates)
        mixed += 0 < len(dropped) < len(arch.gates)

        oracle_model.zero_grad(set_to_none=True)
        with detached(oracle_model, [_oracle_path(g, arch.oracle) for g in dropped]):
            ref = oracle_model(**batch)
        ref.loss.backward()
        # 2. forward: the same ops on the same values, so bit-for-bit equal (inductor: up to rounding)
        _assert_same(_output(out), _output(ref), arch)
        _assert_same(out.loss, ref.loss, arch)
        # 3. gradients: those of the hook oracle, and None exactly where it has None
        assert_same_grads(grads(model), grads(oracle_model))

    assert dbp.step == STEPS
    assert mixed, "the test needs a step that drops some gates and keeps others"

    # 4. one optimizer step through the compiled model, then a second forward
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= got_grad
    batch = arch.batch(STEPS)
    out = compiled(**batch)
    assert torch.isfinite(out.loss)
    _assert_same(_output(out), _output(model(**batch)), arch)  # the compiled model reads the updated weights
    out.loss.backward()
    assert dbp.step == STEPS + 1  # the compiled call drew a mask, the eager one did not
