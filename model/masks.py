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
- "documents": `per_document_mask` cuts the rows into spans (a document's prompt followed by
  one of its completions) and evaluates the same functions on each span alone, in buckets of
  similar sizes, attended causally where the rule is causal, so attention never costs more
  than in the paired layout and often much less (`model.attention` runs it). For CPU, or any
  device without FlexAttention.

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
    attended alone by one SDPA call per bucket of similar spans. The keys of a span are a
    document's prompt followed by one of its completions (or the prompt alone, for a document
    without completions; a padding token alone). A span is either

    - *causal*: its queries are its keys, so top-left causal attention (`is_causal`, which
      skips the blocks above the diagonal) is the rule. The first completion of a document
      hosts its prompt's queries; for the other completions the prompt's query slots are
      *dummies* whose outputs are dropped. Nothing is materialized: its bucket's mask is None.
    - *masked*: its queries are the completion's tokens alone, attending through an explicit
      `[lq, lk]` mask; cheaper than a causal span when the completion is short against its
      prompt (see `_MASKED_COST`).

    Either way a span's mask is the rule itself, evaluated on the tokens' own row indices (a
    causal span is checked against it), so each query sees exactly what the dense mask allows.

    A bucket of `n` spans padded to `lq` queries and `lk` keys is `n * lq` consecutive *query
    slots* and `n * lk` *key slots*; the slots of all buckets in order make `[Sq]` and `[Sk]`.
    Each token is the *real* query of exactly one slot, so `query_slot_token` and `token_slot`
    are inverse maps but for the empty query slots (dummies and slots past a span's end: zeros,
    whose outputs are dropped). A key slot past a span's end repeats a real token that no real
    query sees. A padding token attends to itself only: its output is finite and never read,
    and the attention weights stay in the autograd graph even for a micro-batch of padding
    alone (sharded training reduces the same gradients on every rank).
    """

    query_slot_token: Tensor   # int64 [Sq]: the flat `[B * L]` index of each query slot's
                               # token (an empty slot repeats one of its span's tokens)
    token_slot: Tensor         # int64 [B * L]: each token's query slot
    empty_query_slots: Tensor  # int64 [E]: the query slots whose outputs are dropped
    key_slot_token: Tensor     # int64 [Sk]: the flat index of each key slot's token
    shapes: tuple[tuple[int, int, int], ...]  # (n, lq, lk) per bucket
    masks: tuple[Tensor | None, ...]  # bool [n, 1, lq, lk] per bucket; None: causal
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
# The cost of a (query, key) pair under an explicit mask against one a causal call computes
# (CPU SDPA in torch 2.11-2.13: the masked kernel reads the mask and skips no block). A
# completion of C tokens after a prompt of P attends masked (C x (P + C) pairs) where that
# is cheaper than causally behind P dummy queries ((P + C)^2 / 2 pairs).
_MASKED_COST = 1.5


def per_document_mask(document_ids: Tensor, segment_ids: Tensor, positions: Tensor,
                      sliding_window: int | None) -> DocumentMask:
    """Cut `[B, L]` rows into spans (see `DocumentMask`) and evaluate `row_mask_mod` on each.

    Attention then costs, per document with a prompt of P tokens and completions C_1..C_K,
    (P + C_1)^2 / 2, plus for each other completion the cheaper of C_k (P + C_k) masked and
    (P + C_k)^2 / 2 causal: never more than the paired layout's sum of (P + C_k)^2 / 2.
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
    # Each completion is a span whose keys begin with its group's prompt (if it has one); the
    # first completion after a prompt hosts the prompt's queries, so that prompt is no span.
    own_prompt = prompt_part[part_group]
    has_prompt = ~is_prompt & (own_prompt >= 0)
    is_host = has_prompt & (index == own_prompt + 1)
    is_span = torch.ones(len(part_key), dtype=torch.bool)
    is_span[own_prompt[is_host]] = False
    prompt_length = torch.where(has_prompt, count[own_prompt.clamp(min=0)], 0)
    prompt_start = start[own_prompt.clamp(min=0)]
    num_keys = prompt_length + count
    causal = ~has_prompt | is_host | (_MASKED_COST * count * 2 >= num_keys)
    num_queries = torch.where(causal, num_keys, count)

    bounds = torch.tensor(_BUCKET_BOUNDS)
    bucket_of = (causal.long() * len(bounds) + torch.bucketize(num_queries, bounds)) \
        * len(bounds) + torch.bucketize(num_keys, bounds)  # bucketize: smallest bound >= it
    mask_mod = row_mask_mod(rows_documents, rows_segments, rows_positions, sliding_window)
    query_tokens, key_tokens, real, shapes, masks = [], [], [], [], []
    for bucket in bucket_of[is_span].unique().tolist():
        chosen = is_span & (bucket_of == bucket)
        first, length = start[chosen, None], count[chosen, None]  # [n, 1]
        prompts, keys = prompt_length[chosen, None], num_keys[chosen, None]
        is_causal = bool(causal[chosen][0])
        lq, lk = int(num_queries[chosen].max()), int(keys.max())
        key_offset = torch.arange(lk)
        # Key j: the prompt's, then the part's own; past the end, the part's last token.
        own = first + torch.minimum((key_offset - prompts).clamp(min=0), length - 1)
        key = order[torch.where(key_offset < prompts, prompt_start[chosen, None] + key_offset,
                                own)]  # [n, lk]
        if is_causal:  # the queries are the keys; a prompt's are real in its host only
            query, query_offset = key, key_offset
            is_real = (key_offset < keys) & ((key_offset >= prompts) | is_host[chosen, None])
        else:  # the part's own tokens; past the end, its last one
            query_offset = torch.arange(lq)
            query = order[first + torch.minimum(query_offset, length - 1)]
            is_real = query_offset < length
        row = (key[:, :1] // seq_len)[:, :, None, None]  # [n, 1, 1, 1]
        allowed = mask_mod(row, torch.zeros_like(row), (query % seq_len)[:, None, :, None],
                           (key % seq_len)[:, None, None, :])
        allowed = allowed & (key_offset < keys)[:, None, None, :]
        # Causal attention is the rule where it matters, for real queries (under it a real
        # query never sees a slot past its span's end); else the bucket keeps its mask.
        lower = query_offset[:, None] >= key_offset[None, :]
        if is_causal and bool(((allowed == lower) | ~is_real[:, None, :, None]).all()):
            masks.append(None)
        else:
            masks.append(allowed.to(device))
        shapes.append((len(first), lq, lk))
        query_tokens.append(query.reshape(-1))
        key_tokens.append(key.reshape(-1))
        real.append(is_real.reshape(-1))
    query_slot_token, real = torch.cat(query_tokens), torch.cat(real)
    real_slots = real.nonzero().squeeze(1)
    token_slot = torch.full((num_tokens,), -1, dtype=torch.int64)
    token_slot[query_slot_token[real_slots]] = real_slots
    assert len(real_slots) == num_tokens and bool((token_slot >= 0).all()), \
        "every token is the real query of exactly one slot"
    return DocumentMask(query_slot_token.to(device), token_slot.to(device),
                        (~real).nonzero().squeeze(1).to(device),
                        torch.cat(key_tokens).to(device), tuple(shapes), tuple(masks),
                        batch_size, seq_len)


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
