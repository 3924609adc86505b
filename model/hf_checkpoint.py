"""Hugging Face checkpoints without transformers: config.json + safetensors, in and out.

Reads `model.safetensors`, or sharded `model-*.safetensors` listed by
`model.safetensors.index.json`, from a local folder or a hub repo id (through huggingface_hub,
which also serves the local cache offline). Writes the same format back: shards of at most
`max_shard_bytes` with an index, plus config.json, loadable by transformers and vLLM.

Names: ours are Hugging Face's without the leading `model.` (see `hf_to_ours`). Tensors are
read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from model.transformer import Transformer, build_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")
# Saved by some older checkpoints; derived from the config here, so safe to ignore.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_to_ours(name: str) -> str:
    return name.removeprefix("model.")


def ours_to_hf(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub repo id, fetched (or found in the HF cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ValueError(f"{text}: no such model folder (expected a local folder with "
                         "config.json and *.safetensors, or a hub repo id like 'org/name')")
    from huggingface_hub import snapshot_download
    # model*.safetensors: some repos also hold a second copy of the weights in another layout
    # (e.g. consolidated.safetensors), which is never read.
    patterns = ["config.json", "model*.safetensors", INDEX_FILE, *TOKENIZER_FILES]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated, ...: one clear message
        raise ValueError(f"{text}: could not fetch from the Hugging Face Hub or find it in the "
                         f"local cache ({type(e).__name__}: {e})") from None


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    elif (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        raise ValueError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found "
                         "(only safetensors checkpoints are read; .bin pickles are refused)")
    for f in files:
        if not f.is_file():
            raise ValueError(f"{f}: listed in {index.name} but missing")
    return files


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for `config`, without allocating anything."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def iter_tensors(model_dir: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, one at a time, under our names, validated against
    `config`: unexpected names, duplicates and shapes as they come, missing names at the end.
    Only one tensor is in memory at a time."""
    expected = expected_shapes(config)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # omitted by tied checkpoints, or equal to the embedding
    source: dict[str, Path] = {}
    head = None
    for file in checkpoint_files(model_dir):
        try:
            with safe_open(file, framework="pt") as f:
                for hf_name in f.keys():
                    if hf_name.endswith(_IGNORED_SUFFIXES):
                        continue
                    name = hf_to_ours(hf_name)
                    if config.tie_word_embeddings and name == "lm_head.weight":
                        head = f.get_tensor(hf_name)
                        continue
                    if name not in expected:
                        raise ValueError(f"{file}: unexpected tensor {hf_name!r} for a "
                                         f"{config.architecture} with {config.num_hidden_layers} "
                                         "layers")
                    if name in source:
                        raise ValueError(f"{file}: tensor {hf_name!r} also in {source[name]}")
                    tensor = f.get_tensor(hf_name)
                    if tuple(tensor.shape) != expected[name]:
                        raise ValueError(f"{file}: tensor {hf_name!r} has shape "
                                         f"{tuple(tensor.shape)}, expected {expected[name]} "
                                         "from config.json")
                    source[name] = file
                    yield name, tensor
        except SafetensorError as e:
            raise ValueError(f"{file}: not a valid safetensors file, truncated or corrupt "
                             f"({e})") from None
    missing = sorted(ours_to_hf(n) for n in expected if n not in source)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{model_dir}: missing tensors {', '.join(missing[:5])}{more}")
    if head is not None:  # a tied checkpoint that also stores the head: it must be the same
        with safe_open(source["embed_tokens.weight"], framework="pt") as f:
            embedding = f.get_tensor(ours_to_hf("embed_tokens.weight"))
        if not torch.equal(head, embedding):
            raise ValueError(f"{model_dir}: tie_word_embeddings is true but lm_head.weight "
                             "differs from model.embed_tokens.weight")


def load_state_dict(model_dir: Path, config: ModelConfig,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under our names (tied heads omitted), in its own dtype
    or `dtype`."""
    return {name: t if dtype is None else t.to(dtype)
            for name, t in iter_tensors(model_dir, config)}


@torch.no_grad()
def load_weights(model: Transformer, model_dir: Path) -> Transformer:
    """Copy a checkpoint into a materialized model tensor by tensor, converting to the model's
    dtype and device: host memory holds one tensor at a time, whatever the model's size."""
    params = dict(model.named_parameters())
    for name, tensor in iter_tensors(model_dir, model.config):
        params[name].copy_(tensor)
    return model


def load_model(name_or_path: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Transformer:
    """A ready model from a Hugging Face checkpoint folder or hub repo id."""
    model_dir = resolve_model_dir(name_or_path)
    model = build_model(ModelConfig.from_file(model_dir), device=device, dtype=dtype)
    return load_weights(model, model_dir)


def save_hf_checkpoint(state: Mapping[str, torch.Tensor], config: ModelConfig,
                       out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
                       tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write `state` (our names) as config.json + safetensors shards (+ index when more than
    one), and copy tokenizer files from `tokenizer_dir` when given. Tied heads are omitted,
    as transformers does."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {ours_to_hf(n): t.detach().to("cpu").contiguous() for n, t in state.items()
               if not (config.tie_word_embeddings and n == "lm_head.weight")}
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name in sorted(tensors, key=_layer_order):
        size = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensors[name]
        shard_bytes += size
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out / SINGLE_FILE, metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / file, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    hf_config = config.to_hf_dict()
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:
        dtype_name = str(dtypes.pop()).removeprefix("torch.")
        hf_config["torch_dtype"] = dtype_name
        if "dtype" in hf_config:
            hf_config["dtype"] = dtype_name
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), out)
    return out


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _layer_order(hf_name: str) -> tuple[int, str]:
    # Embedding first, then layers in numeric order, then norm and head: shards follow the model.
    parts = hf_name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return (int(parts[2]) + 1, hf_name)
    return (0 if "embed_tokens" in hf_name else 10**9, hf_name)
