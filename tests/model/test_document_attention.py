"""The "documents" executor (attention per span of a document,
`model.attention.document_attention`) against the dense oracle: values and gradients, at the
attention level on random q/k/v and through the model on loader batches; the span masks cover
the dense mask exactly once; padding stays finite and keeps every parameter in the autograd
graph.

Everything runs in float64, so the tolerance (1e-10) is far below any mask error (O(1e-2)).
Padding tokens differ by design (dense: padding sees earlier padding; documents: itself only)
and are never read, so values are compared on real tokens, and gradients everywhere.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask
import torch.nn.functional as F
from conftest import DOCUMENTS, FAMILIES, family_model, random_examples, row_tensors, tiny_config

from prefixdpo.data import layout
from prefixdpo.data.loader import PreferenceLoader, fit_examples
from prefixdpo.model.attention import document_attention
from prefixdpo.model.executor import EXECUTORS, AttentionExecutor, LayerMasks, choose_executor
from prefixdpo.model.masks import (PADDING_DOCUMENT, DocumentMask, SpanBucket, dense_mask,
                                   per_document_mask, row_mask_mod)
from prefixdpo.model.transformer import build_model

TOLERANCE = 1e-10
LENGTH = 96

# Per row: groups as (prompt length, completion lengths); the rest of the row is padding.
ROWS = [
    [(5, (3, 4)), (2, (1, 1, 1)), (9, (12, 7)), (1, (2,)), (20, (6, 3))],  # many groups, K = 3
    [(30, (40, 26))],                                    # one document filling the row
    [(11, (8, 9, 10))],                                  # one document, then padding
    [],                                                  # padding only
]


def row_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(document_ids, segment_ids, positions) `[4, LENGTH]` for ROWS."""
    documents, segments, positions = zip(*(row_tensors(groups, LENGTH) for groups in ROWS))
    return torch.tensor(documents), torch.tensor(segments), torch.tensor(positions)


@pytest.mark.parametrize("window, scale", [(None, None), (5, None), (None, 0.2)])
def test_attention_values_and_gradients_equal_dense(window, scale):
    """`scale` other than 1/sqrt(head_dim): Gemma's query_pre_attn_scalar."""
    documents, segments, positions = row_batch()
    real = (documents != PADDING_DOCUMENT)[:, None, :, None]  # [B, 1, L, 1]
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, head_dim = len(ROWS), 4, 2, 8  # GQA
    shapes = [(batch, heads, LENGTH, head_dim)] + [(batch, kv_heads, LENGTH, head_dim)] * 2
    inputs = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    # Gradient through real tokens only: padding outputs are the executors' own business.
    weights = torch.randn(shapes[0], generator=generator, dtype=torch.float64) * real

    def run(executor: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        q, k, v = (x.clone().requires_grad_() for x in inputs)
        mask = AttentionExecutor(executor).mask(documents, segments, positions, window)
        if executor == "documents":
            out = document_attention(q, k, v, mask, scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                 enable_gqa=True)
        (out * weights).sum().backward()
        return out.detach(), [q.grad, k.grad, v.grad]

    dense, dense_grads = run("dense")
    ours, grads = run("documents")
    assert ours.isfinite().all() and all(g.isfinite().all() for g in grads)
    assert ((ours - dense) * real).abs().max() <= TOLERANCE
    for grad, dense_grad in zip(grads, dense_grads):
        assert dense_grad.abs().max() > 0 and (grad - dense_grad).abs().max() <= TOLERANCE
    # A padding token attends to itself: its output is its own value (GQA: its head's group).
    padding = ~real[:, 0, :, 0]
    own_value = inputs[2].repeat_interleave(heads // kv_heads, dim=1)
    assert torch.equal(ours.transpose(1, 2)[padding], own_value.transpose(1, 2)[padding])


def span_rows(bucket: SpanBucket, i: int) -> torch.Tensor:
    """Span i's mask `[lq, lk]`, the parts that run without one materialized."""
    lq, lp = bucket.queries, bucket.prompt_keys
    prompt = bucket.prompt_mask[i, 0] if bucket.prompt_mask is not None else \
        torch.ones(lq, lp, dtype=torch.bool)
    own = bucket.mask[i, 0] if bucket.mask is not None else \
        torch.ones(lq, bucket.keys - lp, dtype=torch.bool).tril()
    return torch.cat([prompt, own], dim=1)


def spans_in(mask: DocumentMask):
    """(mask [lq, lk], real query slots of the span (offsets), their tokens, key tokens,
    bucket) of every span; tokens are flat `[B * L]` indices."""
    query_slot, key_slot = 0, 0
    empty = set(mask.empty_query_slots.tolist())
    for bucket in mask.buckets:
        lq, lk = bucket.queries, bucket.keys
        for i in range(bucket.spans):
            real = [j for j in range(lq) if query_slot + j not in empty]
            queries = mask.query_slot_token[[query_slot + j for j in real]]
            yield (span_rows(bucket, i), real, queries,
                   mask.key_slot_token[key_slot:key_slot + lk], bucket)
            query_slot += lq
            key_slot += lk


@pytest.mark.parametrize("window", [None, 5])
def test_span_masks_cover_the_dense_mask_once(window):
    """Every real query sees, through its span's mask, each key the dense mask allows it
    exactly once and nothing else; a span's keys are one document's prompt and at most one
    completion; a document's first completion hosts its prompt's queries, each further one
    attends to the prompt and itself only, and without a window nothing is materialized."""
    documents, segments, positions = row_batch()
    num_tokens = documents.numel()
    dense = dense_mask(row_mask_mod(documents, segments, positions, window), len(ROWS), LENGTH,
                       torch.device("cpu"))[:, 0]
    allowed = torch.zeros(num_tokens, num_tokens, dtype=torch.int64)  # flat query x flat key
    for row in range(len(ROWS)):
        block = slice(row * LENGTH, (row + 1) * LENGTH)
        allowed[block, block] = dense[row].long()
    flat_documents, flat_segments = documents.reshape(-1), segments.reshape(-1)
    seen = torch.zeros_like(allowed)
    mask = per_document_mask(documents, segments, positions, window)
    num_completion_spans = 0
    for rows, real, queries, keys, bucket in spans_in(mask):
        rows = rows[real]
        seen.index_put_((queries[:, None].expand_as(rows), keys.expand_as(rows)), rows.long(),
                        accumulate=True)
        in_span = torch.zeros(num_tokens, dtype=torch.bool)
        in_span[keys[rows.any(0)]] = True
        assert len((flat_documents[in_span] + 1000 * (keys[0] // LENGTH)).unique()) == 1
        assert len(flat_segments[in_span].unique()) <= 2
        if bucket.prompt_keys:  # a further completion: its own tokens are its queries
            num_completion_spans += 1
            assert bool((flat_segments[queries] > 0).all())
        if window is None:  # causal, and a prompt mask (if any) only hides key padding
            assert bucket.mask is None
            prompt_rows = rows[:, :bucket.prompt_keys]
            assert bool((prompt_rows == prompt_rows[:1]).all())
    real = (documents != PADDING_DOCUMENT).reshape(-1)
    assert torch.equal(seen[real], allowed[real])
    assert torch.equal(seen[~real], torch.eye(num_tokens, dtype=torch.int64)[~real])
    # A document's completions after its first: 1 + 2 + 1 + 0 + 1 + 1 + 2 + ...
    assert num_completion_spans == sum(len(c) - 1 for groups in ROWS for _, c in groups)
    if window is None:
        # A span per completion (the first with its prompt's queries), and one per padding
        # token: rows of 77, 96, 38 and 0 tokens of documents.
        num_completions = sum(len(c) for groups in ROWS for _, c in groups)
        num_padding = sum(LENGTH - n for n in (77, 96, 38, 0))
        assert len(list(spans_in(mask))) == num_completions + num_padding


def test_buckets_bound_the_padding():
    """Spans of many sizes: a few buckets, each padded to under 1.5x its shortest span in
    queries and in prompt keys (spans up to 16 share one), so the work that runs (a prompt in
    full, the rest causally) stays under 2.25x the pairs the mask allows."""
    # One document per prompt length, with two completions (or none).
    lengths = [3, 5, 17, 18, 30, 33, 47, 64, 65, 100, 190, 200, 250]
    groups = [(n, (n // 2, n // 3 + 1) if i % 4 else ()) for i, n in enumerate(lengths)]
    row = row_tensors(groups, sum(p + sum(c) for p, c in groups))
    mask = per_document_mask(*(torch.tensor(x)[None] for x in row), None)
    spans = list(spans_in(mask))
    assert 1 < len(mask.buckets) < len(spans)
    assert any(b.prompt_mask is not None for b in mask.buckets), "want prompts of two lengths"
    for rows, real, _, _, bucket in spans:
        num_prompt_keys = int(rows[real][:, :bucket.prompt_keys].any(0).sum())
        assert bucket.queries <= 16 or bucket.queries < 1.5 * len(real)
        assert bucket.prompt_keys <= 16 or bucket.prompt_keys < 1.5 * num_prompt_keys
    work = sum(b.spans * b.queries * (b.prompt_keys + (b.queries + 1) / 2)
               for b in mask.buckets)
    assert work < 2.25 * sum(int(rows[real].sum()) for rows, real, *_ in spans)


def loader_batches(config, rows: int = 3):
    examples, report = fit_examples(random_examples(40, config.vocab_size, seed=0, max_len=30),
                                    "shared+packed", 256, "truncate")
    loader = PreferenceLoader(examples, "shared+packed", rows,
                              packing_length=report.packing_length, pad_multiple=128,
                              shuffle=False, prefetch=0)
    plan = loader.micro_batch_plan(0)
    # The first micro-batch (full rows), the last (an all-padding row), one document alone.
    return [loader.build(plan[0]), loader.build(plan[-1]), loader.build([[0]])]


def sequence_log_probs_and_grads(model, batch, executor: str):
    """Per-sequence log-probs and the parameter gradients of a fixed random weighting."""
    model.zero_grad(set_to_none=True)
    masks = AttentionExecutor(executor).layer_masks(batch.document_ids, batch.segment_ids,
                                                    batch.positions, model.config.attention_windows)
    token_logps = model(batch.input_ids, batch.positions, masks, batch.target_index,
                        batch.target_ids)
    sequences = torch.zeros(batch.num_sequences, dtype=token_logps.dtype).index_add(
        0, batch.target_sequence, token_logps)
    weights = torch.randn(sequences.shape, generator=torch.Generator().manual_seed(1),
                          dtype=sequences.dtype)
    (sequences * weights).sum().backward()
    return sequences.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_log_probs_and_gradients_equal_dense(family):
    model = family_model(family).double()  # 4 heads over 2 kv heads: GQA
    full, last, alone = loader_batches(model.config)
    documents_per_row = [len(row.unique()) for row in full.document_ids]
    assert min(documents_per_row) > 3, "want many groups per row"
    assert int(full.segment_ids.max()) >= 3, "want a group of three completions"
    assert (last.document_ids == PADDING_DOCUMENT).all(dim=1).any(), "want an empty row"
    assert len(alone.document_ids[0].unique()) == 2, "want one document (and padding) alone"
    for batch in (full, last, alone):
        dense, dense_grads = sequence_log_probs_and_grads(model, batch, "dense")
        ours, grads = sequence_log_probs_and_grads(model, batch, "documents")
        assert (ours - dense).abs().max() <= TOLERANCE
        for name, grad in grads.items():
            assert grad.abs().max() > 0, name
            assert (grad - dense_grads[name]).abs().max() <= TOLERANCE, name


def test_padding_only_batch_is_finite_and_keeps_every_gradient():
    """A micro-batch of padding alone (an epoch's end under several ranks) still gives every
    parameter a gradient, zero and finite: a sharded step reduces the same set on every rank."""
    config = tiny_config()
    model = build_model(config, seed=0)
    documents = torch.full((2, 16), PADDING_DOCUMENT)
    zeros = torch.zeros_like(documents)
    masks = LayerMasks(DOCUMENTS, {None: DOCUMENTS.mask(documents, zeros, zeros, None)})
    assert model(zeros, zeros, masks).isfinite().all()
    no_targets = torch.zeros(0, dtype=torch.int64)
    model(zeros, zeros, masks, no_targets, no_targets).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and not param.grad.any(), name


def test_executor_choice():
    documents, segments, positions = row_batch()

    def build(name: str):
        return AttentionExecutor(name).mask(documents, segments, positions, None)

    assert EXECUTORS == ("flex", "dense", "documents")
    assert isinstance(build("documents"), DocumentMask)
    assert isinstance(build("dense"), torch.Tensor)
    assert isinstance(build("flex"), BlockMask)
    with pytest.raises(ValueError, match="unknown attention executor"):
        build("sparse")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_executor("auto", cpu).name == "documents"
    assert (choose_executor("auto", cuda).name, choose_executor("auto", cuda).row_multiple) == \
        ("flex", 128)
    assert choose_executor("dense", cpu).row_multiple == 8
    with pytest.raises(ValueError, match="needs a CUDA device"):
        choose_executor("flex", cpu)
    # Forward only (scoring, evaluation): FlexAttention compiled on the CPU.
    assert choose_executor("flex", cpu, backward=False).compile_cpu
    with pytest.raises(ValueError, match="block size 96"):
        AttentionExecutor("flex", block_size=96)


def test_padding_id_is_the_layouts():
    assert PADDING_DOCUMENT == layout.PADDING_DOCUMENT
