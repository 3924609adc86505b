"""The learning-rate schedule, from hand-computed values."""

from __future__ import annotations

import math

import pytest

from prefixdpo.train.config import OptimSection
from prefixdpo.train.optim import lr_at


def test_warmup_then_cosine():
    config = OptimSection(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    # Warmup: (step + 1) / 4.
    assert [lr_at(s, 14, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # Then 10 decay steps: 0.1 + 0.9 * (1 + cos(pi * k / 10)) / 2.
    for k in range(10):
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 10))
        assert lr_at(4 + k, 14, config) == pytest.approx(expected)
    assert lr_at(14, 14, config) == pytest.approx(0.1)


def test_linear_and_constant():
    linear = OptimSection(lr=2.0, schedule="linear")
    assert [lr_at(s, 4, linear) for s in range(4)] == [2.0, 1.5, 1.0, 0.5]
    constant = OptimSection(lr=3.0, warmup_steps=2, schedule="constant")
    assert [lr_at(s, 10, constant) for s in (0, 1, 2, 9)] == [1.5, 3.0, 3.0, 3.0]
