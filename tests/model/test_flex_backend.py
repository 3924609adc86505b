"""Choosing FlexAttention's backend: the options reach every `flex_attention` call of the
model, and "flash" is refused with a clear error where it cannot run (a torch without the
BACKEND='FLASH' kernel option, no CUDA, a GPU older than Hopper, no flash-attn-4)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import tiny_config

import prefixdpo.model.attention as attention
import prefixdpo.model.transformer as transformer
from prefixdpo.model.attention import FLEX_BACKENDS, flex_kernel_options
from prefixdpo.model.masks import build_layer_masks
from prefixdpo.model.transformer import Attention, build_model, set_flex_backend


def flex_calls(monkeypatch, model) -> list[dict]:
    """Run the model once on a BlockMask (CPU: the eager `flex_attention` of the model file,
    replaced by a recorder) and return the keyword arguments of each call."""
    calls = []

    def record(q, k, v, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(q)

    monkeypatch.setattr(transformer, "flex_attention", record)
    ids = torch.zeros(1, 128, dtype=torch.int64)
    masks = build_layer_masks(ids, ids, ids, model.config.attention_windows, executor="flex")
    with torch.no_grad():
        model(ids, ids, masks)
    return calls


def test_default_leaves_the_choice_to_torch(monkeypatch):
    model = build_model(tiny_config(), seed=0)
    calls = flex_calls(monkeypatch, model)
    assert len(calls) == model.config.num_hidden_layers
    assert all(call["kernel_options"] is None for call in calls)


def test_options_reach_every_flex_call(monkeypatch):
    model = build_model(tiny_config(), seed=0)
    set_flex_backend(model, "triton")
    expected = {"BACKEND": "TRITON"} if "TRITON" in attention._torch_flex_backends() else None
    assert [call["kernel_options"] for call in flex_calls(monkeypatch, model)] == \
        [expected] * model.config.num_hidden_layers
    # What set_flex_backend("flash") sets on a GPU that runs it, set here by hand.
    for module in model.modules():
        if isinstance(module, Attention):
            module.flex_kernel_options = {"BACKEND": "FLASH"}
    assert all(call["kernel_options"] == {"BACKEND": "FLASH"}
               for call in flex_calls(monkeypatch, model))


def test_this_torch_has_the_flash_backend():
    if torch.__version__ >= "2.13":
        assert {"TRITON", "FLASH"} <= set(attention._torch_flex_backends())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_flash_refused_without_cuda():
    model = build_model(tiny_config(), seed=0)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        set_flex_backend(model, "flash")


def test_flash_support_check(monkeypatch):
    """Each requirement in turn, on a pretend machine."""
    monkeypatch.setattr(attention, "_torch_flex_backends", lambda: ("AUTO", "TRITON"))
    with pytest.raises(ValueError, match="upgrade torch"):
        flex_kernel_options("flash")
    assert flex_kernel_options("triton") == {"BACKEND": "TRITON"}
    monkeypatch.setattr(attention, "_torch_flex_backends", lambda: ())  # before BACKEND existed
    assert flex_kernel_options("triton") is None

    monkeypatch.setattr(attention, "_torch_flex_backends", lambda: ("TRITON", "FLASH"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="Hopper or Blackwell"):
        flex_kernel_options("flash")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install flash-attn-4"):
        flex_kernel_options("flash")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert flex_kernel_options("flash") == {"BACKEND": "FLASH"}


def test_unknown_backend():
    assert FLEX_BACKENDS == ("triton", "flash")
    with pytest.raises(ValueError, match="unknown FlexAttention backend"):
        flex_kernel_options("cudnn")
