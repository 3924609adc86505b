"""One forward pass from a Batch to per-sequence log-probs (training, evaluation, reference
precomputation and scoring) and to per-pair losses (training and evaluation), so they all
compute the same thing.

Nothing here reads a device tensor on the host: token counts come from the batch (counted
while collating), so a CUDA forward and backward are queued without waiting for the GPU.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from prefixdpo.data.layout import Batch
from prefixdpo.kernels.reduce import sequence_log_probs
from prefixdpo.model.masks import FLEX_BLOCK_SIZE, AttentionMask, build_attention_mask
from prefixdpo.train.losses import LossConfig, LossState, preference_loss

# Reference log-probs `[S]` of a batch's sequences (None for reference-free losses).
Reference = Callable[[Batch, AttentionMask], "Tensor | None"]


def attention_mask(batch: Batch, sliding_window: int | None, attention: str,
                   flex_block_size: int = FLEX_BLOCK_SIZE) -> AttentionMask:
    """Built once per micro-batch and shared by the policy and a live reference."""
    return build_attention_mask(batch.document_ids, batch.segment_ids, batch.positions,
                                sliding_window, attention, flex_block_size)


def batch_sequence_log_probs(model: nn.Module, batch: Batch, mask: AttentionMask
                             ) -> tuple[Tensor, Tensor]:
    """(log-prob sums `[S]` float32, token counts `[S]` int64) of the batch's sequences."""
    token_logps = model(batch.input_ids, batch.positions, mask, batch.target_index,
                        batch.target_ids)
    sums = sequence_log_probs(token_logps, batch.target_sequence, batch.num_sequences)
    return sums, batch.sequence_num_tokens


def pair_losses(model: nn.Module, batch: Batch, reference: Reference, loss_config: LossConfig,
                loss_state: LossState, attention: str, flex_block_size: int = FLEX_BLOCK_SIZE
                ) -> tuple[Tensor, dict[str, Tensor], LossState]:
    """Per-pair losses `[N]`, per-pair metrics and the advanced loss state of a batch. One
    mask serves the policy and a live reference."""
    mask = attention_mask(batch, model.config.sliding_window, attention, flex_block_size)
    # The reference (no grad) runs first: a live one's gathered weights and activations are
    # freed before the policy's activations, kept for backward, exist.
    ref = reference(batch, mask)
    logps, num_tokens = batch_sequence_log_probs(model, batch, mask)
    chosen, rejected = batch.chosen_sequence, batch.rejected_sequence
    return preference_loss(
        loss_config, logps[chosen], logps[rejected],
        None if ref is None else ref[chosen], None if ref is None else ref[rejected],
        num_tokens[chosen], num_tokens[rejected], loss_state, check_finite=False)
