"""The decoder of Llama, Mistral, Qwen2, Qwen3 and Gemma 3, written to be read top to bottom.

One model, with the few terms that tell the families apart driven by the config (see
`model.config`): bias on q/k/v/o, RMSNorm of each head's q and k, Gemma's `(1 + w)` norms and
the norms around attention and MLP, scaled embeddings, the MLP's activation, the attention
scale, and a per-layer attention window and RoPE. Module and parameter names are Hugging
Face's leaf names (`q_proj`, `gate_proj`, `input_layernorm`, `q_norm`, ...), so a checkpoint
converts by dropping the `model.` prefix; no q/k permutation is needed because RoPE here is the
rotate-half form transformers uses.

Prefix sharing needs three things from the model, all explicit inputs of `forward`:
- `positions`: RoPE is indexed by these, not by the index in the row, so every completion
  restarts at the prompt length;
- attention masks, one per distinct attention window of the layers (`LayerMasks`), built by
  the executor that attends with them (`model.executor`: FlexAttention, dense SDPA, or SDPA
  per document);
- the flat indexes of the hidden states that predict each target token, so log-probs are
  computed only where they are needed (see `kernels.linear_log_probs`).

Nothing here knows about FSDP, activation checkpointing or compilation: `train.parallelize`
applies those from outside. The module is built on the meta device and initialized in one
place, `initial_weights`, which draws each parameter's full value in turn, so a model whose
parameters are split over ranks keeps the same weights. It has no buffers: RoPE frequencies
are derived from the config.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefixdpo.kernels.log_probs import linear_log_probs
from prefixdpo.model.config import LinearRopeScaling, ModelConfig, Rope
from prefixdpo.model.executor import LayerMasks


def rope_inverse_frequencies(rope: Rope, head_dim: int, device: torch.device | None = None
                             ) -> Tensor:
    """Per-pair rotation frequencies `[head_dim // 2]`, float32, as transformers computes them.
    Recomputed on each forward (a few tiny ops) rather than kept in a buffer that a dtype cast
    of the module would round."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    scaling = rope.scaling
    if scaling is None:
        return inv_freq
    if isinstance(scaling, LinearRopeScaling):  # position interpolation
        return inv_freq / scaling.factor
    # Llama 3.x: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly.
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin `[B, L, head_dim]` for integer positions `[B, L]`, computed in float32."""
    angles = positions.float()[..., None] * inv_freq  # [B, L, head_dim // 2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on `x [B, heads, L, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension. Llama's scales by `w` in the input dtype after
    normalizing in float32; Gemma's (`unit_offset`) by `1 + w`, all in float32, each as
    transformers computes it in bfloat16 too."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, window: int | None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.window = window  # which of the micro-batch's masks this layer takes
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=config.o_bias)
        if config.qk_norm:  # Qwen3, Gemma 3: each head's q and k normalized before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_unit_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_unit_offset)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, masks: LayerMasks) -> Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = masks.attend(q, k, v, self.window, self.scale)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.tanh_gelu = config.hidden_act == "gelu_pytorch_tanh"  # Gemma; else SiLU

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.tanh_gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Llama's block: `x + attn(norm(x))`, then `h + mlp(norm(h))`. With sandwich norms
    (Gemma 3) the attention's and the MLP's outputs are normalized too before they are added,
    and the MLP's input norm is `pre_feedforward_layernorm` (Gemma's `post_attention_layernorm`
    is the norm *after* attention, Llama's the one before the MLP: the names are Hugging
    Face's)."""

    def __init__(self, config: ModelConfig, window: int | None):
        super().__init__()
        d, eps, offset = config.hidden_size, config.rms_norm_eps, config.norm_unit_offset
        self.input_layernorm = RMSNorm(d, eps, offset)
        self.self_attn = Attention(config, window)
        self.post_attention_layernorm = RMSNorm(d, eps, offset)
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(d, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(d, eps, offset)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, masks: LayerMasks) -> Tensor:
        attended = self.self_attn(self.input_layernorm(x), cos, sin, masks)
        if not hasattr(self, "pre_feedforward_layernorm"):
            x = x + attended
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class LMHead(nn.Module):
    """The output projection `weight [vocab, hidden]` (Hugging Face's `lm_head`), applied only
    where there are targets: the chunked kernel returns each target's float32 log-prob without
    `[tokens, vocab]` logits ever existing whole. The projection runs in this module's own
    forward so that a wrapper that gathers a module's weights for its forward covers it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))

    def forward(self, hidden: Tensor, target_ids: Tensor, log_sum_sq_probs: bool = False
                ) -> Tensor | tuple[Tensor, Tensor]:
        """hidden `[T, D]`, target_ids `[T]` -> log-probs `[T]` float32; with
        `log_sum_sq_probs`, also each token's log(sum_v p_v^2) `[T]` (no gradient)."""
        return linear_log_probs(hidden, self.weight, target_ids,
                                log_sum_sq_probs=log_sum_sq_probs)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, window)
                                    for window in config.layer_windows)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        self.lm_head = LMHead(config)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Llama 3.2 1B/3B share the embedding and the head. Module-wise transforms such as
        `to_empty` untie them, so this is called again after those."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def initial_weights(self, generator: torch.Generator | None = None
                        ) -> Iterator[tuple[nn.Parameter, Tensor]]:
        """Random initialization, transformers' scheme: N(0, initializer_range) for the
        embedding and the projection weights, zero biases, norms at one (at zero for Gemma's
        `1 + w` norms: the same identity). Yields each parameter with its full float32 value,
        drawn on the generator's device (the parameter's without one), one at a time and in
        module order, so that whoever stores only part of a parameter gets the same numbers.
        With tied embeddings the head's draw comes after, and replaces, the embedding's: the
        order this scheme has always had, so a seed keeps its weights."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, LMHead)):
                weight = module.weight
                device = weight.device if generator is None else generator.device
                value = torch.empty(weight.shape, device=device)
                yield weight, value.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    yield module.bias, torch.zeros(module.bias.shape, device=device)
            elif isinstance(module, RMSNorm):
                fill = 0.0 if module.unit_offset else 1.0
                yield module.weight, torch.full(module.weight.shape, fill,
                                                device=module.weight.device)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random initialization of a materialized model (see `initial_weights`)."""
        for param, value in self.initial_weights(generator):
            param.copy_(value)

    def forward(self, input_ids: Tensor, positions: Tensor, masks: LayerMasks,
                target_index: Tensor | None = None, target_ids: Tensor | None = None,
                log_sum_sq_probs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Hidden states `[B, L, D]` after the final norm; or, given targets, the float32
        log-prob `[T]` of each `target_ids[t]` predicted by the hidden state at flat index
        `target_index[t]` of the `[B * L]` grid, computed by the head module (`LMHead`).
        With `log_sum_sq_probs` (WPO's weights), the pair (log-probs `[T]`, log(sum_v p_v^2)
        `[T]` without gradient), from the same chunked pass of the head. `masks` holds one
        mask per attention window of the layers, with the executor that attends with them."""
        h = self.embed_tokens(input_ids)
        if self.config.scale_embeddings:
            # Gemma: sqrt(hidden) rounded to float32, then to the embedding's dtype, as
            # transformers rounds it.
            h = h * float(torch.tensor(self.config.hidden_size ** 0.5).to(h.dtype))
        # One cos/sin per distinct RoPE (Gemma 3: one for sliding and one for full layers).
        rotations: dict[Rope, tuple[Tensor, Tensor]] = {}
        for rope in dict.fromkeys(self.config.layer_ropes):
            inv_freq = rope_inverse_frequencies(rope, self.config.head_dim, positions.device)
            rotations[rope] = rope_cos_sin(positions, inv_freq, h.dtype)
        for layer, rope in zip(self.layers, self.config.layer_ropes):
            h = layer(h, *rotations[rope], masks)
        h = self.norm(h)
        if target_index is None:
            return h
        if log_sum_sq_probs:
            return self.lm_head(h.flatten(0, 1)[target_index], target_ids, log_sum_sq_probs=True)
        return self.lm_head(h.flatten(0, 1)[target_index], target_ids)

    def logits(self, hidden: Tensor) -> Tensor:
        """Full logits from hidden states; for tests and small unsharded models only."""
        return F.linear(hidden, self.lm_head.weight)


def build_model(config: ModelConfig, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, seed: int | None = None) -> Transformer:
    """Build on the meta device and materialize on `device` in `dtype`, whole. With a seed
    the weights are randomly initialized (drawn in float32, then stored in `dtype`: the same
    on every rank); without, they are left for a loader. `train.build.ModelSource` builds the
    sharded equivalent."""
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    if seed is not None:
        model.init_weights(torch.Generator(device=device).manual_seed(seed))
    return model
