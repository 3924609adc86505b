"""Attention masks for packed, prefix-shared rows, composed from small mask functions.

Every mask function has FlexAttention's `mask_mod` signature `(b, h, q_idx, kv_idx) -> bool`
and reads the batch's per-token tensors by indexing, so the *same* functions serve both
executors:

- CUDA: `create_block_mask` turns them into a sparse `BlockMask` for FlexAttention, built once
  per step and shared by every layer (and by the reference model).
- CPU: `dense_mask` evaluates them on broadcast index grids into a `[B, 1, L, L]` boolean tensor
  for `scaled_dot_product_attention`, because FlexAttention has no backward on CPU.

The rule for a query q and key k in one row (see DESIGN section 2):
    same document  and  k <= q  and  (segment[k] == 0  or  segment[k] == segment[q])
    and, for Mistral, positions[q] - positions[k] < sliding_window.
Positions restart at the prompt length for every completion, so the window is measured in the
original (unshared) sequence, exactly as the model would see prompt+completion alone.
"""

from __future__ import annotations

import functools
from typing import Callable, Union

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
# What the model's attention takes: a BlockMask (FlexAttention) or a dense [B, 1, L, L] bool mask.
AttentionMask = Union[BlockMask, Tensor]


def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


def document_mask(document_ids: Tensor) -> MaskMod:
    """Packing: tokens attend only within their own document (one prefix-shared group)."""

    def same_document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    return same_document


def prefix_sharing_mask(segment_ids: Tensor) -> MaskMod:
    """Segment 0 is the shared prompt; completion s sees the prompt and segment s only."""

    def prompt_or_same_segment(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        kv_segment = segment_ids[b, kv_idx]
        return (kv_segment == 0) | (kv_segment == segment_ids[b, q_idx])

    return prompt_or_same_segment


def sliding_window_mask(positions: Tensor, window: int) -> MaskMod:
    """Mistral: a query sees the `window` most recent positions, itself included."""

    def within_window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return positions[b, q_idx] - positions[b, kv_idx] < window

    return within_window


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    def all_of(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for mask_mod in mask_mods[1:]:
            result = result & mask_mod(b, h, q_idx, kv_idx)
        return result

    return all_of


def row_mask_mod(document_ids: Tensor, segment_ids: Tensor, positions: Tensor,
                 sliding_window: int | None) -> MaskMod:
    """The full rule for a batch of rows, all tensors `[B, L]`."""
    mods = [causal, document_mask(document_ids), prefix_sharing_mask(segment_ids)]
    if sliding_window is not None:
        mods.append(sliding_window_mask(positions, sliding_window))
    return and_masks(*mods)


def dense_mask(mask_mod: MaskMod, batch_size: int, seq_len: int, device: torch.device) -> Tensor:
    """Evaluate a mask function on every (row, query, key): a `[B, 1, L, L]` bool tensor."""
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q_idx = torch.arange(seq_len, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(seq_len, device=device).view(1, 1, 1, -1)
    return mask_mod(b, h, q_idx, kv_idx).expand(batch_size, 1, seq_len, seq_len)


@functools.cache
def _compiled_create_block_mask():
    return torch.compile(create_block_mask)


def block_mask(mask_mod: MaskMod, batch_size: int, seq_len: int, device: torch.device) -> BlockMask:
    """A FlexAttention BlockMask; compiled on CUDA so no `[L, L]` tensor is ever materialized."""
    create = _compiled_create_block_mask() if device.type == "cuda" else create_block_mask
    return create(mask_mod, batch_size, None, seq_len, seq_len, device=device)


def build_attention_mask(document_ids: Tensor, segment_ids: Tensor, positions: Tensor,
                         sliding_window: int | None, use_flex: bool) -> AttentionMask:
    """The mask for one batch of rows, in the form the chosen executor takes."""
    batch_size, seq_len = document_ids.shape
    mask_mod = row_mask_mod(document_ids, segment_ids, positions, sliding_window)
    if use_flex:
        return block_mask(mask_mod, batch_size, seq_len, document_ids.device)
    return dense_mask(mask_mod, batch_size, seq_len, document_ids.device)
