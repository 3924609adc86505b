"""The CUDA executor: FlexAttention, compiled decoder layers and the mixed-precision train step.

On CPU the suite checks FlexAttention's forward only (it has no CPU backward); here, on a GPU,
a tiny model runs a packed prefix-shared batch (several groups per row, groups with different
prompts, groups of three completions, rows crossing FlexAttention's 128-token blocks) and:
- FlexAttention's log-probs AND parameter gradients equal the dense-mask SDPA path's, in float32
  and in bfloat16;
- compiled decoder layers equal eager ones;
- a compiled, mixed-precision `train_step` compiles nothing after its first step while the
  batch content changes at a fixed packing length;
- that step's first loss is ln 2 when the reference is the policy's own log-probs.
The chunked log-prob kernel's compiled CUDA path is checked against its reference in
tests/kernels/test_log_probs.py (float32 and bfloat16).

Tolerances are relative norms, ||a - b|| / ||b||, over the target log-probs and per parameter
gradient. float32 (TF32 off): 1e-4; a mask error shows as O(1e-2) or more. bfloat16: each
executor is compared with the float32 dense result, and FlexAttention must be within 2x (+5e-3)
of the dense bfloat16 path's own error, and under 5e-2 absolute.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import FAMILIES, random_examples, tiny_config

from prefixdpo.data.layout import Batch
from prefixdpo.data.loader import PreferenceLoader, fit_examples
from prefixdpo.model.masks import (and_masks, causal,
                                   dense_mask, document_mask)
from prefixdpo.model.executor import AttentionExecutor, LayerMasks
from prefixdpo.model.transformer import build_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LENGTH = 256  # packing length: two FlexAttention blocks per row
FLOAT32_TOLERANCE = 1e-4


def cuda_config(variant: str):
    """head_dim 32: FlexAttention's kernels want a head dimension of at least 16. Gemma 3:
    a sliding layer then a full one, each with its own mask and RoPE, and its own scale."""
    extra = {"llama": {},
             "mistral_window": dict(sliding_window=24, architecture="MistralForCausalLM"),
             "gemma3": dict(FAMILIES["gemma3"], sliding_window=24)}[variant]
    return tiny_config(**{**extra, "hidden_size": 128, "head_dim": 32, "intermediate_size": 256})


def loader_for(config, layout: str = "shared+packed", rows: int = 2, seed: int = 0,
               shuffle: bool = False) -> PreferenceLoader:
    examples, report = fit_examples(
        random_examples(64, config.vocab_size, seed=seed, max_len=48), layout, LENGTH,
        "truncate")
    return PreferenceLoader(examples, layout, rows, packing_length=report.packing_length,
                            pad_multiple=128, shuffle=shuffle, seed=seed, prefetch=0)


def first_batch(config, layout: str = "shared+packed") -> Batch:
    loader = loader_for(config, layout)
    batch = loader.build(loader.micro_batch_plan(0)[0]).to("cuda")
    assert len(torch.unique(batch.document_ids[0])) > 3, "want several groups in a row"
    return batch


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def logps_and_grads(model, batch: Batch, attention: str) -> tuple[torch.Tensor, dict]:
    """Target log-probs and the gradients of a fixed random weighting of them."""
    model.zero_grad(set_to_none=True)
    masks = AttentionExecutor(attention).layer_masks(batch.document_ids, batch.segment_ids,
                                                     batch.positions, model.config.attention_windows)
    logps = model(batch.input_ids, batch.positions, masks, batch.target_index, batch.target_ids)
    weights = torch.randn(logps.shape, generator=torch.Generator().manual_seed(3)).cuda()
    (logps * weights).sum().backward()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    return logps.detach().float(), grads


@pytest.fixture
def no_tf32():
    """Compare float32 with float32: no TF32 in matmuls (cuBLAS, inductor, FlexAttention)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("variant", ["llama", "mistral_window", "gemma3"])
def test_flex_equals_dense_float32(variant, no_tf32):
    config = cuda_config(variant)
    model = build_model(config, "cuda", seed=0)
    batch = first_batch(config)
    dense, dense_grads = logps_and_grads(model, batch, attention="dense")
    flex, flex_grads = logps_and_grads(model, batch, attention="flex")
    assert relative(flex, dense) <= FLOAT32_TOLERANCE
    # The tolerance tells a wrong mask: without the prefix-sharing rule the log-probs move by
    # far more than it allows (on CPU, 0.009-0.011 relative for the Llama variant over four
    # seeds, 0.026 with the window: 30x the tolerance is a clear margin below both).
    with torch.no_grad():
        broken = dense_mask(and_masks(causal, document_mask(batch.document_ids)),
                            *batch.input_ids.shape, batch.input_ids.device)
        broken_masks = LayerMasks(AttentionExecutor("dense"),
                                  {w: broken for w in config.attention_windows})
        wrong = model(batch.input_ids, batch.positions, broken_masks, batch.target_index,
                      batch.target_ids)
    assert relative(wrong, dense) > 30 * FLOAT32_TOLERANCE
    assert flex_grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():
        assert grad.norm() > 0, name
        assert relative(flex_grads[name], grad) <= FLOAT32_TOLERANCE, name


@pytest.mark.parametrize("variant", ["llama", "mistral_window", "gemma3"])
def test_flex_equals_dense_bfloat16(variant, no_tf32):
    config = cuda_config(variant)
    batch = first_batch(config)
    truth, truth_grads = logps_and_grads(build_model(config, "cuda", seed=0), batch, False)
    model = build_model(config, "cuda", torch.bfloat16, seed=0)
    dense, dense_grads = logps_and_grads(model, batch, attention="dense")
    flex, flex_grads = logps_and_grads(model, batch, attention="flex")
    flex_error, dense_error = relative(flex, truth), relative(dense, truth)
    assert flex_error <= min(2 * dense_error + 5e-3, 5e-2), (flex_error, dense_error)
    for name, grad in truth_grads.items():
        flex_error = relative(flex_grads[name], grad)
        dense_error = relative(dense_grads[name], grad)
        assert flex_error <= min(2 * dense_error + 5e-3, 5e-2), (name, flex_error, dense_error)


def test_compiled_layers_equal_eager(no_tf32):
    torch._dynamo.reset()
    config = cuda_config("llama")
    eager = build_model(config, "cuda", seed=0)
    compiled = copy.deepcopy(eager)
    for layer in compiled.layers:
        layer.compile()
    batch = first_batch(config)
    eager_logps, eager_grads = logps_and_grads(eager, batch, attention="flex")
    compiled_logps, compiled_grads = logps_and_grads(compiled, batch, attention="flex")
    assert relative(compiled_logps, eager_logps) <= FLOAT32_TOLERANCE
    for name, grad in eager_grads.items():
        assert relative(compiled_grads[name], grad) <= FLOAT32_TOLERANCE, name


# ---- the trainer's CUDA path: FSDP2 (one rank), bf16 mixed precision, compiled layers --------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A one-rank NCCL group of its own (torchrun's variables are not touched)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from prefixdpo.train.distributed import Distributed

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    torch.cuda.set_device(0)
    device = torch.device("cuda", 0)
    store = dist.FileStore(str(tmp_path_factory.mktemp("nccl") / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
    try:
        yield Distributed(0, 1, 0, device, init_device_mesh("cuda", (1,)))
    finally:
        dist.destroy_process_group()


def trainer_model(config, env):
    from prefixdpo.train.parallelize import parallelize

    return parallelize(build_model(config, env.device, seed=0), env.mesh, mixed_precision=True,
                       compile=True)


def run_step(model, batches, reference, env, optimizer):
    from prefixdpo.train.loop import train_step
    from prefixdpo.train.losses import LossConfig, LossState

    return train_step(model, batches, reference=reference, loss_config=LossConfig(),
                      loss_state=LossState(), optimizer=optimizer, max_grad_norm=1.0, env=env,
                      executor=AttentionExecutor("flex"))[0]


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_train_step_compiles_only_once(env):
    """Fixed packing length, different content each step (target and sequence counts vary):
    after the first step, no graph is compiled again."""
    from prefixdpo.train.config import OptimSection
    from prefixdpo.train.optim import build_optimizer
    from prefixdpo.train.reference import TableReference

    torch._dynamo.reset()
    config = cuda_config("mistral_window")
    model = trainer_model(config, env)
    loader = loader_for(config, rows=2, shuffle=True, seed=1)
    table = torch.full((loader.numbering.num_sequences,), -30.0, device=env.device)
    optimizer = build_optimizer(model, OptimSection(lr=1e-5), env.device)
    steps = iter(loader)
    before = graphs_compiled()
    run_step(model, next(steps), TableReference(table), env, optimizer)
    after_first = graphs_compiled()
    assert after_first > before, "nothing was compiled: the test would prove nothing"
    target_counts = set()
    for _ in range(5):
        batches = next(steps)
        target_counts.add(sum(len(b.target_ids) for b in batches))
        assert all(tuple(b.input_ids.shape) == (2, LENGTH) for b in batches)
        result = run_step(model, batches, TableReference(table), env, optimizer)
        assert result.finite
    assert len(target_counts) > 1, "the batches should differ in content"
    assert graphs_compiled() == after_first


@pytest.mark.parametrize("layout", ["shared+packed", "paired"])
def test_first_loss_is_ln2_in_mixed_precision(env, layout):
    """The reference table is scored by the same compiled bf16 model in shared+packed (as the
    trainer precomputes it); policy == reference, so every DPO logit is zero up to bf16
    rounding and the loss is ln 2. beta = 0.1 scales a log-prob difference d to a loss
    change of about d / 20; 1e-2 allows d ~ 0.2 nats per pair."""
    from prefixdpo.train.config import OptimSection
    from prefixdpo.train.optim import build_optimizer
    from prefixdpo.train.reference import TableReference
    from prefixdpo.train.scoring import score_sequences

    torch._dynamo.reset()
    config = cuda_config("llama")
    model = trainer_model(config, env)
    examples, report = fit_examples(random_examples(64, config.vocab_size, seed=2, max_len=48),
                                    layout, LENGTH, "truncate")
    packed = fit_examples(examples, "shared+packed", LENGTH, "error")[1]
    table, _ = score_sequences(model, examples, layout="shared+packed",
                               packing_length=packed.packing_length, micro_batch_size=2,
                               device=env.device, executor=AttentionExecutor("flex"), progress=False)
    loader = PreferenceLoader(examples, layout, 4, packing_length=report.packing_length,
                              pad_multiple=128, seed=0, prefetch=0)
    optimizer = build_optimizer(model, OptimSection(lr=1e-5), env.device)
    result = run_step(model, next(iter(loader)), TableReference(table.float()), env, optimizer)
    assert result.finite and result.num_pairs > 0
    assert abs(result.loss - math.log(2)) <= 1e-2, result.loss
    assert abs(result.metrics["rewards/margins"]) <= 2e-2

