"""FSDP2 wrapping from outside the model (one gloo rank, in process): activation checkpointing
and sharding keep names and numbers; a failed checkpoint save leaves the previous one whole."""

from __future__ import annotations

import errno
import json

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from conftest import random_examples, tiny_config

from data.loader import PreferenceLoader, fit_examples
from model.transformer import build_model
from train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from train.config import OptimSection
from train.distributed import setup
from train.forward import attention_mask, batch_sequence_log_probs
from train.optim import build_optimizer
from train.parallelize import parallelize, reshard


@pytest.fixture(scope="module")
def env():
    env = setup("cpu")
    yield env
    dist.destroy_process_group()


def batch(vocab: int):
    examples, report = fit_examples(random_examples(12, vocab), "shared+packed", 128, "error")
    loader = PreferenceLoader(examples, "shared+packed", 2, packing_length=128, prefetch=0)
    return next(iter(loader))[0]


def loss_and_grads(model, b):
    logps, _ = batch_sequence_log_probs(model, b, attention_mask(b, None, use_flex=False))
    logps.sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.clone()
    model.zero_grad()
    return logps.detach(), grads


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_sharded_model_matches_plain(env, activation_checkpointing):
    config = tiny_config(tie_word_embeddings=True)
    plain = build_model(config, seed=0)
    sharded = parallelize(build_model(config, seed=0), env.mesh, mixed_precision=False,
                          activation_checkpointing=activation_checkpointing)
    # Checkpoints and exports see the plain names (the wrapper's prefix is stripped).
    assert sharded.state_dict().keys() == plain.state_dict().keys()
    assert get_model_state_dict(sharded).keys() == plain.state_dict().keys()
    b = batch(config.vocab_size)
    expected, expected_grads = loss_and_grads(plain, b)
    actual, actual_grads = loss_and_grads(sharded, b)
    assert (actual - expected).abs().max() <= 1e-5
    for (name, grad), actual_grad in zip(expected_grads.items(), actual_grads.values(),
                                          strict=True):
        assert (actual_grad - grad).abs().max() <= 1e-5, name


def test_no_grad_pass_leaves_sharded_parameters_registered(env):
    """After a forward without backward (scoring), `reshard` puts the sharded parameters back,
    so an optimizer sees the tensors it must update."""
    sharded = parallelize(build_model(tiny_config(), seed=0), env.mesh, mixed_precision=False)
    before = [id(p) for p in sharded.parameters()]
    b = batch(sharded.config.vocab_size)
    with torch.no_grad():
        batch_sequence_log_probs(sharded, b, attention_mask(b, None, use_flex=False))
    reshard(sharded)
    assert [id(p) for p in sharded.parameters()] == before


def test_failed_save_keeps_the_previous_checkpoint(env, tmp_path, monkeypatch):
    model = parallelize(build_model(tiny_config(), seed=0), env.mesh, mixed_precision=False)
    optimizer = build_optimizer(model, OptimSection(), env.device)
    state = {"train": {"step": 1}, "loader": {}}
    first = save_checkpoint(tmp_path, 1, model, optimizer, state, "", keep_last=2, env=env)
    files = sorted(p.name for p in first.iterdir())

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # Fail inside DCP's own writer, so the error arrives wrapped as DCP wraps it.
    from torch.distributed.checkpoint import filesystem
    monkeypatch.setattr(filesystem, "_write_item", disk_full)
    with pytest.raises(ValueError, match=r"No space left on device.*step_00000001 is intact"):
        save_checkpoint(tmp_path, 2, model, optimizer, {"train": {"step": 2}, "loader": {}}, "",
                        keep_last=2, env=env)
    assert list_checkpoints(tmp_path) == [first]
    assert sorted(p.name for p in first.iterdir()) == files
    assert not list(tmp_path.glob(".step_*"))  # the partial folder is gone
    assert json.loads((first / "train_state.json").read_text())["train"]["step"] == 1
    monkeypatch.undo()
    assert load_checkpoint(first, model, optimizer, env.rank)["train"]["step"] == 1


def test_keep_last(env, tmp_path):
    model = parallelize(build_model(tiny_config(), seed=0), env.mesh, mixed_precision=False)
    optimizer = build_optimizer(model, OptimSection(), env.device)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, optimizer, {"train": {}, "loader": {}}, "x",
                        keep_last=2, env=env)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert (tmp_path / "step_00000003" / "config.toml").read_text() == "x"


def test_resuming_another_models_checkpoint_is_refused(env, tmp_path):
    small = parallelize(build_model(tiny_config(), seed=0), env.mesh, mixed_precision=False)
    saved = save_checkpoint(tmp_path, 1, small, build_optimizer(small, OptimSection(), env.device),
                            {"train": {}, "loader": {}}, "", keep_last=1, env=env)
    wider = parallelize(build_model(tiny_config(intermediate_size=128), seed=0), env.mesh,
                        mixed_precision=False)
    with pytest.raises(ValueError, match="cannot resume from this checkpoint.*train.output_dir"):
        load_checkpoint(saved, wider, build_optimizer(wider, OptimSection(), env.device), 0)
