"""FSDP2 wrapping from outside the model (one gloo rank, in process): activation checkpointing
and sharding keep names and numbers, the units are the intended ones; a failed checkpoint save
leaves the previous one whole. Two ranks: tests/train/test_sharded_build.py."""

from __future__ import annotations

import errno
import json

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from conftest import DENSE, random_examples, reshards_after_forward, tiny_config

from prefixdpo.data.loader import PreferenceLoader, fit_examples
from prefixdpo.model.transformer import build_model
from prefixdpo.train.build import ModelSource
from prefixdpo.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from prefixdpo.train.config import OptimSection
from prefixdpo.train.distributed import setup
from prefixdpo.train.forward import attention_masks, batch_sequence_log_probs
from prefixdpo.train.optim import build_optimizer
from prefixdpo.train.parallelize import parallelize, reshard


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
    logps, _ = batch_sequence_log_probs(model, b, attention_masks(b, model.config, DENSE))
    logps.sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.clone()
    model.zero_grad()
    return logps.detach(), grads


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_sharded_model_matches_plain(env, activation_checkpointing, tied):
    """Built as training builds it: sharded on the meta device, then materialized and drawn."""
    config = tiny_config(tie_word_embeddings=tied)
    plain = build_model(config, seed=0)
    sharded = ModelSource(config, None, None, 0).build(
        env.device, shard=lambda meta_model: parallelize(
            meta_model, env.mesh, mixed_precision=False,
            activation_checkpointing=activation_checkpointing))
    gathered = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    assert all(torch.equal(gathered[name], t) for name, t in plain.state_dict().items())
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


def test_units(env):
    """The embedding, each layer, and the final norm with the head are FSDP units, besides
    the root (untied); on one rank no unit frees its weights after forward, since backward
    would gather them again with nothing saved. Tied, the embedding and the head share the
    root, the one unit that gathers their common weight."""
    model = parallelize(build_model(tiny_config(), seed=0), env.mesh, mixed_precision=False)
    units = [model.embed_tokens, *model.layers, model.norm, model.lm_head]
    assert all(isinstance(m, FSDPModule) for m in [model, *units])
    assert model.norm._get_fsdp_state() is model.lm_head._get_fsdp_state()
    assert len({id(m._get_fsdp_state()) for m in units}) == len(model.layers) + 2
    assert not any(reshards_after_forward(m) for m in units)
    frozen = parallelize(build_model(tiny_config(), seed=0), env.mesh, mixed_precision=False,
                         reshard_after_forward=True)
    assert all(reshards_after_forward(m) for m in [frozen.embed_tokens, *frozen.layers])
    assert not reshards_after_forward(frozen.lm_head)  # backward would start with it

    tied = parallelize(build_model(tiny_config(tie_word_embeddings=True), seed=0), env.mesh,
                       mixed_precision=False)
    assert not any(isinstance(m, FSDPModule) for m in (tied.embed_tokens, tied.norm,
                                                         tied.lm_head))
    assert tied.lm_head.weight is tied.embed_tokens.weight


def test_no_grad_pass_leaves_sharded_parameters_registered(env):
    """After a forward without backward (scoring), `reshard` puts the sharded parameters back,
    so an optimizer sees the tensors it must update."""
    sharded = parallelize(build_model(tiny_config(), seed=0), env.mesh, mixed_precision=False)
    before = [id(p) for p in sharded.parameters()]
    b = batch(sharded.config.vocab_size)
    with torch.no_grad():
        batch_sequence_log_probs(sharded, b, attention_masks(b, sharded.config, DENSE))
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
    with pytest.raises(ValueError, match=r"\(the disk is full\).*step_00000001 is intact"):
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


@pytest.mark.parametrize("tied", [False, True])
def test_synced_reference_mixes_the_sharded_weights(env, tied):
    """TR-DPO's sync on FSDP2 models (each rank mixes its shards): after a forward of each
    (the live reference gathers and reshards), every reference weight becomes
    alpha * policy + (1 - alpha) * reference, and the reference's log-probs follow."""
    from prefixdpo.train.reference import LiveReference

    config = tiny_config(tie_word_embeddings=tied)
    policy = parallelize(build_model(config, seed=0), env.mesh, mixed_precision=False)
    frozen = parallelize(build_model(config, seed=1).requires_grad_(False), env.mesh,
                         mixed_precision=False, reshard_after_forward=True)
    live = LiveReference(frozen)
    b = batch(config.vocab_size)
    mask = attention_masks(b, config, executor=DENSE)
    live(b, mask)
    full = {name: p.full_tensor().clone() for name, p in frozen.named_parameters()}
    target = {name: p.full_tensor().clone() for name, p in policy.named_parameters()}
    live.sync(policy, 0.25)
    for name, p in frozen.named_parameters():
        assert type(p).__name__ == "DTensor", name
        torch.testing.assert_close(p.full_tensor(), 0.25 * target[name] + 0.75 * full[name],
                                   rtol=1e-6, atol=1e-7, msg=name)
    live.sync(policy, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(live(b, mask), batch_sequence_log_probs(policy, b, mask)[0])
    reshard(policy)
