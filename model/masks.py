"""Attention masks for packed, prefix-shared rows, composed from small mask functions.

Every mask function has FlexAttention's `mask_mod` signature `(b, h, q_idx, kv_idx) -> bool`
and reads the batch's per-token tensors by indexing, so the *same* functions serve every
executor (`model.executor` builds the mask in the form each one takes):

- "flex" (CUDA): `create_block_mask` turns them into a sparse `BlockMask` for FlexAttention,
  built once per micro-batch and shared by every layer (and by the reference model).
- "dense": `dense_mask` evaluates them on broadcast index grids into a `[B, 1, L, L]` boolean
  tensor for `scaled_dot_product_attention` (FlexAttention has no backward on CPU). It pays
  L x L per row whatever the mask allows; it is the oracle the other executors are tested
  against.
- "documents": `per_document_mask` cuts the rows into spans (a document's prompt followed by
  one of its completions) and evaluates the same functions on each span alone, in buckets of
  similar sizes, attended causally where the rule is causal, so attention never costs more
  than in the paired layout and often much less (`model.attention` runs it). For CPU, or any
  device without FlexAttention.

The rule for a query q and key k in one row (see DESIGN section 2):
    same document  and  k <= q  and  (segment[k] == 0  or  segment[k] == segment[q])
    and, in a sliding-window layer, positions[q] - positions[k] < sliding_window.
Positions restart at the prompt length for every completion, so the window is measured in the
original (unshared) sequence, exactly as the model would see prompt+completion alone. A model
whose layers differ in window (Gemma 3, Qwen with `max_window_layers`) gets one mask per
distinct window (`model.executor.AttentionExecutor.layer_masks`), built once per micro-batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from prefixdpo.data.packing import BLOCK

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# FlexAttention's default block, and the largest the trainer uses: rows are padded to a
# multiple of it (`data.packing.BLOCK`, the one constant for both).
FLEX_BLOCK_SIZE = BLOCK
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
    """A sliding-window layer: a query sees the `window` most recent positions, itself
    included."""

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


def block_mask(mask_mod: MaskMod, batch_size: int, seq_len: int, device: torch.device,
               block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """A FlexAttention BlockMask of `block_size` x `block_size` blocks; compiled on CUDA so no
    `[L, L]` tensor is ever materialized."""
    create = _compiled_create_block_mask() if device.type == "cuda" else create_block_mask
    return create(mask_mod, batch_size, None, seq_len, seq_len, device=device,
                  BLOCK_SIZE=block_size)


@dataclass(frozen=True)
class SpanBucket:
    """`spans` spans of similar sizes, each padded to `queries` query slots and `keys` key
    slots and attended in one batch. The first `prompt_keys` key slots of a span are its
    prompt's, which every query of the span sees in full (`prompt_mask`, None: all of them);
    the other key slots are attended top-left causally (`mask`, None: the causal rule itself,
    nothing materialized). A bucket with prompt keys is attended in two parts merged by their
    log-sum-exp (`model.attention`)."""

    spans: int
    queries: int
    keys: int
    prompt_keys: int
    prompt_mask: Tensor | None  # bool [spans, 1, queries, prompt_keys]
    mask: Tensor | None         # bool [spans, 1, queries, keys - prompt_keys]


@dataclass(frozen=True)
class DocumentMask:
    """The mask in the form the "documents" executor takes: the rows cut into *spans*, each
    attended alone, in buckets of similar spans. A span is one of

    - *causal*: a document's prompt and its first completion (or a prompt alone, a document
      without a prompt, a padding token alone). Its queries are its keys; the causal rule
      needs no mask and skips the blocks above the diagonal: (P + C)^2 / 2 pairs.
    - *completion*: each further completion. Its queries are the completion's tokens; its keys
      the prompt's (in full) followed by its own (causally): C x P + C^2 / 2 pairs, exactly the
      pairs the rule allows, where the paired layout pays (P + C)^2 / 2.

    Either way a span's masks are the rule itself, evaluated on the tokens' own row indices,
    and dropped only where they equal what runs without them (every prompt key, or causal),
    so each query sees exactly what the dense mask allows (a sliding window keeps its masks).

    The spans of a bucket padded to `queries` and `keys` are `spans * queries` consecutive
    *query slots* and `spans * keys` *key slots*; the slots of all buckets in order make `[Sq]`
    and `[Sk]`. Each token is the *real* query of exactly one slot, so `query_slot_token` and
    `token_slot` are inverse maps but for the empty query slots past a span's end (zeros,
    whose outputs are dropped). A key slot past the end of a span's prompt or its own tokens
    repeats one of them, seen by no real query. A padding token attends to itself only: its
    output is finite and never read, and the attention weights stay in the autograd graph
    even for a micro-batch of padding alone (sharded training reduces the same gradients on
    every rank).
    """

    query_slot_token: Tensor   # int64 [Sq]: the flat `[B * L]` index of each query slot's
                               # token (an empty slot repeats one of its span's tokens)
    token_slot: Tensor         # int64 [B * L]: each token's query slot
    empty_query_slots: Tensor  # int64 [E]: the query slots whose outputs are dropped
    key_slot_token: Tensor     # int64 [Sk]: the flat index of each key slot's token
    buckets: tuple[SpanBucket, ...]
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

    Attention then costs, per document with a prompt of P tokens and completions C_1..C_K,
    (P + C_1)^2 / 2 plus C_k x P + C_k^2 / 2 for each other completion: the pairs the rule
    allows, against the paired layout's sum of (P + C_k)^2 / 2.
    Shapes depend on the data, so this runs on the host: the tensors are read on the CPU (a
    device sync if they live elsewhere, once per micro-batch) and the result is put on their
    device.
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
    # A group is one document of one row, or one padding token alone; a *part* is one
    # segment of a group (a padding token's is segment 0, a prompt).
    num_ids = int(documents.max()) + 1 + seq_len
    group_key = (tokens // seq_len) * num_ids + torch.where(
        is_padding, int(documents.max()) + 1 + tokens % seq_len, documents.long())
    segments = torch.where(is_padding, 0, segments)
    group = torch.unique(group_key, return_inverse=True)[1]
    part_key, part = torch.unique(group * (int(segments.max()) + 1) + segments,
                                  return_inverse=True)
    # Tokens sorted by part, in row order within one: part p is order[start[p]:][:count[p]].
    # Parts are sorted by (group, segment): a group's prompt, then its completions.
    order = torch.argsort(part, stable=True)
    count = torch.bincount(part, minlength=len(part_key))
    start = torch.cumsum(count, 0) - count
    part_group, part_segment = group[order[start]], segments[order[start]]
    index = torch.arange(len(part_key))
    prompt_part = torch.full((int(group.max()) + 1,), -1)
    is_prompt = part_segment == 0
    prompt_part[part_group[is_prompt]] = index[is_prompt]
    # The first completion after a prompt hosts the prompt's queries in one causal span, so
    # that prompt is no span; each further completion is a completion span.
    own_prompt = prompt_part[part_group]
    has_prompt = ~is_prompt & (own_prompt >= 0)
    is_host = has_prompt & (index == own_prompt + 1)
    is_span = torch.ones(len(part_key), dtype=torch.bool)
    is_span[own_prompt[is_host]] = False
    causal = ~has_prompt | is_host
    prompt_length = torch.where(has_prompt, count[own_prompt.clamp(min=0)], 0)
    prompt_start = start[own_prompt.clamp(min=0)]
    # Causal spans: queries = keys = prompt (hosts) + own tokens. Completion spans: queries =
    # own tokens, keys = prompt tokens, then own tokens.
    num_queries = torch.where(causal, prompt_length + count, count)
    num_prompt_keys = torch.where(causal, 0, prompt_length)

    bounds = torch.tensor(_BUCKET_BOUNDS)
    bucket_of = (causal.long() * len(bounds) + torch.bucketize(num_queries, bounds)) \
        * len(bounds) + torch.bucketize(num_prompt_keys, bounds)  # smallest bound >= it
    mask_mod = row_mask_mod(rows_documents, rows_segments, rows_positions, sliding_window)

    def rule(query: Tensor, key: Tensor) -> Tensor:
        """The rule for queries `[n, lq]` and keys `[n, lk]` of n spans: `[n, 1, lq, lk]`."""
        row = (key[:, :1] // seq_len)[:, :, None, None]  # [n, 1, 1, 1]
        return mask_mod(row, torch.zeros_like(row), (query % seq_len)[:, None, :, None],
                        (key % seq_len)[:, None, None, :])

    query_tokens, key_tokens, real, buckets = [], [], [], []
    for bucket in bucket_of[is_span].unique().tolist():
        chosen = is_span & (bucket_of == bucket)
        first, length = start[chosen, None], count[chosen, None]  # [n, 1]
        prompts, queries = prompt_length[chosen, None], num_queries[chosen, None]
        lq, lp = int(queries.max()), int(num_prompt_keys[chosen].max())
        offset = torch.arange(lq)
        # Past the end of a span's prompt or own tokens, a slot repeats their last token.
        if lp == 0:  # causal: keys = queries = the hosted prompt (if any), then own tokens
            own_offset = (offset - prompts).clamp(min=0)
            query = order[torch.where(offset < prompts, prompt_start[chosen, None] + offset,
                                      first + torch.minimum(own_offset, length - 1))]
            prompt_key = query[:, :0]
        else:  # completion: queries = own tokens; keys = the prompt's, then own tokens
            query = order[first + torch.minimum(offset, length - 1)]
            prompt_offset = torch.arange(lp)
            prompt_key = order[prompt_start[chosen, None]
                               + torch.minimum(prompt_offset, prompts - 1)]
        key = query
        is_real = offset < queries  # [n, lq]
        lower = offset[:, None] >= offset[None, :]
        allowed = rule(query, key) & (offset < queries)[:, None, None, :]
        # The causal rule where it matters, for real queries (under it a real query never
        # sees a slot past its span's end); else the bucket keeps its mask.
        where_real = ~is_real[:, None, :, None]
        mask = None if bool(((allowed == lower) | where_real).all()) else allowed.to(device)
        prompt_mask = None
        if lp:
            prompt_allowed = rule(query, prompt_key) & \
                (prompt_offset < prompts)[:, None, None, :]
            if not bool((prompt_allowed | where_real).all()):
                prompt_mask = prompt_allowed.to(device)
        buckets.append(SpanBucket(len(first), lq, lp + lq, lp, prompt_mask, mask))
        query_tokens.append(query.reshape(-1))
        key_tokens.append(torch.cat([prompt_key, key], dim=1).reshape(-1))
        real.append(is_real.reshape(-1))
    query_slot_token, real = torch.cat(query_tokens), torch.cat(real)
    real_slots = real.nonzero().squeeze(1)
    token_slot = torch.full((num_tokens,), -1, dtype=torch.int64)
    token_slot[query_slot_token[real_slots]] = real_slots
    assert len(real_slots) == num_tokens and bool((token_slot >= 0).all()), \
        "every token is the real query of exactly one slot"
    return DocumentMask(query_slot_token.to(device), token_slot.to(device),
                        (~real).nonzero().squeeze(1).to(device),
                        torch.cat(key_tokens).to(device), tuple(buckets), batch_size, seq_len)
