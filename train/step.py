"""One optimizer step (`train_step`) and one evaluation pass (`evaluate`) over a rank's
micro-batches: the computation the loop repeats, apart from the loop's bookkeeping.

Loss normalization lives in one place, `train_step`: every micro-batch's summed per-pair losses
are divided by the number of pairs in the whole optimizer step (all micro-batches, all ranks),
so the update does not depend on how the step is split. FSDP averages gradients over ranks, so
the local loss is also multiplied by the world size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prefixdpo.data.loader import PreferenceLoader, StepBatches
from prefixdpo.model.executor import AttentionExecutor
from prefixdpo.train.distributed import Distributed
from prefixdpo.train.forward import Reference, pair_losses
from prefixdpo.train.losses import LossConfig, LossState
from prefixdpo.train.parallelize import reshard

# Per-pair metrics, summed over the step's pairs and divided by their number when logged.
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "nll_loss")


@dataclass
class StepResult:
    loss: float
    metrics: dict[str, float]   # PAIR_METRICS means, grad_norm
    num_pairs: int
    num_tokens: int
    finite: bool
    stop_requested: bool


def train_step(model: torch.nn.Module, batches: StepBatches, *, reference: Reference,
               loss_config: LossConfig, loss_state: LossState, optimizer: torch.optim.Optimizer,
               max_grad_norm: float, env: Distributed, executor: AttentionExecutor,
               stop_requested: bool | Callable[[], bool] = False
               ) -> tuple[StepResult, LossState]:
    """Forward and backward over this rank's micro-batches, then one optimizer update (skipped
    when the loss or the gradient is not finite).

    The step's pair count, which the loss is divided by, comes with `batches` (counted on the
    host from the loader's plan), so the micro-batches are queued on the device without a
    collective or a host read. After the last backward the step synchronizes once: one
    all-reduce of the loss and metric sums with every rank's stop request, and one read of
    them together with the gradient norm. `stop_requested` may be a function: it is asked
    after the last backward, so a stop asked for during the step ends this step."""
    if not isinstance(batches, StepBatches):
        raise TypeError("train_step takes the loader's StepBatches (for micro-batches of a "
                        "single process: StepBatches.single_process(batches))")
    device = env.device
    scale = env.world_size / max(batches.num_pairs, 1)
    loss_state = loss_state.to(device)
    # [loss, *PAIR_METRICS], summed over micro-batches.
    sums = torch.zeros(1 + len(PAIR_METRICS), dtype=torch.float64, device=device)
    # Gradients are reduce-scattered after every micro-batch (FSDP's default): deferring it
    # would keep a whole unsharded float32 gradient on every rank between micro-batches.
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        losses, metrics, loss_state = pair_losses(model, batch, reference, loss_config,
                                                  loss_state, executor)
        (losses.sum() * scale).backward()
        sums += torch.stack([losses.detach().sum().double()]
                            + [metrics[name].detach().sum().double() for name in PAIR_METRICS])
    # Then the stop request, summed over ranks with them. `full` fills on the device; a tensor
    # made from a Python number would be a blocking copy.
    stop = stop_requested() if callable(stop_requested) else stop_requested
    sums = torch.cat([sums, torch.full((1,), float(stop), dtype=sums.dtype, device=device)])
    if env.world_size > 1:
        torch.distributed.all_reduce(sums)
        loss_state = loss_state.synchronized(loss_config)
    grad_norm = _clip_grad_norm(model, max_grad_norm, device)
    *totals, stops, grad_norm = torch.cat([sums, grad_norm.reshape(1).double()]).tolist()
    totals = [total / max(batches.num_pairs, 1) for total in totals]
    loss = totals[0]
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = dict(zip(PAIR_METRICS, totals[1:]))
    metrics["grad_norm"] = grad_norm
    return StepResult(loss, metrics, batches.num_pairs, batches.num_tokens, finite,
                      stops > 0), loss_state


def _clip_grad_norm(model: torch.nn.Module, max_norm: float, device: torch.device
                    ) -> torch.Tensor:
    """Clip the gradients to `max_norm` (not when <= 0) and return their total norm before
    clipping: a 0-dim tensor on `device`, for the caller to read with the step's other values."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf,
                                          foreach=True)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return norm


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: PreferenceLoader, *, reference: Reference,
             loss_config: LossConfig, loss_state: LossState, env: Distributed,
             executor: AttentionExecutor) -> dict[str, float]:
    """Loss and reward metrics over the held-out examples (each once, sharded by rank). The
    batches are queued without host reads; the sums are read once, at the end."""
    loss_state = loss_state.to(env.device)
    # [loss, *PAIR_METRICS]; the pair count is a host int, joined to them after the loop.
    sums = torch.zeros(1 + len(PAIR_METRICS), dtype=torch.float64, device=env.device)
    num_pairs = 0
    for batch in loader.one_pass():
        num_pairs += batch.num_pairs
        batch = batch.to(env.device, non_blocking=True)
        # The loss state is read, not advanced: evaluation does not move bco_pair's mean.
        losses, metrics, _ = pair_losses(model, batch, reference, loss_config, loss_state,
                                         executor)
        sums += torch.stack([losses.sum().double()]
                            + [metrics[name].sum().double() for name in PAIR_METRICS])
    reshard(model)
    sums = torch.cat([torch.full((1,), float(num_pairs), dtype=sums.dtype, device=env.device),
                      sums])
    if env.world_size > 1:
        torch.distributed.all_reduce(sums)
    count, *values = sums.tolist()
    names = ["loss", *PAIR_METRICS]
    return {f"eval/{name}": value / max(count, 1.0) for name, value in zip(names, values)}
