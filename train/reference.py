"""Precomputed reference log-probs: one no-grad pass of the initial model, cached on disk.

The reference of DPO is the model before training, so its log-prob of every sequence can be
computed once, in the shared packed layout (the cheapest), and looked up during training
instead of running a second model. The table is keyed by what determines it:
- the model: config.json and a SHA-256 digest of every byte of every safetensors file (read
  once, then remembered by path, size, modification time and inode), or the config and seed of
  a random initialization;
- the data: every token of every example after tokenization and truncation;
- the compute dtype;
- `TABLE_VERSION`, the version of the code that computes a table (model, kernels, scoring):
  raised whenever a change to them could change the numbers, so a table computed by older code
  is never reused from the shared cache.
It is looked up in the run's own folder first (so a resumed run never depends on the shared
cache), then in the shared cache, and computed only when neither has it. A resumed run takes
the run folder's table whatever its key (the table its checkpoints were trained against; a
changed model is refused before, see `train.checkpoint.check_resume`) and never replaces it.

LD-DPO (`loss.ld_alpha` < 1) also needs, per pair, each side's sum over its first
min(n_chosen, n_rejected) tokens (`shared`, `[num_pairs, 2]`, in the dataset's pair
numbering). It does not depend on ld_alpha, so it is stored beside the sums in the same file
under the same key; a table without it is computed again when a run needs it.

A live reference with `reference.sync_ref_model` (TR-DPO) is moved towards the policy every
`ref_model_sync_steps` steps (`LiveReference.sync`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from prefixdpo.data.example import Example, fingerprint
from prefixdpo.data.layout import Batch, Numbering
from prefixdpo.data.loader import fit_examples
from prefixdpo.model.executor import AttentionExecutor, LayerMasks
from prefixdpo.train.forward import Reference, sequence_and_prefix_log_probs
from prefixdpo.train.parallelize import reshard
from prefixdpo.model.hf_checkpoint import checkpoint_files
from prefixdpo.train.distributed import all_reduce_sum
from prefixdpo.train.run_dir import error_code, reason
from prefixdpo.train.scoring import score_sequences

__all__ = ["LiveReference", "Reference", "TableReference", "no_reference", "reference_log_probs"]

RUN_FILE = "reference_logps{suffix}.safetensors"
# Part of every table's key: raise it with any change that can alter the log-probs computed.
TABLE_VERSION = 2
_DIGESTS = "file_digests.json"  # in the cache folder: digests of checkpoint files already read


def default_cache_dir() -> Path:
    return Path(os.environ.get("PREFIXDPO_CACHE", Path.home() / ".cache" / "prefixdpo")) \
        / "reference"


def model_fingerprint(model_dir: Path | None, config_path: Path | None, seed: int,
                      device: torch.device, cache_dir: Path) -> str:
    """Identifies the initial weights: the config and a digest of every checkpoint file (read
    once, then remembered in the cache folder by path, size, modification time and inode), or
    for a random initialization the config, the seed and what the random numbers depend on
    (the device kind and the torch version)."""
    h = hashlib.sha256()
    if model_dir is None:
        h.update(config_path.read_bytes())
        kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        h.update(f"random-init seed={seed} on {kind} torch {torch.__version__}".encode())
        return h.hexdigest()
    h.update((model_dir / "config.json").read_bytes())
    memo_file = cache_dir / _DIGESTS
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    for file in checkpoint_files(model_dir):
        stat = file.resolve().stat()
        memo_key = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
        if memo_key not in memo:
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            memo[memo_key] = digest.hexdigest()
        h.update(f"{file.name}:{memo[memo_key]}".encode())
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f".{memo_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError:
        pass  # only a time saving: the digests are recomputed next time
    return h.hexdigest()


def cache_key(model_id: str, examples: Sequence[Example], dtype: str,
              version: int = TABLE_VERSION) -> str:
    text = f"v{version}/{model_id}/{fingerprint(examples)}/{dtype}"
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def read_table(path: Path, key: str | None, num_sequences: int, num_pairs: int | None = None
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """The cached table when `path` holds the one for `key` (any key: None), else None. With
    `num_pairs`, `(table, shared)`, and None when the file has no LD-DPO `shared` table of that
    size."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            if key is not None and (f.metadata() or {}).get("key") != key:
                return None
            table = f.get_tensor("logps")
            shared = None
            if num_pairs is not None:
                if "shared" not in f.keys():
                    return None
                shared = f.get_tensor("shared")
    except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed, not fatal
        return None
    if table.shape != (num_sequences,):
        return None
    if num_pairs is None:
        return table
    return (table, shared) if shared.shape == (num_pairs, 2) else None


def write_table(path: Path, key: str, table: torch.Tensor,
                shared: torch.Tensor | None = None) -> None:
    """Atomic: written beside, then renamed; a failed write leaves no partial file and raises
    OSError (safetensors' own error type included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors = {"logps": table.detach().cpu().contiguous()}
    if shared is not None:
        tensors["shared"] = shared.detach().cpu().contiguous()
    try:
        save_file(tensors, tmp, metadata={"key": key})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise OSError(error_code(e), reason(e)) from None


def _write_copies(paths: Sequence[Path], key: str, table: torch.Tensor, log,
                  shared: torch.Tensor | None = None) -> None:
    """Write the table to each path; a failure is one warning line, not fatal: the table is
    only a time saving and is recomputed next time."""
    for path in paths:
        try:
            write_table(path, key, table, shared)
        except OSError as e:
            log(f"warning: could not write {path} ({e.strerror or e}); the reference "
                "log-probs will be recomputed next time")


def reference_log_probs(model: torch.nn.Module, examples: Sequence[Example], *, key: str,
                        run_dir: Path, cache_dir: Path, name: str, micro_batch_size: int,
                        packing_length: int | str, device: torch.device,
                        executor: AttentionExecutor, rank: int, world_size: int, log=print,
                        shared_prefix: bool = False, resuming: bool = False
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Float32 `[num_sequences]` reference log-probs of `examples` on `device`; with
    `shared_prefix` (LD-DPO), `(table, shared)` with `shared` the float32 `[num_pairs, 2]`
    shared-prefix sums of each pair's chosen and rejected completions.

    Scored in the shared+packed layout with `micro_batch_size` rows of `packing_length` (pass
    the training's, so that compiled layers see one row shape in the whole run; "auto" when
    training is unpacked).

    `model` must hold the initial weights when the table has to be computed. Collective: the
    ranks agree on loading or computing (a cache on one node's local disk is not on another's),
    and when they compute, every rank scores its share. Rank 0 writes the files. `resuming`:
    the run folder's table is taken whatever its key, and is never written over."""
    numbering = Numbering(examples)
    num_sequences = numbering.num_sequences
    num_pairs = numbering.num_pairs if shared_prefix else None
    run_file = run_dir / RUN_FILE.format(suffix=f"_{name}")
    cache_file = cache_dir / f"{key}.safetensors"
    found, source = None, None
    for candidate, wanted in ((run_file, None if resuming else key), (cache_file, key)):
        found = read_table(candidate, wanted, num_sequences, num_pairs)
        if found is not None:
            source = candidate
            break
    table, shared = found if shared_prefix and found is not None else (found, None)
    if all_reduce_sum([float(found is not None)], device)[0] == world_size:
        log(f"reference log-probs ({name}): loaded {source}")
        if rank == 0 and source != run_file and not (resuming and run_file.exists()):
            _write_copies([run_file], key, table, log, shared)
        return (table.to(device), shared.to(device)) if shared_prefix else table.to(device)
    also = "and their pairs' shared prefixes " if shared_prefix else ""
    log(f"reference log-probs ({name}): computing {num_sequences} sequences {also}"
        "(one no-grad pass, shared+packed layout)")
    fitted, report = fit_examples(examples, "shared+packed", packing_length, "error")
    scored = score_sequences(model, fitted, layout="shared+packed",
                             packing_length=report.packing_length,
                             micro_batch_size=micro_batch_size, device=device,
                             executor=executor, rank=rank, world_size=world_size,
                             progress=rank == 0, shared_prefix=shared_prefix)
    table = scored[0].float()
    shared = scored[2].float() if shared_prefix else None
    if rank == 0:
        keep = resuming and run_file.exists()  # the run's own: never written over
        if keep:
            log(f"warning: {run_file} is not used (unreadable, or without what this run "
                "needs); the recomputed table is not written over it")
        _write_copies([cache_file] + ([] if keep else [run_file]), key, table, log, shared)
    return (table, shared) if shared_prefix else table


class TableReference:
    """Reference log-probs looked up by dataset-wide sequence number (and, for LD-DPO, the
    shared-prefix sums by dataset-wide pair number)."""

    def __init__(self, table: torch.Tensor, shared: torch.Tensor | None = None):
        self.table = table
        self.shared = shared

    def __call__(self, batch: Batch, masks: LayerMasks, shared_prefix: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        sums = self.table[batch.sequence_ids]
        if not shared_prefix:
            return sums
        if self.shared is None:
            raise ValueError("this reference table has no shared-prefix sums (LD-DPO); "
                             "compute it with shared_prefix=True")
        return sums, self.shared[batch.pair_ids]


class LiveReference:
    """A frozen copy of the initial model, run on the same batch and masks as the policy."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, batch: Batch, masks: LayerMasks, shared_prefix: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logps = sequence_and_prefix_log_probs(self.model, batch, masks, shared_prefix)
        reshard(self.model)  # no backward will free the gathered root parameters
        return logps

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module, alpha: float) -> None:
        """TR-DPO (TRL's `SyncRefModelCallback`): every reference weight becomes
        alpha * policy + (1 - alpha) * reference. Both models are sharded the same way, so
        each rank mixes its own shards; a policy weight is rounded to the reference's dtype
        (bfloat16 on CUDA) first."""
        ours = dict(self.model.named_parameters())
        theirs = dict(policy.named_parameters())
        if ours.keys() != theirs.keys():
            raise ValueError("reference.sync_ref_model needs a reference with the policy's "
                             "parameters (no LoRA)")
        for name, target in ours.items():
            target_local, source_local = _local(target), _local(theirs[name])
            target_local.mul_(1.0 - alpha).add_(source_local.to(target_local.dtype),
                                                alpha=alpha)


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (the whole tensor when it is not distributed)."""
    return param.to_local() if hasattr(param, "to_local") else param


def no_reference(batch: Batch, masks: LayerMasks, shared_prefix: bool = False) -> None:
    """Reference-free losses (simpo, sft)."""
    return None
