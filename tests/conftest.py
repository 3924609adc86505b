"""Shared fixtures: tiny random model configs and Hugging Face checkpoints made by transformers
(the oracle), saved with `save_pretrained` so they are read through our own loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from prefixdpo.data.example import Example, Group
from prefixdpo.data.layout import PADDING_DOCUMENT

from prefixdpo.model.config import LinearRopeScaling, ModelConfig
from prefixdpo.model.executor import AttentionExecutor

# The executors, for tests that pick one (FLEX: eager FlexAttention on the CPU, forward only).
DENSE, DOCUMENTS, FLEX = (AttentionExecutor(name) for name in ("dense", "documents", "flex"))

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5)

# Variants the oracle tests run over: each exercises one architecture feature.
HF_VARIANTS = {
    "llama_gqa": ("llama", {}),
    "llama3_rope_scaling": ("llama", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_tied": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral_window": ("mistral", dict(sliding_window=8)),
    # Qwen2: bias on q/k/v; tied embeddings; layers from max_window_layers on slide.
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2_sliding_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=6,
                                           max_window_layers=1)),
    # Qwen3: q/k norm, an explicit head_dim unlike hidden / heads, untied; attention_bias
    # (off in the released models) puts a bias on q, k, v and o.
    "qwen3_qk_norm_bias": ("qwen3", dict(head_dim=24, rope_theta=1e6, attention_bias=True)),
    # Gemma 3: (1 + w) and sandwich norms, scaled embeddings, GeLU-tanh, query_pre_attn_scalar,
    # a sliding layer then a full one, each with its own RoPE (linear scaling on the full one).
    "gemma3_layer_types": ("gemma3", dict(
        head_dim=24, query_pre_attn_scalar=20, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1e6}})),
}


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(TINY, head_dim=TINY["hidden_size"] // TINY["num_attention_heads"])
    fields.update(overrides)
    return ModelConfig(**fields)


# Tiny configs of our own model, one per family, each with the terms that set it apart (for the
# tests of our model alone: layouts, executors, sharding). Windows are shorter than the rows.
FAMILIES = {
    "llama": {},
    "mistral_window": dict(architecture="MistralForCausalLM", sliding_window=6),
    "qwen2_sliding_layers": dict(architecture="Qwen2ForCausalLM", qkv_bias=True,
                                 sliding_window=6,
                                 layer_types=("full_attention", "sliding_attention")),
    "qwen3": dict(architecture="Qwen3ForCausalLM", qk_norm=True, head_dim=24, rope_theta=1e6),
    "gemma3": dict(architecture="Gemma3ForCausalLM", qk_norm=True, norm_unit_offset=True,
                   sandwich_norms=True, scale_embeddings=True, hidden_act="gelu_pytorch_tanh",
                   query_pre_attn_scalar=20.0, head_dim=24, sliding_window=6,
                   layer_types=("sliding_attention", "full_attention"), rope_theta=1e6,
                   rope_scaling=LinearRopeScaling(4.0), sliding_rope_theta=1e4,
                   tie_word_embeddings=True),
}


def family_config(family: str, **overrides) -> ModelConfig:
    return tiny_config(**{**FAMILIES[family], **overrides})


def family_model(family: str, seed: int = 0, **overrides):
    """Our model of a family's tiny config, its norms and biases randomized too (initialized
    to constants, a dropped one would not show)."""
    from prefixdpo.model.transformer import build_model

    model = build_model(family_config(family, **overrides), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.rand(p.shape, generator=generator) - 0.5 + ("norm" in name))
    return model


def make_hf_model(kind: str, **overrides):
    """A randomly initialized transformers model (eager attention, float32)."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[kind]
    config = config_cls(**dict(TINY, **overrides))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    # transformers initializes norms to one (Gemma's to zero) and biases to zero; randomize
    # them so a dropped norm or bias would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def random_examples(n: int, vocab: int, seed: int = 0, max_len: int = 12) -> list[Example]:
    """Examples of random tokens: mostly pairs, every fifth with two different prompts, every
    fifth with three ranked completions."""
    rng = np.random.default_rng(seed)
    draw = lambda: rng.integers(0, vocab, rng.integers(1, max_len)).astype(np.int32)  # noqa: E731
    examples = []
    for i in range(n):
        if i % 5 == 3:  # chosen and rejected prompts differ: two groups, nothing shared
            groups = (Group(draw(), (draw(),)), Group(draw(), (draw(),)))
            pairs = ((0, 1),)
        elif i % 5 == 4:  # three ranked completions of one prompt
            groups = (Group(draw(), (draw(), draw(), draw())),)
            pairs = ((0, 1), (0, 2), (1, 2))
        else:
            groups = (Group(draw(), (draw(), draw())),)
            pairs = ((0, 1),)
        examples.append(Example(i, groups, pairs))
    return examples


@pytest.fixture
def hf_checkpoint(tmp_path: Path):
    """Factory: save a tiny transformers model of a variant; returns (folder, model)."""

    def make(variant: str, max_shard_size: str | None = None):
        kind, overrides = HF_VARIANTS[variant]
        model = make_hf_model(kind, **overrides)
        folder = tmp_path / variant
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(folder, **kwargs)
        return folder, model

    return make


def reshards_after_forward(module) -> bool:
    """Whether an FSDP2 unit frees its gathered weights after forward. FSDP2 keeps no mesh to
    reshard to when it keeps them. Private state, read the way each supported torch holds it
    (one parameter group up to 2.11, a list of them later)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        groups = [g for g in [state._fsdp_param_group] if g is not None]
    return all(group.post_forward_mesh_info is not None for group in groups)


def row_tensors(groups: list[tuple[int, tuple[int, ...]]], length: int
                ) -> tuple[list[int], list[int], list[int]]:
    """Document ids, segment ids and positions of one row holding `groups`, each (prompt
    length, completion lengths), padded to `length`."""
    documents, segments, positions = [], [], []
    for document, (prompt, completions) in enumerate(groups):
        documents += [document] * (prompt + sum(completions))
        segments += [0] * prompt
        positions += list(range(prompt))
        for segment, completion in enumerate(completions, start=1):
            segments += [segment] * completion
            positions += list(range(prompt, prompt + completion))
    pad = length - len(documents)
    assert pad >= 0
    return documents + [PADDING_DOCUMENT] * pad, segments + [0] * pad, positions + [0] * pad


def causal_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of each row of `input_ids` alone, causally, through the dense-mask path."""
    batch, seq_len = input_ids.shape
    positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
    zeros = torch.zeros_like(input_ids)
    masks = DENSE.layer_masks(zeros, zeros, positions, model.config.attention_windows)
    return model.logits(model(input_ids, positions, masks))
