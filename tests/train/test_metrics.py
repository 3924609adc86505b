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
