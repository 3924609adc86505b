"""Training: config, parallelism, losses, the loop, checkpoints, metrics."""
