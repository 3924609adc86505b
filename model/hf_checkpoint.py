"""Hugging Face checkpoints without transformers: config.json + safetensors, in and out.

Reads `model.safetensors`, or sharded `model-*.safetensors` listed by
`model.safetensors.index.json`, from a local folder or a hub repo id (through huggingface_hub,
which also serves the local cache offline). Writes the same format back: shards of at most
`max_shard_bytes` with an index, plus config.json, loadable by transformers and vLLM.

Names: ours are Hugging Face's without the leading `model.` (see `hf_to_ours`). Tensors are
read with safetensors only; nothing is ever unpickled. Every header is validated before any
data is read (`CheckpointReader`); then tensors are read one at a time, whole or, for a
parameter sharded over ranks, only the rows this rank holds (`load_weights`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Shard

from prefixdpo.model.config import ModelConfig
from prefixdpo.model.local_files import check_files, checked_file
from prefixdpo.model.transformer import Transformer, build_model

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
# Stored dtypes read (and converted to the model's dtype); integer, bool, float8 and unknown
# dtypes (quantized checkpoints) are refused rather than read as numbers they are not.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
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
    """A local folder as is; otherwise a hub repo id, fetched (or found in the HF cache).
    Either way, the files read from it must lie inside it (`model.local_files`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return checked_model_dir(path)
    text = str(name_or_path)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ValueError(f"{text}: no such model folder (expected a local folder with "
                         "config.json and *.safetensors, or a hub repo id like 'org/name')")
    from huggingface_hub import snapshot_download
    # model*.safetensors: some repos also hold a second copy of the weights in another layout
    # (e.g. consolidated.safetensors), which is never read.
    patterns = [CONFIG_FILE, "model*.safetensors", INDEX_FILE, *TOKENIZER_FILES]
    try:
        folder = Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated, ...: one clear message
        raise ValueError(f"{text}: could not fetch from the Hugging Face Hub or find it in the "
                         f"local cache ({type(e).__name__}: {e})") from None
    return checked_model_dir(folder)


def checked_model_dir(folder: Path) -> Path:
    """`folder`, after checking that none of the files a run reads from it (config, weights
    index, tokenizer files) is a link leading outside it; the shards an index lists are checked
    by `checkpoint_files`."""
    check_files(folder, [CONFIG_FILE, SINGLE_FILE, INDEX_FILE, *TOKENIZER_FILES])
    return folder


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded; each one checked
    to lie inside `model_dir` (`model.local_files`)."""
    index = checked_file(model_dir, INDEX_FILE)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: not a valid safetensors index (weight_map is not an "
                             "object of tensor name -> file name)")
        for name, shard in weight_map.items():
            _check_shard_name(index, name, shard)
        files = [checked_file(model_dir, f) for f in sorted(set(weight_map.values()))]
    elif checked_file(model_dir, SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        raise ValueError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found "
                         "(only safetensors checkpoints are read; .bin pickles are refused)")
    for f in files:
        if not f.is_file():
            raise ValueError(f"{f}: listed in {index.name} but missing")
    return files


def _check_shard_name(index: Path, tensor: str, shard: object) -> None:
    """A weight_map entry must name a file inside the model folder as written: relative, with
    no `..`. Where it leads (a link) is checked by `checked_file`."""
    if (not isinstance(shard, str) or not shard or Path(shard).is_absolute()
            or ".." in Path(shard).parts):
        raise ValueError(f"{index}: weight_map entry {shard!r} (tensor {tensor!r}) must be a "
                         "relative file name inside the model folder, without '..'")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for `config`, without allocating anything."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint, as its file's header describes it."""

    file: Path
    hf_name: str
    shape: tuple[int, ...]


class CheckpointReader:
    """A checkpoint's tensors under our names, validated against `config` from the file
    headers alone, before any data is read: unexpected names, duplicates across files, shapes,
    dtypes (floating point only), missing names. Data is then read by rows (`read`), so a rank
    that holds a slice of a parameter reads only that slice. A tied checkpoint may also store
    the head; it must equal the embedding, which is checked row by row as the embedding is
    read."""

    def __init__(self, model_dir: Path, config: ModelConfig):
        self.model_dir = model_dir
        expected = expected_shapes(config)
        if config.tie_word_embeddings:
            # omitted by tied checkpoints, or stored equal to the embedding
            expected.pop("lm_head.weight")
        self.tensors: dict[str, StoredTensor] = {}
        self.tied_head: StoredTensor | None = None
        for file in checkpoint_files(model_dir):
            with _opened(file) as f:
                for hf_name in f.keys():
                    if hf_name.endswith(_IGNORED_SUFFIXES):
                        continue
                    name = hf_to_ours(hf_name)
                    header = f.get_slice(hf_name)
                    stored = StoredTensor(file, hf_name, tuple(header.get_shape()))
                    dtype = header.get_dtype()
                    if dtype not in FLOAT_DTYPES:
                        raise ValueError(f"{file}: tensor {hf_name!r} has dtype {dtype}; expected "
                                         f"{', '.join(FLOAT_DTYPES[:-1])} or {FLOAT_DTYPES[-1]} "
                                         "(quantized checkpoints are not supported)")
                    if config.tie_word_embeddings and name == "lm_head.weight":
                        self._check(stored, expected["embed_tokens.weight"], self.tied_head)
                        self.tied_head = stored
                        continue
                    if name not in expected:
                        raise ValueError(f"{file}: unexpected tensor {hf_name!r} for a "
                                         f"{config.architecture} with {config.num_hidden_layers} "
                                         "layers")
                    self._check(stored, expected[name], self.tensors.get(name))
                    self.tensors[name] = stored
        missing = sorted(ours_to_hf(n) for n in expected if n not in self.tensors)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"{model_dir}: missing tensors {', '.join(missing[:5])}{more}")

    @staticmethod
    def _check(stored: StoredTensor, shape: tuple[int, ...], seen: StoredTensor | None) -> None:
        if seen is not None:
            raise ValueError(f"{stored.file}: tensor {stored.hf_name!r} also in {seen.file}")
        if stored.shape != shape:
            raise ValueError(f"{stored.file}: tensor {stored.hf_name!r} has shape {stored.shape}, "
                             f"expected {shape} from config.json")

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows `[start:stop)` of dim 0 of tensor `name` (all of it by default), in its stored
        dtype, on the CPU; nothing else of the file is read. NaN or infinite values are refused
        (a damaged or diverged checkpoint would otherwise train to NaN losses)."""
        rows = _read_rows(self.tensors[name], start, stop)
        # By blocks of rows: a whole-tensor mask of a large embedding would be another copy.
        if rows.numel() and not all(bool(torch.isfinite(block).all())
                                    for block in rows.split(1024)):
            stored = self.tensors[name]
            raise ValueError(f"{stored.file}: tensor {stored.hf_name!r} holds NaN or infinite "
                             "values; the checkpoint is damaged or comes from a diverged run")
        if name == "embed_tokens.weight" and self.tied_head is not None:
            if not torch.equal(rows, _read_rows(self.tied_head, start, stop)):
                raise ValueError(f"{self.model_dir}: tie_word_embeddings is true but "
                                 "lm_head.weight differs from model.embed_tokens.weight")
        return rows


def _opened(file: Path):
    """safe_open, with a damaged file reported as the user's error (file named)."""
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{file}: not a valid safetensors file, truncated or corrupt "
                         f"({e})") from None


def _read_rows(stored: StoredTensor, start: int, stop: int | None) -> torch.Tensor:
    with _opened(stored.file) as f:
        try:
            return f.get_slice(stored.hf_name)[start:stop]
        except SafetensorError as e:
            raise ValueError(f"{stored.file}: could not read tensor {stored.hf_name!r}, the "
                             f"file is truncated or corrupt ({e})") from None


def iter_tensors(model_dir: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, one at a time and whole, under our names, validated
    against `config` (see `CheckpointReader`). Only one tensor is in memory at a time."""
    reader = CheckpointReader(model_dir, config)
    for name in reader.tensors:
        yield name, reader.read(name)


def load_state_dict(model_dir: Path, config: ModelConfig,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under our names (tied heads omitted), in its own dtype
    or `dtype`."""
    return {name: t if dtype is None else t.to(dtype)
            for name, t in iter_tensors(model_dir, config)}


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The tensor that holds `param`'s values in this process, and the rows `[start, stop)` of
    the full parameter that it holds: all of them for a plain tensor; for a DTensor sharded
    on dim 0 over a one-dimensional mesh (FSDP2's layout), this rank's `torch.chunk` piece,
    which may be short or empty when the rows do not split evenly."""
    if not isinstance(param, DTensor):
        return param, 0, param.shape[0]
    assert param.device_mesh.ndim == 1 and param.placements == (Shard(0),), param.placements
    local = param.to_local()
    num_rows, num_ranks = param.shape[0], param.device_mesh.size()
    chunk = -(-num_rows // num_ranks)
    start = min(param.device_mesh.get_local_rank() * chunk, num_rows)
    stop = min(start + chunk, num_rows)
    assert local.shape == (stop - start, *param.shape[1:]), (local.shape, start, stop)
    return local, start, stop


@torch.no_grad()
def load_weights(model: Transformer, model_dir: Path) -> Transformer:
    """Copy a checkpoint into a materialized model parameter by parameter, converting to the
    model's dtype and device. A parameter sharded over ranks (see `local_rows`) is read only
    for its local rows: host memory holds one tensor, or this rank's slice of one, at a
    time, whatever the model's size."""
    reader = CheckpointReader(model_dir, model.config)
    # The state dict's names are ours whatever wraps the layers; keep_vars: the parameters
    # themselves, written in place.
    params = model.state_dict(keep_vars=True)
    for name in reader.tensors:
        local, start, stop = local_rows(params[name])
        if start < stop:
            local.copy_(reader.read(name, start, stop))
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
    """Copy the tokenizer files of `src` that exist into `dst`; a file of `src` that is a link
    leading outside it is refused (`model.local_files`), never copied."""
    check_files(src, TOKENIZER_FILES)  # all of them before the first is copied
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
