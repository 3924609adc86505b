"""Training metrics: FLOP counting for MFU, peak memory, and the logger (stdout line, tqdm bar,
`metrics.jsonl`).

FLOPs are those the step really computes, counted from the batch: for every non-padding token
the decoder layers' matmuls (6 x layer params: forward and backward), the head for every target
token only (the kernel never computes prompt logits), and attention over the (query, key) pairs
the mask allows (each query sees `min(position + 1, window)` keys in every layout, with each
layer's own window). A live
reference adds its forward (a third of that). Padding and masked-out attention are not counted,
so MFU measures useful work.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from prefixdpo.data.layout import PADDING_DOCUMENT, Batch
from prefixdpo.model.config import ModelConfig
from prefixdpo.train.run_dir import write_error

logger = logging.getLogger(__name__)

# Dense bfloat16 tensor-core peak FLOP/s per GPU (datasheet values, without sparsity), by the
# exact name `torch.cuda.get_device_name` reports. Exact names, because fragments mislead: the
# H100 PCIe has 756 TFLOP/s against the SXM part's 989, and "L4" is a prefix of "L40". A card
# not listed reports no MFU rather than a wrong one.
PEAK_BF16_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H800": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A800-SXM4-80GB": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
    "NVIDIA GeForce RTX 4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None for a CPU or a card not in the table."""
    if device.type != "cuda":
        return None
    return PEAK_BF16_FLOPS.get(torch.cuda.get_device_name(device).strip())


def forward_flops(batch: Batch, config: ModelConfig) -> float:
    """FLOPs of one forward over the batch's useful tokens (see the module docstring)."""
    real = batch.document_ids != PADDING_DOCUMENT
    tokens = int(real.sum())
    keys = batch.positions + 1
    # Each layer's query sees min(position + 1, window) keys: one count per distinct window.
    pairs = {window: int(((keys if window is None else keys.clamp(max=window)) * real).sum())
             for window in config.attention_windows}
    attention_pairs = sum(pairs[window] for window in config.layer_windows)
    d = config.hidden_size
    head = 0 if config.tie_word_embeddings else config.vocab_size * d
    layer_params = config.num_params - config.vocab_size * d - head - d
    attention = 4 * config.num_attention_heads * config.head_dim  # q.k and p.v, per layer
    return (2 * layer_params * tokens + 2 * config.vocab_size * d * len(batch.target_ids)
            + attention * attention_pairs)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Peak resident set size of the process (KiB on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLogger:
    """Rank 0 prints one line per logged step (above a tqdm bar) and appends the same values
    to `metrics.jsonl`; other ranks stay quiet."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool,
                 reporter: Any = None):
        self.enabled = enabled
        self.reporter = reporter  # experiment trackers (train.reporting.Reporter), or None
        self.path = output_dir / "metrics.jsonl"
        self.bar = None
        # (step, kind) of the records already in the file for the resumed step: a run resumed
        # from its last checkpoint (to retry the export, say) does not log them twice.
        self.logged: set[tuple[int, str]] = set()
        if not enabled:
            return
        if start_step and self.path.is_file():
            # A resumed run logs again the steps after its checkpoint: drop the old lines.
            kept = _lines_up_to(self.path, start_step)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            try:
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, self.path)  # a kill or a full disk here keeps the old file
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise write_error(self.path, e, "Free disk space and run again") from None
            for line in kept:
                record = json.loads(line)
                if record["step"] == start_step:
                    self.logged.add((start_step, _kind(record)))
        elif not start_step:
            self.path.unlink(missing_ok=True)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step",
                        dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        if (step, _kind(record)) in self.logged:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise write_error(self.path, e, "Free disk space, then run the same command again: "
                              "it resumes from the last checkpoint") from None
        if self.reporter is not None:
            self.reporter.log(step, metrics)
        shown = " ".join(f"{k}={_short(v)}" for k, v in metrics.items())
        message = f"{prefix}step {step}: {shown}"
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def print(self, message: str) -> None:
        if self.enabled:
            (self.bar.write(message, file=sys.stdout) if self.bar is not None
             else print(message, flush=True))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.reporter is not None:
            self.reporter.close()


def _lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of a metrics file whose step is at most `step`. Lines that do not read as a
    record with an integer step (the last one torn by a kill mid-write, say) are dropped,
    with one warning."""
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        line_step = record.get("step", 0) if isinstance(record, dict) else None
        if not isinstance(line_step, int) or isinstance(line_step, bool):
            dropped += 1
        elif line_step <= step:
            kept.append(line)
    if dropped:
        logger.warning("%s: dropped %d unreadable line(s) (a line cut short when the run "
                       "stopped, for instance)", path, dropped)
    return kept


def _kind(record: dict[str, Any]) -> str:
    """"eval" for an evaluation record, "train" for a training one."""
    return "eval" if any(key.startswith("eval/") for key in record) else "train"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
