"""ModelConfig from real config.json files, and refusals of what we do not compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefixdpo.model.config import Llama3RopeScaling, ModelConfig

REAL_CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "configs"


def test_real_llama_3_2_1b():
    config = ModelConfig.from_file(REAL_CONFIGS / "llama-3.2-1b.json")
    assert config.tie_word_embeddings and config.num_key_value_heads == 8
    assert config.head_dim == 64 and config.rope_theta == 500000.0
    assert config.rope_scaling == Llama3RopeScaling(32.0, 1.0, 4.0, 8192)
    assert round(config.num_params / 1e9, 3) == 1.236


def test_real_mistral_7b():
    config = ModelConfig.from_file(REAL_CONFIGS / "mistral-7b-v0.1.json")
    assert config.architecture == "MistralForCausalLM" and config.sliding_window == 4096
    assert config.head_dim == 128 and config.num_key_value_heads == 8
    assert round(config.num_params / 1e9, 3) == 7.242


def test_transformers5_rope_parameters_block():
    raw = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2,
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 32}}
    config = ModelConfig.from_hf_dict(raw)
    assert config.rope_theta == 1e4 and config.rope_scaling.factor == 8.0
    assert config.num_key_value_heads == 2 and config.head_dim == 4


def base(**overrides):
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
           "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    raw.update(overrides)
    return raw


@pytest.mark.parametrize("overrides, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "architecture 'GPT2LMHeadModel' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not supported"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "'linear' is not supported"),
    (dict(attention_bias=True), "'attention_bias' = true is not supported"),
    (dict(hidden_act="gelu"), "'hidden_act' = 'gelu' is not supported"),
    (dict(num_key_value_heads=3), "must be a multiple of num_key_value_heads"),
    (dict(vocab_size=None), "required field 'vocab_size' is missing"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks 'low_freq_factor'"),
])
def test_refusals_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict(base(**overrides), "cfg.json")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="model config not found"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        ModelConfig.from_file(tmp_path)


def test_hf_dict_round_trip_preserves_fields(tmp_path):
    raw = json.loads((REAL_CONFIGS / "llama-3.2-1b.json").read_text())
    assert ModelConfig.from_hf_dict(raw).to_hf_dict() == raw
    # A config made from scratch (no source file) generates a config.json that reads back equal.
    fresh = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                        rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 64))
    assert ModelConfig.from_hf_dict(fresh.to_hf_dict()) == fresh


@pytest.mark.parametrize("window_field, expected", [({}, 4096), ({"sliding_window": None}, None),
                                                    ({"sliding_window": 32}, 32)])
def test_mistral_window_matches_transformers(window_field, expected):
    """A Mistral config.json without `sliding_window` means transformers' default of 4096, not
    full attention; an explicit null means full attention."""
    import transformers

    raw = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 10,
           "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, **window_field}
    assert ModelConfig.from_hf_dict(raw).sliding_window == expected
    assert transformers.MistralConfig(**{k: v for k, v in raw.items()
                                         if k != "architectures"}).sliding_window == expected
