"""`sequence_log_probs`: per-token log-probs to per-sequence float32 sums."""

from __future__ import annotations

import pytest
import torch

import prefixdpo.kernels.reduce as reduce_module
from prefixdpo.kernels.reduce import sequence_log_probs


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
