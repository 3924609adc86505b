"""Mask functions evaluated densely against hand-built matrices, and FlexAttention == dense."""

from __future__ import annotations

import torch

from conftest import DENSE, FLEX

from prefixdpo.model.executor import AttentionExecutor
from prefixdpo.model.masks import (and_masks, block_mask, causal, dense_mask, document_mask,
                                   prefix_sharing_mask, row_mask_mod, sliding_window_mask)

# One packed row: group A = prompt (2 tokens) + chosen (2) + rejected (1); group B = prompt (1)
# + two completions of one token; then one padding token.
#            p  p  c  c  r | p  c  r | pad
DOCS = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, -1]])
SEGS = torch.tensor([[0, 0, 1, 1, 2, 0, 1, 2, 0]])
POS = torch.tensor([[0, 1, 2, 3, 2, 0, 1, 1, 0]])


def evaluate(mask_mod) -> torch.Tensor:
    return dense_mask(mask_mod, 1, DOCS.shape[1], torch.device("cpu"))[0, 0].int()


def matrix(rows: str) -> torch.Tensor:
    return torch.tensor([[int(c) for c in row.split()] for row in rows.strip().splitlines()])


def test_causal():
    assert torch.equal(evaluate(causal), torch.ones(9, 9, dtype=torch.int).tril())


def test_document_isolation():
    expected = matrix("""
        1 1 1 1 1 0 0 0 0
        1 1 1 1 1 0 0 0 0
        1 1 1 1 1 0 0 0 0
        1 1 1 1 1 0 0 0 0
        1 1 1 1 1 0 0 0 0
        0 0 0 0 0 1 1 1 0
        0 0 0 0 0 1 1 1 0
        0 0 0 0 0 1 1 1 0
        0 0 0 0 0 0 0 0 1""")
    assert torch.equal(evaluate(document_mask(DOCS)), expected)


def test_prefix_sharing_segments():
    # Key columns of segment 0 are visible to all; segment s columns only to segment s rows.
    expected = matrix("""
        1 1 0 0 0 1 0 0 1
        1 1 0 0 0 1 0 0 1
        1 1 1 1 0 1 1 0 1
        1 1 1 1 0 1 1 0 1
        1 1 0 0 1 1 0 1 1
        1 1 0 0 0 1 0 0 1
        1 1 1 1 0 1 1 0 1
        1 1 0 0 1 1 0 1 1
        1 1 0 0 0 1 0 0 1""")
    assert torch.equal(evaluate(prefix_sharing_mask(SEGS)), expected)


def test_full_rule_chosen_never_sees_rejected():
    full = evaluate(and_masks(causal, document_mask(DOCS), prefix_sharing_mask(SEGS)))
    expected = matrix("""
        1 0 0 0 0 0 0 0 0
        1 1 0 0 0 0 0 0 0
        1 1 1 0 0 0 0 0 0
        1 1 1 1 0 0 0 0 0
        1 1 0 0 1 0 0 0 0
        0 0 0 0 0 1 0 0 0
        0 0 0 0 0 1 1 0 0
        0 0 0 0 0 1 0 1 0
        0 0 0 0 0 0 0 0 1""")
    assert torch.equal(full, expected)


def test_sliding_window_uses_positions():
    # Window 2: a query sees positions q-1 and q. The rejected token (position 2) sees the
    # prompt token at position 1 but not position 0, exactly as it would unshared.
    window = evaluate(and_masks(causal, document_mask(DOCS), prefix_sharing_mask(SEGS),
                                sliding_window_mask(POS, 2)))
    expected = matrix("""
        1 0 0 0 0 0 0 0 0
        1 1 0 0 0 0 0 0 0
        0 1 1 0 0 0 0 0 0
        0 0 1 1 0 0 0 0 0
        0 1 0 0 1 0 0 0 0
        0 0 0 0 0 1 0 0 0
        0 0 0 0 0 1 1 0 0
        0 0 0 0 0 1 0 1 0
        0 0 0 0 0 0 0 0 1""")
    assert torch.equal(window, expected)


def test_every_query_sees_itself():
    # No fully masked query row, so dense attention never produces NaN on padding.
    full = DENSE.mask(DOCS, SEGS, POS, sliding_window=1)
    assert full[0, 0].diagonal().all()


def test_block_mask_matches_dense():
    generator = torch.Generator().manual_seed(0)
    docs = torch.randint(0, 3, (2, 256), generator=generator).sort(dim=1).values
    segs = torch.randint(0, 3, (2, 256), generator=generator)
    pos = torch.randint(0, 256, (2, 256), generator=generator)
    mod = row_mask_mod(docs, segs, pos, 16)
    dense = dense_mask(mod, 2, 256, torch.device("cpu"))
    sparse = block_mask(mod, 2, 256, torch.device("cpu"))
    # The sparse block structure marks exactly the 128x128 blocks holding an allowed pair.
    blocks = sparse.to_dense()[:, 0].bool()  # [B, L/128, L/128] blocks with any allowed pair
    allowed = dense[:, 0].reshape(2, 2, 128, 2, 128).any(dim=4).any(dim=2)
    assert torch.equal(blocks, allowed)


def test_flex_block_size_reaches_the_block_mask():
    """The BlockMask is built at the requested block size (a speed knob of the throughput
    benchmark), with the same allowed pairs."""
    ids = torch.zeros(1, 256, dtype=torch.long)
    positions = torch.arange(256)[None]
    default = FLEX.mask(ids, ids, positions, None)
    small = AttentionExecutor("flex", block_size=64).mask(ids, ids, positions, None)
    assert default.BLOCK_SIZE == (128, 128) and small.BLOCK_SIZE == (64, 64)
    # One causal document: the blocks on and below the diagonal are visited.
    assert torch.equal(default.to_dense()[0, 0].bool(), torch.ones(2, 2).tril().bool())
    assert torch.equal(small.to_dense()[0, 0].bool(), torch.ones(4, 4).tril().bool())
