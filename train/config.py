"""The training config: frozen dataclass sections loaded from TOML, with strict overrides.

    torchrun train.py --config configs/demo.toml --train.steps=50 --loss.beta=0.2

Every key is checked against its dataclass field: an unknown section or key is refused with
the valid ones listed, a value of the wrong type is refused naming `section.key`, and each
section's own `__post_init__` checks ranges. Every float (and every float in a list) must be
finite: `nan` and `inf`, which TOML accepts, are refused naming the key. The resolved config is
written next to every checkpoint (`to_toml`). Relative paths are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefixdpo.data.config import DataConfig
from prefixdpo.train.losses import LossConfig

REFERENCE_MODES = ("auto", "precomputed", "live", "none", "adapters_off")
SCHEDULES = ("cosine", "linear", "constant")
NONFINITE_POLICIES = ("stop", "skip")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_EXECUTORS = ("auto", "flex", "documents", "dense")
FLEX_BACKENDS = ("triton", "flash")
REPORTERS = ("tensorboard", "wandb")
# The projections LoRA may adapt (Hugging Face leaf names); all of them by default.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSection:
    path: str = ""            # Hugging Face checkpoint folder or hub repo id
    config: str = ""          # or a config.json, for a randomly initialized model
    init_seed: int = 0        # seed of the random initialization

    def __post_init__(self) -> None:
        if bool(self.path) == bool(self.config):
            raise ValueError("set exactly one of model.path (a checkpoint) and model.config "
                             "(a config.json for random initialization)")
        _check_seed("model.init_seed", self.init_seed)


@dataclass(frozen=True)
class ReferenceSection:
    # precomputed: one no-grad pass of the initial model before training, cached on disk
    # live: a frozen copy of the initial model runs beside the policy
    # none: reference-free losses only (simpo, sft)
    # adapters_off: the policy itself with its LoRA adapters disabled (needs lora.rank > 0)
    # auto: adapters_off with LoRA, else precomputed, or live with sync_ref_model (resolved
    # when the config is built)
    mode: str = "auto"
    cache_dir: str = ""       # "" = ~/.cache/prefixdpo/reference
    # TR-DPO (TRL's names): every ref_model_sync_steps steps the live reference becomes
    # ref_model_mixup_alpha * policy + (1 - ref_model_mixup_alpha) * reference
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    def __post_init__(self) -> None:
        _check_choice("reference.mode", self.mode, REFERENCE_MODES)
        if not 0 <= self.ref_model_mixup_alpha <= 1:
            raise ValueError(f"reference.ref_model_mixup_alpha = {self.ref_model_mixup_alpha}; "
                             "expected a number in [0, 1]")
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"reference.ref_model_sync_steps = {self.ref_model_sync_steps}; "
                             "expected an integer >= 1")


@dataclass(frozen=True)
class OptimSection:
    lr: float = 5e-7
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"  # after warmup: cosine | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine/linear end at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 = no clipping

    def __post_init__(self) -> None:
        _check_choice("optim.schedule", self.schedule, SCHEDULES)
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("optim.lr and optim.eps must be > 0; optim.weight_decay and "
                             "optim.max_grad_norm >= 0")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas = {list(self.betas)}; expected two numbers in [0, 1)")


@dataclass(frozen=True)
class TrainSection:
    steps: int = 1000                # optimizer steps
    output_dir: str = "outputs/run"
    log_every: int = 10
    micro_batch_size: int = 1        # rows per micro-batch and rank
    grad_accum: int = 1              # micro-batches per optimizer step and rank
    seed: int = 0                    # data order
    device: str = "auto"             # auto = cuda when available
    activation_checkpointing: bool = False
    compile: bool = True             # torch.compile each block (CUDA only)
    # auto = flex on CUDA, documents elsewhere | flex (FlexAttention, CUDA) | documents (SDPA
    # per document: cost follows the documents) | dense (SDPA over whole rows: the oracle)
    attention: str = "auto"
    flex_backend: str = "triton"     # FlexAttention kernels: triton | flash (FlashAttention-4)
    eval_every: int = 0              # steps; 0 = at the end only (when there is eval data)
    eval_on_start: bool = False      # also before the first step (a run starting at step 0)
    nonfinite: str = "stop"          # a NaN/inf loss: stop (keeping the last checkpoint) | skip
    # experiment trackers beside metrics.jsonl: any of tensorboard, wandb (train.reporting)
    report_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.output_dir.strip():
            raise ValueError("train.output_dir is empty; set the run folder for checkpoints, "
                             "metrics and the exported model")
        _check_choice("train.device", self.device, DEVICES)
        _check_choice("train.nonfinite", self.nonfinite, NONFINITE_POLICIES)
        _check_choice("train.attention", self.attention, ATTENTION_EXECUTORS)
        _check_choice("train.flex_backend", self.flex_backend, FLEX_BACKENDS)
        for reporter in self.report_to:
            _check_choice("train.report_to", reporter, REPORTERS)
        for name in ("steps", "log_every", "micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.eval_every < 0:
            raise ValueError("train.eval_every must be >= 0")
        _check_seed("train.seed", self.seed)


@dataclass(frozen=True)
class CheckpointSection:
    every: int = 0           # steps between checkpoints; 0 = at the end only
    keep_last: int = 2       # older checkpoints are deleted once a newer one is complete
    # Continue from the latest checkpoint in train.output_dir. A checkpoint of a run with
    # another model, loss or reference is refused; "force" resumes from it all the same.
    resume: bool | str = True
    export_hf: bool = True   # write a Hugging Face checkpoint to output_dir/hf at the end

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
        if isinstance(self.resume, str) and self.resume != "force":
            raise ValueError(f"checkpoint.resume = {self.resume!r}; expected true, false or "
                             "'force'")


@dataclass(frozen=True)
class LoraSection:
    rank: int = 0             # 0 = full fine-tuning; > 0: train LoRA adapters, base frozen
    alpha: float = 16.0       # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0      # on the adapters' input
    target_modules: tuple[str, ...] = LORA_TARGETS
    init_seed: int = 0        # seed of the adapters' A matrices (B starts at zero)
    export_merged: bool = False  # also export the merged full weights to output_dir/hf

    def __post_init__(self) -> None:
        if self.rank < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("lora.rank must be >= 0, lora.alpha > 0 and lora.dropout in [0, 1)")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty; name some of: "
                             f"{', '.join(LORA_TARGETS)}")
        for name in self.target_modules:
            _check_choice("lora.target_modules", name, LORA_TARGETS)
        _check_seed("lora.init_seed", self.init_seed)


@dataclass(frozen=True)
class Config:
    model: ModelSection
    data: DataConfig
    loss: LossConfig
    reference: ReferenceSection
    optim: OptimSection
    train: TrainSection
    checkpoint: CheckpointSection
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)

    def __post_init__(self) -> None:
        if not self.data.path.strip():
            raise ValueError("data.path is required: a preference data file or hub dataset id")
        if self.reference.mode == "auto":
            mode = "adapters_off" if self.lora.rank else \
                "live" if self.reference.sync_ref_model else "precomputed"
            object.__setattr__(self, "reference", dataclasses.replace(self.reference, mode=mode))
        if self.reference.sync_ref_model and self.reference.mode != "live":
            raise ValueError(f"reference.sync_ref_model updates the reference during training, "
                             f"which needs reference.mode = 'live', not "
                             f"{self.reference.mode!r} (as TRL refuses it with precomputed "
                             "reference log-probs and with PEFT)")
        if self.reference.sync_ref_model and self.lora.rank:
            raise ValueError("reference.sync_ref_model needs full fine-tuning: with LoRA the "
                             "policy's adapters have no counterpart in the reference (TRL "
                             "refuses it with PEFT too)")
        if self.reference.mode == "adapters_off" and not self.lora.rank:
            raise ValueError("reference.mode = 'adapters_off' needs LoRA adapters: set "
                             "lora.rank > 0, or choose another reference mode")
        if self.reference.mode == "none" and self.loss.needs_reference:
            raise ValueError(f"reference.mode = 'none' but loss.type {list(self.loss.type)} "
                             "needs a reference; use simpo/sft or another reference mode")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} = {value!r}; expected one of: {', '.join(allowed)}")


def _check_seed(name: str, value: int) -> None:
    # numpy's and torch's generators take seeds in [0, 2**64); TOML integers stop at 2**63.
    if not 0 <= value < 2**63:
        raise ValueError(f"{name} = {value}; expected an integer from 0 to 2**63 - 1")


_SECTION_TYPES = typing.get_type_hints(Config)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a TOML file and apply `--section.key=value` overrides. An error names the override
    that set the key at fault, else the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    given = {}  # "section.key" -> the override that set it
    for override in overrides:
        section, key, value = parse_override(override)
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ValueError(f"{override}: [{section}] is not a table of keys in {path}")
        raw[section][key] = value
        given[f"{section}.{key}"] = override
    return build_config(raw, source=str(path), overrides=given)


def parse_override(text: str) -> tuple[str, str, Any]:
    """`--section.key=value` -> (section, key, value); the value is read as a TOML value when
    it is one (numbers, booleans, arrays, quoted strings), else taken as a bare string."""
    body = text.removeprefix("--")
    name, sep, value_text = body.partition("=")
    section, dot, key = name.partition(".")
    if not (text.startswith("--") and sep and dot and section and key):
        raise ValueError(f"override {text!r}: expected --section.key=value")
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    return section, key, value


def build_config(raw: dict[str, Any], source: str = "config",
                 overrides: dict[str, str] | None = None) -> Config:
    """`overrides`: "section.key" -> the command-line override that set it, which errors about
    that key name instead of `source`."""
    overrides = overrides or {}
    unknown = sorted(set(raw) - set(_SECTION_TYPES))
    if unknown:
        where = next((o for k, o in overrides.items() if k.split(".")[0] == unknown[0]), source)
        raise ValueError(f"{where}: unknown section [{unknown[0]}]; valid sections: "
                         f"{', '.join(_SECTION_TYPES)}")
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ValueError(f"{source}: [{name}] must be a table of keys")
        sections[name] = _build_section(name, cls, values, source, overrides)
    try:
        return Config(**sections)
    except ValueError as e:
        raise ValueError(_attributed(str(e), source, overrides)) from None


def _build_section(name: str, cls: type, values: dict[str, Any], source: str,
                   overrides: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        where = overrides.get(f"{name}.{unknown[0]}", source)
        raise ValueError(f"{where}: unknown key {name}.{unknown[0]}; valid keys in [{name}]: "
                         f"{', '.join(hints)}")
    kwargs = {key: _coerce(value, hints[key], f"{name}.{key}",
                           overrides.get(f"{name}.{key}", source))
              for key, value in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(_attributed(str(e), source, overrides)) from None


def _attributed(message: str, source: str, overrides: dict[str, str]) -> str:
    """`message` prefixed with the override that set a key it names, else with `source`."""
    for key, override in overrides.items():
        if re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message):
            return f"{override}: {message}"
    return f"{source}: {message}"


def _coerce(value: Any, hint: Any, where: str, source: str) -> Any:
    """`value` as type `hint`, or a ValueError naming the key, the value and the type."""

    def fail() -> ValueError:
        return ValueError(f"{source}: {where} = {value!r} should be {_type_name(hint)}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, where, source)
            except ValueError:
                continue
        raise fail()
    if origin is dict:  # a TOML table, e.g. data.columns = {prompt = "question"}
        if not isinstance(value, dict):
            raise fail()
        return {_coerce(k, args[0], where, source): _coerce(v, args[1], f"{where}.{k}", source)
                for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str):  # "a,b" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise fail()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where, source) for v in value)
        if len(value) != len(args):
            raise fail()
        return tuple(_coerce(v, a, where, source) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML reads nan and inf; no option takes them
                raise ValueError(f"{source}: {where} must be a finite number, got {value!r}")
            return float(value)
        raise fail()
    if hint is str:
        if isinstance(value, str):
            return value
        raise fail()
    raise AssertionError(f"unsupported config type {hint} for {where}")


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is dict:
        return f"a table {{key = value, ...}}, each value {_type_name(args[1])}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values"
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(hint, str(hint))


def to_toml(config: Config) -> str:
    """The resolved config as TOML (every key, defaults included)."""
    lines = []
    for name in _SECTION_TYPES:
        lines.append(f"[{name}]")
        section = getattr(config, name)
        for f in dataclasses.fields(section):
            lines.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise AssertionError(f"cannot write {value!r} as TOML")
