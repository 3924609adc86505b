"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

A checkpoint is a folder `output_dir/step_00000100/` holding
- the DCP files of `{"model": ..., "optim": ...}` (sharded; each rank writes its shards),
- `train_state.json`: step, loader position, loss state, counters (rank 0),
- `rng_rank{r}.safetensors`: each rank's torch RNG state,
- `config.toml`: the resolved config of the run.

It is written to a hidden `.step_00000100.tmp/` and renamed into place only when every rank's
part is on disk, so a crash or a full disk mid-save leaves the previous checkpoints whole.
Older checkpoints beyond `keep_last` are deleted after the rename. Only folders with a
`train_state.json` count as checkpoints. Our own files are JSON and safetensors; DCP keeps its
`.metadata` as a pickle, so resume only from checkpoints you wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)

from train.distributed import Distributed, all_reduce_sum

STATE_FILE = "train_state.json"
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
                    config_toml: str, keep_last: int, env: Distributed) -> Path:
    """Collective: every rank calls it. Raises ValueError (on every rank) if any rank failed,
    after removing the partial folder; earlier checkpoints are untouched."""
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
        dcp.save(state, checkpoint_id=tmp)
        save_file(_rng_state(), tmp / f"rng_rank{rank}.safetensors")
        if rank == 0:
            (tmp / "config.toml").write_text(config_toml)
            _write_json(tmp / STATE_FILE, train_state)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - reported on all ranks below
        error = describe(e)
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
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int) -> dict[str, Any]:
    """Restore model, optimizer and RNG in place; return the train state."""
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, optimizer)}
    try:
        dcp.load(state, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - does not fit this run
        raise ValueError(
            f"{path}: cannot resume from this checkpoint ({describe(e)}); it does not match "
            "this run's model or optimizer. Use another train.output_dir, or set "
            "checkpoint.resume = false") from None
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    try:
        return json.loads((path / STATE_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / STATE_FILE}: not valid JSON ({e})") from None


def describe(error: BaseException) -> str:
    """One line for an error; DCP wraps each rank's error with its traceback, so unwrap it."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


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
