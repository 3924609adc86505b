"""The "documents" executor (attention per document, `model.attention.document_attention`)
against the dense oracle: values and gradients, at the attention level on random q/k/v and
through the model on loader batches; the per-document masks are the dense mask's diagonal
blocks; padding stays finite and keeps every parameter in the autograd graph.

Everything runs in float64, so the tolerance (1e-10) is far below any mask error (O(1e-2)).
Padding tokens differ by design (dense: padding sees earlier padding; documents: itself only)
and are never read, so values are compared on real tokens, and gradients everywhere.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask
import torch.nn.functional as F
from conftest import random_examples, row_tensors, tiny_config

from data import layout
from data.loader import PreferenceLoader, fit_examples
from model.attention import document_attention
from model.masks import (EXECUTORS, PADDING_DOCUMENT, DocumentMask, build_attention_mask,
                         dense_mask, per_document_mask, row_mask_mod)
from model.transformer import build_model

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


@pytest.mark.parametrize("window", [None, 5])
def test_attention_values_and_gradients_equal_dense(window):
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
        mask = build_attention_mask(documents, segments, positions, window, executor=executor)
        if executor == "documents":
            out = document_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
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


def documents_in(mask: DocumentMask):
    """(bucket mask, index in the bucket, row, first column, length) of every document."""
    slot = 0
    for bucket in mask.masks:
        n, length = bucket.shape[0], bucket.shape[-1]
        for i in range(n):
            tokens = mask.slot_token[slot:slot + length]
            empty = (mask.empty_slots >= slot) & (mask.empty_slots < slot + length)
            size = length - int(empty.sum())
            assert torch.equal(tokens[:size], torch.arange(size) + tokens[0]), "one run"
            yield bucket, i, *divmod(int(tokens[0]), mask.seq_len), size
            slot += length


@pytest.mark.parametrize("window", [None, 5])
def test_document_masks_are_the_dense_diagonal_blocks(window):
    """Each document's own mask is the dense mask restricted to its rows and columns, and
    the dense mask allows no pair of real tokens outside those diagonal blocks."""
    documents, segments, positions = row_batch()
    dense = dense_mask(row_mask_mod(documents, segments, positions, window), len(ROWS), LENGTH,
                       torch.device("cpu"))[:, 0]
    mask = per_document_mask(documents, segments, positions, window)
    covered = torch.zeros_like(dense)
    for bucket, i, row, start, size in documents_in(mask):
        block = (row, slice(start, start + size), slice(start, start + size))
        assert torch.equal(bucket[i, 0, :size, :size], dense[block])
        covered[block] = True
    real = documents != PADDING_DOCUMENT
    assert not (dense & real[:, :, None] & real[:, None, :] & ~covered).any()


def test_buckets_bound_the_padding():
    """Documents of many lengths: a few buckets, each padded to under 1.5x its shortest
    document (documents up to 16 tokens share one), so the work stays under 2.25x the sum of
    squared document lengths."""
    lengths = [3, 5, 17, 18, 30, 33, 47, 64, 65, 100, 190, 200, 250]
    documents = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    zeros = torch.zeros_like(documents)
    mask = per_document_mask(documents, zeros, zeros, None)
    assert 1 < len(mask.masks) < len(lengths)
    assert sorted(size for *_, size in documents_in(mask)) == lengths
    for bucket, _, _, _, size in documents_in(mask):
        assert bucket.shape[-1] <= 16 or bucket.shape[-1] < 1.5 * size
    work = sum(m.shape[0] * m.shape[-1] ** 2 for m in mask.masks)
    assert work < 2.25 * sum(n * n for n in lengths)


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
    mask = build_attention_mask(batch.document_ids, batch.segment_ids, batch.positions,
                                model.config.sliding_window, executor=executor)
    token_logps = model(batch.input_ids, batch.positions, mask, batch.target_index,
                        batch.target_ids)
    sequences = torch.zeros(batch.num_sequences, dtype=token_logps.dtype).index_add(
        0, batch.target_sequence, token_logps)
    weights = torch.randn(sequences.shape, generator=torch.Generator().manual_seed(1),
                          dtype=sequences.dtype)
    (sequences * weights).sum().backward()
    return sequences.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["llama", "mistral_window"])
def test_model_log_probs_and_gradients_equal_dense(variant):
    extra = dict(sliding_window=6, architecture="MistralForCausalLM") \
        if variant == "mistral_window" else {}
    config = tiny_config(**extra)  # 4 heads over 2 kv heads: GQA
    model = build_model(config, seed=0).double()
    full, last, alone = loader_batches(config)
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
    mask = build_attention_mask(documents, zeros, zeros, None, executor="documents")
    assert model(zeros, zeros, mask).isfinite().all()
    no_targets = torch.zeros(0, dtype=torch.int64)
    model(zeros, zeros, mask, no_targets, no_targets).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and not param.grad.any(), name


def test_executor_choice():
    documents, segments, positions = row_batch()

    def build(**kwargs):
        return build_attention_mask(documents, segments, positions, None, **kwargs)

    assert EXECUTORS == ("flex", "dense", "documents")
    assert isinstance(build(executor="documents"), DocumentMask)
    assert isinstance(build(executor="dense"), torch.Tensor)
    assert isinstance(build(executor="flex"), BlockMask)
    with pytest.raises(ValueError, match="unknown attention executor"):
        build(executor="sparse")


def test_padding_id_is_the_layouts():
    assert PADDING_DOCUMENT == layout.PADDING_DOCUMENT
