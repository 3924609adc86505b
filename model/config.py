"""ModelConfig: the architecture hyperparameters of a Llama or Mistral model.

Read from a Hugging Face `config.json` (both the classic `rope_theta` / `rope_scaling` fields and
the newer `rope_parameters` block), validated, and written back. Anything this implementation
does not compute exactly as transformers does is refused with a message naming the field, never
silently approximated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}


@dataclass(frozen=True)
class Llama3RopeScaling:
    """The `llama3` rope scaling of Llama 3.1 / 3.2 (frequency-dependent interpolation)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


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
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    architecture: str = "LlamaForCausalLM"
    # The config.json this came from, kept so that saving preserves every field we do not model
    # (token ids, generation defaults, ...). Excluded from equality.
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
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
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or null, found {self.sliding_window}")

    @property
    def num_params(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        d, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attn = d * self.num_attention_heads * self.head_dim * 2 + d * kv * 2
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_hidden_layers * per_layer + embed + head + d

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json content: the source file's fields unchanged when there is one (so
        nothing we do not model is lost), else generated from our fields."""
        if self.hf_config:
            # transformers needs both to pick the class; a hand-written file may lack one.
            return {"architectures": [self.architecture],
                    "model_type": SUPPORTED_ARCHITECTURES[self.architecture],
                    **self.hf_config}
        out: dict[str, Any] = dict(
            architectures=[self.architecture],
            model_type=SUPPORTED_ARCHITECTURES[self.architecture],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=None if self.rope_scaling is None else {
                "rope_type": "llama3",
                "factor": self.rope_scaling.factor,
                "low_freq_factor": self.rope_scaling.low_freq_factor,
                "high_freq_factor": self.rope_scaling.high_freq_factor,
                "original_max_position_embeddings":
                    self.rope_scaling.original_max_position_embeddings,
            },
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
        )
        if self.architecture == "MistralForCausalLM":
            out["sliding_window"] = self.sliding_window
        else:
            out.update(attention_bias=False, mlp_bias=False)
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


# What transformers' MistralConfig assumes when config.json has no `sliding_window`.
MISTRAL_DEFAULT_SLIDING_WINDOW = 4096


def _parse_hf_config(raw: dict[str, Any], source: str) -> ModelConfig:
    def fail(message: str) -> ValueError:
        return ValueError(f"{source}: {message}")

    def get(name: str, default: Any = None, required: bool = False) -> Any:
        if name not in raw or raw[name] is None:
            if required:
                raise fail(f"required field {name!r} is missing")
            return default
        return raw[name]

    architectures = get("architectures")
    if architectures:
        if not isinstance(architectures, list) or len(architectures) != 1:
            raise fail(f"field 'architectures' = {architectures!r}: expected one architecture")
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise fail(
                f"architecture {architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
    else:
        by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
        model_type = get("model_type")
        if model_type not in by_type:
            raise fail(
                f"model_type {model_type!r} is not supported and no 'architectures' is given "
                f"(supported: {', '.join(by_type)})"
            )
        architecture = by_type[model_type]

    # Features transformers would compute and we do not: refuse rather than diverge.
    hidden_act = get("hidden_act", "silu")
    if hidden_act != "silu":
        raise fail(f"field 'hidden_act' = {hidden_act!r} is not supported (only 'silu')")
    for name in ("attention_bias", "mlp_bias"):
        if get(name, False):
            raise fail(f"field {name!r} = true is not supported (no bias in projections)")
    if get("attention_dropout", 0.0):
        raise fail(f"field 'attention_dropout' = {raw['attention_dropout']} is not supported (0 only)")

    num_heads = get("num_attention_heads", required=True)
    hidden_size = get("hidden_size", required=True)
    rope_theta, rope_scaling = _parse_rope(raw, fail)

    # Mistral: a config without the key gets transformers' default window of 4096; an explicit
    # null means full attention. (transformers ignores `use_sliding_window` for Mistral.)
    sliding_window = get("sliding_window")
    if architecture == "LlamaForCausalLM" and sliding_window is not None:
        raise fail("field 'sliding_window' is set on a Llama model; only Mistral uses it")
    if architecture == "MistralForCausalLM" and "sliding_window" not in raw:
        sliding_window = MISTRAL_DEFAULT_SLIDING_WINDOW
    try:
        return ModelConfig(
            vocab_size=get("vocab_size", required=True),
            hidden_size=hidden_size,
            intermediate_size=get("intermediate_size", required=True),
            num_hidden_layers=get("num_hidden_layers", required=True),
            num_attention_heads=num_heads,
            num_key_value_heads=get("num_key_value_heads", num_heads),
            head_dim=get("head_dim", hidden_size // num_heads if isinstance(num_heads, int)
                         and num_heads > 0 else 0),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            sliding_window=sliding_window,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            max_position_embeddings=get("max_position_embeddings", 4096),
            initializer_range=float(get("initializer_range", 0.02)),
            architecture=architecture,
            hf_config=dict(raw),
        )
    except (ValueError, TypeError) as e:
        raise fail(str(e)) from None


def _parse_rope(raw: dict[str, Any], fail) -> tuple[float, Llama3RopeScaling | None]:
    # transformers >= 5 writes {"rope_parameters": {"rope_theta":..., "rope_type":..., ...}};
    # older files have rope_theta and rope_scaling at the top level.
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise fail(f"field 'rope_parameters' must be an object, found {params!r}")
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
        where = "rope_parameters"
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling")
        where = "rope_scaling"
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise fail(f"field 'rope_theta' must be a positive number, found {theta!r}")
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise fail(f"field {where!r} must be an object or null, found {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise fail(f"field '{where}.rope_type' = {rope_type!r} is not supported "
                   "(supported: default, llama3)")
    try:
        result = Llama3RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise fail(f"field '{where}' lacks {e.args[0]!r}, which llama3 rope scaling needs") from None
    if not (result.factor > 0 and result.high_freq_factor > result.low_freq_factor > 0
            and math.isfinite(result.factor)):
        raise fail(f"field '{where}' has invalid llama3 values: {scaling}")
    return float(theta), result
