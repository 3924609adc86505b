"""What the benchmarks share to measure: the environment of a run, clocks that wait for the GPU,
resettable peak memory, compiled-graph counters and the CPU's matmul peak.

FLOPs are the trainer's (`train.setup.Training.step_flops`); the GPU's peak is
`train.metrics.peak_flops`.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def environment(device: torch.device) -> dict[str, Any]:
    """Date, command, commit (and whether the tree has changes), versions and hardware."""
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_changes": bool(git("status", "--porcelain")),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """`time.perf_counter()` once the device's queued work is done."""
    synchronize(device)
    return time.perf_counter()


class PeakMemory:
    """Peak memory since `reset()`: on CUDA `max_memory_allocated`; on the CPU the process's
    peak resident set size (VmHWM), which Linux lets a process reset through
    /proc/self/clear_refs once freed memory is handed back (`malloc_trim`); where it cannot,
    the whole process's peak (`ru_maxrss`, said in `method`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated"
            return
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "peak RSS (VmHWM, reset)"
        except OSError:
            self.method = "peak RSS of the whole process (ru_maxrss)"

    def gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        if "VmHWM" in self.method:
            status = Path("/proc/self/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def compile_counts() -> dict[str, int]:
    """Graphs dynamo has compiled and graph breaks so far in this process (never reset)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def compile_mode_options(mode: str):
    """The inductor options of a `torch.compile` mode, as a context in which they hold."""
    import torch._inductor
    import torch._inductor.config

    return torch._inductor.config.patch(torch._inductor.list_mode_options(mode))


def gemm_peak_flops(size: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of a large float32 matmul on this process's threads: the most a CPU step's matmuls
    could reach here and now (a shared machine shows it lower), to say how close a step is."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # the first call allocates and warms the caches
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 2:
        a @ b
        count += 1
    return 2 * size ** 3 * count / (time.perf_counter() - start)
