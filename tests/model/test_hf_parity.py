"""Our model against transformers (the oracle) on tiny random checkpoints read by our loader."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import DENSE, HF_VARIANTS, causal_logits

from prefixdpo.model.hf_checkpoint import load_model, save_hf_checkpoint
from prefixdpo.model.transformer import build_model

SEQ_LEN = 24  # longer than the Mistral window (8) and the llama3 original context (16)


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
@pytest.mark.parametrize("sharded", [False, True])
def test_logits_match_transformers(hf_checkpoint, variant, sharded):
    folder, hf_model = hf_checkpoint(variant, max_shard_size="40KB" if sharded else None)
    assert (folder / "model.safetensors.index.json").exists() == sharded
    ours = load_model(folder)
    input_ids = torch.randint(0, ours.config.vocab_size, (2, SEQ_LEN),
                              generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(input_ids).logits
        actual = causal_logits(ours, input_ids)
    assert (actual - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_target_log_probs_match_transformers(hf_checkpoint, variant):
    """The training path: given targets, the head module returns each target's log-prob,
    read from the hidden state at its flat index, as log_softmax of transformers' logits."""
    folder, hf_model = hf_checkpoint(variant)
    ours = load_model(folder)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, ours.config.vocab_size, (2, SEQ_LEN), generator=generator)
    target_index = torch.randperm(2 * SEQ_LEN, generator=generator)[:17]
    target_ids = torch.randint(0, ours.config.vocab_size, (17,), generator=generator)
    positions = torch.arange(SEQ_LEN).expand(2, SEQ_LEN)
    zeros = torch.zeros_like(input_ids)
    masks = DENSE.layer_masks(zeros, zeros, positions, ours.config.attention_windows)
    with torch.no_grad():
        logps = hf_model(input_ids).logits.flatten(0, 1).log_softmax(-1)
        expected = logps[target_index, target_ids]
        actual = ours(input_ids, positions, masks, target_index, target_ids)
    assert actual.dtype == torch.float32 and actual.shape == (17,)
    assert (actual - expected).abs().max().item() <= 1e-5


def test_features_are_exercised(hf_checkpoint):
    """The variants differ where they should: scaling, window and tying change the logits."""
    folder, _ = hf_checkpoint("mistral_window")
    model = load_model(folder)
    assert model.config.sliding_window == 8
    unwindowed = build_model(replace(model.config, sliding_window=None, layer_types=()))
    unwindowed.load_state_dict(model.state_dict())
    input_ids = torch.randint(0, model.config.vocab_size, (1, SEQ_LEN))
    with torch.no_grad():
        windowed, full = causal_logits(model, input_ids), causal_logits(unwindowed, input_ids)
    # Identical inside the window, different beyond it.
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-6)
    assert (windowed[:, 8:] - full[:, 8:]).abs().max() > 1e-3

    folder, _ = hf_checkpoint("llama_tied")
    tied = load_model(folder)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert "lm_head.weight" not in dict(tied.named_parameters())  # one parameter, counted once

    folder, _ = hf_checkpoint("llama3_rope_scaling")
    scaled = load_model(folder)
    unscaled = build_model(replace(scaled.config, rope_scaling=None))
    unscaled.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        assert (causal_logits(scaled, input_ids) - causal_logits(unscaled, input_ids)).abs().max() > 1e-4


def differs(model, changed_config, input_ids, state=None) -> float:
    """Largest logit difference between `model` and the same weights under another config."""
    other = build_model(changed_config)
    other.load_state_dict(state if state is not None else model.state_dict())
    with torch.no_grad():
        return (causal_logits(model, input_ids) - causal_logits(other, input_ids)).abs().max()


@pytest.mark.parametrize("variant, feature", [
    ("qwen2_bias_tied", "qkv_bias"),
    ("qwen2_sliding_layers", "layer_types"),
    ("qwen3_qk_norm_bias", "qk_norm"),
    ("qwen3_qk_norm_bias", "o_bias"),
    ("gemma3_layer_types", "layer_types"),
    ("gemma3_layer_types", "sliding_rope_theta"),
    ("gemma3_layer_types", "rope_scaling"),
    ("gemma3_layer_types", "query_pre_attn_scalar"),
    ("gemma3_layer_types", "scale_embeddings"),
    ("gemma3_layer_types", "hidden_act"),
])
def test_family_features_are_exercised(hf_checkpoint, variant, feature):
    """Each family term the oracle test covers changes the logits of its tiny variant, so the
    parity above could not hold with the term dropped."""
    folder, _ = hf_checkpoint(variant)
    model = load_model(folder)
    config, state = model.config, model.state_dict()
    input_ids = torch.randint(0, config.vocab_size, (1, SEQ_LEN),
                              generator=torch.Generator().manual_seed(3))
    if feature == "qkv_bias":
        assert config.qkv_bias and not config.o_bias and "layers.0.self_attn.q_proj.bias" in state
        changed = replace(config, qkv_bias=False)
        state = {k: v for k, v in state.items() if not k.endswith("_proj.bias")}
    elif feature == "layer_types":
        assert set(config.layer_types) == {"full_attention", "sliding_attention"}
        assert len(config.attention_windows) == 2
        changed = replace(config, layer_types=("full_attention",) * config.num_hidden_layers)
    elif feature == "o_bias":
        assert config.qkv_bias and config.o_bias
        changed = replace(config, o_bias=False)
        state = {k: v for k, v in state.items() if not k.endswith("o_proj.bias")}
    elif feature == "qk_norm":
        assert config.head_dim * config.num_attention_heads != config.hidden_size
        changed = replace(config, qk_norm=False)
        state = {k: v for k, v in state.items() if "_norm." not in k or "layernorm" in k}
    elif feature == "sliding_rope_theta":
        assert config.sliding_rope_theta == 1e4 and config.rope_theta == 1e6
        changed = replace(config, sliding_rope_theta=None)
    elif feature == "rope_scaling":
        assert config.rope_scaling.factor == 4.0
        changed = replace(config, rope_scaling=None)
    elif feature == "query_pre_attn_scalar":
        assert config.attention_scale == 20 ** -0.5
        changed = replace(config, query_pre_attn_scalar=None)
    elif feature == "scale_embeddings":
        changed = replace(config, scale_embeddings=False)
    else:
        assert config.hidden_act == "gelu_pytorch_tanh"
        changed = replace(config, hidden_act="silu")
    assert differs(model, changed, input_ids, state) > 1e-4


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_saved_checkpoint_loads_in_transformers(hf_checkpoint, tmp_path, variant):
    import transformers

    folder, hf_model = hf_checkpoint(variant)
    ours = load_model(folder)
    out = save_hf_checkpoint(ours.state_dict(), ours.config, tmp_path / "saved",
                             max_shard_bytes=50_000)
    assert (out / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(reloaded) is type(hf_model)
    input_ids = torch.randint(0, ours.config.vocab_size, (2, SEQ_LEN))
    with torch.no_grad():
        expected = causal_logits(ours, input_ids)
        actual = reloaded(input_ids).logits
    assert (actual - expected).abs().max().item() <= 1e-5


def test_bfloat16_close_to_float32(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    fp32, bf16 = load_model(folder), load_model(folder, dtype=torch.bfloat16)
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    input_ids = torch.randint(0, fp32.config.vocab_size, (2, SEQ_LEN))
    with torch.no_grad():
        a, b = causal_logits(fp32, input_ids), causal_logits(bf16, input_ids).float()
    assert torch.linalg.norm(a - b) / torch.linalg.norm(a) < 2e-2
