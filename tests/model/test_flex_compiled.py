"""Compiled FlexAttention (forward, CPU) against dense SDPA with the same mask functions.

Eager FlexAttention evaluates `mask_mod` on every (query, key) pair and ignores the BlockMask's
block structure, so an eager comparison cannot see a wrong BlockMask. Compiled FlexAttention
visits only the blocks the BlockMask lists, applies `mask_mod` inside partial blocks only and
skips it inside full ones, as the CUDA kernels do; on CPU it compiles to C++ (forward only).
Here it must equal the dense path on packed rows crossing its 128-token blocks, and must
differ from it, by far more than the tolerance, once the BlockMask is corrupted: the
comparison can fail.

One compilation serves the file (one shape, one mask function; `dynamic=False`: torch 2.13's
C++ code for FlexAttention with dynamic shapes fails to build). The rows hold every case at
once: several groups per row, groups of three completions, group boundaries off the block
grid, groups crossing blocks, GQA, Mistral's window measured in positions, padding at row
ends, an all-padding row, B > 1, an attention scale other than 1/sqrt(head_dim).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import row_tensors
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from prefixdpo.model.masks import block_mask, dense_mask, row_mask_mod

compiled_flex_attention = torch.compile(flex_attention, dynamic=False)

LENGTH = 384   # three blocks of 128
WINDOW = 256   # positions: cuts the long group of row 1, and leaves it full blocks
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
SCALE = 0.2    # not 1/sqrt(HEAD_DIM): Gemma's query_pre_attn_scalar reaches the kernel
TOLERANCE = 1e-5

# Per row: groups as (prompt length, completion lengths); the rest of the row is padding.
ROWS = [
    [(50, (30, 41)), (7, (3, 5, 9)), (100, (60, 70))],   # 3 groups, ends at 375
    [(260, (60, 50)), (5, (1, 1, 1))],                   # a group over all three blocks
    [],                                                  # padding only
]


@functools.cache
def problem() -> tuple[BlockMask, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(BlockMask, dense mask, (q, k, v)) for ROWS."""
    documents, segments, positions = (torch.tensor(t) for t in zip(*(row_tensors(groups, LENGTH) for groups in ROWS)))
    mask_mod = row_mask_mod(documents, segments, positions, WINDOW)
    batch = len(ROWS)
    cpu = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, HEADS, LENGTH, HEAD_DIM, generator=generator)
    k, v = (torch.randn(batch, KV_HEADS, LENGTH, HEAD_DIM, generator=generator) for _ in "kv")
    return (block_mask(mask_mod, batch, LENGTH, cpu), dense_mask(mask_mod, batch, LENGTH, cpu),
            (q, k, v))


def flex_minus_dense(blocks: BlockMask) -> float:
    """Largest |compiled FlexAttention - dense SDPA| over all rows, heads and queries."""
    _, dense, (q, k, v) = problem()
    with torch.no_grad():
        flex = compiled_flex_attention(q, k, v, block_mask=blocks, scale=SCALE, enable_gqa=True)
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=SCALE,
                                                    enable_gqa=True)
    return float((flex - reference).abs().max())


def rebuilt(blocks: BlockMask, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
            full_kv_num_blocks: torch.Tensor, full_kv_indices: torch.Tensor) -> BlockMask:
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks,
                                    full_kv_indices, BLOCK_SIZE=blocks.BLOCK_SIZE,
                                    mask_mod=blocks.mask_mod, seq_lengths=blocks.seq_lengths)


def test_rows_exercise_the_block_structure():
    """Skipped blocks, partial blocks off the diagonal (groups crossing a block boundary), full
    blocks (where FlexAttention skips `mask_mod`), and a window that cuts."""
    blocks, dense, _ = problem()
    listed = blocks.to_dense()[:, 0].bool()  # [B, 3, 3] blocks visited
    assert not listed.all() and listed.tril(-1).any()
    assert (blocks.full_kv_num_blocks > 0).any()
    documents, segments, positions = (torch.tensor(t) for t in zip(*(row_tensors(groups, LENGTH) for groups in ROWS)))
    unwindowed = dense_mask(row_mask_mod(documents, segments, positions, None), len(ROWS),
                            LENGTH, torch.device("cpu"))
    assert (unwindowed & ~dense).any()
    assert dense[:, 0].any(dim=-1).all(), "every query sees at least itself"


@pytest.mark.slow  # compiles FlexAttention to C++: ~5 s, ~20 s with a cold inductor cache
def test_compiled_flex_equals_dense():
    blocks, _, _ = problem()
    assert flex_minus_dense(blocks) <= TOLERANCE


@pytest.mark.slow  # the compilation above, if run alone
@pytest.mark.parametrize("corruption", ["masked_block_marked_full", "partial_block_dropped",
                                        "full_block_dropped"])
def test_corrupted_block_mask_is_detected(corruption):
    blocks, _, _ = problem()
    kv_num, kv_idx = blocks.kv_num_blocks.clone(), blocks.kv_indices.clone()
    full_num, full_idx = blocks.full_kv_num_blocks.clone(), blocks.full_kv_indices.clone()
    if corruption == "masked_block_marked_full":
        # Row 0, last query block: key block 0 holds no allowed pair (other groups); listing it
        # as full lets those queries see a whole other group.
        assert 0 not in kv_idx[0, 0, 2, :kv_num[0, 0, 2]] and full_num[0, 0, 2] == 0
        full_idx[0, 0, 2, 0] = 0
        full_num[0, 0, 2] = 1
    else:
        # Row 1, middle query block, all prompt: key block 0 is full, its own block partial
        # (causal); drop one of them.
        assert kv_num[1, 0, 1] == 1 and full_num[1, 0, 1] == 1
        (kv_num if corruption == "partial_block_dropped" else full_num)[1, 0, 1] = 0
    corrupted = rebuilt(blocks, kv_num, kv_idx, full_num, full_idx)
    assert flex_minus_dense(corrupted) > 1e4 * TOLERANCE
