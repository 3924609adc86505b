"""One forward pass from a Batch to per-sequence log-probs, shared by training, evaluation,
reference precomputation and scoring, so they all compute the same thing."""

from __future__ import annotations

from torch import Tensor, nn

from data.layout import Batch
from kernels import sequence_log_probs
from model.masks import AttentionMask, build_attention_mask


def attention_mask(batch: Batch, sliding_window: int | None, use_flex: bool) -> AttentionMask:
    """Built once per micro-batch and shared by the policy and a live reference."""
    return build_attention_mask(batch.document_ids, batch.segment_ids, batch.positions,
                                sliding_window, use_flex)


def batch_sequence_log_probs(model: nn.Module, batch: Batch, mask: AttentionMask
                             ) -> tuple[Tensor, Tensor]:
    """(log-prob sums `[S]` float32, token counts `[S]` int64) of the batch's sequences."""
    token_logps = model(batch.input_ids, batch.positions, mask, batch.target_index,
                        batch.target_ids)
    return sequence_log_probs(token_logps, batch.target_sequence, batch.num_sequences)
