"""Attention executors beside FlexAttention and dense SDPA, and FlexAttention's kernel choice.

- `document_attention` runs attention per span (the "documents" executor of `model.masks`):
  each bucket of spans is gathered from the rows into a padded batch, attended by
  `scaled_dot_product_attention` (a prompt with its first completion, causally) or by CPU's
  flash kernel in two parts merged by their log-sum-exp (a further completion: its prompt in
  full, then itself causally), and scattered back. So the work is the pairs the mask allows
  rather than L^2 per row, and below the paired layout's. (Off the CPU, a further completion
  is one masked call.)
- `flex_kernel_options` turns a FlexAttention backend name (`FLEX_BACKENDS`) and a block size
  into the `kernel_options` that `flex_attention` takes, refusing with a ValueError what this
  torch or this machine cannot run. "flash" is FlexAttention's FlashAttention-4 backend
  (`kernel_options={"BACKEND": "FLASH"}`, CuTeDSL kernels for Hopper and Blackwell, needing
  the `flash_attn.cute` package of flash-attn-4); "triton" is its default Triton kernel.
  Blocks smaller than the default also need kernel tiles no larger than them (`fit_flex_configs`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import typing

import torch
import torch.nn.functional as F
from torch import Tensor

from prefixdpo.model.masks import FLEX_BLOCK_SIZE, DocumentMask, SpanBucket

FLEX_BACKENDS = ("triton", "flash")


class _Regather(torch.autograd.Function):
    """`x[index]` along dim 0 with rows `zeroed` set to zero; its gradient is `grad[adjoint]`
    with rows `adjoint_zeroed` set to zero. Exact when, but for the zeroed rows, `index` maps
    the rows of `x` one to one onto the output and `adjoint` is its inverse: the backward of
    the gather is then a gather too, rather than a scatter-add into a zeroed buffer."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, adjoint: Tensor, zeroed: Tensor,
                adjoint_zeroed: Tensor) -> Tensor:
        ctx.save_for_backward(adjoint, adjoint_zeroed)
        return x[index].index_fill_(0, zeroed, 0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        adjoint, adjoint_zeroed = ctx.saved_tensors
        return grad[adjoint].index_fill_(0, adjoint_zeroed, 0), None, None, None, None


def _flash_cpu_ops_exist() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and \
        hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def _bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask as the additive bias the flash kernel takes."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


class _PromptThenOwnAttention(torch.autograd.Function):
    """Attention of `q` over a prompt's keys (in full, or under `prompt_mask`) followed by its
    own keys (causally, or under `mask`), as two calls of CPU's flash kernel merged by their
    log-sum-exp: C x P + C^2 / 2 pairs rather than the C x (P + C) of one masked call. The
    backward runs the kernel's backward on each part with the merged output and log-sum-exp,
    which is each part's share of the gradient of the whole softmax."""

    @staticmethod
    def forward(ctx, q: Tensor, prompt_k: Tensor, prompt_v: Tensor, k: Tensor, v: Tensor,
                prompt_mask: Tensor | None, mask: Tensor | None, scale: float) -> Tensor:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        prompt_bias, bias = _bias(prompt_mask, q.dtype), _bias(mask, q.dtype)
        prompt_out, prompt_lse = flash(q, prompt_k, prompt_v, 0.0, False, attn_mask=prompt_bias,
                                       scale=scale)
        own_out, own_lse = flash(q, k, v, 0.0, mask is None, attn_mask=bias, scale=scale)
        if prompt_mask is not None:  # a query that sees no prompt key (a sliding window)
            prompt_lse = prompt_lse.masked_fill(~prompt_mask.any(-1), -math.inf)
        lse = torch.logaddexp(prompt_lse, own_lse)
        out = ((prompt_lse - lse).exp().unsqueeze(-1) * prompt_out.to(lse.dtype)
               + (own_lse - lse).exp().unsqueeze(-1) * own_out.to(lse.dtype)).to(q.dtype)
        ctx.save_for_backward(q, prompt_k, prompt_v, k, v, out, lse, prompt_bias, bias)
        ctx.causal, ctx.scale = mask is None, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, prompt_k, prompt_v, k, v, out, lse, prompt_bias, bias = ctx.saved_tensors
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad = grad.contiguous()
        dq, prompt_dk, prompt_dv = flash_backward(grad, q, prompt_k, prompt_v, out, lse, 0.0,
                                                  False, attn_mask=prompt_bias, scale=ctx.scale)
        own_dq, dk, dv = flash_backward(grad, q, k, v, out, lse, 0.0, ctx.causal,
                                        attn_mask=bias, scale=ctx.scale)
        return dq + own_dq, prompt_dk, prompt_dv, dk, dv, None, None, None


def _attend(q: Tensor, k: Tensor, v: Tensor, bucket: SpanBucket, scale: float) -> Tensor:
    """One bucket: `q [n, heads, lq, d]` over `k`, `v` `[n, kv_heads, lk, d]`."""
    if bucket.prompt_keys == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bucket.mask, scale=scale,
                                              is_causal=bucket.mask is None, enable_gqa=True)
    lp = bucket.prompt_keys
    if q.device.type == "cpu" and _flash_cpu_ops_exist():
        return _PromptThenOwnAttention.apply(q, k[:, :, :lp], v[:, :, :lp], k[:, :, lp:],
                                             v[:, :, lp:], bucket.prompt_mask, bucket.mask,
                                             scale)
    # Elsewhere one call under the whole mask.
    shape = (bucket.spans, 1, bucket.queries)
    prompt_mask = bucket.prompt_mask if bucket.prompt_mask is not None else \
        torch.ones(*shape, lp, dtype=torch.bool, device=q.device)
    mask = bucket.mask if bucket.mask is not None else torch.ones(
        *shape, bucket.keys - lp, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.cat([prompt_mask, mask], -1),
                                          scale=scale, enable_gqa=True)


def document_attention(q: Tensor, k: Tensor, v: Tensor, mask: DocumentMask,
                       scale: float | None = None) -> Tensor:
    """Attention `[B, heads, L, head_dim]` of `q [B, heads, L, head_dim]` over `k`, `v`
    `[B, kv_heads, L, head_dim]` with q.k scaled by `scale` (None: 1/sqrt(head_dim)), one
    bucket of spans at a time; equal to dense SDPA with the full mask on every non-padding
    token (padding tokens attend to themselves only)."""
    batch, num_heads, seq_len, head_dim = q.shape
    assert (batch, seq_len) == (mask.batch_size, mask.seq_len), "mask built for other rows"
    scale = head_dim ** -0.5 if scale is None else scale
    no_rows = mask.empty_query_slots[:0]

    def tokens(x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(batch * seq_len, x.shape[1], head_dim)

    def per_bucket(slots: Tensor, lengths: list[int]) -> list[Tensor]:
        """[S, h, d] -> per bucket [n, h, length, d]."""
        sizes = [b.spans * length for b, length in zip(mask.buckets, lengths)]
        return [part.view(b.spans, length, slots.shape[1], head_dim).transpose(1, 2)
                for b, length, part in zip(mask.buckets, lengths, slots.split(sizes))]

    # Queries: each token in one slot, so gathering them back is a gather too. Keys and
    # values: a prompt's are repeated for each of its completions, so their gradient is a
    # sum (index_select's backward adds).
    queries = _Regather.apply(tokens(q), mask.query_slot_token, mask.token_slot,
                              mask.empty_query_slots, no_rows)
    keys, values = (tokens(x).index_select(0, mask.key_slot_token) for x in (k, v))
    query_lengths, key_lengths = [b.queries for b in mask.buckets], [b.keys for b in mask.buckets]
    outputs = [_attend(q_b, k_b, v_b, bucket, scale)
               for q_b, k_b, v_b, bucket in zip(per_bucket(queries, query_lengths),
                                                per_bucket(keys, key_lengths),
                                                per_bucket(values, key_lengths), mask.buckets)]
    out = torch.cat([o.transpose(1, 2).reshape(-1, num_heads, head_dim) for o in outputs])
    # Back to row order; the empty slots' outputs are dropped, so their gradient is zero.
    out = _Regather.apply(out, mask.token_slot, mask.query_slot_token, no_rows,
                          mask.empty_query_slots)
    return out.view(batch, seq_len, num_heads, head_dim).transpose(1, 2)


def _torch_flex_backends() -> tuple[str, ...]:
    """The values this torch accepts for `kernel_options["BACKEND"]` (none before it had one)."""
    try:
        from torch.nn.attention.flex_attention import FlexKernelOptions
    except ImportError:
        return ()
    return typing.get_args(typing.get_type_hints(FlexKernelOptions).get("BACKEND"))


def flex_kernel_options(backend: str, block_size: int = FLEX_BLOCK_SIZE
                        ) -> dict[str, str | int] | None:
    """`kernel_options` for `flex_attention` that select `backend` (one of FLEX_BACKENDS) for
    BlockMasks of `block_size` blocks; a ValueError if it cannot run here. None: torch's own
    choice, on a torch without a BACKEND option (where Triton is the only backend).

    A block smaller than the default needs Triton tiles that divide it, forward and backward:
    the default forward tile on Hopper is 128 x 128 (`Q and KV block size must be divisible by
    BLOCK_M and BLOCK_N`). The backward tiles keep its kernel's constraints (BLOCK_N1 a
    multiple of BLOCK_M1, BLOCK_M2 of BLOCK_N2)."""
    if backend not in FLEX_BACKENDS:
        raise ValueError(f"unknown FlexAttention backend {backend!r}; choose one of "
                         f"{FLEX_BACKENDS}")
    options: dict[str, str | int] = {}
    if block_size < FLEX_BLOCK_SIZE:
        small = min(block_size, 64)
        options.update(fwd_BLOCK_M=block_size, fwd_BLOCK_N=block_size, bwd_BLOCK_M1=small,
                       bwd_BLOCK_N1=block_size, bwd_BLOCK_M2=block_size, bwd_BLOCK_N2=small)
    supported = _torch_flex_backends()
    if backend == "triton":
        if "TRITON" in supported:
            options["BACKEND"] = "TRITON"
        return options or None
    if "FLASH" not in supported:
        raise ValueError(f"FlexAttention backend 'flash' needs a torch whose flex_attention "
                         f"takes kernel_options BACKEND='FLASH'; torch {torch.__version__} "
                         "does not: upgrade torch or use 'triton'")
    if not torch.cuda.is_available():
        raise ValueError("FlexAttention backend 'flash' needs a CUDA GPU (Hopper or Blackwell); "
                         "none is available: use 'triton' (or no FlexAttention on CPU)")
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        raise ValueError(f"FlexAttention backend 'flash' needs a Hopper or Blackwell GPU; this "
                         f"one has compute capability {major}.{minor}: use 'triton'")
    if importlib.util.find_spec("flash_attn") is None or \
            importlib.util.find_spec("flash_attn.cute") is None:
        raise ValueError("FlexAttention backend 'flash' needs FlashAttention-4's CuTeDSL "
                         "kernels (the flash_attn.cute module): pip install flash-attn-4")
    if block_size != FLEX_BLOCK_SIZE:
        raise ValueError(f"FlexAttention backend 'flash' takes blocks of {FLEX_BLOCK_SIZE} "
                         f"tokens only, not {block_size}")
    return {"BACKEND": "FLASH"}


@functools.cache
def fit_flex_configs(block_size: int) -> bool:
    """Make the Triton tile configs inductor offers FlexAttention no larger than `block_size`,
    for this process; whether it could.

    Inductor checks each candidate config's tiles against the BlockMask's block before the
    kernel options replace them, and offers one config per direction (more with
    max-autotune); Hopper's backward config at head_dim 64-128 has 128-token tiles, so a
    64-token block has no candidate left and fails to compile, whatever the options say.
    Capping every candidate's tiles at the block keeps the candidates (tiles are powers of
    two, so the kernels' divisibility constraints still hold). Through the choices hook
    inductor documents (`InductorChoices`), installed by `inductor_choices_class` so the
    backward's compilation, which runs in autograd's own thread, sees it too."""
    try:
        from torch._inductor import config
        from torch._inductor.choices import InductorChoices
    except ImportError:
        return False
    if not hasattr(InductorChoices, "get_flex_attention_bwd_configs") or \
            getattr(config, "inductor_choices_class", False) is not None:
        return False  # an older inductor, or another owner of the hook

    def capped(configs: list, fields: tuple[str, ...]) -> list:
        return [dataclasses.replace(c, **{f: min(getattr(c, f), block_size) for f in fields})
                for c in configs]

    class FittedChoices(InductorChoices):
        def get_flex_attention_fwd_configs(self, *args, **kwargs) -> list:
            return capped(super().get_flex_attention_fwd_configs(*args, **kwargs),
                          ("block_m", "block_n"))

        def get_flex_attention_bwd_configs(self, *args, **kwargs) -> list:
            return capped(super().get_flex_attention_bwd_configs(*args, **kwargs),
                          ("block_m1", "block_n1", "block_m2", "block_n2"))

    config.inductor_choices_class = FittedChoices
    return True
