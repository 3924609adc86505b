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
from prefixdpo.model.config import ModelConfig
from prefixdpo.model.masks import FLEX_BLOCK_SIZE, LayerMasks, build_layer_masks
from prefixdpo.train.losses import LossConfig, LossState, preference_loss

# Reference log-probs `[S]` of a batch's sequences (None for reference-free losses).
Reference = Callable[[Batch, LayerMasks], "Tensor | None"]


def attention_masks(batch: Batch, config: ModelConfig, attention: str,
                    flex_block_size: int = FLEX_BLOCK_SIZE) -> LayerMasks:
    """One mask per attention window of the model's layers, built once per micro-batch and
    shared by the policy and a live reference."""
    return build_layer_masks(batch.document_ids, batch.segment_ids, batch.positions,
                             config.attention_windows, attention, flex_block_size)


def batch_sequence_log_probs(model: nn.Module, batch: Batch, masks: LayerMasks
                             ) -> tuple[Tensor, Tensor]:
    """(log-prob sums `[S]` float32, token counts `[S]` int64) of the batch's sequences."""
    token_logps = model(batch.input_ids, batch.positions, masks, batch.target_index,
                        batch.target_ids)
    sums = sequence_log_probs(token_logps, batch.target_sequence, batch.num_sequences)
    return sums, batch.sequence_num_tokens


def pair_losses(model: nn.Module, batch: Batch, reference: Reference, loss_config: LossConfig,
                loss_state: LossState, attention: str, flex_block_size: int = FLEX_BLOCK_SIZE
                ) -> tuple[Tensor, dict[str, Tensor], LossState]:
    """Per-pair losses `[N]`, per-pair metrics and the advanced loss state of a batch. The
    masks serve the policy and a live reference."""
    masks = attention_masks(batch, model.config, attention, flex_block_size)
    # The reference (no grad) runs first: a live one's gathered weights and activations are
    # freed before the policy's activations, kept for backward, exist.
    ref = reference(batch, masks)
    logps, num_tokens = batch_sequence_log_probs(model, batch, masks)
    chosen, rejected = batch.chosen_sequence, batch.rejected_sequence
    return preference_loss(
        loss_config, logps[chosen], logps[rejected],
        None if ref is None else ref[chosen], None if ref is None else ref[rejected],
        num_tokens[chosen], num_tokens[rejected], loss_state, check_finite=False)
