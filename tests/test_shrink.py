"""The generic relations and repairs of the shrinking rule (dropbp_fx.shrink_rules), on real default configs."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from dropbp_fx.shrink import shrink, shrink_dict  # noqa: E402
from dropbp_fx.shrink_rules import complete, default_config, repair  # noqa: E402


def _shrunk(model_type):
    return shrink(default_config(model_type))


def test_layer_parts_keep_summing_to_the_layer_count():
    d = {"num_hidden_layers": 72, "n_input_layers": 16, "n_recurrent_layers": 40, "n_output_layers": 16}
    out = shrink_dict(d)
    parts = out["n_input_layers"] + out["n_recurrent_layers"] + out["n_output_layers"]
    assert parts == out["num_hidden_layers"] and all(out[k] > 0 for k in d)


def test_head_dim_stays_rotary_plus_non_rotary_through_per_layer_overrides():
    d = {"num_hidden_layers": 3, "num_attention_heads": 8, "head_dim": 256, "qk_nope_head_dim": 128,
         "qk_rope_head_dim": 64, "v_head_dim": 128, "layer_types": ["full", "sliding", "sliding"],
         "per_layer_config": {"1": {"qk_nope_head_dim": 192}, "2": {"qk_nope_head_dim": 192}}}
    out = shrink_dict(d)
    sliding = out["per_layer_config"]["1"]
    assert out["head_dim"] == sliding["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    assert out["head_dim"] <= 32


def test_unrelated_head_dims_are_not_summed():
    d = {"num_hidden_layers": 2, "num_attention_heads": 8, "head_dim": 256, "linear_key_head_dim": 128,
         "linear_value_head_dim": 128}
    assert shrink_dict(d)["head_dim"] == 16


def test_factor_lists_keep_their_sum_and_product():
    d = {"hidden_size": 256, "axial_pos_embds_dim": [64, 192], "axial_pos_shape": [64, 64],
         "max_position_embeddings": 4096}
    out = shrink_dict(d)
    assert sum(out["axial_pos_embds_dim"]) == out["hidden_size"]
    assert out["axial_pos_shape"][0] * out["axial_pos_shape"][1] == out["max_position_embeddings"]


def test_offset_that_must_be_a_multiple_of_a_period_stays_one():
    config = _shrunk("inkling2_loop_text")
    assert config.loop_layer_index_start % config.n_layers_per_attn_res_block == 0
    assert config.loop_layer_index_end % config.n_layers_per_attn_res_block == 0


def test_offsets_of_other_periods_are_left_alone():
    config = _shrunk("jamba")
    assert config.expert_layer_offset < config.expert_layer_period
    assert config.attn_layer_offset < config.attn_layer_period


def test_hybrid_keeps_an_attention_layer():
    config = _shrunk("granitemoehybrid")
    assert "full_attention" in config.layer_types and len(config.layer_types) == config.num_hidden_layers
    assert "full_attention" in _shrunk("bamba").layer_types


def test_layer_types_left_none_are_written_out():
    config = _shrunk("lfm2_moe")
    assert list(config.layer_types) == ["full_attention"] * config.num_hidden_layers


def test_default_language_taken_from_the_languages():
    config = _shrunk("xmod")
    assert config.default_language == config.languages[0]


def test_complete_leaves_a_complete_config_alone():
    config = _shrunk("llama")
    d = config.to_dict()
    assert not complete(config, d, 2)


def test_validator_message_sets_the_required_value():
    d = {"text_config": {"hidden_size_per_layer_input": 256}}
    exc = ValueError("hidden_size_per_layer_input must be 0, got 256")
    assert repair(exc, d, {}) and d["text_config"]["hidden_size_per_layer_input"] == 0
    assert not repair(ValueError("something else"), d, {})


def test_missing_group_fields_are_filled():
    config = _shrunk("qwen4_exp_text")
    assert config.indexer_budget % config.indexer_compress_ratio == 0
    assert config.indexer_n_heads and config.indexer_kv_heads == 1


def test_adapter_dims_follow_the_hidden_size_they_equalled():
    config = _shrunk("dots3_note")
    assert config.vision_config.adapter_in_dim == config.vision_config.hidden_size
    assert config.vision_config.adapter_out_dim == config.text_config.hidden_size


# ----------------------------------------------------------------------------------------- relations kept by the rule
def test_per_layer_source_layers_are_remapped_to_the_kept_layers():
    # each layer reads the K/V of itself or of an earlier layer of its kind (kv_source_layers)
    kinds = ["sliding", "sliding", "indexed", "sliding", "indexed", "indexed"]
    d = {"num_hidden_layers": 6, "layer_types": kinds, "kv_source_layers": [0, 1, 2, 3, 2, 2]}
    out = shrink_dict(d)
    assert out["layer_types"] == ["sliding", "indexed"]
    assert out["kv_source_layers"] == [0, 1]  # layer 2 (now 1) reads its own


def test_state_space_heads_times_head_dim_stay_expand_times_hidden():
    d = {"hidden_size": 2560, "mamba_expand": 2, "n_mamba_heads": 8, "mamba_headdim": 640, "num_hidden_layers": 54}
    out = shrink_dict(d)
    assert out["n_mamba_heads"] * out["mamba_headdim"] == out["mamba_expand"] * out["hidden_size"]


def test_hidden_sizes_that_were_a_multiple_of_the_hidden_size_stay_that_multiple():
    out = shrink_dict({"hidden_size": 2560, "attention_hidden_size": 5120, "num_hidden_layers": 4})
    assert out["attention_hidden_size"] == 2 * out["hidden_size"]


def test_sizes_named_size_or_dim_inside_the_name_follow_the_hidden_size_they_equalled():
    d = {"global_config": {"hidden_size": 2048}, "decoder_config": {"hidden_size": 1024, "hidden_size_global": 2048}}
    out = shrink_dict(d)
    assert out["decoder_config"]["hidden_size_global"] == out["global_config"]["hidden_size"]


def test_vocabularies_named_vocab_are_vocabularies():
    assert shrink_dict({"encoder_hash_byte_group_vocab": 500002})["encoder_hash_byte_group_vocab"] == 256


def test_block_counts_equal_to_the_layer_count_follow_it():
    out = shrink_dict({"num_hidden_layers": 32, "num_blocks": 32})
    assert out["num_blocks"] == out["num_hidden_layers"] == 2
    assert shrink_dict({"num_hidden_layers": 32, "num_blocks": 1})["num_blocks"] == 1


def test_the_parent_config_borrows_what_its_sub_configs_agree_on():
    from transformers import PretrainedConfig

    from dropbp_fx.shrink_rules import lend_missing

    parent = PretrainedConfig()
    parent.encoder_config = PretrainedConfig(num_hidden_layers=2)
    parent.decoder_config = PretrainedConfig(num_hidden_layers=2)
    exc = AttributeError(f"'{type(parent).__name__}' object has no attribute 'num_hidden_layers'")
    assert lend_missing(parent, exc) and parent.num_hidden_layers == 2
    parent.decoder_config.foo, parent.encoder_config.foo = 1, 3
    assert not lend_missing(parent, AttributeError(f"'{type(parent).__name__}' object has no attribute 'foo'"))


# ----------------------------------------------------------------------------------------- gentler shrinks
def test_gentler_shrink_leaves_one_class_as_it_was():
    d = {"image_size": 224, "patch_size": 7, "patch_stride": 4, "hidden_size": 768, "depths": [2, 3, 16, 3]}
    assert shrink_dict(d)["patch_size"] == 4
    kept = shrink_dict(d, keep=("patch",))
    assert kept["patch_size"] == 7 and kept["image_size"] == 32 and kept["hidden_size"] == 64
    assert shrink_dict(d, keep=("depth",))["depths"] == [2, 3, 16, 3]


def test_gentler_shrink_fills_ids_and_bounds_left_none():
    d = {"vocab_size": 33, "pad_token_id": None, "mask_token_id": None, "eos_token_id": 2,
         "attn_config": {"clip_qkv": None, "bos_token_id": None}}
    assert shrink_dict(d)["pad_token_id"] is None
    out = shrink_dict(d, fill=True)
    ids = [out["pad_token_id"], out["mask_token_id"], out["attn_config"]["bos_token_id"]]
    assert ids[:2] == [0, 1] and len(set(ids + [2])) == 4  # free low ids first (a pad id indexes positions too)
    assert out["attn_config"]["clip_qkv"] == 8.0


def test_gentler_shrink_without_special_layers_and_wider():
    d = {"num_hidden_layers": 35, "num_kv_shared_layers": 15, "hidden_size": 2048, "intermediate_size": 16384}
    assert shrink_dict(d)["num_kv_shared_layers"] == 1
    assert shrink_dict(d, least=("few",))["num_kv_shared_layers"] == 0
    wide = shrink_dict(d, wide=2)
    assert wide["hidden_size"] == 128 and wide["intermediate_size"] == 256 and wide["num_hidden_layers"] == 2


def test_gentler_shrinks_end_with_the_widest():
    from dropbp_fx.shrink import GENTLER, describe

    assert GENTLER[-3:] == [{"keep": ("hidden",)}, {"keep": ("ffn",)}, {"keep": ("layers",)}]
    assert describe(keep=("patch",)) == "patch values kept" and describe() == "the rule"


def test_keeping_the_layer_count_keeps_every_per_layer_entry():
    d = {"num_hidden_layers": 4, "layer_types": ["a", "b", "a", "b"], "moe_layers": [1, 3]}
    out = shrink_dict(d, keep=("layers",))
    assert out["num_hidden_layers"] == 4 and out["layer_types"] == d["layer_types"] and out["moe_layers"] == [1, 3]


def test_build_falls_back_to_a_gentler_shrink():
    from dropbp_fx.models import build

    model, _ = build("cvt", "image-classification")  # indexes its per-stage drop-path rates by stage: depths kept
    assert model.shrunk_by == "depth values kept"
    assert list(model.config.depth) == list(default_config("cvt").depth)
    llama, _ = build("llama", "causal-lm")
    assert not hasattr(llama, "shrunk_by") and not hasattr(llama, "batch_inputs")


def test_gentler_shrinks_are_capped():
    import torch
    from torch import nn

    from dropbp_fx.models import _check_size

    _check_size(nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)]))
    with pytest.raises(RuntimeError, match="too big"):
        _check_size(nn.Sequential(*[nn.Linear(4, 4) for _ in range(13)]))
    with torch.device("meta"), pytest.raises(RuntimeError, match="too big"):
        _check_size(nn.Linear(5000, 5000))


# ----------------------------------------------------------------------------------------- inputs the model asks for
class _Fake:
    def __init__(self, forward, **config):
        from types import SimpleNamespace

        self.config = SimpleNamespace(num_labels=3, **config)
        self.forward = forward


def test_batch_of_an_image_classifier_of_token_ids():
    from dropbp_fx.models import batch_fn

    batch = batch_fn(_Fake(lambda input_ids=None, labels=None: None, vocab_size=512), "image-classification")(0)
    assert set(batch) == {"input_ids", "labels"} and batch["labels"].shape == (2,) and batch["input_ids"].max() < 256


def test_batch_of_images_given_as_patches():
    from types import SimpleNamespace

    from dropbp_fx.models import batch_fn

    vision = SimpleNamespace(image_size=32, patch_size=4, num_channels=3)
    model = _Fake(lambda pixel_values=None, pixel_attention_mask=None, spatial_shapes=None, labels=None: None,
                  vision_config=vision)
    batch = batch_fn(model, "image-classification")(0)
    assert batch["pixel_values"].shape == (2, 64, 48) and batch["pixel_attention_mask"].shape == (2, 64)
    assert batch["spatial_shapes"].tolist() == [[8, 8], [8, 8]]


def test_batch_with_the_inputs_build_found():
    from transformers import PretrainedConfig

    from dropbp_fx.models import SEQ, batch_fn

    model = _Fake(lambda input_ids=None, input_features=None, labels=None: None, vocab_size=256,
                  audio_config=PretrainedConfig(num_mel_bins=20))
    batch = batch_fn(model, "seq2seq-lm", {"input_features": 4})(0)
    assert batch["input_features"].shape == (2, 20, 4 * SEQ)
    assert "input_features" not in batch_fn(model, "seq2seq-lm")(0)
    assert batch_fn(model, "masked-lm", {"length": 128})(0)["labels"].shape == (2, 128)
