"""Per-token log-probs -> per-sequence sums.

The loss works on one number per completion: the sum of its tokens' log-probs, returned in
float32 whatever the model dtype. The sum is accumulated in float64: `index_add` adds tokens one
after another, and in float32 the rounding of thousands of sequential adds shows in the small
difference of two large sums that DPO takes (1.5e-4 relative on the loss at 1,536 tokens,
against 7e-6 this way); the [T] float64 temporary costs nothing next to the model. Tokens
arrive flat, in any order, each tagged with the sequence it belongs to, which is how the
prefix-shared and packed layouts hand them over.

Token counts per sequence (for length-normalized losses: IPO, SimPO, the NLL term) are not
computed here: counting on the device (`bincount`) makes the host wait for it, while the
layout knows them on the host (`Batch.sequence_num_tokens`).

LD-DPO (`loss.ld_alpha`, TRL's `ld_alpha`) weighs each pair's completions differently: the
tokens up to the shorter completion's length count fully, those past it (the longer one's
"verbose" tail) by alpha. A sequence of a ranked group may be in several pairs, each with its
own shorter length, so this is not one number per sequence: `shared_prefix_log_probs` gives,
for every pair, each side's sum over its first min(n_chosen, n_rejected) tokens, from the same
flat tokens, with one sort and one running sum (no `[pairs, length]` padding);
`ld_log_probs` combines them with the full sums as TRL does (shared + alpha * tail).
`reference_ld_pair_log_probs` is the oracle: TRL's own computation on padded per-sequence rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefixdpo.kernels.log_probs import values_checked_on_host


def sequence_log_probs(token_logps: Tensor, sequence_index: Tensor,
                       num_sequences: int) -> Tensor:
    """token_logps `[T]` (any float dtype), sequence_index `[T]` int64 in `[0, num_sequences)`
    -> sums `[S]` float32 (accumulated in float64), differentiable w.r.t. token_logps.

    Every given token counts: pass only real targets (drop ignored positions first). A sequence
    with no tokens gets sum 0. On CUDA the sum uses atomic adds, so its last bits may vary from
    run to run. An index outside `[0, num_sequences)` raises ValueError on CPU and fails a
    device-side assert on CUDA (no host sync)."""
    if token_logps.dim() != 1 or sequence_index.dim() != 1:
        raise ValueError(f"expected token_logps [T] and sequence_index [T]; got shapes "
                         f"{tuple(token_logps.shape)} and {tuple(sequence_index.shape)}")
    if token_logps.shape[0] != sequence_index.shape[0]:
        raise ValueError(f"token_logps has {token_logps.shape[0]} entries, sequence_index "
                         f"{sequence_index.shape[0]}")
    if not token_logps.is_floating_point():
        raise ValueError(f"token_logps must be floating point; got {token_logps.dtype}")
    if sequence_index.dtype != torch.long:
        raise ValueError(f"sequence_index must be int64; got {sequence_index.dtype}")
    if token_logps.device != sequence_index.device:
        raise ValueError(f"token_logps is on {token_logps.device}, sequence_index on "
                         f"{sequence_index.device}; expected one device")
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 0:
        raise ValueError(f"num_sequences must be an int >= 0; got {num_sequences!r}")
    _check_index(sequence_index, num_sequences)
    values = token_logps.double()
    return values.new_zeros(num_sequences).index_add(0, sequence_index, values).float()


def token_ranks(sequence_index: Tensor, sequence_num_tokens: Tensor) -> Tensor:
    """Each token's index `[T]` in its sequence, for tokens laid out as `data.layout.Batch`
    lays them out: every sequence's tokens contiguous, in order, the sequences in slot order.
    Computed on the device from the counts (no host sync)."""
    starts = torch.cumsum(sequence_num_tokens, 0) - sequence_num_tokens
    return torch.arange(sequence_index.shape[0], device=sequence_index.device) \
        - starts[sequence_index]


def shared_prefix_log_probs(token_logps: Tensor, sequence_index: Tensor, token_rank: Tensor,
                            sequence_num_tokens: Tensor, chosen: Tensor, rejected: Tensor
                            ) -> Tensor:
    """Per pair, the log-prob sums `[P, 2]` float32 (chosen, rejected) over each side's first
    min(n_chosen, n_rejected) tokens: LD-DPO's shared part. Differentiable w.r.t. token_logps.

    token_logps `[T]`, sequence_index `[T]` int64 (in any order), token_rank `[T]` int64 (the
    token's index in its sequence: 0 .. n-1, each once), sequence_num_tokens `[S]` int64,
    chosen / rejected `[P]` int64 sequence indexes (a sequence may be in several pairs).
    The tokens are sorted by (sequence, rank) and summed cumulatively in float64; a prefix sum
    is then a difference of two entries. Malformed ranks raise ValueError on CPU (on other
    devices they are not checked: no host sync)."""
    _check_shared_inputs(token_logps, sequence_index, token_rank, sequence_num_tokens, chosen,
                         rejected)
    num_tokens = token_logps.shape[0]
    order = torch.argsort(sequence_index * max(num_tokens, 1) + token_rank)
    running = torch.cumsum(token_logps.double()[order], 0)
    running = torch.cat([running.new_zeros(1), running])                    # [T + 1]
    starts = torch.cumsum(sequence_num_tokens, 0) - sequence_num_tokens     # [S]
    if values_checked_on_host(token_rank) and num_tokens:
        expected = torch.arange(num_tokens, device=order.device) - starts[sequence_index[order]]
        if not torch.equal(token_rank[order], expected) or int(sequence_num_tokens.sum()) \
                != num_tokens:
            raise ValueError("token_rank must number each sequence's tokens 0 .. n-1, and "
                             "sequence_num_tokens count them")
    shared = torch.minimum(sequence_num_tokens[chosen], sequence_num_tokens[rejected])

    def prefix(sequence: Tensor) -> Tensor:
        return running[starts[sequence] + shared] - running[starts[sequence]]

    return torch.stack([prefix(chosen), prefix(rejected)], dim=1).float()


def ld_log_probs(full: Tensor, shared: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's sequence log-prob, TRL's `shared_logps + ld_alpha * tail_logps` with the tail
    the full sum minus the shared part; computed in float64, returned float32. `full` and
    `shared` have the same shape (per pair side)."""
    full64, shared64 = full.double(), shared.double()
    return (shared64 + ld_alpha * (full64 - shared64)).float()


def reference_ld_pair_log_probs(token_logps: Tensor, sequence_index: Tensor,
                                token_rank: Tensor, num_sequences: int, chosen: Tensor,
                                rejected: Tensor, ld_alpha: float) -> tuple[Tensor, Tensor]:
    """The oracle, TRL's `_compute_loss` on padded rows: each pair's chosen and rejected
    tokens scattered into `[2P, max_length]` rows with a completion mask, the shared and tail
    masks from the mask's running count, `shared + ld_alpha * tail` per row. Float32 (chosen
    `[P]`, rejected `[P]`), differentiable w.r.t. token_logps."""
    num_pairs, device = chosen.shape[0], token_logps.device
    lengths = torch.zeros(num_sequences, dtype=torch.long, device=device).index_add_(
        0, sequence_index, torch.ones_like(sequence_index))
    width = int(lengths.max()) if num_sequences else 0
    per_sequence = token_logps.new_zeros(num_sequences, width).index_put(
        (sequence_index, token_rank), token_logps)                           # [S, width]
    mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
    rows = torch.cat([per_sequence[chosen], per_sequence[rejected]])       # [2P, width]
    completion_mask = torch.cat([mask[chosen], mask[rejected]]).long()
    comp_pos = completion_mask.cumsum(dim=1)
    comp_lens = completion_mask.sum(dim=1)
    chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
    shared_lens = torch.minimum(chosen_lens, rejected_lens)
    shared_lens = torch.cat([shared_lens, shared_lens], dim=0)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
    tail_mask = comp_pos > shared_lens.unsqueeze(1)
    logps = (rows * shared_mask).sum(dim=1) + ld_alpha * (rows * tail_mask).sum(dim=1)
    out_chosen, out_rejected = logps.float().split([num_pairs, num_pairs])
    return out_chosen, out_rejected


def _check_shared_inputs(token_logps: Tensor, sequence_index: Tensor, token_rank: Tensor,
                         sequence_num_tokens: Tensor, chosen: Tensor, rejected: Tensor) -> None:
    if token_logps.dim() != 1 or not token_logps.is_floating_point():
        raise ValueError(f"token_logps must be floating point [T]; got {token_logps.dtype} "
                         f"{tuple(token_logps.shape)}")
    named = {"sequence_index": sequence_index, "token_rank": token_rank}
    for name, tensor in named.items():
        if tensor.shape != token_logps.shape or tensor.dtype != torch.long:
            raise ValueError(f"{name} must be int64 [T] like token_logps "
                             f"{tuple(token_logps.shape)}; got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
    for name, tensor in {"sequence_num_tokens": sequence_num_tokens, "chosen": chosen,
                         "rejected": rejected}.items():
        if tensor.dim() != 1 or tensor.dtype != torch.long:
            raise ValueError(f"{name} must be a 1-d int64 tensor; got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} "
                         "must have one entry per pair")
    devices = {t.device for t in (token_logps, sequence_index, token_rank, sequence_num_tokens,
                                  chosen, rejected)}
    if len(devices) > 1:
        raise ValueError(f"expected one device; got {sorted(map(str, devices))}")
    num_sequences = sequence_num_tokens.shape[0]
    _check_index(sequence_index, num_sequences)
    _check_index(chosen, num_sequences)
    _check_index(rejected, num_sequences)


def _check_index(sequence_index: Tensor, num_sequences: int) -> None:
    if sequence_index.numel() == 0:
        return
    outside = (sequence_index < 0) | (sequence_index >= num_sequences)
    if not values_checked_on_host(sequence_index):
        torch._assert_async(~outside.any(), f"sequence_index is outside [0, {num_sequences})")
    elif bool(outside.any()):
        raise ValueError(f"sequence_index holds {int(sequence_index[outside][0])}, outside "
                         f"[0, {num_sequences})")
