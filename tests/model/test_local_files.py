"""Model and tokenizer folders are read from inside only: a symbolic link among their files that
leads outside is refused in one line before it is opened, except the Hugging Face hub cache's
own layout (snapshot links into the same repo's blobs/). Real links in temporary folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from prefixdpo.data.tokenizer import load_tokenizer
from prefixdpo.model.hf_checkpoint import (copy_tokenizer_files, load_model, resolve_model_dir,
                                           save_hf_checkpoint)
from prefixdpo.model.transformer import build_model

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "assets/tokenizers/mistral-7b-v0.1"
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def model_folder(folder: Path, seed: int = 0, max_shard_bytes: int = 5 * 2**30) -> Path:
    """A tiny checkpoint with the Mistral tokenizer files, as a plain folder."""
    model = build_model(tiny_config(vocab_size=32000), seed=seed)
    save_hf_checkpoint(model.state_dict(), model.config, folder, max_shard_bytes=max_shard_bytes,
                       tokenizer_dir=TOKENIZER)
    return folder


def assert_refused(error: pytest.ExceptionInfo, link: Path, outside: Path) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    assert str(link) in message and str(outside.resolve()) in message, message
    assert "outside the folder" in message, message


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_link_to_a_file_outside_the_model_folder_is_refused(tmp_path, name):
    """Before: a model.safetensors linked to another checkpoint's weights trained with exit 0."""
    elsewhere = model_folder(tmp_path / "elsewhere", seed=1)
    folder = model_folder(tmp_path / "model")
    (folder / name).unlink()
    (folder / name).symlink_to(elsewhere / name)
    with pytest.raises(ValueError) as error:
        load_model(folder)
    assert_refused(error, folder / name, elsewhere / name)


def test_a_link_to_a_system_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """Named like a weight file or a tokenizer file, /etc/passwd is never opened: the check
    comes first (before: it was opened and only its parsing failed)."""
    folder = model_folder(tmp_path / "model")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    for name in ("model.safetensors", "tokenizer.json"):
        (folder / name).unlink()
        (folder / name).symlink_to(secret)
    opened = []
    real_open = open

    def spying_open(file, *args, **kwargs):
        opened.append(Path(file).resolve() if isinstance(file, (str, Path)) else file)
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr("builtins.open", spying_open)
    with pytest.raises(ValueError) as error:
        resolve_model_dir(folder)
    assert_refused(error, folder / "model.safetensors", secret)
    with pytest.raises(ValueError) as error:
        load_tokenizer(folder)
    assert_refused(error, folder / "tokenizer.json", secret)
    assert secret.resolve() not in opened


def test_a_shard_listed_in_the_index_may_not_lead_outside(tmp_path):
    folder = model_folder(tmp_path / "model", max_shard_bytes=200_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    moved = tmp_path / "moved.safetensors"
    shutil.move(folder / shard, moved)
    (folder / shard).symlink_to(moved)
    with pytest.raises(ValueError) as error:
        load_model(folder)
    assert_refused(error, folder / shard, moved)


def test_links_inside_the_folder_and_a_linked_folder_are_followed(tmp_path):
    folder = model_folder(tmp_path / "model")
    (folder / "weights").mkdir()
    shutil.move(folder / "model.safetensors", folder / "weights" / "v1.safetensors")
    (folder / "model.safetensors").symlink_to("weights/v1.safetensors")
    (tmp_path / "alias").symlink_to(folder)  # the folder itself, named through a link
    expected = build_model(tiny_config(vocab_size=32000), seed=0).state_dict()
    loaded = load_model(tmp_path / "alias").state_dict()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    assert load_tokenizer(tmp_path / "alias").eos_id == 2


def hub_cache(root: Path, repo: str, source: Path) -> Path:
    """`source`'s files laid out as the Hugging Face hub cache does: the content in
    `models--org--name/blobs/<name>`, and snapshots/abc/<file> -> ../../blobs/<name>."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot = repo_dir / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        blob = f"blob-{abs(hash(file.name)):x}"
        shutil.copyfile(file, repo_dir / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


def test_the_hub_cache_layout_is_read(tmp_path):
    snapshot = hub_cache(tmp_path / "hub", "org/name", model_folder(tmp_path / "model"))
    assert all((snapshot / f).is_symlink() for f in ("config.json", "model.safetensors"))
    expected = build_model(tiny_config(vocab_size=32000), seed=0).state_dict()
    loaded = load_model(snapshot).state_dict()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    tokenizer = load_tokenizer(snapshot)
    assert tokenizer.encode(["hello"]) == load_tokenizer(TOKENIZER).encode(["hello"])
    out = tmp_path / "export"
    out.mkdir()
    assert sorted(copy_tokenizer_files(snapshot, out)) == sorted(TOKENIZER_NAMES)
    assert not any(p.is_symlink() for p in out.iterdir())


def test_a_snapshot_link_into_another_repos_blobs_is_refused(tmp_path):
    snapshot = hub_cache(tmp_path / "hub", "org/name", model_folder(tmp_path / "model"))
    other = hub_cache(tmp_path / "hub", "evil/other", model_folder(tmp_path / "other", seed=1))
    target = (other / "model.safetensors").resolve()
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(
        Path("..", "..", "..", other.parents[1].name, "blobs", target.name))
    with pytest.raises(ValueError) as error:
        load_model(snapshot)
    assert_refused(error, snapshot / "model.safetensors", target)


def test_a_tokenizer_folder_and_the_export_copy_check_links(tmp_path):
    """data.tokenizer names a folder: the same rule. Copying tokenizer files into an export
    (tokenizer.model, generation_config.json, ...) never copies a file from outside."""
    folder = tmp_path / "tok"
    shutil.copytree(TOKENIZER, folder)
    outside = tmp_path / "private.json"
    outside.write_text("{}")
    (folder / "generation_config.json").symlink_to(outside)
    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(ValueError) as error:
        copy_tokenizer_files(folder, out)
    assert_refused(error, folder / "generation_config.json", outside)
    assert list(out.iterdir()) == []
    (folder / "generation_config.json").unlink()
    (folder / "chat_template.jinja").symlink_to(outside)
    with pytest.raises(ValueError) as error:
        load_tokenizer(folder)
    assert_refused(error, folder / "chat_template.jinja", outside)
