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
