"""The training command: `prefixdpo-train` (installed) or `python train.py` (in the clone).

    prefixdpo-train --config configs/demo.toml [--nproc-per-node N] [--section.key=value ...]
    torchrun --nnodes 2 --nproc-per-node 8 ... train.py --config X.toml   # several nodes

Started by hand, this process is the launcher of one node: it checks the config, starts N ranks
(`python -m prefixdpo.train.cli` with torchrun's variables: RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) in its own process group, and waits for them.
- A rank that fails reports its own error in one line (`error: ...`, or `[rank r] error: ...`
  with several ranks) and exits with status 1. The launcher then kills the other ranks (they
  would wait for it in a collective) and exits with that status, adding nothing. A rank that
  dies without a word (SIGKILL from the out-of-memory killer, a crash) is named here, in one
  line.
- SIGTERM or SIGINT is passed on to every rank as SIGTERM: each finishes its step, the run
  saves a checkpoint, and the launcher exits 0 when all ranks have, with no time limit. A
  second Ctrl-C reaches the ranks from the terminal and stops them at once.
- A launcher that dies (SIGKILL) leaves ranks whose parent changed: they stop as on SIGTERM.

torch's own launcher (torchrun, its elastic agent) prints a traceback and a summary for every
failed rank and ends a SIGTERM stop with its own traceback and status 1, so it is kept for what
it is needed for: several nodes and their rendezvous. Under a launcher (RANK set) this runs
one rank.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from prefixdpo.train.distributed import LAUNCHER_ENV, free_port

# Statuses with which a rank has reported itself: its error line (1), "interrupted" (130).
_REPORTED = (1, 130)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prefixdpo-train", description="Train a Llama, Mistral, Qwen or Gemma model with "
        "DPO-family losses and prefix sharing.",
        epilog="overrides: --section.key=value, e.g. --train.steps=100 --loss.beta=0.2 (see "
               "README, 'Config reference')")
    parser.add_argument("--config", required=True, help="a TOML config, e.g. configs/demo.toml")
    parser.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=None,
                        metavar="N", help="ranks to start on this node (default 1; one per GPU)")
    args, overrides = parser.parse_known_args(argv)
    if "RANK" in os.environ:  # under torchrun, or started by the launcher below
        if args.nproc_per_node is not None:
            parser.error("--nproc-per-node starts ranks; under torchrun, give it to torchrun")
        return run_rank(args.config, overrides)
    nproc = 1 if args.nproc_per_node is None else args.nproc_per_node
    if nproc < 1:
        parser.error("--nproc-per-node must be >= 1")
    try:
        from prefixdpo.train.config import load_config

        load_config(args.config, overrides)  # one line for a config error, not one per rank
        return launch(nproc, ["--config", args.config, *overrides])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the ranks were started
        print("interrupted", file=sys.stderr)
        return 130


def run_rank(config_path: str, overrides: list[str]) -> int:
    """Train as one rank; a user's error (config, data, model files, storage) is one line, and
    so is a collective that fails because another rank died."""
    from torch.distributed import DistError

    from prefixdpo.train.config import load_config
    from prefixdpo.train.loop import train

    try:
        train(load_config(config_path, overrides))
    except (ValueError, OSError, DistError) as e:
        return _failed(str(e) if isinstance(e, (ValueError, OSError)) else _first_line(e))
    except RuntimeError as e:
        if not any(sign in str(e) for sign in _LOST_PEER):
            raise  # a bug: its traceback is wanted
        return _failed(f"lost another rank, which failed or was killed ({_first_line(e)})")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


# How gloo reports a peer that died mid-collective (NCCL's errors are DistErrors).
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _failed(message: str) -> int:
    """Print this rank's error line. With several ranks, leave at once: the others may wait in
    a collective for this one, and the launcher stops them when it sees this exit."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if distributed else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
    if distributed:
        sys.stdout.flush()
        os._exit(1)
    return 1


def launch(nproc: int, rank_argv: list[str]) -> int:
    """Start `nproc` ranks of this node and wait for them (see the module docstring); returns
    the exit status."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0")
    env[LAUNCHER_ENV] = str(os.getpid())
    if nproc > 1 and "OMP_NUM_THREADS" not in env:  # as torchrun: the cores shared out
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    ranks: list[subprocess.Popen] = []
    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for rank in range(nproc):
            ranks.append(subprocess.Popen(
                [sys.executable, "-m", "prefixdpo.train.cli", *rank_argv],
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))))
            if stopping:  # a stop asked for while the ranks were being started
                ranks[-1].send_signal(signal.SIGTERM)
        while True:
            statuses = [process.poll() for process in ranks]
            failed = [(rank, code) for rank, code in enumerate(statuses) if code not in (None, 0)]
            if failed or None not in statuses:
                break
            time.sleep(0.1)
        if not failed:
            return 0
        for process in ranks:  # the others would wait for the failed one in a collective
            if process.poll() is None:
                process.kill()
        for process in ranks:
            process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # A rank killed by a signal first: a rank that reports a lost peer is its victim.
    rank, code = min(failed, key=lambda failure: failure[1] >= 0)
    if code < 0:
        name = signal.Signals(-code).name
        if stopping and -code == signal.SIGTERM:
            print("stopped before training began; nothing was saved", file=sys.stderr)
        else:
            hint = " (by hand, or by the kernel's out-of-memory killer: then lower " \
                   "train.micro_batch_size or data.packing_length)" if -code == signal.SIGKILL \
                else ""
            # On a line of its own: the ranks, killed, left their progress bars unfinished.
            print(f"\nerror: rank {rank} was killed by {name}{hint}", file=sys.stderr)
        return 128 - code
    if code not in _REPORTED:
        print(f"\nerror: rank {rank} exited with status {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
