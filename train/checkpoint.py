"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

A checkpoint is a folder `output_dir/step_00000100/` holding
- the DCP files of `{"model": ..., "optim": ...}` (sharded; each rank writes its shards), and
  `"reference"` for a reference that changes during training (TR-DPO's synced live one),
- `train_state.json`: step, loader position, loss state, counters (rank 0),
- `rng_rank{r}.safetensors`: each rank's torch RNG state,
- `config.toml`: the resolved config of the run.

A resume compares what defines the run with the checkpoint's (`check_resume`): the whole
`[model]`, `[loss]`, `[reference]` and `[lora]` sections of its config.toml (but where the
reference cache lives and whether merged weights are exported), and the fingerprint of the
initial weights saved in train_state.json. A difference is refused in one line naming the keys,
unless `checkpoint.resume = "force"`; the data is compared by the loader (`load_state_dict`).
A checkpoint whose train_state.json or config.toml cannot be read counts as incomplete: the one
before it is used.

It is written to a hidden `.step_00000100.tmp/` and renamed into place only when every rank's
part is on disk, so a crash or a full disk mid-save leaves the previous checkpoints whole.
Older checkpoints beyond `keep_last` are deleted after the rename. Only folders with a
`train_state.json` count as checkpoints; pruning deletes that marker first. Our own files are
JSON and safetensors. DCP keeps its `.metadata` as a pickle and its non-tensor entries as
`torch.save` blobs: the metadata is read first with only DCP's metadata types allowed, and the
blobs with `weights_only=True`, but checkpoints remain trusted input: resume only from folders
you wrote.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)

from prefixdpo.train.distributed import Distributed, all_reduce_sum
from prefixdpo.train.run_dir import reason

STATE_FILE = "train_state.json"
CONFIG_FILE = "config.toml"
# The config sections that define what a run trains (its objective and model), compared whole
# on resume, so options added to them later are covered too; and the keys in them that may
# change (where things are cached or written, not what is computed).
RUN_SECTIONS = ("model", "loss", "reference", "lora")
MAY_CHANGE = ("reference.cache_dir", "lora.export_merged")
# Keys not worth a note when they differ: the folder itself, and how resuming was asked for.
_UNNOTED = ("train.output_dir", "checkpoint.resume")
# The globals DCP's `.metadata` pickle names (as torch 2.13 writes it): its own metadata classes
# and the torch and pathlib types they hold. torch's FileSystemReader unpickles the file with plain
# `pickle.load`; it is read first with only these allowed, so a file naming anything else is
# refused before DCP reads it.
_METADATA = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    (_METADATA, "Metadata"), (_METADATA, "MetadataIndex"), (_METADATA, "StorageMeta"),
    (_METADATA, "TensorProperties"), (_METADATA, "TensorStorageMetadata"),
    (_METADATA, "BytesStorageMetadata"), (_METADATA, "ChunkStorageMetadata"),
    (_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict")}
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir()
             if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(output_dir: Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, train_state: dict[str, Any],
                    config_toml: str, keep_last: int, env: Distributed,
                    reference: nn.Module | None = None) -> Path:
    """Collective: every rank calls it. Raises ValueError (on every rank) if any rank failed,
    after removing the partial folder; earlier checkpoints are untouched. `reference`: a
    reference model whose weights change during training, saved with the model."""
    final = output_dir / checkpoint_name(step)
    tmp = output_dir / f".{final.name}.tmp"
    rank = env.rank
    error = ""
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        state = {"model": get_model_state_dict(model),
                 "optim": get_optimizer_state_dict(model, optimizer)}
        if reference is not None:
            state["reference"] = get_model_state_dict(reference)
        dcp.save(state, checkpoint_id=tmp)
        save_file(_rng_state(), tmp / f"rng_rank{rank}.safetensors")
        if rank == 0:
            (tmp / CONFIG_FILE).write_text(config_toml)
            _write_json(tmp / STATE_FILE, train_state)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - reported on all ranks below
        error = reason(unwrapped(e), output_dir)
    failed = all_reduce_sum([float(bool(error))], env.device)[0]
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else ""
        raise ValueError(f"saving checkpoint {final} failed ({error or 'on another rank'})"
                         f"{kept}. Free disk space or change train.output_dir")
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        prune(output_dir, keep_last)
    _barrier()
    return final


def prune(output_dir: Path, keep_last: int) -> None:
    """Delete the checkpoints older than the last `keep_last`. The completion marker goes
    first, so a kill mid-deletion leaves a folder that no longer counts as a checkpoint rather
    than one that counts but lacks data files; such leftovers are deleted here too."""
    kept = list_checkpoints(output_dir)[-keep_last:]
    newest_kept = kept[0].name if kept else ""
    for old in output_dir.iterdir():
        if _NAME.match(old.name) and old.name < newest_kept:
            (old / STATE_FILE).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int, reference: nn.Module | None = None) -> dict[str, Any]:
    """Restore model, optimizer, RNG (and `reference`, when given) in place; return the train
    state. A checkpoint with files missing or its train state damaged raises
    IncompleteCheckpoint, before DCP reads anything."""
    saved, _ = read_run_files(path)
    metadata = check_metadata(path)
    if metadata is None:
        raise IncompleteCheckpoint(f"{path} is incomplete (its .metadata file is missing)")
    missing = sorted({info.relative_path for info in metadata.storage_data.values()
                      if not (path / info.relative_path).is_file()})
    if missing:
        raise IncompleteCheckpoint(f"{path} is incomplete ({missing[0]} is missing"
                                   + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
                                   + ")")
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, optimizer)}
    if reference is not None:
        state["reference"] = get_model_state_dict(reference)
    try:
        dcp.load(state, checkpoint_id=path, planner=_WeightsOnlyLoadPlanner())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - does not fit this run
        if _missing_file(e):
            raise IncompleteCheckpoint(f"{path} is incomplete ({describe(e)})") from None
        raise ValueError(
            f"{path}: cannot resume from this checkpoint ({describe(e)}); it does not match "
            "this run's model or optimizer. Use another train.output_dir, or set "
            "checkpoint.resume = false") from None
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    if reference is not None:
        set_model_state_dict(reference, state["reference"])
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return saved


def read_run_files(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train state, run config) of a checkpoint, from train_state.json and config.toml (an
    empty config when there is none); IncompleteCheckpoint when either cannot be read."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError(f"expected a JSON object, found {type(state).__name__}")
        file = path / CONFIG_FILE
        config = tomllib.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (OSError, ValueError) as e:  # JSON, TOML and UTF-8 errors are ValueErrors
        raise IncompleteCheckpoint(f"{file} is damaged ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return state, config


def check_resume(path: Path, saved: dict[str, Any], saved_config: dict[str, Any],
                 config_toml: str, model_id: str | None, force: bool,
                 log: Callable[[str], None]) -> None:
    """Refuse (ValueError, one line naming the keys) to resume from `path` when what defines
    the run differs from its checkpoint's: a key of RUN_SECTIONS (MAY_CHANGE aside), or the
    fingerprint of the initial weights (`model_id`, when both runs have one). With `force`, log
    the difference and go on. Other keys that changed are logged."""
    current = tomllib.loads(config_toml)
    refused, changed = [], []
    for section, values in current.items():
        before = saved_config.get(section)
        if not isinstance(before, dict):
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            # A key the checkpoint lacks did not exist when it was written: nothing to compare.
            if key not in before or before[key] == value or name in _UNNOTED:
                continue
            change = f"{name} ({_toml_text(before[key])} -> {_toml_text(value)})"
            (refused if section in RUN_SECTIONS and name not in MAY_CHANGE else changed).append(
                change)
    saved_id = saved.get("run", {}).get("model") if isinstance(saved.get("run"), dict) else None
    if model_id and saved_id and model_id != saved_id and not any(
            c.startswith("model.") for c in refused):
        refused.append("the initial weights (the file of model.config or the files of "
                       "model.path changed since: their fingerprint differs)")
    if refused:
        what = "; ".join(refused)
        if not force:
            raise ValueError(
                f"cannot resume from {path}: what defines the run differs from its run's: "
                f"{what}. Set it back, choose another train.output_dir, or set "
                "checkpoint.resume = \"force\" to resume with it changed")
        log(f"warning: checkpoint.resume = 'force': resuming from {path} with {what} changed")
    if changed:
        log(f"resuming with changed settings: {', '.join(changed)}")


def _toml_text(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}")


def check_metadata(path: Path) -> Any:
    """Read `path/.metadata` allowing only the types DCP metadata holds, and return it (None
    when the file is missing); ValueError if it names anything else."""
    file = path / ".metadata"
    if not file.is_file():
        return None
    try:
        with open(file, "rb") as f:
            return _MetadataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - any failure: not metadata this trainer wrote
        raise ValueError(f"{file}: not checkpoint metadata as this trainer writes it ({e}); "
                         "resume only from checkpoints you wrote") from None


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, with the non-tensor entries (the optimizer's hyperparameters) read
    by `torch.load(weights_only=True)` instead of the default planner's full unpickling."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        safe = io.BytesIO()  # handed on re-serialized: only what the safe load accepted
        torch.save(loaded, safe)
        safe.seek(0)
        super().load_bytes(read_item, safe)


class IncompleteCheckpoint(ValueError):
    """A checkpoint folder marked complete whose files are partly gone (deleted by hand, or by
    a run killed while pruning it before pruning removed the marker first) or damaged."""


def _missing_file(error: BaseException) -> bool:
    """Whether DCP failed for a file that is not there (on any rank). DCP reports a missing
    data file as FileNotFoundError and missing metadata as an assertion naming errno 2."""
    failures = [error]
    if isinstance(error, CheckpointException) and error.failures:
        failures = [failure[0] if isinstance(failure, tuple) else failure
                    for failure in error.failures.values()]
    return any(isinstance(f, FileNotFoundError) or "[Errno 2]" in str(f) for f in failures)


def describe(error: BaseException) -> str:
    """One line for an error; DCP wraps each rank's error with its traceback, so unwrap it."""
    error = unwrapped(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def unwrapped(error: BaseException) -> BaseException:
    """The error of the first failing rank inside DCP's CheckpointException (else `error`)."""
    if isinstance(error, CheckpointException) and error.failures:
        failure = next(iter(error.failures.values()))
        return failure[0] if isinstance(failure, tuple) else failure
    return error


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
