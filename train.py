"""Train a Llama or Mistral model with DPO-family losses.

    python train.py --config configs/demo.toml                      # one process
    python train.py --config X.toml --nproc-per-node 8              # 8 ranks (GPUs) of one node
    torchrun --nnodes 2 --nproc-per-node 8 ... train.py --config X.toml   # several nodes

The same command as `prefixdpo-train` (train/cli.py); any config value can be
overridden with --section.key=value (see README, "Config reference").
"""

import sys

from prefixdpo.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
