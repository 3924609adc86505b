"""The CUDA executor: FlexAttention, compiled decoder layers and the mixed-precision train step.

On CPU the suite checks FlexAttention's forward only (it has no CPU backward); here, on a GPU,
a tiny model runs a packed prefix-shared batch (several groups per row, groups with different
prompts, groups of three completions, rows crossing FlexAttention's 128-token blocks) and:
- FlexAttention's log-probs AND parameter gradients equal the dense-mask SDPA path's, in float32
  and in bfloat16, for a Llama, a Mistral window and a Gemma 3 config (a sliding layer then a
  full one, each with its own mask and RoPE, and Gemma's attention scale);
- compiled decoder layers equal eager ones;
- a compiled, mixed-precision `train_step` compiles nothing after its first step while the
  batch content changes at a fixed packing length;
- that step's first loss is ln 2 when the reference is the policy's own log-probs.
The chunked log-prob kernel's compiled CUDA path is checked against its reference in
tests/kernels/test_log_probs.py (float32 and bfloat16).

In a CPU rehearsal (cuda_helpers.py) the documents executor takes FlexAttention's place where
gradients are compared, compiled CPU FlexAttention its place in the forward checks, and the
CPU's compiler inductor's CUDA code; the train steps run in float32.

Tolerances are relative norms, ||a - b|| / ||b||, over the target log-probs and per parameter
gradient. float32 (TF32 off): 1e-4; a mask error shows as O(1e-2) or more. bfloat16: each
executor is compared with the float32 dense result, and FlexAttention must be within 2x (+5e-3)
of the dense bfloat16 path's own error, and under 5e-2 absolute (`within_bf16_noise`).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import FAMILIES, random_examples
from cuda_helpers import (CUDA_MARKS, DENSE, DEVICE, FLOAT32_TOLERANCE, FORWARD_EXECUTOR,
                          LENGTH, MIXED_PRECISION, TRAIN_EXECUTOR, cuda_config, first_batch,
                          graphs_compiled, logps_and_grads, no_tf32, one_rank_group, relative,
                          within_bf16_noise)

from prefixdpo.data.loader import PreferenceLoader, fit_examples
from prefixdpo.model.executor import LayerMasks
from prefixdpo.model.masks import and_masks, causal, dense_mask, document_mask
from prefixdpo.model.transformer import build_model

pytestmark = CUDA_MARKS

VARIANTS = {"llama": {},
            "mistral_window": dict(sliding_window=24, architecture="MistralForCausalLM"),
            "gemma3": dict(FAMILIES["gemma3"], sliding_window=24)}


def variant_config(variant: str):
    return cuda_config(**VARIANTS[variant])


def forward_logps(model, batch, masks) -> torch.Tensor:
    with torch.no_grad():
        return model(batch.input_ids, batch.positions, masks, batch.target_index,
                     batch.target_ids).float()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_flex_equals_dense_float32(variant):
    config = variant_config(variant)
    model = build_model(config, DEVICE, seed=0)
    batch = first_batch(config)
    with no_tf32():
        dense, dense_grads = logps_and_grads(model, batch, DENSE)
        ours, our_grads = logps_and_grads(model, batch, TRAIN_EXECUTOR)
        forward = forward_logps(model, batch, FORWARD_EXECUTOR.layer_masks(
            batch.document_ids, batch.segment_ids, batch.positions, config.attention_windows))
    assert relative(ours, dense) <= FLOAT32_TOLERANCE
    assert relative(forward, dense) <= FLOAT32_TOLERANCE
    # The tolerance tells a wrong mask: without the prefix-sharing rule the log-probs move by
    # far more than it allows (on CPU, 0.009-0.011 relative for the Llama variant over four
    # seeds, 0.026 with the window: 30x the tolerance is a clear margin below both).
    broken = dense_mask(and_masks(causal, document_mask(batch.document_ids)),
                        *batch.input_ids.shape, batch.input_ids.device)
    wrong = forward_logps(model, batch,
                          LayerMasks(DENSE, {w: broken for w in config.attention_windows}))
    assert relative(wrong, dense) > 30 * FLOAT32_TOLERANCE
    assert our_grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():
        assert grad.norm() > 0, name
        assert relative(our_grads[name], grad) <= FLOAT32_TOLERANCE, name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_flex_equals_dense_bfloat16(variant):
    config = variant_config(variant)
    batch = first_batch(config)
    with no_tf32():
        truth, truth_grads = logps_and_grads(build_model(config, DEVICE, seed=0), batch, DENSE)
        model = build_model(config, DEVICE, torch.bfloat16, seed=0)
        dense, dense_grads = logps_and_grads(model, batch, DENSE)
        ours, our_grads = logps_and_grads(model, batch, TRAIN_EXECUTOR)
    error, dense_error = relative(ours, truth), relative(dense, truth)
    assert within_bf16_noise(error, dense_error), (error, dense_error)
    assert truth_grads.keys() == our_grads.keys() == dense_grads.keys()
    for name, grad in truth_grads.items():
        error, dense_error = relative(our_grads[name], grad), relative(dense_grads[name], grad)
        assert within_bf16_noise(error, dense_error), (name, error, dense_error)


def test_compiled_layers_equal_eager():
    """(In a rehearsal the layers compile to C++ around the dense mask: the documents
    executor's span buckets change shape with every batch.)"""
    torch._dynamo.reset()
    config = cuda_config()
    executor = TRAIN_EXECUTOR if DEVICE.type == "cuda" else DENSE
    eager = build_model(config, DEVICE, seed=0)
    compiled = copy.deepcopy(eager)
    for layer in compiled.layers:
        layer.compile()
    batch = first_batch(config)
    with no_tf32():
        eager_logps, eager_grads = logps_and_grads(eager, batch, executor)
        before = graphs_compiled()
        compiled_logps, compiled_grads = logps_and_grads(compiled, batch, executor)
    assert graphs_compiled() > before, "nothing was compiled: the test would prove nothing"
    assert relative(compiled_logps, eager_logps) <= FLOAT32_TOLERANCE
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        assert relative(compiled_grads[name], grad) <= FLOAT32_TOLERANCE, name


# ---- the trainer's CUDA path: FSDP2 (one rank), bf16 mixed precision, compiled layers --------


@pytest.fixture(scope="module")
def env():
    with one_rank_group() as env:
        yield env


def trainer_model(config, env, compile: bool = True):
    from prefixdpo.train.parallelize import parallelize

    return parallelize(build_model(config, env.device, seed=0), env.mesh,
                       mixed_precision=MIXED_PRECISION, compile=compile)


def loader_for(config, layout: str = "shared+packed", rows: int = 2, seed: int = 0,
               shuffle: bool = False, pad_multiple: int = 128) -> PreferenceLoader:
    examples, report = fit_examples(
        random_examples(64, config.vocab_size, seed=seed, max_len=48), layout, LENGTH,
        "truncate")
    return PreferenceLoader(examples, layout, rows, packing_length=report.packing_length,
                            pad_multiple=pad_multiple, shuffle=shuffle, seed=seed, prefetch=0)


def run_step(model, batches, reference, env, optimizer, executor=TRAIN_EXECUTOR):
    from prefixdpo.train.loop import train_step
    from prefixdpo.train.losses import LossConfig, LossState

    return train_step(model, batches, reference=reference, loss_config=LossConfig(),
                      loss_state=LossState(), optimizer=optimizer, max_grad_norm=1.0, env=env,
                      executor=executor)[0]


def test_train_step_compiles_only_once(env):
    """Fixed packing length, different content each step (target and sequence counts vary):
    after the first step, no graph is compiled again. (In a rehearsal around the dense mask,
    whose shape is the row's: the documents executor's spans change shape with the content.)"""
    from prefixdpo.train.config import OptimSection
    from prefixdpo.train.optim import build_optimizer
    from prefixdpo.train.reference import TableReference

    torch._dynamo.reset()
    executor = TRAIN_EXECUTOR if DEVICE.type == "cuda" else DENSE
    config = variant_config("mistral_window")
    model = trainer_model(config, env)
    loader = loader_for(config, rows=2, shuffle=True, seed=1)
    table = torch.full((loader.numbering.num_sequences,), -30.0, device=env.device)
    optimizer = build_optimizer(model, OptimSection(lr=1e-5), env.device)
    steps = iter(loader)
    before = graphs_compiled()
    run_step(model, next(steps), TableReference(table), env, optimizer, executor)
    after_first = graphs_compiled()
    assert after_first > before, "nothing was compiled: the test would prove nothing"
    target_counts = set()
    for _ in range(5):
        batches = next(steps)
        target_counts.add(sum(len(b.target_ids) for b in batches))
        assert all(tuple(b.input_ids.shape) == (2, LENGTH) for b in batches)
        result = run_step(model, batches, TableReference(table), env, optimizer, executor)
        assert result.finite
    assert len(target_counts) > 1, "the batches should differ in content"
    assert graphs_compiled() == after_first


@pytest.mark.parametrize("layout", ["shared+packed", "paired"])
def test_first_loss_is_ln2_in_mixed_precision(env, layout):
    """The reference table is scored by the same bf16 model in shared+packed (as the trainer
    precomputes it); policy == reference, so every DPO logit is zero up to bf16 rounding and
    the loss is ln 2. beta = 0.1 scales a log-prob difference d to a loss change of about
    d / 20; 1e-2 allows d ~ 0.2 nats per pair. (Compiled on CUDA only: compilation is
    test_train_step_compiles_only_once's subject.)"""
    from prefixdpo.train.config import OptimSection
    from prefixdpo.train.optim import build_optimizer
    from prefixdpo.train.reference import TableReference
    from prefixdpo.train.scoring import score_sequences

    torch._dynamo.reset()
    config = cuda_config()
    model = trainer_model(config, env, compile=DEVICE.type == "cuda")
    examples, report = fit_examples(random_examples(64, config.vocab_size, seed=2, max_len=48),
                                    layout, LENGTH, "truncate")
    packed = fit_examples(examples, "shared+packed", LENGTH, "error")[1]
    table, _ = score_sequences(model, examples, layout="shared+packed",
                               packing_length=packed.packing_length, micro_batch_size=2,
                               device=env.device, executor=TRAIN_EXECUTOR, progress=False)
    loader = PreferenceLoader(examples, layout, 4, packing_length=report.packing_length,
                              pad_multiple=TRAIN_EXECUTOR.row_multiple, seed=0, prefetch=0)
    optimizer = build_optimizer(model, OptimSection(lr=1e-5), env.device)
    result = run_step(model, next(iter(loader)), TableReference(table.float()), env, optimizer)
    assert result.finite and result.num_pairs > 0
    assert abs(result.loss - math.log(2)) <= 1e-2, result.loss
    assert abs(result.metrics["rewards/margins"]) <= 2e-2
