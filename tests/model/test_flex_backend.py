"""Choosing FlexAttention's backend and block size: the executor's kernel options reach every
`flex_attention` call of the model; "flash" is refused with a clear error where it cannot run
(a torch without the BACKEND='FLASH' kernel option, no CUDA, a GPU older than Hopper, no
flash-attn-4); a block smaller than 128 gets Triton tiles that divide it, forward and
backward, on Hopper too."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import FLEX, tiny_config

import prefixdpo.model.attention as attention
import prefixdpo.model.executor as executor_module
from prefixdpo.model.attention import FLEX_BACKENDS, fit_flex_configs, flex_kernel_options
from prefixdpo.model.executor import AttentionExecutor
from prefixdpo.model.transformer import build_model


def flex_calls(monkeypatch, model, executor: AttentionExecutor = FLEX) -> list[dict]:
    """Run the model once on a BlockMask (CPU: the eager `flex_attention` of the executor
    module, replaced by a recorder) and return the keyword arguments of each call."""
    calls = []

    def record(q, k, v, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(q)

    monkeypatch.setattr(executor_module, "flex_attention", record)
    ids = torch.zeros(1, 128, dtype=torch.int64)
    masks = executor.layer_masks(ids, ids, ids, model.config.attention_windows)
    with torch.no_grad():
        model(ids, ids, masks)
    return calls


def test_options_reach_every_flex_call(monkeypatch):
    model = build_model(tiny_config(), seed=0)
    expected = {"BACKEND": "TRITON"} if "TRITON" in attention._torch_flex_backends() else None
    assert FLEX.kernel_options == expected
    assert [call["kernel_options"] for call in flex_calls(monkeypatch, model)] == \
        [expected] * model.config.num_hidden_layers
    small = AttentionExecutor("flex", block_size=64)
    calls = flex_calls(monkeypatch, model, small)
    assert len(calls) == model.config.num_hidden_layers
    assert all(call["kernel_options"] == small.kernel_options for call in calls)
    assert small.kernel_options["fwd_BLOCK_M"] == small.kernel_options["fwd_BLOCK_N"] == 64


def test_small_blocks_get_tiles_that_divide_them():
    """Every Triton tile at most the block, in each direction; the backward's tiles keep its
    kernel's constraints (BLOCK_N1 a multiple of BLOCK_M1, BLOCK_M2 of BLOCK_N2)."""
    assert "fwd_BLOCK_M" not in (flex_kernel_options("triton") or {})
    for block in (16, 32, 64):
        options = flex_kernel_options("triton", block)
        tiles = {k: v for k, v in options.items() if "BLOCK" in k}
        assert len(tiles) == 6 and all(block % size == 0 for size in tiles.values())
        assert options["bwd_BLOCK_N1"] % options["bwd_BLOCK_M1"] == 0
        assert options["bwd_BLOCK_M2"] % options["bwd_BLOCK_N2"] == 0


def test_hopper_backward_configs_fit_a_64_block(monkeypatch):
    """Inductor drops a config whose tiles do not divide the block before the kernel options
    apply; on Hopper its only backward config at head_dim 64 has 128-token tiles, so without
    the fit a 64-token block has no config left (the failure of `--block-size 64` on sm90)."""
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(config, "inductor_choices_class", None)
    fit_flex_configs.cache_clear()
    default = InductorChoices().get_flex_attention_bwd_configs(64, torch.bfloat16, "cuda")
    assert all(64 % c.block_n1 for c in default), "torch's default fits 64: nothing to show"
    assert fit_flex_configs(64)
    fitted = config.inductor_choices_class()
    backward = fitted.get_flex_attention_bwd_configs(64, torch.bfloat16, "cuda")
    forward = fitted.get_flex_attention_fwd_configs(64, torch.bfloat16, "cuda")
    assert backward and forward
    for c in backward:
        assert all(64 % size == 0 for size in (c.block_m1, c.block_n1, c.block_m2, c.block_n2))
        assert c.block_n1 % c.block_m1 == 0 and c.block_m2 % c.block_n2 == 0
    assert all(64 % c.block_m == 0 and 64 % c.block_n == 0 for c in forward)
    fit_flex_configs.cache_clear()


def test_this_torch_has_the_flash_backend():
    if torch.__version__ >= "2.13":
        assert {"TRITON", "FLASH"} <= set(attention._torch_flex_backends())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_flash_refused_without_cuda():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        AttentionExecutor("flex", "flash")


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
    with pytest.raises(ValueError, match="blocks of 128 tokens only"):
        flex_kernel_options("flash", 64)


def test_unknown_backend():
    assert FLEX_BACKENDS == ("triton", "flash")
    with pytest.raises(ValueError, match="unknown FlexAttention backend"):
        flex_kernel_options("cudnn")
