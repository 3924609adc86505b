"""AdamW and the learning-rate schedule: linear warmup, then cosine, linear or constant.

The schedule is a pure function of the step, set on the optimizer before each update, so a
resumed run needs no scheduler state beyond the step number.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prefixdpo.train.config import OptimSection


def build_optimizer(model: nn.Module, config: OptimSection, device: torch.device
                    ) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused kernel on CUDA. Weight decay applies to
    matrices only, not to norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                             fused=device.type == "cuda")


def lr_at(step: int, total_steps: int, config: OptimSection) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    if config.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    floor = config.min_lr_ratio
    return config.lr * (floor + (1.0 - floor) * factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
