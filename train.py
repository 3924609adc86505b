"""Train a Llama or Mistral model with DPO-family losses.

    torchrun --standalone --nproc_per_node 1 train.py --config configs/demo.toml
    python train.py --config configs/demo.toml --train.steps=50   # one process, no torchrun

Any config value can be overridden with --section.key=value (see README, "Config reference").
"""

from __future__ import annotations

import argparse
import os
import sys

from torch.distributed import DistError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="overrides: --section.key=value, e.g. --train.steps=100 --loss.beta=0.2")
    parser.add_argument("--config", required=True, help="a TOML config, e.g. configs/demo.toml")
    args, overrides = parser.parse_known_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        from prefixdpo.train.config import load_config
        from prefixdpo.train.loop import train

        train(load_config(args.config, overrides))
    except (ValueError, OSError, DistError) as e:
        # One line per failing rank. With several ranks, leave at once: the others may wait in
        # a collective for this one, and torchrun stops them when it sees this exit.
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        prefix = f"[rank {rank}] " if distributed else ""
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        if distributed:
            sys.stdout.flush()
            os._exit(1)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
