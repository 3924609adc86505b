"""Checkpoint loading refuses bad input with one clear message naming the file or tensor."""

from __future__ import annotations

import json
import re
from pathlib import Path
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import prefixdpo.model.hf_checkpoint as hf_checkpoint_module
from prefixdpo.model.config import ModelConfig
from prefixdpo.model.hf_checkpoint import (CheckpointReader, load_model, load_weights, resolve_model_dir,
                                 save_hf_checkpoint)
from prefixdpo.model.transformer import build_model


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(ValueError, match="no such model folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="required field"):
        load_model(tmp_path)


def test_pickles_are_refused(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"\.bin pickles are refused"):
        load_model(folder)


def test_truncated_file(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors: not a valid safetensors file"):
        load_model(folder)


def test_corrupt_header(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_model(folder)


def rewrite(folder, edit):
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    rewrite(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(folder)


def test_unexpected_tensor(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    rewrite(folder, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.2.mlp.up_proj.weight'"):
        load_model(folder)


def test_shape_mismatch(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    rewrite(folder, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(65,\), expected \(64,\)"):
        load_model(folder)


def test_shard_listed_but_missing(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa", max_shard_size="40KB")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="listed in model.safetensors.index.json but missing"):
        load_model(folder)


def test_old_rotary_buffers_are_ignored(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa")
    plain = load_model(folder).state_dict()
    rewrite(folder, lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    with_buffer = load_model(folder).state_dict()
    assert with_buffer.keys() == plain.keys()
    assert all(torch.equal(with_buffer[k], plain[k]) for k in plain)


def test_hub_repo_id_from_local_cache(hf_checkpoint, tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub's cache with the network off."""
    folder, _ = hf_checkpoint("llama_tied")
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_dir("org/tiny") == snapshot
    model = load_model("org/tiny")
    assert model.config.tie_word_embeddings
    with pytest.raises(ValueError, match="org/absent: could not fetch"):
        resolve_model_dir("org/absent")


def test_save_writes_index_and_dtype(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama_gqa")
    model = load_model(folder, dtype=torch.bfloat16)
    out = save_hf_checkpoint(model.state_dict(), model.config, tmp_path / "out",
                             max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(
        t.numel() * 2 for t in model.state_dict().values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_tied_checkpoint_that_stores_the_head(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_tied")
    rewrite(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = load_model(folder)
    assert model.lm_head.weight is model.embed_tokens.weight
    rewrite(folder, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens"):
        load_model(folder)


def test_duplicate_tensor_across_shards(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa", max_shard_size="40KB")
    first, second = sorted(folder.glob("model-*.safetensors"))[:2]
    a, b = load_file(first), load_file(second)
    b.update({next(iter(a)): a[next(iter(a))]})
    save_file(b, second, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="also in"):
        load_model(folder)


def test_headers_are_validated_before_any_data_is_read(hf_checkpoint, monkeypatch):
    """Validation (names, duplicates, shapes, missing) reads only the headers, so a bad
    checkpoint is refused before a byte of data is read; then rows are read on demand."""
    folder, hf_model = hf_checkpoint("llama_gqa", max_shard_size="40KB")
    config = ModelConfig.from_file(folder)
    reads = []
    read_rows = hf_checkpoint_module._read_rows
    monkeypatch.setattr(hf_checkpoint_module, "_read_rows",
                        lambda stored, start, stop: reads.append(stored.hf_name)
                        or read_rows(stored, start, stop))
    reader = CheckpointReader(folder, config)
    assert reads == [] and len(reader.tensors) == len(hf_model.state_dict())
    embedding = hf_model.state_dict()["model.embed_tokens.weight"]
    assert torch.equal(reader.read("embed_tokens.weight", 100, 107), embedding[100:107])
    assert torch.equal(reader.read("embed_tokens.weight"), embedding)
    assert reads == ["model.embed_tokens.weight"] * 2

    reads.clear()
    wider = replace(config, intermediate_size=97)
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight' has shape .*97"):
        load_weights(build_model(wider), folder)
    assert reads == []


def point_index_at(folder, shard_name):
    """Rewrite the index so the tensors of the second shard are listed under `shard_name`."""
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    second = sorted(set(index["weight_map"].values()))[1]
    index["weight_map"] = {name: shard_name if file == second else file
                           for name, file in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    return folder / second


@pytest.mark.parametrize("escape", ["../../outside.safetensors", "../outside.safetensors",
                                    "sub/../../outside.safetensors", "absolute"])
def test_index_entries_outside_the_folder_are_refused(hf_checkpoint, tmp_path, escape):
    folder, _ = hf_checkpoint("llama_gqa", max_shard_size="40KB")
    outside = tmp_path / "outside.safetensors"
    shard_name = str(outside) if escape == "absolute" else escape
    (folder / "sub").mkdir()
    outside.write_bytes(point_index_at(folder, shard_name).read_bytes())
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: weight_map entry "
                                         rf"{re.escape(repr(shard_name))} .* inside the model"):
        load_model(folder)


def test_index_entry_that_is_not_a_string_is_refused(hf_checkpoint):
    folder, _ = hf_checkpoint("llama_gqa", max_shard_size="40KB")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = 3
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError,
                       match=r"index\.json: weight_map entry 3 .* a relative file name"):
        load_model(folder)


def test_symlinked_shards_as_in_the_hub_cache_still_load(hf_checkpoint, tmp_path):
    """The hub cache links snapshots/<rev>/<file> to ../../blobs/<hash>: the files as written
    in the index are inside the folder, their targets are not, and that is fine."""
    folder, hf_model = hf_checkpoint("llama_gqa", max_shard_size="40KB")
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / f.name)
    state = load_model(snapshot).state_dict()
    expected = hf_model.state_dict()
    assert all(torch.equal(state[k.removeprefix("model.")], expected[k]) for k in expected)


@pytest.mark.parametrize("dtype, stored", [
    (torch.int8, "I8"), (torch.uint8, "U8"), (torch.int32, "I32"), (torch.int64, "I64"),
    (torch.bool, "BOOL"), (torch.float8_e4m3fn, "F8_E4M3"),
])
def test_non_float_dtypes_are_refused(hf_checkpoint, dtype, stored):
    folder, _ = hf_checkpoint("llama_gqa")
    rewrite(folder, lambda t: t.update({"model.norm.weight": torch.ones(64).to(dtype)}))
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor 'model\.norm\.weight' has "
                                         rf"dtype {stored}; expected F16, BF16, F32 or F64"):
        load_model(folder)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_dtypes_are_read_and_converted(hf_checkpoint, dtype):
    folder, _ = hf_checkpoint("llama_gqa")
    rewrite(folder, lambda t: t.update({"model.norm.weight": torch.full((64,), 0.5, dtype=dtype)}))
    assert torch.equal(load_model(folder).norm.weight, torch.full((64,), 0.5))
