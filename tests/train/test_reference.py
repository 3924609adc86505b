"""The reference-table cache key: a different model, different data or a different dtype
never reuses a table."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import random_examples
from safetensors.torch import load_file, save_file

from data.example import Example, Group
from train.reference import cache_key, model_fingerprint, read_table, write_table

CPU = torch.device("cpu")


def test_model_fingerprint_sees_any_weight_change(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("llama_gqa")
    cache = tmp_path / "cache"
    before = model_fingerprint(folder, None, 0, CPU, cache)
    assert model_fingerprint(folder, None, 0, CPU, cache) == before
    assert len(json.loads((cache / "file_digests.json").read_text())) == 1  # remembered
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][5, 7] += 1e-3  # one value, mid-file
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(folder, None, 0, CPU, cache) != before


def test_random_init_fingerprint(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama"}')
    a = model_fingerprint(None, config, 0, CPU, tmp_path)
    assert a == model_fingerprint(None, config, 0, CPU, tmp_path)
    assert a != model_fingerprint(None, config, 1, CPU, tmp_path)


def test_cache_key_separates_data_grouping_and_dtype():
    examples = random_examples(6, 50)
    assert cache_key("m", examples, "float32") == cache_key("m", list(examples), "float32")
    assert cache_key("m", examples, "float32") != cache_key("m", examples, "bfloat16")
    assert cache_key("m", examples, "float32") != cache_key("m2", examples, "float32")
    # The same tokens grouped differently are other sequences.
    p, a, b = (np.array(x, np.int32) for x in ([1, 2], [3], [4]))
    one = [Example(0, (Group(p, (a, b)),), ((0, 1),))]
    two = [Example(0, (Group(p, (a,)), Group(p, (b,))), ((0, 1),))]
    assert cache_key("m", one, "float32") != cache_key("m", two, "float32")


def test_table_round_trip_and_key_check(tmp_path):
    table = torch.randn(5)
    write_table(tmp_path / "t.safetensors", "key-a", table)
    assert torch.equal(read_table(tmp_path / "t.safetensors", "key-a", 5), table)
    assert read_table(tmp_path / "t.safetensors", "key-b", 5) is None
    assert read_table(tmp_path / "t.safetensors", "key-a", 6) is None
    assert read_table(tmp_path / "absent.safetensors", "key-a", 5) is None
