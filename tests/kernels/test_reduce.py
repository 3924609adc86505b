"""`sequence_log_probs`: per-token log-probs to per-sequence float32 sums; LD-DPO's
shared-prefix sums against TRL's padded computation."""

from __future__ import annotations

import pytest
import torch

import prefixdpo.kernels.reduce as reduce_module
from prefixdpo.kernels.reduce import (ld_log_probs, reference_ld_pair_log_probs,
                                      sequence_log_probs, shared_prefix_log_probs, token_ranks)


def test_sums_and_gradient():
    token_logps = torch.tensor([-1.0, -2.0, -0.5, -3.0, -0.25, -4.0], requires_grad=True)
    # Tokens of three sequences, interleaved as a packed row delivers them; sequence 3 is empty.
    sequence_index = torch.tensor([0, 2, 0, 1, 2, 2])
    sums = sequence_log_probs(token_logps, sequence_index, num_sequences=4)
    assert sums.dtype == torch.float32
    assert sums.tolist() == [-1.5, -3.0, -6.25, 0.0]
    # d(sum_s w_s * sums_s) / d token_t = w_{sequence of t}
    weights = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    grad, = torch.autograd.grad((sums * weights).sum(), token_logps)
    assert grad.tolist() == [1.0, 100.0, 1.0, 10.0, 100.0, 100.0]


def test_bfloat16_tokens_are_not_summed_in_bfloat16():
    # 256 tokens of 1/256 each: exactly 1.0. bf16 accumulation would stall at 0.5 (bf16 has 8
    # mantissa bits: 0.5 + 1/256 rounds back to 0.5).
    token_logps = torch.full((256,), 1 / 256, dtype=torch.bfloat16)
    sums = sequence_log_probs(token_logps, torch.zeros(256, dtype=torch.long), 1)
    assert sums.dtype == torch.float32 and sums.item() == 1.0


def test_accumulation_is_float64():
    # -2^24 - 1 - 1: in float32, -2^24 - 1 rounds back to -2^24 (the spacing there is 2), so
    # sequential float32 adds give -16777216; the exact -16777218 is a float32 number.
    token_logps = torch.tensor([-2.0 ** 24, -1.0, -1.0])
    sums = sequence_log_probs(token_logps, torch.zeros(3, dtype=torch.long), 1)
    assert sums.item() == -16777218.0


def test_no_tokens():
    sums = sequence_log_probs(torch.zeros(0), torch.zeros(0, dtype=torch.long), 2)
    assert sums.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("token_logps,sequence_index,num_sequences,message", [
    (torch.zeros(3), torch.tensor([0, 1, 2]), 2, "holds 2, outside \\[0, 2\\)"),
    (torch.zeros(3), torch.tensor([0, -1, 1]), 2, "holds -1"),
    (torch.zeros(3), torch.tensor([0, 1]), 2, "3 entries, sequence_index 2"),
    (torch.zeros(3, 1), torch.tensor([0, 1, 1]), 2, "expected token_logps \\[T\\]"),
    (torch.zeros(3), torch.tensor([0, 1, 1], dtype=torch.int32), 2, "int64"),
    (torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 1]), 2, "floating point"),
    (torch.zeros(3), torch.tensor([0, 1, 1]), -1, "num_sequences must be an int >= 0"),
])
def test_bad_inputs(token_logps, sequence_index, num_sequences, message):
    with pytest.raises(ValueError, match=message):
        sequence_log_probs(token_logps, sequence_index, num_sequences)


@pytest.mark.parametrize("bad_index", [2, -1])
def test_device_side_index_check(monkeypatch, bad_index):
    """As on CUDA: an index outside [0, S) fails `torch._assert_async` (eagerly on CPU: a
    RuntimeError) rather than being read on the host; valid indices pass it."""
    monkeypatch.setattr(reduce_module, "values_checked_on_host", lambda tensor: False)
    assert sequence_log_probs(torch.ones(3), torch.tensor([0, 1, 1]), 2).tolist() == [1.0, 2.0]
    with pytest.raises(RuntimeError, match="sequence_index is outside \\[0, 2\\)"):
        sequence_log_probs(torch.ones(3), torch.tensor([0, bad_index, 1]), 2)


# ---- LD-DPO: shared-prefix sums and the LD-weighted log-probs -------------------------------

def _pairs_case(seed: int, shuffle: bool):
    """Random flat tokens of 7 sequences (lengths 1..9), in layout order or shuffled, and 6
    pairs among them, sequence 2 in three pairs (a ranked group) and sequence 6 in none."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 7, 5, 1, 9, 4, 2])
    sequence_index = torch.repeat_interleave(torch.arange(7), lengths)
    ranks = torch.cat([torch.arange(n) for n in lengths.tolist()])
    token_logps = -3 * torch.rand(int(lengths.sum()), generator=generator, dtype=torch.float64)
    if shuffle:
        order = torch.randperm(token_logps.shape[0], generator=generator)
        sequence_index, ranks, token_logps = sequence_index[order], ranks[order], \
            token_logps[order]
    chosen = torch.tensor([0, 2, 2, 4, 1, 3])
    rejected = torch.tensor([1, 0, 4, 2, 5, 4])
    return token_logps.float().requires_grad_(), sequence_index, ranks, lengths, chosen, rejected


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld_log_probs_match_trls_padded_computation(shuffle, alpha):
    """shared + alpha (full - shared) from the flat tokens equals TRL's masks on padded rows
    (`reference_ld_pair_log_probs`), values and gradients, whatever the token order."""
    token_logps, index, ranks, lengths, chosen, rejected = _pairs_case(0, shuffle)
    full = sequence_log_probs(token_logps, index, 7)
    shared = shared_prefix_log_probs(token_logps, index, ranks, lengths, chosen, rejected)
    ours = (ld_log_probs(full[chosen], shared[:, 0], alpha),
            ld_log_probs(full[rejected], shared[:, 1], alpha))
    theirs = reference_ld_pair_log_probs(token_logps, index, ranks, 7, chosen, rejected, alpha)
    cotangent = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    grads = [torch.autograd.grad((torch.stack(out) * cotangent).sum(), token_logps)[0]
             for out in (ours, theirs)]
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)


def test_shared_prefix_by_hand():
    """Sequences [a0 a1 a2] and [b0]: the shared length is 1, so the shared parts are a0 and
    b0; the gradient reaches a0 only (and b0), not a1, a2."""
    token_logps = torch.tensor([-1.0, -2.0, -4.0, -8.0], requires_grad=True)
    index = torch.tensor([0, 0, 0, 1])
    ranks = torch.tensor([0, 1, 2, 0])
    shared = shared_prefix_log_probs(token_logps, index, ranks, torch.tensor([3, 1]),
                                     torch.tensor([0]), torch.tensor([1]))
    assert shared.tolist() == [[-1.0, -8.0]]
    grad, = torch.autograd.grad(shared[0, 0] + 10 * shared[0, 1], token_logps)
    assert grad.tolist() == [1.0, 0.0, 0.0, 10.0]
    # LD-weighted with alpha 0.5: -1 + 0.5 (-2 - 4) = -4; the shorter side is unchanged.
    assert ld_log_probs(torch.tensor([-7.0]), shared[:, 0], 0.5).tolist() == [-4.0]


def test_token_ranks_of_the_layout_order():
    ranks = token_ranks(torch.tensor([0, 0, 0, 1, 3, 3]), torch.tensor([3, 1, 0, 2]))
    assert ranks.tolist() == [0, 1, 2, 0, 0, 1]


def test_shared_prefix_accumulates_in_float64():
    """The running sum is float64: a large first token does not swallow the ones after it."""
    token_logps = torch.tensor([-2.0 ** 24, -1.0, -1.0, -3.0])
    shared = shared_prefix_log_probs(token_logps, torch.tensor([0, 0, 0, 1]),
                                     torch.tensor([0, 1, 2, 0]), torch.tensor([3, 1]),
                                     torch.tensor([1]), torch.tensor([0]))
    assert shared.tolist() == [[-3.0, -16777216.0]]


@pytest.mark.parametrize("change,message", [
    (dict(token_rank=torch.tensor([0, 2, 1, 0])), None),        # any order of ranks: fine
    (dict(token_rank=torch.tensor([0, 1, 1, 0])), "number each sequence's tokens"),
    (dict(sequence_num_tokens=torch.tensor([2, 2])), "number each sequence's tokens"),
    (dict(token_rank=torch.tensor([0, 1, 2])), "token_rank must be int64 \\[T\\]"),
    (dict(chosen=torch.tensor([0, 1])), "one entry per pair"),
    (dict(rejected=torch.tensor([2])), "outside \\[0, 2\\)"),
    (dict(token_logps=torch.zeros(4, dtype=torch.long)), "floating point"),
])
def test_shared_prefix_bad_inputs(change, message):
    args = dict(token_logps=torch.zeros(4), sequence_index=torch.tensor([0, 0, 0, 1]),
                token_rank=torch.tensor([0, 1, 2, 0]), sequence_num_tokens=torch.tensor([3, 1]),
                chosen=torch.tensor([0]), rejected=torch.tensor([1]))
    args.update(change)
    if message is None:
        shared_prefix_log_probs(**args)
        return
    with pytest.raises(ValueError, match=message):
        shared_prefix_log_probs(**args)
