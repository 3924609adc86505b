"""How attention runs: one object, chosen once per run from `train.attention` and the device.

An `AttentionExecutor` builds a micro-batch's masks in its own form (`layer_masks`, one per
attention window of the model's layers) and attends with them (`attend`); the masks carry
their executor (`LayerMasks`), so the model never asks which form a mask has, and nothing
else needs to know which executor runs:

- "flex": FlexAttention over a sparse `BlockMask` of `block_size` blocks, with the kernel
  options of `flex_backend` (`model.attention.flex_kernel_options`). Compiled on CUDA; on the
  CPU it has no backward, and runs eagerly, or compiled with `compile_cpu` (forward only: C++
  kernels that visit only the BlockMask's blocks, as the CUDA kernels do).
- "dense": a `[B, 1, L, L]` boolean mask for `scaled_dot_product_attention`: L x L per row
  whatever the mask allows; the oracle the others are tested against.
- "documents": attention per span (`model.attention.document_attention`): the CPU's default.

`choose_executor` is the trainer's rule: "auto" is FlexAttention on CUDA and the documents
executor elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from prefixdpo.model.attention import (FLEX_BACKENDS, document_attention, fit_flex_configs,
                                       flex_kernel_options)
from prefixdpo.model.masks import (FLEX_BLOCK_SIZE, AttentionMask, block_mask, dense_mask,
                                   per_document_mask, row_mask_mod)

EXECUTORS = ("flex", "dense", "documents")
# Unpacked rows of the other executors are padded to a multiple of this: few distinct shapes.
SMALL_ROW_MULTIPLE = 8

# FlexAttention must be compiled to run as a fused kernel; inside an already compiled layer the
# call is inlined. Created here, at import, so that tracing a compiled layer meets a plain
# global rather than a factory. CUDA leaves shapes to dynamo's automatic dynamic mode: packed
# rows never change shape, and the unpacked layouts' varying lengths then cost one more
# compilation instead of one per length. The CPU's is static (torch 2.13's C++ code for
# FlexAttention with dynamic shapes fails to build).
compiled_flex_attention = torch.compile(flex_attention)
compiled_cpu_flex_attention = torch.compile(flex_attention, dynamic=False)


@dataclass(frozen=True, eq=False)
class AttentionExecutor:
    """How attention runs (see the module docstring). `block_size` and `flex_backend` concern
    FlexAttention only; a backend this machine cannot run is refused here, with a ValueError.

    Only the four fields make one: FSDP's mixed precision rebuilds the dataclasses among a
    module's inputs from their fields (`dataclasses.replace`), once per unit and forward."""

    name: str
    flex_backend: str = "triton"
    block_size: int = FLEX_BLOCK_SIZE
    compile_cpu: bool = False

    def __post_init__(self) -> None:
        if self.name not in EXECUTORS:
            raise ValueError(f"unknown attention executor {self.name!r}; choose one of "
                             f"{EXECUTORS}")
        size = self.block_size
        if not (16 <= size <= FLEX_BLOCK_SIZE and size & (size - 1) == 0):
            raise ValueError(f"FlexAttention block size {size}: expected a power of two from "
                             f"16 to {FLEX_BLOCK_SIZE} (rows are padded to multiples of "
                             f"{FLEX_BLOCK_SIZE})")
        options = _kernel_options(self.flex_backend, size) if self.name == "flex" else None
        object.__setattr__(self, "_kernel_options", options)
        if self.name == "flex" and size < FLEX_BLOCK_SIZE:
            fit_flex_configs(size)

    @property
    def kernel_options(self) -> Mapping[str, Any] | None:
        """FlexAttention's `kernel_options` (None: torch's own choice)."""
        return self._kernel_options

    @property
    def row_multiple(self) -> int:
        """Unpacked rows are padded to a multiple of this: FlexAttention's largest block (fewer
        distinct shapes to compile, and whole blocks), a small multiple for the others."""
        return FLEX_BLOCK_SIZE if self.name == "flex" else SMALL_ROW_MULTIPLE

    def mask(self, document_ids: Tensor, segment_ids: Tensor, positions: Tensor,
             sliding_window: int | None) -> AttentionMask:
        """The mask of rows `[B, L]` for one attention window, in this executor's form."""
        if self.name == "documents":
            return per_document_mask(document_ids, segment_ids, positions, sliding_window)
        batch_size, seq_len = document_ids.shape
        mask_mod = row_mask_mod(document_ids, segment_ids, positions, sliding_window)
        if self.name == "flex":
            return block_mask(mask_mod, batch_size, seq_len, document_ids.device,
                              self.block_size)
        return dense_mask(mask_mod, batch_size, seq_len, document_ids.device)

    def layer_masks(self, document_ids: Tensor, segment_ids: Tensor, positions: Tensor,
                    windows: tuple[int | None, ...]) -> LayerMasks:
        """One mask per window in `windows` (a model's `config.attention_windows`)."""
        return LayerMasks(self, {window: self.mask(document_ids, segment_ids, positions, window)
                                 for window in windows})

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float
               ) -> Tensor:
        """Attention `[B, heads, L, head_dim]` of `q` over `k`, `v` (GQA: fewer kv heads)."""
        if self.name == "flex":
            flex = compiled_flex_attention if q.is_cuda else \
                compiled_cpu_flex_attention if self.compile_cpu else flex_attention
            return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=True,
                        kernel_options=self._kernel_options)
        if self.name == "documents":
            return document_attention(q, k, v, mask, scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=True)


# Checked once per process and setting (the executor is rebuilt often, see its docstring).
_kernel_options = functools.cache(flex_kernel_options)


@dataclass(frozen=True, eq=False)
class LayerMasks:
    """The masks of one micro-batch, one per distinct attention window of the model's layers
    (None: full attention), each built once and shared by the layers of that window and by
    the reference model; with the executor that built them."""

    executor: AttentionExecutor
    by_window: Mapping[int | None, AttentionMask]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float
               ) -> Tensor:
        return self.executor.attend(q, k, v, self.by_window[window], scale)


def choose_executor(choice: str, device: torch.device, *, flex_backend: str = "triton",
                    block_size: int = FLEX_BLOCK_SIZE, backward: bool = True
                    ) -> AttentionExecutor:
    """The executor for `train.attention` = `choice` on `device`: "auto" is FlexAttention on
    CUDA and the documents executor elsewhere. FlexAttention has no backward on the CPU: there
    it is refused, or with `backward=False` (scoring, evaluation) runs compiled."""
    if choice == "auto":
        choice = "flex" if device.type == "cuda" else "documents"
    if choice == "flex" and device.type != "cuda" and backward:
        raise ValueError("train.attention = 'flex' needs a CUDA device (FlexAttention has no "
                         "backward on CPU); use 'documents' or 'dense'")
    if flex_backend not in FLEX_BACKENDS:
        raise ValueError(f"unknown FlexAttention backend {flex_backend!r}; choose one of "
                         f"{FLEX_BACKENDS}")
    return AttentionExecutor(choice, flex_backend if choice == "flex" else "triton",
                             block_size, compile_cpu=choice == "flex" and device.type != "cuda")
