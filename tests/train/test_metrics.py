"""MFU's peak-FLOPs table: exact device names only; unknown cards get no MFU."""

from __future__ import annotations

import pytest
import torch

from prefixdpo.train import metrics


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),      # a fragment match would give it the SXM peak
    ("NVIDIA L40", 181e12),            # and "L4" is a prefix of "L40"
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA RTX 6000 Ada Generation", None),  # not in the table: no MFU rather than a guess
    ("Some Future GPU H200X", None),
])
def test_peak_flops_by_exact_name(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.peak_flops(torch.device("cuda", 0)) == expected


def test_no_peak_on_cpu():
    assert metrics.peak_flops(torch.device("cpu")) is None


def test_forward_flops_follow_each_layers_window():
    """A Gemma-like model, one sliding layer (window 3) and one full layer, on one row holding
    a prompt of 4 and completions of 2 and 3, then padding. Derived by hand:
    - keys per token: positions 0..3 | 4, 5 | 4, 5, 6 plus one: 1, 2, 3, 4, 5, 6, 5, 6, 7 (sum
      39) in the full layer, each capped at 3 in the sliding one: 1, 2, 3, 3, 3, 3, 3, 3, 3
      (sum 24);
    - attention: 4 x heads x head_dim per (query, key) pair and layer: 4 x 4 x 24 x (39 + 24);
    - matmuls: 2 x the decoder layers' parameters per non-padding token (9), and 2 x vocab x
      hidden per target (5)."""
    import numpy as np
    from conftest import family_config

    from prefixdpo.data.example import Example, Group
    from prefixdpo.data.layout import Numbering, collate

    config = family_config("gemma3", sliding_window=3)
    assert config.layer_windows == (3, None)
    ids = lambda n: np.arange(n, dtype=np.int32)  # noqa: E731
    example = Example(0, (Group(ids(4), (ids(2), ids(3))),), ((0, 1),))
    batch = collate([[0]], [example], Numbering([example]), "shared+packed", 11)
    assert batch.positions[0].tolist()[:9] == [0, 1, 2, 3, 4, 5, 4, 5, 6]
    assert len(batch.target_ids) == 5
    d, v = config.hidden_size, config.vocab_size
    layer_params = config.num_params - v * d - d  # tied: the embedding once, the final norm
    expected = 2 * layer_params * 9 + 2 * v * d * 5 + 4 * 4 * 24 * (39 + 24)
    assert metrics.forward_flops(batch, config) == expected
