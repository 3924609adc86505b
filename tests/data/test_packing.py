"""Best-fit-decreasing packing and the automatic packing length."""

from __future__ import annotations

import numpy as np
import pytest

from prefixdpo.data.packing import auto_packing_length, pack_best_fit, packing_efficiency


def test_every_item_once_and_rows_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 2000)
    rows = pack_best_fit(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(2000))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    # Best fit decreasing is within a few percent of the lower bound on such data.
    lower_bound = -(-lengths.sum() // 512)
    assert len(rows) <= lower_bound * 1.03
    assert packing_efficiency(lengths, len(rows), 512) > 0.97


def test_best_fit_prefers_the_tightest_row():
    # Decreasing: 6 opens row 0 (free 4), 5 opens row 1 (free 5); 4 fits both and goes to the
    # tighter row 0; 3 then goes to row 1 (free 5 -> 2); 2 goes to row 1 (free 2 -> 0).
    rows = pack_best_fit([6, 5, 4, 3, 2], 10)
    assert rows == [[0, 2], [1, 3, 4]]


def test_refuses_items_that_do_not_fit():
    with pytest.raises(ValueError, match=r"item lengths must be in \[1, 10\]"):
        pack_best_fit([3, 11], 10)


def test_auto_packing_length():
    lengths = list(range(1, 1001))  # p95 = 950.05 -> 1.1x = 1045.06 -> 1152
    assert auto_packing_length(lengths) == 1152
    assert auto_packing_length([100] * 99 + [2000]) == 2048  # never below the longest
    with pytest.raises(ValueError, match="empty"):
        auto_packing_length([])
