"""Parallelism applied from outside the model, in a fixed order (as torchtitan does):

1. activation checkpointing of each decoder layer (recompute its activations in backward);
2. `torch.compile` of each layer (CUDA), in place so parameter names do not change;
3. `fully_shard` (FSDP2) of each layer, then of the embedding, then of the final norm and the
   head together (the log-prob kernel runs inside the head's forward, where its weight is
   gathered), then of the root. Tied embeddings (one weight for the embedding and the head)
   stay in the root instead, gathered for the whole forward and backward.

Meant to be applied to a model still on the meta device (`train.build.ModelSource.build`), so
that each rank then allocates only its shards; it also works on a materialized model.

On CUDA, parameters stay float32 and are gathered in bfloat16 for compute, with gradients
reduced in float32. On CPU everything is float32.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from prefixdpo.model.transformer import Transformer


def parallelize(model: Transformer, mesh: DeviceMesh, *, mixed_precision: bool,
                activation_checkpointing: bool = False, compile: bool = False,
                reshard_after_forward: bool | None = None) -> Transformer:
    """Shard `model` over `mesh` in place (see the module docstring); returns it.

    `reshard_after_forward`: free each unit's gathered weights after its forward and gather
    them again in backward. By default only with more than one rank: on one rank the gathered
    weights are a local copy of one whole model (in the compute dtype), kept from forward to
    backward rather than copied again layer by layer. A frozen model (no backward) passes
    True: nothing would use the kept copies."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision else MixedPrecisionPolicy()
    if reshard_after_forward is None:
        reshard_after_forward = mesh.size() > 1
    shard = functools.partial(fully_shard, mesh=mesh, mp_policy=policy)
    for index, layer in enumerate(model.layers):
        if activation_checkpointing:
            # The wrapper's state-dict hooks keep the parameter names unchanged. Dropout
            # inside the layer (LoRA's) needs the recomputation to draw the same masks.
            dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in layer.modules())
            layer = checkpoint_wrapper(layer, preserve_rng_state=dropout)
        if compile:
            layer.compile()
        model.layers[index] = layer
        shard(layer, reshard_after_forward=reshard_after_forward)
    if not model.config.tie_word_embeddings:
        shard(model.embed_tokens, reshard_after_forward=reshard_after_forward)
        # One unit for the two, whose forwards run back to back. Backward starts here, so its
        # weights are kept after forward rather than gathered again at once (as torchtitan
        # does); a frozen model's `reshard` frees them.
        shard([model.norm, model.lm_head], reshard_after_forward=False)
    # The root: what is left (the tied embedding and head, and the norm then).
    shard(model)
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
