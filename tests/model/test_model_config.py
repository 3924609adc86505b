"""ModelConfig from real config.json files, and refusals of what we do not compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefixdpo.model.config import Llama3RopeScaling, LinearRopeScaling, ModelConfig
from prefixdpo.model.transformer import rope_inverse_frequencies

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
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic' is not supported"),
    (dict(mlp_bias=True), "'mlp_bias' = true is not supported"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                           "partial_rotary_factor": 0.5}), "partial_rotary_factor' = 0.5"),
    (dict(architectures=["Qwen3MoeForCausalLM"]), "mixture-of-experts layers are not implemented"),
    (dict(architectures=["Gemma2ForCausalLM"]), "soft-capping are not implemented"),
    (dict(architectures=["Qwen3NextForCausalLM"]), "hybrid linear-attention"),
    (dict(architectures=["Gemma3ForCausalLM"], final_logit_softcapping=30.0),
     "'final_logit_softcapping' = 30.0 is not supported"),
    (dict(architectures=["Gemma3ForCausalLM"], use_bidirectional_attention=True),
     "'use_bidirectional_attention' = true is not supported"),
    (dict(architectures=["Gemma3ForCausalLM"], hidden_activation="silu"),
     "'hidden_activation' = 'silu' is not supported"),
    (dict(architectures=["Gemma3ForCausalLM"],
          rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                 "rope_theta": 1e4}}),
     "only the full-attention layers' RoPE may be scaled"),
    (dict(architectures=["Qwen2ForCausalLM"], layer_types=["full_attention", "linear_attention"]),
     "'linear_attention', which is not supported"),
    (dict(architectures=["Qwen2ForCausalLM"], layer_types=["sliding_attention"]),
     "sliding_attention layers but no sliding window"),
    (dict(architectures=["MistralForCausalLM"], layer_types=["full_attention"]),
     "'layer_types' is set on a mistral model"),
    (dict(hidden_act="gelu"), "'hidden_act' = 'gelu' is not supported"),
    (dict(num_key_value_heads=3), "must be a multiple of num_key_value_heads"),
    (dict(vocab_size=None), "required field 'vocab_size' is missing"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks 'low_freq_factor'"),
])
def test_refusals_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        ModelConfig.from_hf_dict(base(**overrides), "cfg.json")
    assert str(error.value).startswith("cfg.json: ") and "\n" not in str(error.value)


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


# Real config.json files of each family, read by transformers (the oracle) and by us.
FAMILY_CONFIGS = {
    "llama-3.2-1b.json": 1_235_814_400,
    "mistral-7b-v0.1.json": 7_241_732_096,
    "qwen2.5-0.5b-instruct.json": 494_032_768,
    "qwen3-8b.json": 8_190_735_360,
    "gemma-3-1b-it.json": 999_885_952,
    "gemma-3-270m.json": 268_098_176,
}


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_real_configs_read_as_transformers_reads_them(name):
    """Layer types, windows, each layer type's RoPE, head size, attention scale, tying and the
    parameter count (transformers' model built on the meta device) agree."""
    import torch
    import transformers

    raw = json.loads((REAL_CONFIGS / name).read_text())
    ours = ModelConfig.from_hf_dict(raw)
    theirs = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(theirs)
    assert type(model).__name__ == ours.architecture
    assert ours.num_params == sum(p.numel() for p in model.parameters()) == FAMILY_CONFIGS[name]
    layer_types = getattr(theirs, "layer_types", None) or ["full_attention"] * \
        theirs.num_hidden_layers
    windows = [layer.self_attn.sliding_window if hasattr(layer.self_attn, "sliding_window")
               else getattr(theirs, "sliding_window", None) for layer in model.model.layers]
    assert list(ours.layer_windows) == windows
    if ours.architecture != "MistralForCausalLM":  # Mistral has no layer types: all slide
        assert list(ours.layer_types) == layer_types
    assert ours.head_dim == model.model.layers[0].self_attn.head_dim
    assert ours.attention_scale == pytest.approx(model.model.layers[0].self_attn.scaling)
    assert ours.tie_word_embeddings == bool(theirs.tie_word_embeddings)
    rotary = model.model.rotary_emb
    for layer_type, rope in zip(ours.layer_types, ours.layer_ropes):
        key = f"{layer_type}_inv_freq" if hasattr(rotary, f"{layer_type}_inv_freq") else \
            "inv_freq"
        expected = getattr(rotary, key)
        if expected.is_meta:  # buffers of a meta model hold no values: recompute them
            params = theirs.rope_parameters.get(layer_type, theirs.rope_parameters)
            init = rotary.compute_default_rope_parameters if params["rope_type"] == "default" \
                else transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[params["rope_type"]]
            kwargs = {"layer_type": layer_type} if key != "inv_freq" else {}
            expected = init(theirs, **kwargs)[0]
        actual = rope_inverse_frequencies(rope, ours.head_dim)
        torch.testing.assert_close(actual, expected.float(), rtol=1e-6, atol=0)


def test_gemma3_vision_language_checkpoint_is_refused_in_one_line():
    with pytest.raises(ValueError, match="'Gemma3ForConditionalGeneration' is not supported: "
                       "a Gemma 3 vision-language checkpoint") as error:
        ModelConfig.from_file(REAL_CONFIGS / "gemma-3-4b-it.json")
    assert "\n" not in str(error.value)


def test_gemma3_4b_text_model_scales_its_global_rope():
    """The text model of Gemma 3 4B (as its own Gemma3ForCausalLM config, the older form:
    rope_scaling for the global layers, rope_local_base_freq for the local ones)."""
    import transformers

    text = json.loads((REAL_CONFIGS / "gemma-3-4b-it.json").read_text())["text_config"]
    ours = ModelConfig.from_hf_dict({**text, "architectures": ["Gemma3ForCausalLM"]})
    theirs = transformers.Gemma3TextConfig(**text)
    assert ours.rope_scaling == LinearRopeScaling(8.0)
    assert ours.rope_theta == theirs.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert ours.sliding_rope_theta == \
        theirs.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert list(ours.layer_types) == theirs.layer_types and ours.sliding_window == 1024
    assert ours.head_dim == 256 and ours.attention_scale == 256 ** -0.5
    # Written back from our fields alone, in transformers 5's form, it reads back equal, here
    # and in transformers.
    fresh = ModelConfig(**{f: getattr(ours, f) for f in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "rope_theta", "rope_scaling", "sliding_rope_theta", "layer_types", "sliding_window",
        "tie_word_embeddings", "max_position_embeddings", "architecture", "qk_norm",
        "norm_unit_offset", "sandwich_norms", "scale_embeddings", "hidden_act",
        "query_pre_attn_scalar")})
    written = fresh.to_hf_dict()
    assert ModelConfig.from_hf_dict(written) == fresh
    again = transformers.Gemma3TextConfig(**{k: v for k, v in written.items()
                                             if k != "architectures"})
    assert again.rope_parameters == theirs.rope_parameters
    assert again.layer_types == theirs.layer_types


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma3"])
def test_generated_config_reads_back_in_transformers_as_the_same_class(family):
    """A config made from scratch (a random model) is written in transformers 5's form: it
    reads back equal here, and transformers builds the same architecture from it."""
    import transformers
    from conftest import FAMILIES, family_config

    name = {"mistral": "mistral_window", "qwen2": "qwen2_sliding_layers"}.get(family, family)
    config = family_config(name)
    assert not config.hf_config
    written = config.to_hf_dict()
    assert ModelConfig.from_hf_dict(written) == config
    theirs = transformers.AutoConfig.for_model(**written)
    assert type(theirs).__name__.removesuffix("TextConfig").removesuffix("Config").lower() == \
        family
    if family != "mistral":
        assert list(theirs.layer_types) == list(config.layer_types)
    assert theirs.sliding_window == config.sliding_window


@pytest.mark.parametrize("field, value, expected", [
    # Before: "unsupported operand type(s) for //: 'str' and 'int'", no field named.
    ("hidden_size", "128", "an integer"),
    ("num_attention_heads", 4.0, "an integer"),
    ("rms_norm_eps", "1e-5", "a number"),
    # Before: bool("false") is True, taken silently.
    ("tie_word_embeddings", "false", "true or false"),
])
def test_a_field_of_the_wrong_type_is_named(tmp_path, field, value, expected):
    raw = json.loads((REAL_CONFIGS / "llama-3.2-1b.json").read_text())
    raw[field] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as error:
        ModelConfig.from_file(tmp_path)
    assert str(error.value) == (f"{tmp_path / 'config.json'}: field {field!r} = {value!r}: "
                                f"expected {expected}")
