"""Chunked lm_head -> log-softmax -> gather: per-token log-probs without `[N, V]` logits.

`linear_log_probs(hidden, weight, targets)` returns `log_softmax(hidden @ weight.T)[i, targets[i]]`
in float32. The N tokens are processed `chunk_size` rows at a time; backward recomputes each
chunk's logits from the saved `hidden`, `weight`, `targets` and the per-token logsumexp, so the
temporaries are one or two `[chunk_size, V]` float32 blocks, forward and backward, plus the
float32 weight gradient. At vocab 128k and 8k tokens the plain version holds several 4 GiB
`[N, V]` tensors; this one holds 0.25-0.5 GiB of logits at a time.

Two executors of the same math:
- eager PyTorch everywhere; inputs are taken to float32 (float64 stays float64), so CPU results
  match `reference_linear_log_probs` to float32 rounding;
- on CUDA, the elementwise work per chunk (logsumexp + gather forward; softmax, one-hot and the
  output-gradient scale backward) is one `torch.compile`d function of fixed shape `[chunk_size,
  V]` (the last chunk is padded with ignored rows, so nothing recompiles as N changes), and the
  matmuls stay cuBLAS. bf16/fp16 inputs are multiplied in their own dtype with float32 output
  (`out_dtype`) so logits are float32 without a float32 copy of the weight; the logit gradient
  is rounded to the weight dtype for the two backward matmuls, as a bf16 `nn.Linear` does, and
  the weight gradient is accumulated in float32 across chunks. Whether this torch and device
  support those mixed-dtype matmuls (CUDA rejects them before torch 2.10) is probed once per
  device; where they fail, half weights take the float32 path.

Nothing here reads a device value on the host, so a CUDA forward and backward never wait for
the GPU: out-of-range targets are refused by a device-side assert on CUDA (a ValueError on CPU,
where reading is free), and non-finite logits are not checked at all: NaN/inf in hidden or
weight propagate to the log-probs and gradients, and the training step, which checks its loss
and gradient norm once per step, skips or stops on them.

`reference_linear_log_probs` is the oracle: same signature, logits materialized plainly.
`linear_logit_stats` gives per-token mean logit and entropy for metrics, chunked, without grad.

With `log_sum_sq_probs=True`, `linear_log_probs` also returns, from the same pass over the
chunks, each token's `log(sum_v p_v^2)` (TRL's `log_sum_sq_probs`: logsumexp(2 z) - 2
logsumexp(z)), without gradient, for WPO's pair weights (`loss.use_weighting`);
`reference_log_sum_sq_probs` is its oracle.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# Rows per chunk. One float32 logits block is chunk x V x 4 bytes: 250 MiB at V = 128,256,
# 62.5 MiB at V = 32,000. Measured on CPU at N = 4096, V = 128,256, D = 256 float32
# (benchmarks/dpo_loss.py), forward + backward peak extra memory is 504 MiB against 6,034 MiB
# for the materialized reference (1/12); 1024 rows measured ~1/6, 256 rows ~1/22. 512 keeps
# each matmul large (512 x D x V) for GPU efficiency while staying well under 1/8.
DEFAULT_CHUNK_SIZE = 512

_HALF_DTYPES = (torch.bfloat16, torch.float16)
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def reference_linear_log_probs(hidden: Tensor, weight: Tensor, targets: Tensor,
                               ignore_index: int = -100,
                               chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """The oracle: float32 (float64 for float64 inputs) logits `[N, V]`, log-softmax, gather.
    `chunk_size` is accepted for signature parity and ignored."""
    _check_inputs(hidden, weight, targets, chunk_size)
    compute_dtype = _compute_dtype(hidden)
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).t()          # [N, V]
    ignored = targets == ignore_index
    picked = logits.log_softmax(-1).gather(-1, targets.masked_fill(ignored, 0)[:, None])
    return picked.squeeze(-1).masked_fill(ignored, 0.0).float()


def reference_log_sum_sq_probs(hidden: Tensor, weight: Tensor, targets: Tensor,
                               ignore_index: int = -100) -> Tensor:
    """The oracle of `log_sum_sq_probs`: float32 `log(sum_v softmax(z)_v^2)` `[N]` from
    materialized logits, computed as `log((softmax(z) ** 2).sum())`; 0 where ignored."""
    _check_inputs(hidden, weight, targets, DEFAULT_CHUNK_SIZE)
    compute_dtype = _compute_dtype(hidden)
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).t()          # [N, V]
    value = logits.softmax(-1).pow(2).sum(-1).log()
    return value.masked_fill(targets == ignore_index, 0.0).float().detach()


def linear_log_probs(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, log_sum_sq_probs: bool = False
                     ) -> Tensor | tuple[Tensor, Tensor]:
    """Float32 log-prob `[N]` of `targets[i]` under `softmax(hidden[i] @ weight.T)`; 0 where
    `targets == ignore_index`. hidden `[N, D]`, weight `[V, D]` (same floating dtype and device),
    targets `[N]` int64. Differentiable w.r.t. hidden and weight; memory O(chunk_size x V).

    With `log_sum_sq_probs`, returns `(log_probs, log_sum_sq)`: the second is each token's
    float32 `log(sum_v p_v^2)` (0 where ignored), computed in the same pass over the chunks,
    without gradient.

    Raises ValueError for malformed inputs, and for targets outside `[0, V)` (other than
    ignore_index) on CPU; on CUDA such targets fail a device-side assert instead (no host
    sync). Non-finite hidden or weight values are not refused: they make the output (and the
    gradients) non-finite."""
    _check_inputs(hidden, weight, targets, chunk_size)
    use_compiled = hidden.is_cuda
    return _LinearLogProbs.apply(hidden, weight, targets, ignore_index, chunk_size, use_compiled,
                                 bool(log_sum_sq_probs))


@torch.no_grad()
def linear_logit_stats(hidden: Tensor, weight: Tensor,
                       chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[Tensor, Tensor]:
    """Per-token mean logit over the vocabulary and entropy of the softmax, both float32 `[N]`,
    computed chunk by chunk without gradient (for metrics: TRL's `logits/chosen` is the mean
    of the first over a completion's tokens)."""
    _check_operands(hidden, weight, chunk_size)
    mean_logit = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(mean_logit)
    w = _operand_weight(weight, hidden.is_cuda)
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        logits = _chunk_logits(hidden[start:end], w)                           # [c, V]
        lse = logits.logsumexp(-1, keepdim=True)
        mean_logit[start:end] = logits.mean(-1)
        # H = lse - sum_v p_v * logit_v
        entropy[start:end] = (lse - (logits - lse).exp_().mul_(logits).sum(-1, keepdim=True)
                              ).squeeze(-1)
    return mean_logit, entropy


class _LinearLogProbs(torch.autograd.Function):
    """Saves hidden, weight, targets and the per-token logsumexp; nothing of size N x V. With
    `log_sum_sq`, a second output (no gradient): per-token log(sum_v p_v^2)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                chunk_size: int, use_compiled: bool, log_sum_sq: bool = False
                ) -> Tensor | tuple[Tensor, Tensor]:
        _check_targets(targets, ignore_index, weight.shape[0])
        w = _operand_weight(weight, use_compiled)
        stats_dtype = _compute_dtype(hidden)
        log_probs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=stats_dtype, device=hidden.device)
        sum_sq = torch.empty(hidden.shape[0] if log_sum_sq else 0, dtype=torch.float32,
                             device=hidden.device)
        stats = _compiled_forward_stats() if use_compiled else _forward_stats
        square_stats = _compiled_log_sum_sq() if use_compiled else _log_sum_sq
        for start, end, h, t in _chunks(hidden, targets, ignore_index, chunk_size, use_compiled):
            logits = _chunk_logits(h, w)
            chunk_logp, chunk_lse = stats(logits, t, ignore_index)
            log_probs[start:end] = chunk_logp[:end - start]
            lse[start:end] = chunk_lse[:end - start]
            if log_sum_sq:
                sum_sq[start:end] = square_stats(logits, t, ignore_index)[:end - start]
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.ignore_index, ctx.chunk_size, ctx.use_compiled = ignore_index, chunk_size, use_compiled
        if not log_sum_sq:
            return log_probs
        ctx.mark_non_differentiable(sum_sq)
        return log_probs, sum_sq

    @staticmethod
    def backward(ctx, grad_log_probs: Tensor, *unused: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ignore_index, use_compiled = ctx.ignore_index, ctx.use_compiled
        w = _operand_weight(weight, use_compiled)
        grad_log_probs = grad_log_probs.to(lse.dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # The weight gradient sums over all chunks: accumulate in float32 (float64 stays).
        grad_weight = (torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
                       if need_weight else None)
        for start, end, h, t in _chunks(hidden, targets, ignore_index, ctx.chunk_size,
                                        use_compiled):
            rows = h.shape[0]                       # end - start, or chunk_size when padded
            g = _pad_rows(grad_log_probs[start:end], rows, 0.0)
            chunk_lse = _pad_rows(lse[start:end], rows, 0.0)
            logits = _chunk_logits(h, w)                                      # [c, V]
            if use_compiled:
                grad_logits = _compiled_grad_logits()(logits, t, chunk_lse, g, ignore_index,
                                                      w.dtype)
            else:
                grad_logits = _grad_logits(logits, t, chunk_lse, g, ignore_index)
            del logits
            if need_hidden:
                grad_hidden[start:end] = (grad_logits @ w)[:end - start]      # [c, D]
            if need_weight:
                _accumulate_grad_weight(grad_weight, grad_logits, h)
            del grad_logits     # before the next chunk's logits exist: one [c, V] block at a time
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return (grad_hidden, grad_weight) + (None,) * (len(ctx.needs_input_grad) - 2)


# ---- per-chunk math, shared by both executors ----------------------------------------------

def _forward_stats(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """logits `[c, V]` fp32 -> (log-prob of target `[c]`, 0 where ignored; logsumexp `[c]`).
    Written out of place and without scatter so torch.compile fuses it into one pass."""
    ignored = targets == ignore_index
    # Out-of-range targets are refused before the loop (on CUDA asynchronously, so this may
    # run first): clamp so the gather itself stays in bounds.
    index = targets.masked_fill(ignored, 0).clamp(0, logits.shape[-1] - 1)
    picked = logits.gather(-1, index[:, None]).squeeze(-1)
    lse = logits.logsumexp(-1)
    return torch.where(ignored, 0.0, picked - lse), lse


def _grad_logits(logits: Tensor, targets: Tensor, lse: Tensor, grad: Tensor,
                 ignore_index: int) -> Tensor:
    """d(sum_i g_i log p_i[t_i]) / d logits = g_i (onehot(t_i) - softmax_i), computed in place
    on the fp32 logits buffer. Rows with ignored targets get g = 0, hence exact zeros
    wherever their logits are finite (non-finite logits give NaN, as they do in the loss)."""
    ignored = targets == ignore_index
    grad = torch.where(ignored, 0.0, grad)
    grad_logits = logits.sub_(lse[:, None]).exp_().mul_(-grad[:, None])
    index = targets.masked_fill(ignored, 0).clamp(0, logits.shape[-1] - 1)
    return grad_logits.scatter_add_(-1, index[:, None], grad[:, None])


def _grad_logits_fused(logits: Tensor, targets: Tensor, lse: Tensor, grad: Tensor,
                       ignore_index: int, out_dtype: torch.dtype) -> Tensor:
    """The same, out of place and with an explicit one-hot, for torch.compile to fuse into one
    pass that writes the gradient in the matmul dtype."""
    grad = torch.where(targets == ignore_index, 0.0, grad)[:, None]
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    onehot = (vocab[None, :] == targets[:, None]).to(logits.dtype)
    return (grad * (onehot - (logits - lse[:, None]).exp())).to(out_dtype)


def _log_sum_sq(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """logits `[c, V]` -> float32 log(sum_v p_v^2) `[c]`, 0 where ignored: with m the row's
    largest logit, logsumexp(2 (z - m)) - 2 logsumexp(z - m), as TRL's kernel computes it;
    z - m is exact for the largest logits, where the terms that matter are."""
    shifted = logits - logits.amax(dim=-1, keepdim=True)     # one more [c, V] block
    log_sum = torch.logsumexp(shifted, dim=-1)
    value = torch.logsumexp(shifted.mul_(2), dim=-1) - 2 * log_sum
    return torch.where(targets == ignore_index, 0.0, value).float()


@functools.cache
def _compiled_log_sum_sq():
    return torch.compile(_log_sum_sq, dynamic=False)


@functools.cache
def _compiled_forward_stats():
    return torch.compile(_forward_stats, dynamic=False)


@functools.cache
def _compiled_grad_logits():
    return torch.compile(_grad_logits_fused, dynamic=False)


# ---- matmuls and chunking -----------------------------------------------------------------

def _compute_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _operand_weight(weight: Tensor, use_compiled: bool) -> Tensor:
    """The weight as the matmuls take it. CUDA half weights stay in their dtype (float32 output
    via out_dtype) where this torch supports that; elsewhere float32 (float64 stays), which
    copies `[V, D]` once per call for half weights, never anything `[N, V]`."""
    if use_compiled and weight.dtype in _HALF_DTYPES and _half_matmuls_supported(weight.device):
        return weight
    return weight.to(_compute_dtype(weight))


@functools.cache
def _half_matmuls_supported(device: torch.device) -> bool:
    """`half_matmuls_work(device)`, decided once per device (one tiny probe and one host sync,
    at the first half-precision call). CPU is never probed: it has no mixed-dtype matmuls."""
    return device.type == "cuda" and half_matmuls_work(device)


def half_matmuls_work(device: torch.device) -> bool:
    """Whether `_chunk_logits` and `_accumulate_grad_weight` work on `device` with bf16
    operands: a float32 `h @ w.T` (`mm` with `out_dtype`, torch >= 2.8) and a float32
    `acc += g.T @ h` (`addmm.dtype_out`), each equal to the float32 computation on the same
    values. Before torch 2.10 CUDA rejects these mixed dtypes (pytorch issues 154086 and
    167931); any failure or mismatch means the float32 path."""
    generator = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator).to(device, torch.bfloat16)

    h, w, g = draw(8, 32), draw(16, 32), draw(8, 16)
    acc = torch.randn(16, 32, generator=generator).to(device)
    try:
        logits = _chunk_logits(h, w)
        expected_acc = acc + g.float().t() @ h.float()
        _accumulate_grad_weight(acc, g, h)
    except Exception:  # noqa: BLE001 - whatever the reason, the float32 path always works
        return False
    # bf16 products are exact in float32; only the summation order may differ.
    return bool(logits.dtype == torch.float32 and acc.dtype == torch.float32
                and torch.allclose(logits, h.float() @ w.float().t(), rtol=1e-4, atol=1e-4)
                and torch.allclose(acc, expected_acc, rtol=1e-4, atol=1e-4))


def _chunk_logits(h: Tensor, w: Tensor) -> Tensor:
    """`h @ w.T` as float32 (float64 for float64) `[c, V]`."""
    if w.dtype in _HALF_DTYPES:
        return torch.mm(h, w.t(), out_dtype=torch.float32)
    return h.to(w.dtype) @ w.t()


def _accumulate_grad_weight(grad_weight: Tensor, grad_logits: Tensor, h: Tensor) -> None:
    """grad_weight `[V, D]` += grad_logits.T `[V, c]` @ h `[c, D]`, summed in grad_weight's
    dtype. Half operands (CUDA) write straight into the float32 accumulator (cuBLAS
    C += A @ B); otherwise the operands are already in the accumulator's dtype
    except h, whose chunk is cast."""
    if grad_logits.dtype in _HALF_DTYPES:
        torch.ops.aten.addmm.dtype_out(grad_weight, grad_logits.t(), h, grad_weight.dtype,
                                       out=grad_weight)
    else:
        grad_weight.addmm_(grad_logits.t(), h.to(grad_weight.dtype))


def _chunks(hidden: Tensor, targets: Tensor, ignore_index: int, chunk_size: int, pad: bool):
    """Yield (start, end, hidden rows, targets) per chunk; with `pad` every chunk has exactly
    `chunk_size` rows, the tail filled with zero hidden states and ignored targets."""
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        h, t = hidden[start:end], targets[start:end]
        if pad and end - start < chunk_size:
            h, t = _pad_rows(h, chunk_size, 0.0), _pad_rows(t, chunk_size, ignore_index)
        yield start, end, h, t


def _pad_rows(x: Tensor, rows: int, value: float | int) -> Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0], *x.shape[1:]), value)
    return torch.cat([x, pad])


# ---- validation -----------------------------------------------------------------------------

def _check_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> None:
    if targets.dim() != 1:
        raise ValueError(f"expected targets [N]; got shape {tuple(targets.shape)}")
    _check_operands(hidden, weight, chunk_size)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} entries for {hidden.shape[0]} "
                         "hidden states")
    if targets.dtype != torch.long:
        raise ValueError(f"targets must be int64 token ids; got {targets.dtype}")
    if targets.device != hidden.device:
        raise ValueError(f"targets are on {targets.device}, hidden on {hidden.device}; expected "
                         "one device")


def _check_operands(hidden: Tensor, weight: Tensor, chunk_size: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"expected hidden [N, D] and weight [V, D]; got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden {tuple(hidden.shape)} has D = "
                         f"{hidden.shape[1]}, weight {tuple(weight.shape)} has D = "
                         f"{weight.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if hidden.dtype not in _FLOAT_DTYPES or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share one floating dtype (bfloat16, float16, "
                         f"float32, float64); got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device}, weight on {weight.device}; expected "
                         "one device")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")


def _check_targets(targets: Tensor, ignore_index: int, vocab_size: int) -> None:
    """Targets outside `[0, vocab_size)` other than ignore_index: a ValueError naming the first
    on CPU; on other devices a device-side assert, which fails the next synchronizing call
    instead of making the host wait for the device on every forward."""
    if targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    message = (f"a target id is outside the vocabulary [0, {vocab_size}) and is not "
               f"ignore_index ({ignore_index})")
    if not values_checked_on_host(targets):
        torch._assert_async(~bad.any(), message)
    elif bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"target id {int(targets[index])} at position {index} is outside the "
                         f"vocabulary [0, {vocab_size}) and is not ignore_index "
                         f"({ignore_index})")


def values_checked_on_host(tensor: Tensor) -> bool:
    """Whether the kernels check a tensor's values by reading them on the host: on CPU that is
    free and gives a ValueError naming the bad entry; on an accelerator it would stall the host
    until the device caught up, so there the checks are device-side asserts
    (`torch._assert_async`)."""
    return tensor.device.type == "cpu"
