"""Attention masks for packed, prefix-shared rows, composed from small mask functions.

Every mask function has FlexAttention's `mask_mod` signature `(b, h, q_idx, kv_idx) -> bool`
and reads the batch's per-token tensors by indexing, so the *same* functions serve every
executor (`EXECUTORS`; `build_attention_mask` builds the mask in the form each one takes):

- "flex" (CUDA): `create_block_mask` turns them into a sparse `BlockMask` for FlexAttention,
  built once per step and shared by every layer (and by the reference model).
- "dense": `dense_mask` evaluates them on broadcast index grids into a `[B, 1, L, L]` boolean
  tensor for `scaled_dot_product_attention` (FlexAttention has no backward on CPU). It pays
  L x L per row whatever the mask allows; it is the oracle the other executors are tested
  against.
- "documents": `per_document_mask` cuts the rows into their documents (one prefix-shared group
  each) and evaluates the same functions on each document alone, in buckets of similar
  lengths, so attention costs the sum of (document length)^2 (`model.attention` runs it). For
  CPU, or any device without FlexAttention.

The rule for a query q and key k in one row (see DESIGN section 2):
    same document  and  k <= q  and  (segment[k] == 0  or  segment[k] == segment[q])
    and, for Mistral, positions[q] - positions[k] < sliding_window.
Positions restart at the prompt length for every completion, so the window is measured in the
original (unshared) sequence, exactly as the model would see prompt+completion alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# How attention runs; see the module docstring.
EXECUTORS = ("flex", "dense", "documents")
# The document id of padding tokens (what `data.layout` writes).
PADDING_DOCUMENT = -1


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


# FlexAttention's default block: rows are padded to a multiple of it.
FLEX_BLOCK_SIZE = 128


def block_mask(mask_mod: MaskMod, batch_size: int, seq_len: int, device: torch.device,
               block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """A FlexAttention BlockMask of `block_size` x `block_size` blocks; compiled on CUDA so no
    `[L, L]` tensor is ever materialized."""
    create = _compiled_create_block_mask() if device.type == "cuda" else create_block_mask
    return create(mask_mod, batch_size, None, seq_len, seq_len, device=device,
                  BLOCK_SIZE=block_size)


@dataclass(frozen=True)
class DocumentMask:
    """The mask in the form the "documents" executor takes: the rows cut into documents (a
    document is a maximal run of one id in a row: one prefix-shared group), bucketed by length.

    A bucket of `n` documents padded to `length` is `n * length` consecutive *slots*; slots of
    all buckets in order make `[S]`. Each token sits in exactly one slot, so `slot_token` and
    `token_slot` are inverse maps but for the *empty* slots past a document's end: those hold
    zeros, come after the document, so no real query sees them (causal), and their outputs are
    dropped. Every padding token is a document of its own, attending to itself only:
    its output is finite and never read, and the attention weights stay in the autograd graph
    even for a micro-batch of padding alone (sharded training reduces the same gradients on
    every rank).
    """

    slot_token: Tensor         # int64 [S]: the flat `[B * L]` index of each slot's token (an
                               # empty slot repeats its document's last token)
    token_slot: Tensor         # int64 [B * L]: each token's slot
    empty_slots: Tensor        # int64 [E]: the slots past their document's end
    masks: tuple[Tensor, ...]  # bool [n, 1, length, length] per bucket: each document alone
    batch_size: int
    seq_len: int


# What the model's attention takes, one form per executor.
AttentionMask = Union[BlockMask, Tensor, DocumentMask]

# Bucket bounds: 1 (padding tokens), then 16, 24, 32, 48, 64, 96, ... A bucket pads its
# documents to its longest, under 1.5x a document's length (documents shorter than 16 cost
# little anyway), so under 2.25x its work, while a micro-batch makes a few attention calls (two
# per octave of lengths at most) rather than one per document.
_BUCKET_BOUNDS = [1, 16] + [m << e for e in range(3, 30) for m in (3, 4)]


def per_document_mask(document_ids: Tensor, segment_ids: Tensor, positions: Tensor,
                      sliding_window: int | None) -> DocumentMask:
    """Cut `[B, L]` rows into documents and evaluate `row_mask_mod` on each document alone.

    Shapes (how many documents, how long) depend on the data, so this runs on the host: the
    tensors are read on the CPU (a device sync if they live elsewhere, once per micro-batch)
    and the result is put on their device.
    """
    device = document_ids.device
    batch_size, seq_len = document_ids.shape
    documents, segments, places = (t.cpu().reshape(-1) for t in
                                   (document_ids, segment_ids, positions))
    num_tokens = documents.numel()
    is_padding = documents == PADDING_DOCUMENT
    starts = torch.ones(num_tokens, dtype=torch.bool)
    starts[1:] = documents[1:] != documents[:-1]
    starts[::seq_len] = True  # a document never crosses rows
    starts |= is_padding
    starts = starts.nonzero().squeeze(1)
    lengths = torch.diff(starts, append=torch.tensor([num_tokens]))
    # Each document's id occurs in one run only (else the dense rule would join the runs).
    real = ~is_padding[starts]
    row_and_id = (starts[real] // seq_len) * (int(documents.max()) + 1) + documents[starts[real]]
    assert len(row_and_id.unique()) == len(row_and_id), "a document id occurs in two runs"

    bucket_of = torch.bucketize(lengths, torch.tensor(_BUCKET_BOUNDS))  # smallest bound >= it
    slot_tokens, filled, masks = [], [], []
    for bucket in bucket_of.unique().tolist():
        chosen = bucket_of == bucket
        first, count = starts[chosen, None], lengths[chosen, None]  # [n, 1]
        n, length = len(first), int(count.max())
        offset = torch.arange(length)
        # Past its end a document repeats its last token's ids: the mask row of such a slot
        # sees the document, so no query row is all False (SDPA would give NaN).
        clamped = first + torch.minimum(offset, count - 1)  # [n, length]
        mask_mod = row_mask_mod(documents[clamped], segments[clamped], places[clamped],
                                sliding_window)
        masks.append(dense_mask(mask_mod, n, length, torch.device("cpu")).to(device))
        slot_tokens.append(clamped.reshape(-1))
        filled.append((offset < count).reshape(-1))
    slot_token, filled = torch.cat(slot_tokens), torch.cat(filled)
    real_slots = filled.nonzero().squeeze(1)
    token_slot = torch.full((num_tokens,), -1, dtype=torch.int64)
    token_slot[slot_token[real_slots]] = real_slots
    assert len(real_slots) == num_tokens and bool((token_slot >= 0).all()), \
        "every token is in exactly one slot"
    return DocumentMask(slot_token.to(device), token_slot.to(device),
                        (~filled).nonzero().squeeze(1).to(device), tuple(masks), batch_size,
                        seq_len)


def build_attention_mask(document_ids: Tensor, segment_ids: Tensor, positions: Tensor,
                         sliding_window: int | None, executor: str,
                         flex_block_size: int = FLEX_BLOCK_SIZE) -> AttentionMask:
    """The mask for one batch of rows `[B, L]`, in the form `executor` (one of `EXECUTORS`)
    takes; `flex_block_size` is the BlockMask's block (flex only)."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown attention executor {executor!r}; choose one of {EXECUTORS}")
    if executor == "documents":
        return per_document_mask(document_ids, segment_ids, positions, sliding_window)
    batch_size, seq_len = document_ids.shape
    mask_mod = row_mask_mod(document_ids, segment_ids, positions, sliding_window)
    if executor == "flex":
        return block_mask(mask_mod, batch_size, seq_len, document_ids.device, flex_block_size)
    return dense_mask(mask_mod, batch_size, seq_len, document_ids.device)
