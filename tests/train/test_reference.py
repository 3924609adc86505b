"""The reference-table cache key: a different model, different data or a different dtype
never reuses a table."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import DENSE, random_examples, tiny_config
from safetensors.torch import load_file, save_file

from prefixdpo.data.example import Example, Group
from prefixdpo.data.loader import fit_examples
from prefixdpo.model.transformer import build_model
from prefixdpo.train.reference import (TABLE_VERSION, cache_key, model_fingerprint, read_table,
                             reference_log_probs, write_table)

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


def test_cache_key_holds_the_code_version():
    """A table computed by older code (another TABLE_VERSION) is never found again."""
    examples = random_examples(6, 50)
    assert cache_key("m", examples, "float32") == cache_key("m", examples, "float32",
                                                              TABLE_VERSION)
    assert cache_key("m", examples, "float32") != cache_key("m", examples, "float32",
                                                              TABLE_VERSION - 1)


def test_reference_is_scored_in_the_training_row_shape(tmp_path):
    """The table is computed with rows of the training's packing length (512 here, where
    "auto" would pick a shorter one), so compiled layers meet one row shape in the whole run."""
    config = tiny_config()
    model = build_model(config, seed=0)
    examples, _ = fit_examples(random_examples(20, config.vocab_size, max_len=12),
                               "shared+packed", 512, "error")
    shapes = set()
    model.register_forward_pre_hook(lambda module, args: shapes.add(tuple(args[0].shape)))
    table = reference_log_probs(model, examples, key="k", run_dir=tmp_path / "run",
                                cache_dir=tmp_path / "cache", name="train", micro_batch_size=2,
                                packing_length=512, device=CPU, executor=DENSE, rank=0,
                                world_size=1, log=lambda *a: None)
    assert shapes == {(2, 512)}
    assert table.shape == (sum(e.num_sequences for e in examples),)
    assert torch.isfinite(table).all() and (table < 0).all()


def test_table_round_trip_and_key_check(tmp_path):
    table = torch.randn(5)
    write_table(tmp_path / "t.safetensors", "key-a", table)
    assert torch.equal(read_table(tmp_path / "t.safetensors", "key-a", 5), table)
    assert read_table(tmp_path / "t.safetensors", "key-b", 5) is None
    assert read_table(tmp_path / "t.safetensors", "key-a", 6) is None
    assert read_table(tmp_path / "absent.safetensors", "key-a", 5) is None
