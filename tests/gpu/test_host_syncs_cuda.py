"""A micro-batch's forward and backward never make the host wait for the GPU.

The trainer's CUDA model (FSDP2 on one rank, bfloat16 mixed precision, compiled decoder
layers, FlexAttention) with a precomputed reference table runs what `train_step` runs per
micro-batch: the copy of a pinned batch to the device, `train.forward.pair_losses` (mask,
policy log-probs, reference lookup, loss) and `.backward()`, under
`torch.cuda.set_sync_debug_mode("error")`, which turns every synchronizing CUDA call (a read
of a device value, a blocking copy, a stream or device synchronize) into an error. A sync
here would stall the host once per micro-batch and leave the GPU idle while it waits.

Warm-up first: compilation and the lazy initializations (FSDP, the allocator, autotuning)
synchronize legitimately, and nothing may compile inside the checked pass (checked).
Values: the checked pass repeats a pass already run on the same batch and weights, so its
losses and gradients must equal that pass's (relative norm 1e-5: the same kernels, with only
the order of atomic additions free to differ).

In a CPU rehearsal (cuda_helpers.py) the same passes run uncompiled on gloo with the documents
executor (which builds its spans on the host by design) in float32; the sync check itself
needs CUDA.
"""

from __future__ import annotations

import pytest
import torch
from cuda_helpers import (CUDA_MARKS, DEVICE, MIXED_PRECISION, TRAIN_EXECUTOR, cuda_config,
                          fitted_examples, full_grads, graphs_compiled, loader_for, on_cuda,
                          one_rank_group, relative)

from prefixdpo.model.transformer import build_model

pytestmark = CUDA_MARKS


@pytest.fixture(scope="module")
def env():
    with one_rank_group() as env:
        yield env


def test_forward_and_backward_do_not_synchronize(env):
    from prefixdpo.train.forward import pair_losses
    from prefixdpo.train.losses import LossConfig, LossState
    from prefixdpo.train.parallelize import parallelize
    from prefixdpo.train.reference import TableReference

    torch._dynamo.reset()
    config = cuda_config()
    cuda = DEVICE.type == "cuda"
    model = parallelize(build_model(config, env.device, seed=0), env.mesh,
                        mixed_precision=MIXED_PRECISION, compile=cuda)
    examples = fitted_examples(config, seed=5)
    loader = loader_for(examples, rows=2, seed=1, shuffle=True, pin_memory=True)
    num_sequences = loader.numbering.num_sequences
    table = (-100.0 * torch.rand(num_sequences, generator=torch.Generator().manual_seed(0))
             - 1.0).to(env.device)
    reference = TableReference(table)
    loss_state = LossState().to(env.device)  # as train_step keeps it

    def micro_batch(host_batch):
        """One micro-batch as `train_step` runs it (the loss normalized by its pairs)."""
        batch = host_batch.to(env.device, non_blocking=True)
        losses, _, _ = pair_losses(model, batch, reference, LossConfig(), loss_state,
                                   executor=TRAIN_EXECUTOR)
        (losses.sum() / host_batch.num_pairs).backward()
        return losses.detach()

    plan = loader.micro_batch_plan(0)
    for rows in plan[:3]:  # warm-up: batches of other content, same shapes
        micro_batch(loader.build(rows))
        model.zero_grad(set_to_none=True)
    host_batch = loader.build(plan[3])
    assert host_batch.input_ids.is_pinned() or not cuda
    expected_losses = micro_batch(host_batch)
    expected_grads = full_grads(model)
    model.zero_grad(set_to_none=True)
    compiled_before = graphs_compiled()
    if on_cuda("torch.cuda.set_sync_debug_mode reports CUDA synchronizations only"):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            losses = micro_batch(host_batch)
        except RuntimeError as e:
            if "synchroniz" not in str(e):
                raise
            raise AssertionError(f"a host sync in forward or backward: {e}") from e
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    else:
        losses = micro_batch(host_batch)
    assert graphs_compiled() == compiled_before, "compiled inside the checked pass"

    assert torch.isfinite(losses).all() and len(losses) == host_batch.num_pairs
    assert relative(losses, expected_losses) <= 1e-5
    grads = full_grads(model)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert grad.norm() > 0, name
        assert relative(grads[name], grad) <= 1e-5, name
