"""LoRA: low-rank adapters on the projections, added from outside the model, PEFT-compatible.

`add_lora` replaces each targeted `nn.Linear` (HF leaf names: `q_proj`, ..., `down_proj`) with
a `LoRALinear` computing

    y = x W^T + dropout(x) A^T B^T * alpha / rank,     A [rank, in], B [out, rank]

and freezes every other parameter. The base weight keeps its name (`...q_proj.weight`), so
Hugging Face checkpoints load into the model unchanged and the random initialization draws the
same numbers; the adapters are `...q_proj.lora_A.weight` and `...q_proj.lora_B.weight`, PEFT's
names without its adapter name. It is applied on the meta device before `parallelize`, so each
layer's FSDP2 unit holds its adapters (and activation checkpointing recomputes them); then
`init_lora` draws A as PEFT does (Kaiming-uniform, a = sqrt(5)) and sets B to zero, so the
adapted model starts equal to the base.

The reference of a LoRA run is the base model: the same model and forward with the adapters
disabled (`adapters_disabled`, `AdaptersOffReference`), in the same layout and mask, under no
grad; no second copy of the weights exists.

Export (`save_adapter`): a PEFT adapter folder, `adapter_config.json` and
`adapter_model.safetensors` with PEFT's key names
(`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), which
`peft.PeftModel.from_pretrained` loads onto the Hugging Face base model; and on request the
merged weights `W + B A alpha / rank` in the usual Hugging Face layout (`merged_state_dict`).
Training checkpoints keep the whole model state (base and adapters) and the optimizer state of
the adapters only.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from prefixdpo.data.layout import Batch
from prefixdpo.model.hf_checkpoint import copy_tokenizer_files, local_rows, ours_to_hf
from prefixdpo.model.executor import LayerMasks
from prefixdpo.train.config import LoraSection
from prefixdpo.train.forward import sequence_and_prefix_log_probs

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRAFactor(nn.Module):
    """One factor of an adapter: a bare `weight`, not an `nn.Linear`, so that the model's
    initialization (which draws every `nn.Linear` weight in module order) skips it."""

    def __init__(self, rows: int, columns: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, columns))


class LoRALinear(nn.Linear):
    """An `nn.Linear` (the base, frozen, with its bias if it has one: Qwen2's q/k/v) plus a
    low-rank update. An `nn.Linear` itself, so code that handles projections (initialization,
    loading) handles it too."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        # A placeholder weight on the meta device (nothing allocated or drawn), replaced by
        # the base's own parameters, under the same names.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device="meta")
        self.weight = base.weight
        self.bias = base.bias
        with torch.device(base.weight.device):
            self.lora_A = LoRAFactor(rank, base.in_features).to(base.weight.dtype)
            self.lora_B = LoRAFactor(base.out_features, rank).to(base.weight.dtype)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapters_enabled = True

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.adapters_enabled:
            return y
        # Dropout only in a forward that computes gradients: evaluation and scoring, which
        # run the training-mode model under no grad, see the whole adapter.
        if self.training and torch.is_grad_enabled():
            x = self.dropout(x)
        update = F.linear(F.linear(x, self.lora_A.weight), self.lora_B.weight)
        return y + update * self.scaling

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.lora_A.weight.shape[0]}, "
                f"scaling={self.scaling:g}")


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) of every adapted projection, in module order. Names are the state
    dict's: wrappers (activation checkpointing, compile) are left out."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield _clean(name), module


def _clean(name: str) -> str:
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def add_lora(model: nn.Module, config: LoraSection) -> nn.Module:
    """Replace the targeted projections with `LoRALinear` and freeze everything but the
    adapters, in place; returns `model`. A no-op when `config.rank` is 0. Call it before
    `parallelize` (on the meta device, typically); then `init_lora` once weights exist."""
    if not config.rank:
        return model
    targets = set(config.target_modules)
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear(child, config.rank, config.alpha,
                                                       config.dropout))
                replaced += 1
    if not replaced:
        raise ValueError(f"lora.target_modules {list(config.target_modules)}: no such "
                         "projection in the model")
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in f".{name}" or ".lora_B." in f".{name}")
    return model


@torch.no_grad()
def init_lora(model: nn.Module, seed: int) -> None:
    """A as PEFT draws it (`kaiming_uniform_(a=sqrt(5))`: uniform in +-1/sqrt(in_features)),
    B zero. Each A is drawn whole, in module order, from one generator on the parameter's
    device, and each rank keeps its own rows, so the values do not depend on the number of
    ranks."""
    generator = None
    for _, module in lora_modules(model):
        a, b = module.lora_A.weight, module.lora_B.weight
        if generator is None:
            generator = torch.Generator(device=_local(a).device).manual_seed(seed)
        full = torch.empty(a.shape, device=generator.device)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
        local, start, stop = local_rows(a)
        local.copy_(full[start:stop])
        _local(b).zero_()


def _local(param: Tensor) -> Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base: every adapter off inside the block, as it was after. Do not
    leave the block between a forward and its backward (a recomputing backward would see the
    other setting)."""
    modules = [m for _, m in lora_modules(model)]
    previous = [m.adapters_enabled for m in modules]
    for m in modules:
        m.adapters_enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(modules, previous):
            m.adapters_enabled = enabled


class AdaptersOffReference:
    """Reference log-probs from the policy itself with its adapters disabled: the same model,
    batch, mask and layout, under no grad (`reference.mode = "adapters_off"`)."""

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, batch: Batch, masks: LayerMasks, shared_prefix: bool = False
                 ) -> Tensor | tuple[Tensor, Tensor]:
        """Sums `[S]`; with `shared_prefix` (LD-DPO) also the pairs' shared-prefix sums."""
        with adapters_disabled(self.model):
            return sequence_and_prefix_log_probs(self.model, batch, masks, shared_prefix)


def split_state_dict(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(base weights, adapter weights) of a full model state dict, under our names."""
    base, adapters = {}, {}
    for name, tensor in state.items():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        (adapters if is_adapter else base)[name] = tensor
    return base, adapters


def merged_state_dict(state: Mapping[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """The base weights with every adapter folded in, `W + B A scaling` (computed in float32),
    under the names of the plain model."""
    base, adapters = split_state_dict(state)
    merged = dict(base)
    for name in adapters:
        if not name.endswith(".lora_A.weight"):
            continue
        prefix = name.removesuffix(".lora_A.weight")
        a, b = adapters[name].float(), adapters[f"{prefix}.lora_B.weight"].float()
        weight = base[f"{prefix}.weight"]
        merged[f"{prefix}.weight"] = (weight.float() + (b @ a) * scaling).to(weight.dtype)
    return merged


def peft_name(name: str) -> str:
    """Our adapter name -> PEFT's key in adapter_model.safetensors."""
    return PEFT_PREFIX + ours_to_hf(name)


def adapter_config(config: LoraSection, base_model: str = "") -> dict:
    """PEFT's `adapter_config.json` for these adapters (LoRA on a causal LM, no bias)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
    }


def save_adapter(state: Mapping[str, Tensor], config: LoraSection, out_dir: Path,
                 base_model: str = "", tokenizer_dir: Path | None = None) -> Path:
    """Write a PEFT adapter folder from a full state dict (our names) holding the adapters."""
    _, adapters = split_state_dict(state)
    if not adapters:
        raise ValueError("no LoRA adapters in the model state to export")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {peft_name(n): t.detach().to("cpu").contiguous() for n, t in adapters.items()}
    save_file(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(
        json.dumps(adapter_config(config, base_model), indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), out_dir)
    return out_dir


def export_adapters(model: nn.Module, config: LoraSection, out_dir: Path, *, is_main: bool,
                    base_model: str = "", tokenizer_dir: Path | None = None,
                    chat_template: str | None = None) -> Path:
    """Gather the adapters (only them) and write the PEFT folder on the main rank, in
    float32. Collective under FSDP: every rank calls it."""
    state = {}
    for name, module in lora_modules(model):
        for factor in ("lora_A", "lora_B"):
            param = getattr(module, factor).weight
            full = param.full_tensor() if isinstance(param, DTensor) else param
            state[f"{name}.{factor}.weight"] = full.detach().float().cpu()
    if is_main:
        save_adapter(state, config, out_dir, base_model, tokenizer_dir)
        if chat_template is not None:
            (out_dir / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out_dir
