"""Parallelism applied from outside the model, in a fixed order (as torchtitan does):

1. activation checkpointing of each decoder layer (recompute its activations in backward);
2. `torch.compile` of each layer (CUDA), in place so parameter names do not change;
3. `fully_shard` (FSDP2) of each layer, then of the root, which holds the embedding, the final
   norm and the head: the log-prob kernel runs inside the root's forward, where the head weight
   is gathered.

On CUDA, parameters stay float32 and are gathered in bfloat16 for compute, with gradients
reduced in float32. On CPU everything is float32.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from model.transformer import Transformer


def parallelize(model: Transformer, mesh: DeviceMesh, *, mixed_precision: bool,
                activation_checkpointing: bool = False, compile: bool = False) -> Transformer:
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision else MixedPrecisionPolicy()
    for index, layer in enumerate(model.layers):
        if activation_checkpointing:
            # The wrapper's state-dict hooks keep the parameter names unchanged.
            layer = checkpoint_wrapper(layer, preserve_rng_state=False)
        if compile:
            layer.compile()
        model.layers[index] = layer
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """A reference model: no gradients, eval mode."""
    model.requires_grad_(False)
    return model.eval()


def reshard(model: nn.Module) -> None:
    """Register the sharded parameters again after a no-grad forward. Without a backward, the
    root keeps its gathered parameters registered (it expects backward to need them), and an
    optimizer built or stepped then would see the wrong tensors. A no-op without FSDP."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
