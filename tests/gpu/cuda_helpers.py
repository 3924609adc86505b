"""What the CUDA test modules of this folder share: where they run, the skip marks, a one-rank
process group, a tiny model shaped for FlexAttention's kernels, packed batches, and the
comparisons.

A CPU rehearsal: with `PREFIXDPO_GPU_REHEARSAL=1`, or by default on a machine without CUDA
(`PREFIXDPO_GPU_REHEARSAL=0` skips the tests there instead), every test runs its body on the
CPU, with each CUDA-only piece replaced by its CPU counterpart: the documents executor where a
backward is needed (FlexAttention has none on the CPU), compiled CPU FlexAttention for
forward-only checks, gloo for NCCL, the CPU's compiler for inductor's CUDA code, float32 for
bfloat16 where bfloat16 is not the subject. So a plain
Python error, a wrong call or a broken oracle shows in the CPU suite, not in a GPU run. The
checks that need CUDA itself are left out through `on_cuda`, each with its reason.

Not a test module: the tests import it (pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator

import pytest
import torch
from conftest import random_examples, tiny_config

from prefixdpo.data.layout import Batch
from prefixdpo.data.loader import PreferenceLoader, fit_examples
from prefixdpo.model.config import ModelConfig
from prefixdpo.model.executor import AttentionExecutor, choose_executor

HAS_CUDA = torch.cuda.is_available()
REHEARSAL = os.environ.get("PREFIXDPO_GPU_REHEARSAL", "0" if HAS_CUDA else "1") == "1"
DEVICE = torch.device("cpu") if REHEARSAL else torch.device("cuda")
# The trainer's executor on DEVICE (FlexAttention on CUDA, documents on the CPU), and the one
# of checks without a backward (FlexAttention, compiled on the CPU too).
TRAIN_EXECUTOR = choose_executor("auto", DEVICE)
FORWARD_EXECUTOR = choose_executor("flex", DEVICE, backward=False)
DENSE = AttentionExecutor("dense")
# The trainer computes in bfloat16 on CUDA. On the CPU bfloat16 runs ~10x slower than float32
# and says nothing about CUDA's kernels: tests whose subject is not bfloat16 itself rehearse
# in float32 (the mixed-precision tests keep it).
MIXED_PRECISION = DEVICE.type == "cuda"
COMPUTE_DTYPE = torch.bfloat16 if MIXED_PRECISION else torch.float32

CUDA_MARKS = [pytest.mark.gpu, pytest.mark.skipif(
    not HAS_CUDA and not REHEARSAL,
    reason="needs a CUDA device (PREFIXDPO_GPU_REHEARSAL=1 rehearses it on the CPU)")]

LENGTH = 256  # packing length: two FlexAttention blocks per row
FLOAT32_TOLERANCE = 1e-4  # relative norm, float32 with TF32 off (see test_flex_cuda.py)
# Sequence log-probs (sums over up to ~50 tokens of ~-5.4 nats each) of this tiny model in
# bfloat16 differ from float32 by at most 0.024 nats (measured on the CPU over 140 sequences;
# 0.005 on average). 0.1 nats is four times that; a wrong mask or a sequence mix-up moves a
# sequence by about a nat or more.
SEQUENCE_NATS = 0.1


class NotRehearsed(UserWarning):
    """A check that needs CUDA, left out of a CPU rehearsal (pytest lists it with its reason)."""


def on_cuda(reason: str) -> bool:
    """Whether to run a check that needs CUDA: yes on a GPU; in a rehearsal no, and `reason`
    (why it needs CUDA) is reported as a `NotRehearsed` warning."""
    if not REHEARSAL:
        return True
    warnings.warn(NotRehearsed(f"not rehearsed on the CPU: {reason}"), stacklevel=2)
    return False


def cuda_config(**overrides) -> ModelConfig:
    """head_dim 32 (over a family's own): FlexAttention's kernels want at least 16."""
    return tiny_config(**{**overrides, "hidden_size": 128, "head_dim": 32,
                          "intermediate_size": 256})


@contextlib.contextmanager
def one_rank_group() -> Iterator:
    """A process group of one rank (NCCL; gloo in a rehearsal), made by the trainer's own
    `setup` (no torchrun variables needed), destroyed afterwards."""
    import torch.distributed as dist

    from prefixdpo.train.distributed import setup

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    env = setup(DEVICE.type)
    try:
        yield env
    finally:
        dist.destroy_process_group()


def fitted_examples(config: ModelConfig, layout: str = "shared+packed", num: int = 64,
                    seed: int = 0, max_len: int = 48):
    """Random examples (pairs, pairs with two prompts, triples) fitted to LENGTH in `layout`
    and, so that the shared+packed scoring pass takes them too, in shared+packed."""
    examples, _ = fit_examples(random_examples(num, config.vocab_size, seed=seed,
                                               max_len=max_len), layout, LENGTH, "truncate")
    examples, _ = fit_examples(examples, "shared+packed", LENGTH, "error")
    return examples


def loader_for(examples, layout: str = "shared+packed", rows: int = 2, seed: int = 0,
               shuffle: bool = False, pin_memory: bool = False) -> PreferenceLoader:
    """Packed rows of LENGTH, or unpacked rows padded to 128 (FlexAttention's block), as the
    trainer builds them on CUDA (pinned memory only where there is CUDA)."""
    return PreferenceLoader(examples, layout, rows, packing_length=LENGTH, pad_multiple=128,
                            shuffle=shuffle, seed=seed, prefetch=0,
                            pin_memory=pin_memory and HAS_CUDA)


def first_batch(config: ModelConfig, device: torch.device = DEVICE) -> Batch:
    loader = loader_for(fitted_examples(config))
    batch = loader.build(loader.micro_batch_plan(0)[0]).to(device)
    assert len(torch.unique(batch.document_ids[0])) > 3, "want several groups in a row"
    return batch


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def within_bf16_noise(candidate: float, baseline: float) -> bool:
    """A bfloat16 result `candidate` away (relative norm) from float32 truth is as good as
    another bfloat16 computation of the same thing, `baseline` away: within twice that (each
    execution rounds at other places: kernels, fusion, reduction order), plus 5e-3 for
    gradients of small norm, and never above 5e-2. This is test_flex_cuda.py's rule."""
    return candidate <= min(2 * baseline + 5e-3, 5e-2)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Compare float32 with float32: no TF32 in matmuls (cuBLAS, inductor, FlexAttention)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def logps_and_grads(model: torch.nn.Module, batch: Batch, executor: AttentionExecutor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Target log-probs and every parameter gradient (gathered whole, float32, by plain name)
    of a fixed random weighting of them."""
    model.zero_grad(set_to_none=True)
    masks = executor.layer_masks(batch.document_ids, batch.segment_ids, batch.positions,
                                 model.config.attention_windows)
    logps = model(batch.input_ids, batch.positions, masks, batch.target_index, batch.target_ids)
    weights = torch.randn(logps.shape, generator=torch.Generator().manual_seed(3))
    (logps * weights.to(logps.device)).sum().backward()
    grads = full_grads(model)
    model.zero_grad(set_to_none=True)
    return logps.detach().float(), grads


_WRAPPER_PREFIXES = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")


def plain_name(name: str) -> str:
    """A parameter's name without the prefixes of activation checkpointing or compile."""
    return _WRAPPER_PREFIXES.sub("", name)


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gradient, whole (sharded ones gathered), float32, by plain name."""
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grads[plain_name(name)] = grad.detach().float().clone()
    return grads


def graphs_compiled() -> int:
    """Graphs torch.compile has compiled so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
