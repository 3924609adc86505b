"""A training step set up from a run's settings: the policy (built on the meta device, with LoRA,
activation checkpointing, compilation and FSDP2 applied), its reference and its optimizer.

`build_training` is the one place these are made, for `train.loop` and for the benchmarks
(`benchmarks/throughput.py`, `benchmarks/vs_trl.py`), so that what a benchmark times is what
trains. It takes the config's sections rather than the whole config: a benchmark has no data
file to name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prefixdpo.data.example import Example
from prefixdpo.data.loader import StepBatches
from prefixdpo.model.executor import AttentionExecutor
from prefixdpo.train.build import ModelSource
from prefixdpo.train.config import LoraSection, OptimSection, ReferenceSection, TrainSection
from prefixdpo.train.distributed import Distributed, broadcast_text
from prefixdpo.train.forward import Reference
from prefixdpo.train.lora import AdaptersOffReference, add_lora, init_lora
from prefixdpo.train.losses import LossConfig, LossState
from prefixdpo.train.metrics import forward_flops
from prefixdpo.train.optim import build_optimizer
from prefixdpo.train.parallelize import freeze, parallelize
from prefixdpo.train.reference import (LiveReference, TableReference, cache_key,
                                       default_cache_dir, model_fingerprint, no_reference,
                                       reference_log_probs)
from prefixdpo.train.step import StepResult, train_step

# The reference modes that run a forward pass of their own in every step.
FORWARD_REFERENCES = ("live", "adapters_off")


@dataclass
class Training:
    """What a training step needs; `step` runs one (`train.step.train_step`)."""

    model: nn.Module
    reference: Reference
    eval_reference: Reference
    optimizer: torch.optim.Optimizer
    executor: AttentionExecutor
    loss: LossConfig
    max_grad_norm: float
    env: Distributed
    reference_mode: str

    def step(self, batches: StepBatches, loss_state: LossState,
             stop_requested: bool | Callable[[], bool] = False
             ) -> tuple[StepResult, LossState]:
        return train_step(self.model, batches, reference=self.reference, loss_config=self.loss,
                          loss_state=loss_state, optimizer=self.optimizer,
                          max_grad_norm=self.max_grad_norm, env=self.env,
                          executor=self.executor, stop_requested=stop_requested)

    def step_flops(self, batches: StepBatches) -> float:
        """Useful FLOPs of a step on this rank: `forward_flops` of each micro-batch, times 3
        for the forward and the backward, plus one forward where the reference runs one."""
        factor = 3 + (self.reference_mode in FORWARD_REFERENCES)
        return factor * sum(forward_flops(b, self.model.config) for b in batches)


def build_training(source: ModelSource, env: Distributed, executor: AttentionExecutor, *,
                   train: TrainSection, optim: OptimSection, loss: LossConfig,
                   reference: ReferenceSection, lora: LoraSection = LoraSection(),
                   examples: Sequence[Example] = (), eval_examples: Sequence[Example] = (),
                   packing_length: int = 0, log: Callable[[str], None] = print,
                   model_id: str | None = None, resuming: bool = False,
                   stand_in_reference: Reference | None = None) -> Training:
    """The policy, its reference and its optimizer for `source` on `env`'s device, as the
    sections say. The initial model is sharded while still on the meta device: each rank then
    allocates, and reads or draws, only its own shards; parameters are float32, and CUDA
    computes in bfloat16. A precomputed reference is scored (or read from its cache) over
    `examples` and `eval_examples` in rows of `packing_length` (0: "auto"), keyed by `model_id`
    (`train.reference.model_fingerprint` of the initial weights; None: computed here), and
    with `resuming` taken from the run folder whatever its key.
    `stand_in_reference` replaces the configured reference (a benchmark's table of values that
    do not change the cost, which spares it the scoring pass)."""
    device = env.device
    cuda = device.type == "cuda"
    model = source.build(device, shard=lambda meta_model: parallelize(
        add_lora(meta_model, lora), env.mesh, mixed_precision=cuda,
        activation_checkpointing=train.activation_checkpointing,
        compile=train.compile and cuda))
    if lora.rank:
        init_lora(model, lora.init_seed)  # B = 0: the model starts as its base
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"LoRA rank {lora.rank} on {', '.join(lora.target_modules)}: "
            f"{trainable / 1e6:.2f}M trainable parameters, the base frozen")
    log(f"model: {source.config.architecture}, {source.config.num_params / 1e6:.1f}M parameters")
    # The reference, while the model still holds its initial weights.
    if stand_in_reference is not None:
        references = stand_in_reference, stand_in_reference
    else:
        references = build_reference(source, model, env, executor, reference, train,
                                     loss.uses_ld, examples, eval_examples, packing_length, log,
                                     model_id, resuming)
    optimizer = build_optimizer(model, optim, device)
    return Training(model, *references, optimizer, executor, loss, optim.max_grad_norm, env,
                    reference.mode)


def build_reference(source: ModelSource, model: nn.Module, env: Distributed,
                    executor: AttentionExecutor, section: ReferenceSection,
                    train: TrainSection, shared_prefix: bool, examples: Sequence[Example],
                    eval_examples: Sequence[Example], packing_length: int, log,
                    model_id: str | None = None, resuming: bool = False
                    ) -> tuple[Reference, Reference]:
    """The training and the evaluation reference of `section.mode` (see `train.reference`);
    `shared_prefix`: LD-DPO also needs the pairs' shared-prefix sums."""
    mode = section.mode
    if mode == "none":
        return no_reference, no_reference
    if mode == "adapters_off":
        base = AdaptersOffReference(model)
        return base, base
    if mode == "live":
        # A second copy of the initial weights, built as the policy was (sharded on the meta
        # device, then only this rank's shards read or drawn) and stored in the compute
        # dtype. Without a backward, each unit's weights are freed right after its forward.
        # A synced reference (TR-DPO) keeps float32 weights, as the policy does, so that the
        # repeated mixing is not rounded to bfloat16 each time.
        cuda = env.device.type == "cuda"
        synced = section.sync_ref_model
        dtype = torch.bfloat16 if cuda and not synced else torch.float32
        frozen = source.build(env.device, dtype, shard=lambda meta_model: parallelize(
            freeze(meta_model), env.mesh, mixed_precision=cuda and synced,
            compile=train.compile and cuda, reshard_after_forward=True))
        live = LiveReference(frozen)
        return live, live
    cache_dir = Path(section.cache_dir) if section.cache_dir else default_cache_dir()
    if model_id is None:  # rank 0 reads the checkpoint files once and tells the others
        model_id = broadcast_text(
            model_fingerprint(source.checkpoint_dir, source.config_path, source.seed,
                              env.device, cache_dir) if env.is_main else "", env.device)
    dtype = "bfloat16" if env.device.type == "cuda" else "float32"
    tables = []
    for name, part in (("train", examples), ("eval", eval_examples)):
        if not part:
            tables.append(no_reference)
            continue
        table = reference_log_probs(
            model, part, key=cache_key(model_id, part, dtype),
            run_dir=Path(train.output_dir), cache_dir=cache_dir, name=name,
            micro_batch_size=train.micro_batch_size, packing_length=packing_length or "auto",
            device=env.device, executor=executor, rank=env.rank, world_size=env.world_size,
            log=log, shared_prefix=shared_prefix, resuming=resuming)
        tables.append(TableReference(*table) if shared_prefix else TableReference(table))
    return tables[0], tables[1]
