"""Truncation by max_prompt_length and max_length, ids checked by hand (BOS = 1, EOS = 2)."""

from __future__ import annotations

import numpy as np
import pytest

from prefixdpo.data.truncation import check_limits, truncate_group

PROMPT = np.array([1, 10, 11, 12, 13], dtype=np.int32)  # BOS + 4 tokens
CHOSEN = np.array([20, 21, 22, 2], dtype=np.int32)
REJECTED = np.array([30, 2], dtype=np.int32)


def run(prompt=PROMPT, max_length=0, max_prompt_length=0, mode="keep_end", bos_id=1):
    prompt, completions, truncated = truncate_group(
        prompt, [CHOSEN, REJECTED], max_length=max_length, max_prompt_length=max_prompt_length,
        mode=mode, bos_id=bos_id)
    return prompt.tolist(), [c.tolist() for c in completions], truncated


def test_no_limits_change_nothing():
    assert run() == ([1, 10, 11, 12, 13], [[20, 21, 22, 2], [30, 2]], False)
    assert run(max_length=9, max_prompt_length=5) == \
        ([1, 10, 11, 12, 13], [[20, 21, 22, 2], [30, 2]], False)


@pytest.mark.parametrize("mode, bos_id, prompt", [
    ("keep_end", 1, [1, 12, 13]),      # BOS kept, then the last tokens
    ("keep_end", None, [11, 12, 13]),  # a tokenizer without BOS: just the last tokens
    ("keep_start", 1, [1, 10, 11])])
def test_max_prompt_length(mode, bos_id, prompt):
    assert run(max_prompt_length=3, mode=mode, bos_id=bos_id) == \
        (prompt, [[20, 21, 22, 2], [30, 2]], True)


def test_max_length_cuts_completions_keeping_their_start():
    # Prompt 5 + room 2: the chosen keeps [20, 21] (its EOS is lost), the rejected fits.
    assert run(max_length=7) == ([1, 10, 11, 12, 13], [[20, 21], [30, 2]], True)


def test_prompt_longer_than_max_length_leaves_one_completion_token():
    assert run(max_length=4) == ([1, 12, 13], [[20], [30]], True)
    assert run(max_length=4, mode="keep_start") == ([1, 10, 11], [[20], [30]], True)
    assert run(max_length=2) == ([1], [[20], [30]], True)


def test_both_limits():
    # max_prompt_length first (keep_end: [1, 13]), then room 6 - 2 = 4: everything fits.
    assert run(max_length=6, max_prompt_length=2) == ([1, 13], [[20, 21, 22, 2], [30, 2]], True)
    assert run(max_length=4, max_prompt_length=2) == ([1, 13], [[20, 21], [30, 2]], True)


def test_limits_are_checked():
    with pytest.raises(ValueError, match=r"max_length = 1 leaves no room"):
        check_limits(1, 0, "keep_end")
    with pytest.raises(ValueError, match=r"truncation_mode = 'middle'"):
        check_limits(0, 0, "middle")
    check_limits(0, 0, "keep_start")
