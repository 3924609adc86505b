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
- "documents": `per_document_mask` cuts the rows into spans (a document's prompt, or one of
  its completions, with the keys it may see: the prompt, then itself) and evaluates the same
  functions on each span alone, in buckets of similar sizes, so attention costs per document
  prompt^2 + sum of completion x (prompt + completion), under the paired layout's cost
  (`model.attention` runs it). For CPU, or any device without FlexAttention.

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
    """The mask in the form the "documents" executor takes: the rows cut into *spans*, each
    attended alone. A span is one segment of one document (a prompt, or one completion):
    its queries are that segment's tokens, its keys the document's prompt followed by the
    segment itself (a prompt's keys are the prompt). Nothing else can be visible to those
    queries under the rule, and the span's mask is the rule itself, evaluated on the tokens'
    own row indices, so a span sees exactly what the dense mask allows.

    Spans are bucketed by (query length, key length). A bucket of `n` spans padded to `lq`
    queries and `lk` keys is `n * lq` consecutive *query slots* and `n * lk` *key slots*; the
    slots of all buckets in order make `[Sq]` and `[Sk]`. Each token is the query of exactly
    one slot, so `query_slot_token` and `token_slot` are inverse maps but for the *empty*
    query slots past a span's end (zeros, whose outputs are dropped); a key slot past a span's
    end repeats a real token and its mask column is False. Every padding token is a span of
    its own, attending to itself only: its output is finite and never read, and the attention
    weights stay in the autograd graph even for a micro-batch of padding alone (sharded
    training reduces the same gradients on every rank).
    """

    query_slot_token: Tensor   # int64 [Sq]: the flat `[B * L]` index of each query slot's
                               # token (an empty slot repeats its span's last query)
    token_slot: Tensor         # int64 [B * L]: each token's query slot
    empty_query_slots: Tensor  # int64 [E]: the query slots past their span's end
    key_slot_token: Tensor     # int64 [Sk]: the flat index of each key slot's token
    masks: tuple[Tensor, ...]  # bool [n, 1, lq, lk] per bucket: each span alone
    batch_size: int
    seq_len: int


# What the model's attention takes, one form per executor.
AttentionMask = Union[BlockMask, Tensor, DocumentMask]

# Bucket bounds for query and key lengths: 1 (padding tokens), then 16, 24, 32, 48, 64,
# 96, ... A bucket pads its spans to its longest, under 1.5x a span's length in each
# dimension (lengths under 16 cost little anyway), so under 2.25x its work, while a
# micro-batch makes a few attention calls (a few per octave of lengths) rather than one per
# span.
_BUCKET_BOUNDS = [1, 16] + [m << e for e in range(3, 30) for m in (3, 4)]


def per_document_mask(document_ids: Tensor, segment_ids: Tensor, positions: Tensor,
                      sliding_window: int | None) -> DocumentMask:
    """Cut `[B, L]` rows into spans (see `DocumentMask`) and evaluate `row_mask_mod` on each.

    Attention then costs, per document, prompt^2 + sum over completions of completion x
    (prompt + completion): less than the paired layout's sum of (prompt + completion)^2, and
    less than attending over the whole document. Shapes depend on the data, so this runs on
    the host: the tensors are read on the CPU (a device sync if they live elsewhere, once per
    micro-batch) and the result is put on their device.
    """
    device = document_ids.device
    batch_size, seq_len = document_ids.shape
    rows_documents, rows_segments, rows_positions = (t.cpu() for t in
                                                     (document_ids, segment_ids, positions))
    documents, segments = rows_documents.reshape(-1), rows_segments.reshape(-1).long()
    num_tokens = documents.numel()
    tokens = torch.arange(num_tokens)
    is_padding = documents == PADDING_DOCUMENT
    assert bool((documents >= PADDING_DOCUMENT).all()) and bool((segments >= 0).all())
    # A group is one document of one row, or one padding token alone; a span is one segment
    # of a group (a padding token's is segment 0, so its keys are itself).
    num_ids = int(documents.max()) + 1 + seq_len
    group_key = (tokens // seq_len) * num_ids + torch.where(
        is_padding, int(documents.max()) + 1 + tokens % seq_len, documents.long())
    segments = torch.where(is_padding, 0, segments)
    group = torch.unique(group_key, return_inverse=True)[1]
    span_key, span = torch.unique(group * (int(segments.max()) + 1) + segments,
                                  return_inverse=True)
    # Tokens sorted by span, in row order within one; span s is order[start[s]:][:count[s]].
    order = torch.argsort(span, stable=True)
    count = torch.bincount(span, minlength=len(span_key))
    start = torch.cumsum(count, 0) - count
    span_group, span_segment = group[order[start]], segments[order[start]]
    prompt_span = torch.full((int(group.max()) + 1,), -1)
    is_prompt = span_segment == 0
    prompt_span[span_group[is_prompt]] = is_prompt.nonzero().squeeze(1)
    # A completion's keys begin with its document's prompt (if it has one).
    has_prompt = ~is_prompt & (prompt_span[span_group] >= 0)
    own_prompt = prompt_span[span_group].clamp(min=0)
    prompt_length = torch.where(has_prompt, count[own_prompt], 0)
    prompt_start = start[own_prompt]
    num_keys = prompt_length + count

    bounds = torch.tensor(_BUCKET_BOUNDS)
    query_bucket = torch.bucketize(count, bounds)  # smallest bound >= it
    bucket_of = query_bucket * len(bounds) + torch.bucketize(num_keys, bounds)
    query_tokens, key_tokens, filled, masks = [], [], [], []
    mask_mod = row_mask_mod(rows_documents, rows_segments, rows_positions, sliding_window)
    for bucket in bucket_of.unique().tolist():
        chosen = bucket_of == bucket
        first, queries = start[chosen, None], count[chosen, None]  # [n, 1]
        prompt_first, prompts = prompt_start[chosen, None], prompt_length[chosen, None]
        keys = num_keys[chosen, None]
        query_offset = torch.arange(int(queries.max()))
        key_offset = torch.arange(int(keys.max()))
        # Past its end a span repeats its last query, so no query row is all False (SDPA
        # would give NaN); its key slots past the end repeat its last key, masked out.
        query = order[first + torch.minimum(query_offset, queries - 1)]  # [n, lq]
        in_span = (key_offset - prompts).clamp(min=0)
        key = order[torch.where(key_offset < prompts, prompt_first + key_offset,
                                first + torch.minimum(in_span, queries - 1))]  # [n, lk]
        row = (query[:, :1] // seq_len)[:, :, None, None]  # [n, 1, 1, 1]
        allowed = mask_mod(row, torch.zeros_like(row), (query % seq_len)[:, None, :, None],
                           (key % seq_len)[:, None, None, :])
        masks.append((allowed & (key_offset < keys)[:, None, None, :]).to(device))
        query_tokens.append(query.reshape(-1))
        key_tokens.append(key.reshape(-1))
        filled.append((query_offset < queries).reshape(-1))
    query_slot_token, filled = torch.cat(query_tokens), torch.cat(filled)
    real_slots = filled.nonzero().squeeze(1)
    token_slot = torch.full((num_tokens,), -1, dtype=torch.int64)
    token_slot[query_slot_token[real_slots]] = real_slots
    assert len(real_slots) == num_tokens and bool((token_slot >= 0).all()), \
        "every token is the query of exactly one slot"
    return DocumentMask(query_slot_token.to(device), token_slot.to(device),
                        (~filled).nonzero().squeeze(1).to(device),
                        torch.cat(key_tokens).to(device), tuple(masks), batch_size, seq_len)


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
