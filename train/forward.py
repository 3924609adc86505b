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
from prefixdpo.kernels.reduce import (ld_log_probs, sequence_log_probs, shared_prefix_log_probs,
                                      token_ranks)
from prefixdpo.model.config import ModelConfig
from prefixdpo.model.executor import AttentionExecutor, LayerMasks
from prefixdpo.train.losses import LossConfig, LossState, preference_loss, wpo_pair_weights

# Reference log-probs `[S]` of a batch's sequences (None for reference-free losses). LD-DPO
# (`loss.ld_alpha` < 1) calls it with `shared_prefix=True` and takes `(sums [S], shared
# [N, 2])`, the second as `batch_shared_prefix_log_probs` gives it.
Reference = Callable[..., "Tensor | tuple[Tensor, Tensor] | None"]


def attention_masks(batch: Batch, config: ModelConfig, executor: AttentionExecutor
                    ) -> LayerMasks:
    """One mask per attention window of the model's layers, built once per micro-batch and
    shared by the policy and a live reference."""
    return executor.layer_masks(batch.document_ids, batch.segment_ids, batch.positions,
                                config.attention_windows)


def batch_sequence_log_probs(model: nn.Module, batch: Batch, masks: LayerMasks
                             ) -> tuple[Tensor, Tensor]:
    """(log-prob sums `[S]` float32, token counts `[S]` int64) of the batch's sequences."""
    token_logps = model(batch.input_ids, batch.positions, masks, batch.target_index,
                        batch.target_ids)
    sums = sequence_log_probs(token_logps, batch.target_sequence, batch.num_sequences)
    return sums, batch.sequence_num_tokens


def batch_token_log_probs(model: nn.Module, batch: Batch, masks: LayerMasks,
                          log_sum_sq_probs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Each target's log-prob `[T]` float32; with `log_sum_sq_probs` (WPO), the pair
    (log-probs, log(sum_v p_v^2) `[T]` without gradient) from the same chunked head."""
    if log_sum_sq_probs:
        return model(batch.input_ids, batch.positions, masks, batch.target_index,
                     batch.target_ids, log_sum_sq_probs=True)
    return model(batch.input_ids, batch.positions, masks, batch.target_index, batch.target_ids)


def batch_shared_prefix_log_probs(token_logps: Tensor, batch: Batch) -> Tensor:
    """LD-DPO's shared parts `[N, 2]`: each pair's chosen and rejected log-prob sums over their
    first min(n_chosen, n_rejected) tokens (`kernels.reduce.shared_prefix_log_probs`)."""
    ranks = token_ranks(batch.target_sequence, batch.sequence_num_tokens)
    return shared_prefix_log_probs(token_logps, batch.target_sequence, ranks,
                                   batch.sequence_num_tokens, batch.chosen_sequence,
                                   batch.rejected_sequence)


def sequence_and_prefix_log_probs(model: nn.Module, batch: Batch, masks: LayerMasks,
                                  shared_prefix: bool = False
                                  ) -> Tensor | tuple[Tensor, Tensor]:
    """A reference's answer: log-prob sums `[S]`, and with `shared_prefix` also
    `batch_shared_prefix_log_probs` `[N, 2]` from the same forward."""
    token_logps = batch_token_log_probs(model, batch, masks)
    sums = sequence_log_probs(token_logps, batch.target_sequence, batch.num_sequences)
    if not shared_prefix:
        return sums
    return sums, batch_shared_prefix_log_probs(token_logps, batch)


def pair_losses(model: nn.Module, batch: Batch, reference: Reference, loss_config: LossConfig,
                loss_state: LossState, executor: AttentionExecutor
                ) -> tuple[Tensor, dict[str, Tensor], LossState]:
    """Per-pair losses `[N]`, per-pair metrics and the advanced loss state of a batch. The
    masks serve the policy and a live reference.

    `loss.ld_alpha` < 1 (LD-DPO): policy and reference log-probs are each side's shared part
    plus ld_alpha times its tail, from the flat tokens; the NLL term keeps the plain sums.
    `loss.use_weighting` (WPO): the head also gives each token's log(sum_v p_v^2), and each
    pair's loss is weighted by `losses.wpo_pair_weights` of the policy's plain tokens."""
    masks = attention_masks(batch, model.config, executor)
    ld = loss_config.uses_ld
    # The reference (no grad) runs first: a live one's gathered weights and activations are
    # freed before the policy's activations, kept for backward, exist.
    ref = reference(batch, masks, shared_prefix=True) if ld else reference(batch, masks)
    log_sum_sq = None
    token_logps = batch_token_log_probs(model, batch, masks, loss_config.use_weighting)
    if loss_config.use_weighting:
        token_logps, log_sum_sq = token_logps
    logps = sequence_log_probs(token_logps, batch.target_sequence, batch.num_sequences)
    num_tokens = batch.sequence_num_tokens
    chosen, rejected = batch.chosen_sequence, batch.rejected_sequence
    policy_chosen, policy_rejected = logps[chosen], logps[rejected]
    ref_chosen = ref_rejected = policy_chosen_nll = pair_weights = None
    if ld:
        shared = batch_shared_prefix_log_probs(token_logps, batch)
        policy_chosen_nll = policy_chosen
        policy_chosen = ld_log_probs(policy_chosen, shared[:, 0], loss_config.ld_alpha)
        policy_rejected = ld_log_probs(policy_rejected, shared[:, 1], loss_config.ld_alpha)
        if ref is not None:
            ref_sums, ref_shared = ref
            ref_chosen = ld_log_probs(ref_sums[chosen], ref_shared[:, 0], loss_config.ld_alpha)
            ref_rejected = ld_log_probs(ref_sums[rejected], ref_shared[:, 1],
                                        loss_config.ld_alpha)
    elif ref is not None:
        ref_chosen, ref_rejected = ref[chosen], ref[rejected]
    if log_sum_sq is not None:
        aligned = sequence_log_probs(token_logps.detach() - log_sum_sq, batch.target_sequence,
                                     batch.num_sequences)
        pair_weights = wpo_pair_weights(aligned[chosen], aligned[rejected], num_tokens[chosen],
                                        num_tokens[rejected])
    return preference_loss(
        loss_config, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
        num_tokens[chosen], num_tokens[rejected], loss_state, check_finite=False,
        pair_weights=pair_weights, policy_chosen_nll=policy_chosen_nll)
