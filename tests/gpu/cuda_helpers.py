"""What the CUDA test modules of this folder share: the skip marks, a one-rank process group,
a tiny model shaped for FlexAttention's kernels, packed batches, and the comparisons.

Not a test module: the tests import it (pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import pytest
import torch
from conftest import random_examples, tiny_config

from prefixdpo.data.layout import Batch
from prefixdpo.data.loader import PreferenceLoader, fit_examples
from prefixdpo.model.config import ModelConfig

CUDA_MARKS = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LENGTH = 256  # packing length: two FlexAttention blocks per row
FLOAT32_TOLERANCE = 1e-4  # relative norm, float32 with TF32 off (see test_flex_cuda.py)
# Sequence log-probs (sums over up to ~50 tokens of ~-5.4 nats each) of this tiny model in
# bfloat16 differ from float32 by at most 0.024 nats (measured on the CPU over 140 sequences;
# 0.005 on average). 0.1 nats is four times that; a wrong mask or a sequence mix-up moves a
# sequence by about a nat or more.
SEQUENCE_NATS = 0.1


def cuda_config(**overrides) -> ModelConfig:
    """head_dim 32: FlexAttention's kernels want a head dimension of at least 16."""
    return tiny_config(hidden_size=128, head_dim=32, intermediate_size=256, **overrides)


@contextlib.contextmanager
def one_rank_group() -> Iterator:
    """A process group of one NCCL rank, made by the trainer's own `setup` (no torchrun
    variables needed), destroyed afterwards."""
    import torch.distributed as dist

    from prefixdpo.train.distributed import setup

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    env = setup("cuda")
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
    trainer builds them on CUDA."""
    return PreferenceLoader(examples, layout, rows, packing_length=LENGTH, pad_multiple=128,
                            shuffle=shuffle, seed=seed, prefetch=0, pin_memory=pin_memory)


def first_batch(config: ModelConfig, device: str | torch.device = "cuda") -> Batch:
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
