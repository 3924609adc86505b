"""ModelConfig: the architecture hyperparameters of a Llama, Mistral, Qwen2, Qwen3 or Gemma 3 model.

The five families are one decoder with a few config-driven terms (DESIGN section 5):

| family  | what differs from Llama                                                          |
|---------|----------------------------------------------------------------------------------|
| Mistral | a sliding window on every layer                                                  |
| Qwen2   | bias on q/k/v; sliding layers from `layer_types` / `max_window_layers`           |
| Qwen3   | RMSNorm of each head's q and k before RoPE; an explicit `head_dim`               |
| Gemma 3 | RMSNorm as `x * (1 + w)` in float32, four norms per block, q/k norm, embeddings  |
|         | scaled by sqrt(hidden), GeLU-tanh MLP, `query_pre_attn_scalar`, sliding and full |
|         | layers mixed by `layer_types`, each layer type with its own RoPE                 |

Read from a Hugging Face `config.json` as transformers 5 writes it (`rope_parameters`, keyed by
layer type for Gemma 3; `layer_types`) and as older checkpoints write it (`rope_theta` +
`rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`, `use_sliding_window` +
`max_window_layers`), with each family's own defaults for absent keys. Anything this
implementation does not compute exactly as transformers does is refused with a message naming
the field or the architecture, never silently approximated. (Over the usual ~500 lines: the
five families' config forms and defaults are kept together, so each key has its rules in one
place.)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

# architectures[0] -> model_type, for the families implemented here.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
}
# Relatives that are refused, with the reason (anything else gets the plain list above).
UNSUPPORTED_ARCHITECTURES = {
    "Gemma3ForConditionalGeneration":
        "a Gemma 3 vision-language checkpoint (4B and larger); its text model alone is not "
        "read from it: use a text-only Gemma 3 (270M, 1B) or a folder holding its language "
        "model as a Gemma3ForCausalLM",
    "GemmaForCausalLM": "Gemma 1 is not implemented (Gemma 3 is: Gemma3ForCausalLM)",
    "Gemma2ForCausalLM": "Gemma 2's attention and final-logit soft-capping are not implemented "
                         "(Gemma 3 is: Gemma3ForCausalLM)",
    "Gemma3nForCausalLM": "Gemma 3n (per-layer embeddings, AltUp) is not implemented",
    "Gemma3nForConditionalGeneration": "Gemma 3n (per-layer embeddings, AltUp) is not implemented",
    "Gemma4ForCausalLM": "Gemma 4 is not implemented",
    "Gemma4ForConditionalGeneration": "Gemma 4 is not implemented",
    "Qwen2MoeForCausalLM": "mixture-of-experts layers are not implemented",
    "Qwen3MoeForCausalLM": "mixture-of-experts layers are not implemented",
    "Qwen3NextForCausalLM": "Qwen3-Next's hybrid linear-attention and mixture-of-experts layers "
                            "are not implemented",
    "Qwen3_5ForCausalLM": "the hybrid linear-attention layers of Qwen3.5 are not implemented",
    "Qwen2VLForConditionalGeneration": "vision-language models are not implemented",
    "Qwen2_5_VLForConditionalGeneration": "vision-language models are not implemented",
}
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class Llama3RopeScaling:
    """The `llama3` rope scaling of Llama 3.1 / 3.2 (frequency-dependent interpolation)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LinearRopeScaling:
    """The `linear` rope scaling (position interpolation): every frequency divided by
    `factor`. Gemma 3 4B and larger use it on their full-attention layers."""

    factor: float


RopeScaling = Union[Llama3RopeScaling, LinearRopeScaling]


@dataclass(frozen=True)
class Rope:
    """One layer type's rotary embedding: base and scaling."""

    theta: float
    scaling: RopeScaling | None = None


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    # RoPE of full-attention layers, and of sliding ones unless `sliding_rope_theta` is set.
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_rope_theta: float | None = None  # Gemma 3's local base (no scaling)
    # Per layer, FULL_ATTENTION or SLIDING_ATTENTION; empty: every layer sliding when
    # `sliding_window` is set (Mistral), else every layer full.
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None  # a query sees the `sliding_window` latest positions
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    architecture: str = "LlamaForCausalLM"
    qkv_bias: bool = False               # bias on q_proj, k_proj, v_proj (Qwen2)
    o_bias: bool = False                 # bias on o_proj (Llama / Qwen3 `attention_bias`)
    qk_norm: bool = False                # RMSNorm of each head's q and k (Qwen3, Gemma 3)
    norm_unit_offset: bool = False       # RMSNorm scales by (1 + w), in float32 (Gemma)
    sandwich_norms: bool = False         # norms after attention and around the MLP (Gemma 3)
    scale_embeddings: bool = False       # embeddings times sqrt(hidden_size) (Gemma)
    hidden_act: str = "silu"             # MLP gate activation, one of ACTIVATIONS
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this), else head_dim
    # The config.json this came from, kept so that saving preserves every field we do not model
    # (token ids, generation defaults, ...). Excluded from equality.
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(_unsupported(self.architecture))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, found {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, found {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window <= 0):
            raise ValueError(f"sliding_window must be a positive integer or null, found "
                             f"{self.sliding_window!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        layer_types = tuple(self.layer_types) or (
            (SLIDING_ATTENTION if self.sliding_window is not None else FULL_ATTENTION),
        ) * self.num_hidden_layers
        object.__setattr__(self, "layer_types", layer_types)
        if len(layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        for kind in layer_types:
            if kind not in LAYER_TYPES:
                raise ValueError(f"layer_types has {kind!r}; supported: {', '.join(LAYER_TYPES)}")
        if SLIDING_ATTENTION in layer_types and self.sliding_window is None:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is "
                             "null")

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's attention window (None: full attention)."""
        return tuple(self.sliding_window if kind == SLIDING_ATTENTION else None
                     for kind in self.layer_types)

    @property
    def attention_windows(self) -> tuple[int | None, ...]:
        """The distinct windows of the layers, in layer order: one attention mask each."""
        return tuple(dict.fromkeys(self.layer_windows))

    @property
    def layer_ropes(self) -> tuple[Rope, ...]:
        """Each layer's rotary embedding."""
        full = Rope(self.rope_theta, self.rope_scaling)
        sliding = full if self.sliding_rope_theta is None else Rope(self.sliding_rope_theta)
        return tuple(sliding if kind == SLIDING_ATTENTION else full for kind in self.layer_types)

    @property
    def attention_scale(self) -> float:
        """The factor of q.k in attention."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def num_params(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        d, q, kv = (self.hidden_size, self.num_attention_heads * self.head_dim,
                    self.num_key_value_heads * self.head_dim)
        attn = d * q * 2 + d * kv * 2
        attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias + 2 * self.head_dim * self.qk_norm
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + (4 if self.sandwich_norms else 2) * d
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_hidden_layers * per_layer + embed + head + d

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json content: the source file's fields unchanged when there is one (so
        nothing we do not model is lost), else generated from our fields in transformers 5's
        form."""
        if self.hf_config:
            # transformers needs both to pick the class; a hand-written file may lack one.
            return {"architectures": [self.architecture], "model_type": self.model_type,
                    **self.hf_config}
        out: dict[str, Any] = dict(
            architectures=[self.architecture],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
        )
        full = _rope_dict(Rope(self.rope_theta, self.rope_scaling))
        family = self.model_type
        if family == "gemma3_text":
            sliding = Rope(self.sliding_rope_theta or self.rope_theta)
            scalar = self.query_pre_attn_scalar
            out.update(hidden_activation=self.hidden_act, attention_bias=self.o_bias,
                       query_pre_attn_scalar=int(scalar) if float(scalar).is_integer()
                       else scalar,
                       sliding_window=self.sliding_window, layer_types=list(self.layer_types),
                       rope_parameters={FULL_ATTENTION: full,
                                        SLIDING_ATTENTION: _rope_dict(sliding)})
            return out
        out.update(hidden_act=self.hidden_act, rope_parameters=full)
        if family == "mistral":
            out["sliding_window"] = self.sliding_window
        elif family in ("qwen2", "qwen3"):
            sliding = SLIDING_ATTENTION in self.layer_types
            out.update(use_sliding_window=sliding, sliding_window=self.sliding_window,
                       max_window_layers=self.layer_types.index(SLIDING_ATTENTION) if sliding
                       else self.num_hidden_layers,
                       layer_types=list(self.layer_types))
            if family == "qwen3":
                out["attention_bias"] = self.o_bias
        else:
            out.update(attention_bias=self.o_bias, mlp_bias=False)
        return out

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        return _parse_hf_config(raw, source)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{path}: model config not found (expected a Hugging Face config.json)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        return _parse_hf_config(raw, str(path))


def _unsupported(architecture: str) -> str:
    reason = UNSUPPORTED_ARCHITECTURES.get(architecture)
    supported = f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    if reason:
        return f"architecture {architecture!r} is not supported: {reason} ({supported})"
    return f"architecture {architecture!r} is not supported ({supported})"


def _rope_dict(rope: Rope) -> dict[str, Any]:
    if rope.scaling is None:
        return {"rope_type": "default", "rope_theta": rope.theta}
    if isinstance(rope.scaling, LinearRopeScaling):
        return {"rope_type": "linear", "rope_theta": rope.theta, "factor": rope.scaling.factor}
    s = rope.scaling
    return {"rope_type": "llama3", "rope_theta": rope.theta, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}


# What transformers' config classes assume for keys a config.json lacks, per family (where it
# is not Llama's). Mistral: a config without `sliding_window` gets a window of 4096; an
# explicit null means full attention.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 4096},
    "qwen2": {"sliding_window": 4096, "max_window_layers": 28, "use_sliding_window": False},
    "qwen3": {"sliding_window": 4096, "max_window_layers": 28, "use_sliding_window": False,
              "head_dim": 128},
    # The text configs inside Gemma 3 vision-language checkpoints leave out whatever equals
    # these.
    "gemma3_text": {"vocab_size": 262_208, "num_attention_heads": 8, "num_key_value_heads": 4,
                    "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                    "max_position_embeddings": 131_072, "tie_word_embeddings": True,
                    "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 1_000_000.0,
                    "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6},
}
# The type of each field read as a number or flag, checked before any is used, so a wrong one
# ("hidden_size": "128") is named rather than failing in the arithmetic it reaches first.
_FIELD_TYPES = {**dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size",
                                 "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "head_dim", "max_position_embeddings",
                                 "sliding_window"), int),
                **dict.fromkeys(("rms_norm_eps", "initializer_range", "rope_theta",
                                 "query_pre_attn_scalar"), float),
                **dict.fromkeys(("tie_word_embeddings", "attention_bias"), bool)}


def _parse_hf_config(raw: dict[str, Any], source: str) -> ModelConfig:
    def fail(message: str) -> ValueError:
        return ValueError(f"{source}: {message}")

    architecture = _architecture(raw, fail)
    family = SUPPORTED_ARCHITECTURES[architecture]
    defaults = _FAMILY_DEFAULTS[family]

    def get(name: str, default: Any = None, required: bool = False) -> Any:
        if name not in raw or raw[name] is None:
            if required and name not in defaults:
                raise fail(f"required field {name!r} is missing")
            return defaults.get(name, default)
        return raw[name]

    for name, kind in _FIELD_TYPES.items():
        value = raw.get(name)
        if value is not None and not (type(value) is kind or kind is float and type(value) is int):
            expected = {int: "an integer", float: "a number", bool: "true or false"}[kind]
            raise fail(f"field {name!r} = {value!r}: expected {expected}")

    # Features transformers would compute and we do not: refuse rather than diverge.
    activation_key = "hidden_activation" if family == "gemma3_text" else "hidden_act"
    hidden_act = get(activation_key, "silu")
    allowed = ("gelu_pytorch_tanh",) if family == "gemma3_text" else ("silu",)
    if hidden_act not in allowed:
        raise fail(f"field {activation_key!r} = {hidden_act!r} is not supported "
                   f"(only {', '.join(map(repr, allowed))})")
    if get("mlp_bias", False):
        raise fail("field 'mlp_bias' = true is not supported (no bias in the MLP)")
    if get("attention_dropout", 0.0):
        raise fail(f"field 'attention_dropout' = {raw['attention_dropout']} is not supported "
                   "(0 only)")
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if get(name) is not None:
            raise fail(f"field {name!r} = {raw[name]} is not supported (soft-capping is not "
                       "implemented; Gemma 3 has none)")
    if get("use_bidirectional_attention", False):
        raise fail("field 'use_bidirectional_attention' = true is not supported (causal "
                   "attention only)")

    num_heads = get("num_attention_heads", required=True)
    hidden_size = get("hidden_size", required=True)
    num_layers = get("num_hidden_layers", required=True)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
        raise fail(f"field 'num_hidden_layers' must be a positive integer, found {num_layers!r}")
    sliding_window, layer_types = _attention_pattern(raw, family, num_layers, get, fail)
    full_rope, sliding_theta = _parse_ropes(raw, family, get, fail)
    attention_bias = bool(get("attention_bias", False))
    default_head_dim = hidden_size // num_heads if isinstance(num_heads, int) and \
        isinstance(hidden_size, int) and num_heads > 0 else 0
    gemma = family == "gemma3_text"
    try:
        return ModelConfig(
            vocab_size=get("vocab_size", required=True),
            hidden_size=hidden_size,
            intermediate_size=get("intermediate_size", required=True),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=get("num_key_value_heads", num_heads),
            head_dim=get("head_dim", default_head_dim),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=full_rope.theta,
            rope_scaling=full_rope.scaling,
            sliding_rope_theta=sliding_theta,
            layer_types=layer_types,
            sliding_window=sliding_window,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            max_position_embeddings=get("max_position_embeddings", 4096),
            initializer_range=float(get("initializer_range", 0.02)),
            architecture=architecture,
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family != "qwen2" and attention_bias,
            qk_norm=family in ("qwen3", "gemma3_text"),
            norm_unit_offset=gemma,
            sandwich_norms=gemma,
            scale_embeddings=gemma,
            hidden_act=hidden_act,
            query_pre_attn_scalar=float(get("query_pre_attn_scalar")) if gemma else None,
            hf_config=dict(raw),
        )
    except (ValueError, TypeError) as e:
        raise fail(str(e)) from None


def _architecture(raw: dict[str, Any], fail) -> str:
    architectures = raw.get("architectures")
    if architectures:
        if not isinstance(architectures, list) or len(architectures) != 1:
            raise fail(f"field 'architectures' = {architectures!r}: expected one architecture")
        if architectures[0] not in SUPPORTED_ARCHITECTURES:
            raise fail(_unsupported(architectures[0]))
        return architectures[0]
    by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
    model_type = raw.get("model_type")
    if model_type not in by_type:
        raise fail(f"model_type {model_type!r} is not supported and no 'architectures' is given "
                   f"(supported: {', '.join(by_type)})")
    return by_type[model_type]


def _attention_pattern(raw: dict[str, Any], family: str, num_layers: int, get, fail
                       ) -> tuple[int | None, tuple[str, ...]]:
    """(sliding window, layer types) as each family's transformers config derives them."""
    # A missing key means the family's default window; an explicit null, no window.
    window = raw["sliding_window"] if "sliding_window" in raw else get("sliding_window")
    explicit = raw.get("layer_types")
    if family in ("llama", "mistral"):
        if explicit is not None:
            raise fail(f"field 'layer_types' is set on a {family} model, whose transformers "
                       "class ignores it; remove it (alternating layers are not Mistral's)")
        if family == "llama":
            if window is not None:
                raise fail("field 'sliding_window' is set on a Llama model; only Mistral, "
                           "Qwen and Gemma use it")
            return None, ()
        return window, ()
    if family in ("qwen2", "qwen3") and not get("use_sliding_window", False):
        window = None  # transformers drops the window when use_sliding_window is false
    if explicit is not None:
        if not isinstance(explicit, list) or not all(isinstance(t, str) for t in explicit):
            raise fail(f"field 'layer_types' must be a list of strings, found {explicit!r}")
        for kind in explicit:
            if kind not in LAYER_TYPES:
                raise fail(f"field 'layer_types' has {kind!r}, which is not supported "
                           f"(supported: {', '.join(LAYER_TYPES)})")
        if len(explicit) != num_layers:
            raise fail(f"field 'layer_types' has {len(explicit)} entries for {num_layers} "
                       "layers")
        if SLIDING_ATTENTION in explicit and window is None:
            raise fail("field 'layer_types' has sliding_attention layers but no sliding window "
                       "is set (sliding_window, use_sliding_window)")
        return (window if SLIDING_ATTENTION in explicit else None), tuple(explicit)
    if family == "gemma3_text":
        pattern = get("sliding_window_pattern")
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
            raise fail(f"field 'sliding_window_pattern' must be a positive integer, found "
                       f"{pattern!r}")
        types = tuple(SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION
                      for i in range(num_layers))
    else:  # Qwen: layers from max_window_layers on slide, when a window is set
        first = get("max_window_layers")
        types = tuple(SLIDING_ATTENTION if window is not None and i >= first else FULL_ATTENTION
                      for i in range(num_layers))
    return (window if SLIDING_ATTENTION in types else None), types


def _parse_ropes(raw: dict[str, Any], family: str, get, fail) -> tuple[Rope, float | None]:
    """(the full-attention layers' Rope, the sliding layers' base if it differs)."""
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise fail(f"field 'rope_parameters' must be an object, found {params!r}")
    if family != "gemma3_text":
        if params is not None:
            return _parse_rope(params, raw.get("rope_theta", 10000.0), "rope_parameters", fail), None
        return _parse_rope(raw.get("rope_scaling"), raw.get("rope_theta", 10000.0),
                           "rope_scaling", fail), None
    # Gemma 3: transformers 5 writes one block per layer type; older files rope_theta (global),
    # rope_local_base_freq and rope_scaling (global only).
    if params is not None and set(params) & set(LAYER_TYPES):
        full = _parse_rope(params.get(FULL_ATTENTION) or {}, get("rope_theta"),
                           f"rope_parameters.{FULL_ATTENTION}", fail)
        local = _parse_rope(params.get(SLIDING_ATTENTION) or {}, get("rope_local_base_freq"),
                            f"rope_parameters.{SLIDING_ATTENTION}", fail)
    else:
        full = _parse_rope(params if params is not None else raw.get("rope_scaling"),
                           get("rope_theta"), "rope_parameters" if params is not None
                           else "rope_scaling", fail)
        local = Rope(_theta(get("rope_local_base_freq"), "rope_local_base_freq", fail))
    if local.scaling is not None:
        raise fail(f"field 'rope_parameters.{SLIDING_ATTENTION}' has rope scaling; only the "
                   "full-attention layers' RoPE may be scaled")
    return full, local.theta


def _theta(value: Any, where: str, fail) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
            or not math.isfinite(value):
        raise fail(f"field {where!r} must be a positive number, found {value!r}")
    return float(value)


def _parse_rope(scaling: Any, default_theta: Any, where: str, fail) -> Rope:
    """A RoPE block: `rope_parameters` (with its own `rope_theta`) or a classic
    `rope_scaling` next to a top-level theta."""
    if scaling is None:
        return Rope(_theta(default_theta, "rope_theta", fail))
    if not isinstance(scaling, dict):
        raise fail(f"field {where!r} must be an object or null, found {scaling!r}")
    theta_where = f"{where}.rope_theta" if "rope_theta" in scaling else "rope_theta"
    theta = _theta(scaling.get("rope_theta", default_theta), theta_where, fail)
    partial = scaling.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise fail(f"field '{where}.partial_rotary_factor' = {partial!r} is not supported "
                   "(RoPE on the whole head only)")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return Rope(theta)
    if rope_type not in ("llama3", "linear"):
        raise fail(f"field '{where}.rope_type' = {rope_type!r} is not supported "
                   "(supported: default, linear, llama3)")
    try:
        if rope_type == "linear":
            result: RopeScaling = LinearRopeScaling(factor=float(scaling["factor"]))
        else:
            result = Llama3RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
    except KeyError as e:
        raise fail(f"field '{where}' lacks {e.args[0]!r}, which {rope_type} rope scaling "
                   "needs") from None
    except (TypeError, ValueError):
        raise fail(f"field '{where}' has invalid {rope_type} values: {scaling}") from None
    if not (result.factor > 0 and math.isfinite(result.factor)):
        raise fail(f"field '{where}' has invalid {rope_type} values: {scaling}")
    if isinstance(result, Llama3RopeScaling) and \
            not result.high_freq_factor > result.low_freq_factor > 0:
        raise fail(f"field '{where}' has invalid llama3 values: {scaling}")
    return Rope(theta, result)
