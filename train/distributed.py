"""Process group, device and mesh: torchrun's environment, or a single process without it.

NCCL on CUDA, gloo on CPU. Multi-node runs use torchrun's rendezvous (see the README); nothing
here depends on the number of nodes.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# Set by `prefixdpo-train` (train.cli) in the environment of the ranks it starts, as torchrun
# sets TORCHELASTIC_RUN_ID: a rank whose parent changes has lost its launcher.
LAUNCHER_ENV = "PREFIXDPO_LAUNCHER_PID"


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Distributed:
    """Initialize (or reuse) the default process group for the chosen device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but no CUDA device is available; "
                         "use 'cpu' or 'auto'")
    launched = "RANK" in os.environ  # by torchrun; else plain `python train.py`: a group of one
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} but {torch.cuda.device_count()} CUDA "
                             "device(s) visible: start at most one rank per GPU")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        device_id = torch_device if device == "cuda" else None
        if launched:
            dist.init_process_group(backend, device_id=device_id)
        else:
            dist.init_process_group(backend, device_id=device_id, rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{free_port()}")
    world_size = dist.get_world_size()
    mesh = init_device_mesh(device, (world_size,))
    return Distributed(dist.get_rank(), world_size, local_rank, torch_device, mesh)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()  # no rank tears down while another still talks to it
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks in one collective (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def broadcast_text(text: str, device: torch.device, length: int = 64) -> str:
    """Rank 0's short ASCII text (a hex digest), on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return text
    buffer = torch.zeros(length, dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        data = text.encode("ascii")
        assert len(data) <= length, "text too long to broadcast"
        buffer[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().tolist()).rstrip(b"\0").decode("ascii")


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous of ranks started here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
