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


def _check_index(sequence_index: Tensor, num_sequences: int) -> None:
    if sequence_index.numel() == 0:
        return
    outside = (sequence_index < 0) | (sequence_index >= num_sequences)
    if not values_checked_on_host(sequence_index):
        torch._assert_async(~outside.any(), f"sequence_index is outside [0, {num_sequences})")
    elif bool(outside.any()):
        raise ValueError(f"sequence_index holds {int(sequence_index[outside][0])}, outside "
                         f"[0, {num_sequences})")
