"""Kernels: the chunked lm_head -> log-softmax -> gather with recomputation in backward, and
the per-sequence reduction, each beside a plain-PyTorch reference of the same signature."""

from kernels.log_probs import (DEFAULT_CHUNK_SIZE, linear_log_probs, linear_logit_stats,
                               reference_linear_log_probs)
from kernels.reduce import sequence_log_probs

__all__ = ["DEFAULT_CHUNK_SIZE", "linear_log_probs", "linear_logit_stats",
           "reference_linear_log_probs", "sequence_log_probs"]
