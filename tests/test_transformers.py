"""transformers models from tiny configs: two gates per layer, named by module path, forward equal,
gradients equal to the hook oracle, through torch.compile(backend=...) and through torch.export."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dropbp_fx  # noqa: E402
from dropbp_fx.passes import find_residual_branches  # noqa: E402
from dropbp_fx.testing import assert_same_grads, detached, grads  # noqa: E402

LAYERS = 2
VOCAB = 96


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def _bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _neox():
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0))


def _names(layer_fmt, per_layer):
    return [layer_fmt.format(i) + suffix for i in range(LAYERS) for suffix in per_layer]


# model factory, expected gate names, gate name -> module whose output the oracle detaches, has a KV cache
MODELS = {
    "llama": (_llama, _names("model.layers.{}", [".self_attn", ".mlp"]), {}, True),
    "gpt2": (_gpt2, _names("transformer.h.{}", [".attn", ".mlp"]), {}, True),
    "bert": (_bert, _names("bert.encoder.layer.{}", [".attention.{self,output}", ".{intermediate,output}"]),
             {".attention.{self,output}": ".attention.output.dropout", ".{intermediate,output}": ".output.dropout"},
             False),
    "neox": (_neox, _names("gpt_neox.layers.{}", [".mlp", ".attention"]), {}, True),
}


def _oracle_path(gate: str, renames: dict) -> str:
    for suffix, target in renames.items():
        if gate.endswith(suffix):
            return gate[: -len(suffix)] + target
    return gate


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def _oracle_grads(model, batch, dropped, renames):
    model.zero_grad(set_to_none=True)
    with detached(model, [_oracle_path(g, renames) for g in dropped]):
        out = model(**batch)
    out.loss.backward()
    return out, grads(model)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_compile_backend_matches_hook_oracle(arch):
    factory, expected, renames, has_cache = MODELS[arch]
    torch.manual_seed(0)
    model = factory().train()
    oracle_model = copy.deepcopy(model)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, seed=3, inner="eager")
    compiled = torch.compile(model, backend=dbp)

    mixed_steps = 0
    for step in range(4):
        batch = _batch(step)
        model.zero_grad(set_to_none=True)
        out = compiled(**batch)
        out.loss.backward()
        mask = dbp.last_mask
        dropped = [g for g, d in mask.items() if d]
        mixed_steps += 0 < len(dropped) < len(mask)
        ref, ref_grads = _oracle_grads(oracle_model, batch, dropped, renames)
        assert torch.equal(out.logits, ref.logits)
        assert_same_grads(grads(model), ref_grads)
        if dropped:  # a dropped branch's parameters get no gradient at all (None, not zeros)
            assert any(g is None for g in ref_grads.values())

    assert dbp.gate_names == expected  # exactly two gates per layer, named by module path
    assert mixed_steps >= 2, "the test needs steps with some gates dropped and some kept"
    assert dbp.step == 4
    if has_cache:  # default use_cache: attention branches return cache tensors and are still gated
        assert model.config.use_cache
        assert any(dbp.side_outputs[g] for g in expected if "att" in g)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_export_graph_matches_hook_oracle(arch):
    factory, expected, renames, _ = MODELS[arch]
    torch.manual_seed(0)
    model = factory().train()
    model.config.use_cache = False
    oracle_model = copy.deepcopy(model)
    batch = _batch(1)
    gm = torch.export.export(model, (), {"input_ids": batch["input_ids"]}).module()
    assert any(n.target == torch.ops.aten.add.Tensor for n in gm.graph.nodes)  # an aten-level graph
    if arch == "llama":  # there the skip operand is a .to() of the residual stream, not the stream itself
        skips = [b.skip.target for b in find_residual_branches(gm).branches]
        assert skips == [torch.ops.aten.to.dtype] * len(expected)

    dbp = dropbp_fx.DropBP(drop_rate=0.5, seed=5, inner="eager")
    gm = dbp.transform(gm)
    gm.graph.lint()
    assert dbp.gate_names == expected

    loss_fn = torch.nn.CrossEntropyLoss()
    for step in range(3):
        for p in gm.parameters():
            p.grad = None
        logits = gm(input_ids=batch["input_ids"])
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        logits = getattr(logits, "logits", logits)
        loss = loss_fn(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1))
        loss.backward()
        dropped = [g for g, d in dbp.last_mask.items() if d]

        oracle_model.zero_grad(set_to_none=True)
        with detached(oracle_model, [_oracle_path(g, renames) for g in dropped]):
            ref_logits = oracle_model(input_ids=batch["input_ids"]).logits
        loss_fn(ref_logits.reshape(-1, VOCAB), batch["labels"].reshape(-1)).backward()
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
        got = {n: None if p.grad is None else p.grad.clone() for n, p in gm.named_parameters()}
        ref = {n: g for n, g in grads(oracle_model).items() if n in got}
        assert len(ref) == len(got)
        assert_same_grads(got, ref)


def test_peft_model_gates_keep_module_path_names():
    """Regression: Dynamo reaches PEFT's wrapped model through ``__dict__['_modules']``; names stay clean."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    dbp = dropbp_fx.DropBP(drop_rate=0.75, policy="bernoulli", inner="eager")
    compiled = torch.compile(model, backend=dbp)
    for step in range(30):  # LoRA on attention only: some attention gate stays open on every step
        compiled(**_batch(step)).loss.backward()
        assert not all(dbp.last_mask[g] for g in dbp.gate_names if g.endswith("self_attn"))
    assert dbp.gate_names == _names("base_model.model.model.layers.{}", [".self_attn", ".mlp"])


def test_models_with_different_eps_in_one_process_under_inductor(monkeypatch):
    """A notebook compiles several models: the second Llama, with another ``rms_norm_eps``, makes Dynamo
    recompile the shared frames with the eps a dynamic float (a 0-d tensor read with ``.item()``). Every
    piece that reads it gets it (before, Inductor failed with ``CppCompileError: 'zf..' was not declared``
    or the graph fell back to eager with ``DataDependentOutputException``); gradients equal the oracle's."""
    import warnings

    from dropbp_fx.passes import outline

    torch._dynamo.reset()
    recomputed = []
    real = outline._with_scalar_sources
    monkeypatch.setattr(outline, "_with_scalar_sources",
                        lambda gm, nodes: recomputed.append(len(out := real(gm, nodes)) - len(nodes)) or out)
    for eps in (1e-6, 1e-5, 1e-4):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, rms_norm_eps=eps)
        model = transformers.LlamaForCausalLM(config).train()
        oracle_model = copy.deepcopy(model)
        dbp = dropbp_fx.DropBP(drop_rate=0.5, seed=5, inner="inductor")
        compiled = torch.compile(model, backend=dbp)
        with warnings.catch_warnings():
            warnings.simplefilter("error", dropbp_fx.DropBPWarning)  # no fallback, no skipped graph
            for step in range(2):
                batch = _batch(step)
                model.zero_grad(set_to_none=True)
                out = compiled(**batch)
                out.loss.backward()
                dropped = [g for g, d in dbp.last_mask.items() if d]
                ref, ref_grads = _oracle_grads(oracle_model, batch, dropped, {})
                torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
                assert_same_grads(grads(model), ref_grads, rtol=1e-4, atol=1e-5)
        assert len(dbp.gate_names) == 2 * LAYERS
    assert any(n > 0 for n in recomputed), "no piece recomputed a dynamic float: the test lost its subject"
