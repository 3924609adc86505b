"""The reference and evaluation on CUDA: the live reference equals the precomputed table of
the same model, and `train.loop.evaluate` on CUDA equals the CPU float32 evaluation.

Tolerances, in nats of a sequence log-prob (a sum over up to ~50 tokens of about -5.4 each):
`SEQUENCE_NATS` = 0.1, four times the largest difference between this tiny model in bfloat16
and in float32 (see cuda_helpers.py); a mask error or a mix-up of sequences moves a sequence by
about a nat or more.
- Live reference vs table: one frozen bfloat16 model, compiled, FlexAttention; the table is
  scored in shared+packed rows, the live reference runs on the training layout's rows
  (shared+packed shuffled into other rows, and paired). Only the row composition differs, so
  each sequence agrees within SEQUENCE_NATS (in practice far closer).
- evaluate: CUDA runs the trainer's model (FSDP2, bf16 mixed precision, compiled,
  FlexAttention), the CPU the same weights in float32 with the dense mask. With beta = 0.1 and
  each sequence within SEQUENCE_NATS: log-probs within SEQUENCE_NATS, rewards within
  beta * SEQUENCE_NATS, margins and the sigmoid loss (its slope is at most 1 in the margin)
  within 2 * beta * SEQUENCE_NATS. The reference is the model's own float32 table shifted per
  sequence by distinct multiples of 1.5 nats, so every margin is at least 0.15 from zero,
  far beyond the 0.02 bf16 can move it: the reward accuracy must be exactly equal.

In a CPU rehearsal (cuda_helpers.py) the "CUDA" side is the same trainer's model on gloo in
float32 with the documents executor, uncompiled; the CPU side is unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cuda_helpers import (COMPUTE_DTYPE, CUDA_MARKS, DENSE, DEVICE, LENGTH, MIXED_PRECISION,
                          SEQUENCE_NATS, TRAIN_EXECUTOR, cuda_config, fitted_examples,
                          loader_for, one_rank_group)

from prefixdpo.data.layout import Numbering
from prefixdpo.model.transformer import build_model
from prefixdpo.train.losses import LossConfig, LossState
from prefixdpo.train.scoring import score_sequences

pytestmark = CUDA_MARKS

BETA = LossConfig().beta


@pytest.fixture(scope="module")
def env():
    with one_rank_group() as env:
        yield env


def frozen_reference_model(config, env):
    """The live reference as the trainer builds it: the initial weights stored in bfloat16,
    frozen, compiled, sharded, resharded after each forward (no backward frees them)."""
    from prefixdpo.train.parallelize import freeze, parallelize

    model = build_model(config, env.device, COMPUTE_DTYPE, seed=0)
    return parallelize(freeze(model), env.mesh, mixed_precision=False,
                       compile=DEVICE.type == "cuda", reshard_after_forward=True)


@pytest.mark.parametrize("layout", ["shared+packed", "paired"])
def test_live_reference_equals_the_precomputed_table(env, layout):
    from prefixdpo.train.forward import attention_masks
    from prefixdpo.train.reference import LiveReference

    torch._dynamo.reset()
    config = cuda_config()
    examples = fitted_examples(config, layout, seed=1)
    model = frozen_reference_model(config, env)
    table, counts = score_sequences(model, examples, layout="shared+packed",
                                    packing_length=LENGTH, micro_batch_size=2,
                                    device=env.device, executor=TRAIN_EXECUTOR, progress=False)
    assert bool((counts > 0).all())
    live = LiveReference(model)
    loader = loader_for(examples, layout, rows=4, seed=3, shuffle=True)
    got, expected = [], []
    for micro_batch in loader.micro_batch_plan(0)[:8]:
        batch = loader.build(micro_batch).to(env.device)
        got.append(live(batch, attention_masks(batch, config, executor=TRAIN_EXECUTOR)))
        expected.append(table[batch.sequence_ids].float())
    got, expected = torch.cat(got), torch.cat(expected)
    assert got.dtype == torch.float32 and len(got) > 20
    difference = (got - expected).abs().max().item()
    assert difference <= SEQUENCE_NATS, difference
    # The tolerance tells sequences apart: neighbours differ by far more than it allows.
    assert (expected - expected.roll(1)).abs().median() > 10 * SEQUENCE_NATS


def reference_with_margins(table: torch.Tensor, examples, seed: int = 0) -> torch.Tensor:
    """The model's own log-probs, each sequence shifted by a multiple of 1.5 nats distinct
    within its example: every pair's reward margin is then beta * 1.5 * k for an integer
    k != 0, of either sign."""
    numbering = Numbering(examples)
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.zeros(numbering.num_sequences)
    for i, example in enumerate(examples):
        start, n = int(numbering.sequence_offsets[i]), example.num_sequences
        offsets[start:start + n] = 1.5 * torch.randperm(n, generator=generator).float()
    return table.float() + offsets


def test_evaluate_on_cuda_matches_cpu_float32(env):
    from prefixdpo.train.distributed import Distributed
    from prefixdpo.train.loop import evaluate
    from prefixdpo.train.parallelize import parallelize
    from prefixdpo.train.reference import TableReference

    torch._dynamo.reset()
    config = cuda_config()
    examples = fitted_examples(config, seed=4, num=48)
    cpu = torch.device("cpu")
    cpu_model = build_model(config, cpu, seed=0)
    table, _ = score_sequences(cpu_model, examples, layout="shared+packed",
                               packing_length=LENGTH, micro_batch_size=2, device=cpu,
                               executor=DENSE, progress=False)
    reference = reference_with_margins(table, examples)
    common = dict(loss_config=LossConfig(), loss_state=LossState())

    cpu_env = Distributed(rank=0, world_size=1, local_rank=0, device=cpu, mesh=None)
    expected = evaluate(cpu_model, loader_for(examples), reference=TableReference(reference),
                        env=cpu_env, executor=DENSE, **common)
    cuda_model = parallelize(copy.deepcopy(cpu_model).to(env.device), env.mesh,
                             mixed_precision=MIXED_PRECISION, compile=DEVICE.type == "cuda")
    got = evaluate(cuda_model, loader_for(examples, pin_memory=True),
                   reference=TableReference(reference.to(env.device)), env=env,
                   executor=TRAIN_EXECUTOR, **common)

    assert got.keys() == expected.keys()
    assert 0.0 < expected["eval/rewards/accuracies"] < 1.0  # margins of both signs
    tolerances = {"eval/logps/chosen": SEQUENCE_NATS, "eval/logps/rejected": SEQUENCE_NATS,
                  "eval/nll_loss": SEQUENCE_NATS,
                  "eval/rewards/chosen": BETA * SEQUENCE_NATS,
                  "eval/rewards/rejected": BETA * SEQUENCE_NATS,
                  "eval/rewards/margins": 2 * BETA * SEQUENCE_NATS,
                  "eval/loss": 2 * BETA * SEQUENCE_NATS,
                  "eval/rewards/accuracies": 1e-12}
    assert set(expected) == set(tolerances), "each metric needs its tolerance here"
    for name, value in expected.items():
        assert abs(got[name] - value) <= tolerances[name], (name, got[name], value)
