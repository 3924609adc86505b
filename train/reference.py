"""Precomputed reference log-probs: one no-grad pass of the initial model, cached on disk.

The reference of DPO is the model before training, so its log-prob of every sequence can be
computed once, in the shared packed layout (the cheapest), and looked up during training
instead of running a second model. The table is keyed by what determines it:
- the model: config.json and a fingerprint of the weights (safetensors headers, sizes and
  sampled bytes), or the config and seed of a random initialization;
- the data: every token of every example after tokenization and truncation;
- the compute dtype.
It is looked up in the run's own folder first (so a resumed run never depends on the shared
cache), then in the shared cache, and computed only when neither has it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data.example import Example
from data.layout import Batch, Numbering
from data.loader import fit_examples
from model.masks import AttentionMask
from train.forward import Reference, batch_sequence_log_probs
from model.hf_checkpoint import checkpoint_files
from train.scoring import score_sequences

__all__ = ["LiveReference", "Reference", "TableReference", "no_reference", "reference_log_probs"]

RUN_FILE = "reference_logps{suffix}.safetensors"
_SAMPLES_PER_FILE = 16
_SAMPLE_BYTES = 1 << 16


def default_cache_dir() -> Path:
    return Path(os.environ.get("PREFIXDPO_CACHE", Path.home() / ".cache" / "prefixdpo")) \
        / "reference"


def model_fingerprint(model_dir: Path | None, config_path: Path | None, seed: int) -> str:
    """Identifies the initial weights without reading them all."""
    h = hashlib.sha256()
    if model_dir is None:
        h.update(config_path.read_bytes())
        h.update(f"random-init seed={seed}".encode())
        return h.hexdigest()
    h.update((model_dir / "config.json").read_bytes())
    for file in checkpoint_files(model_dir):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, 1 << 26)))
            for k in range(_SAMPLES_PER_FILE):
                f.seek(max(0, size * k // _SAMPLES_PER_FILE - _SAMPLE_BYTES))
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def data_fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        for g in e.groups:
            h.update(np.int64(len(g.prompt)).tobytes())
            h.update(np.ascontiguousarray(g.prompt, np.int32).tobytes())
            for c in g.completions:
                h.update(np.int64(len(c)).tobytes())
                h.update(np.ascontiguousarray(c, np.int32).tobytes())
        h.update(b"|")
    return h.hexdigest()


def cache_key(model_id: str, examples: Sequence[Example], dtype: str) -> str:
    return hashlib.sha256(f"{model_id}/{data_fingerprint(examples)}/{dtype}".encode()
                          ).hexdigest()[:40]


def read_table(path: Path, key: str, num_sequences: int) -> torch.Tensor | None:
    """The cached table when `path` holds the one for `key`, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            table = f.get_tensor("logps")
    except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed, not fatal
        return None
    return table if table.shape == (num_sequences,) else None


def write_table(path: Path, key: str, table: torch.Tensor) -> None:
    """Atomic: written beside, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"logps": table.detach().cpu().contiguous()}, tmp, metadata={"key": key})
    os.replace(tmp, path)


def reference_log_probs(model: torch.nn.Module, examples: Sequence[Example], *, key: str,
                        run_dir: Path, cache_dir: Path, name: str, micro_batch_size: int,
                        device: torch.device, use_flex: bool, rank: int, world_size: int,
                        log=print) -> torch.Tensor:
    """Float32 `[num_sequences]` reference log-probs of `examples` on `device`.

    `model` must hold the initial weights when the table has to be computed. Collective when
    it computes (every rank scores its share)."""
    num_sequences = Numbering(examples).num_sequences
    run_file = run_dir / RUN_FILE.format(suffix=f"_{name}")
    cache_file = cache_dir / f"{key}.safetensors"
    for source in (run_file, cache_file):
        table = read_table(source, key, num_sequences)
        if table is not None:
            log(f"reference log-probs ({name}): loaded {source}")
            if rank == 0 and source != run_file:
                write_table(run_file, key, table)
            return table.to(device)
    log(f"reference log-probs ({name}): computing {num_sequences} sequences "
        "(one no-grad pass, shared+packed layout)")
    fitted, report = fit_examples(examples, "shared+packed", "auto", "error")
    logps, _ = score_sequences(model, fitted, layout="shared+packed",
                               packing_length=report.packing_length,
                               micro_batch_size=micro_batch_size, device=device,
                               use_flex=use_flex, rank=rank, world_size=world_size,
                               progress=rank == 0)
    table = logps.float()
    if rank == 0:
        for path in (cache_file, run_file):
            try:
                write_table(path, key, table)
            except OSError as e:
                log(f"warning: could not write {path} ({e}); the table will be recomputed "
                    "next time")
    return table


class TableReference:
    """Reference log-probs looked up by dataset-wide sequence number."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, batch: Batch, mask: AttentionMask) -> torch.Tensor:
        return self.table[batch.sequence_ids]


class LiveReference:
    """A frozen copy of the initial model, run on the same batch and mask as the policy."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, batch: Batch, mask: AttentionMask) -> torch.Tensor:
        return batch_sequence_log_probs(self.model, batch, mask)[0]


def no_reference(batch: Batch, mask: AttentionMask) -> None:
    """Reference-free losses (simpo, sft)."""
    return None
