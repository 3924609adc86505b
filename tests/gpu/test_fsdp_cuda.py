"""The trainer's CUDA model against the plain one: FSDP2 (one rank), bfloat16 mixed precision,
compiled decoder layers and FlexAttention, with and without activation checkpointing.

Values compared: the target log-probs of a packed prefix-shared batch (several groups per row,
groups with two prompts, groups of three completions, rows crossing FlexAttention's 128-token
blocks) and every parameter gradient of a fixed random weighting of them, gathered whole.

Tolerances are relative norms ||a - b|| / ||b|| per tensor.
- Sharded, mixed-precision, compiled, FlexAttention against the plain (unsharded, uncompiled)
  bfloat16 model on the dense-mask path: both compute in bfloat16 from the same rounded
  weights but round at different places (FlexAttention vs SDPA, inductor's fusions, FSDP's
  float32 gradient reduction), so each is about as far from the float32 result as the other.
  The rule (`within_bf16_noise`): their distance at most twice the plain bfloat16 model's own
  distance from float32 (TF32 off), + 5e-3, and under 5e-2 (bf16 keeps 8 bits: 2^-9 = 2e-3 per
  rounding). What sharding, a precision policy or compilation can get wrong (a shard lost or
  counted twice, a gradient unreduced or scaled, weights left in float32 or cast twice) moves
  the results by far more. The mask itself is pinned in float32 by test_flex_cuda.py (dropping
  the prefix-sharing rule moves this model's log-probs by only ~1e-2, within bf16's noise).
- Activation checkpointing recomputes the same layers in backward: in float32 (TF32 off) its
  gradients equal those without it to 1e-4 (rounding of a differently fused recomputation;
  a recomputation without the prefix-sharing mask is off by ~1e-2); in mixed precision by the
  bfloat16 rule above, against the same model without checkpointing.

In a CPU rehearsal (cuda_helpers.py): gloo, the documents executor, bfloat16 on the CPU, and
the layers uncompiled (compilation is rehearsed by test_flex_cuda.py).
"""

from __future__ import annotations

import pytest
import torch
from cuda_helpers import (CUDA_MARKS, DENSE, DEVICE, FLOAT32_TOLERANCE, TRAIN_EXECUTOR,
                          cuda_config, first_batch, logps_and_grads, no_tf32, one_rank_group,
                          relative, within_bf16_noise)

from prefixdpo.model.transformer import build_model

pytestmark = CUDA_MARKS


@pytest.fixture(scope="module")
def env():
    with one_rank_group() as env:
        yield env


def trainer_model(config, env, *, mixed_precision: bool = True,
                  activation_checkpointing: bool = False):
    from prefixdpo.train.parallelize import parallelize

    return parallelize(build_model(config, env.device, seed=0), env.mesh,
                       mixed_precision=mixed_precision,
                       activation_checkpointing=activation_checkpointing,
                       compile=DEVICE.type == "cuda")


def test_sharded_mixed_precision_compiled_flex_matches_plain_bfloat16(env):
    """(The sliding window's mask is checked against the dense one in test_flex_cuda.py.)"""
    torch._dynamo.reset()
    config = cuda_config()
    batch = first_batch(config, env.device)
    with no_tf32():
        truth, truth_grads = logps_and_grads(build_model(config, env.device, seed=0), batch,
                                             DENSE)
        plain, plain_grads = logps_and_grads(
            build_model(config, env.device, torch.bfloat16, seed=0), batch, DENSE)
        sharded = trainer_model(config, env)
        ours, our_grads = logps_and_grads(sharded, batch, TRAIN_EXECUTOR)
    assert all(type(p).__name__ == "DTensor" for p in sharded.parameters())
    assert our_grads.keys() == plain_grads.keys() == truth_grads.keys()
    noise = relative(plain, truth)
    assert noise < 5e-2, f"bfloat16 itself is off by {noise:.1e}: the comparison means nothing"
    assert within_bf16_noise(relative(ours, plain), noise), (relative(ours, plain), noise)
    assert within_bf16_noise(relative(ours, truth), noise), (relative(ours, truth), noise)
    for name, grad in plain_grads.items():
        assert our_grads[name].norm() > 0, name
        noise = relative(grad, truth_grads[name])
        error = relative(our_grads[name], grad)
        assert within_bf16_noise(error, noise), (name, error, noise)
        assert within_bf16_noise(relative(our_grads[name], truth_grads[name]), noise), name


def test_activation_checkpointing_keeps_values_and_gradients(env):
    torch._dynamo.reset()
    config = cuda_config()
    batch = first_batch(config, env.device)
    executor = TRAIN_EXECUTOR
    with no_tf32():
        # float32 (mixed_precision=False): the recomputation must reproduce the forward.
        fp32, fp32_grads = logps_and_grads(trainer_model(config, env, mixed_precision=False),
                                           batch, executor)
        fp32_ac, fp32_ac_grads = logps_and_grads(
            trainer_model(config, env, mixed_precision=False, activation_checkpointing=True),
            batch, executor)
        # bfloat16 mixed precision, as the trainer runs on CUDA.
        bf16, bf16_grads = logps_and_grads(trainer_model(config, env), batch, executor)
        bf16_ac, bf16_ac_grads = logps_and_grads(
            trainer_model(config, env, activation_checkpointing=True), batch, executor)
    assert fp32_ac_grads.keys() == fp32_grads.keys() == bf16_ac_grads.keys()
    assert relative(fp32_ac, fp32) <= FLOAT32_TOLERANCE
    assert within_bf16_noise(relative(bf16_ac, bf16), relative(bf16, fp32))
    for name, grad in fp32_grads.items():
        assert grad.norm() > 0, name
        assert relative(fp32_ac_grads[name], grad) <= FLOAT32_TOLERANCE, name
        noise = relative(bf16_grads[name], grad)
        assert within_bf16_noise(relative(bf16_ac_grads[name], bf16_grads[name]), noise), \
            (name, relative(bf16_ac_grads[name], bf16_grads[name]), noise)
