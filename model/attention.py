"""Attention executors beside FlexAttention and dense SDPA, and FlexAttention's kernel choice.

- `document_attention` runs attention per span (the "documents" executor of `model.masks`:
  a span is a document's prompt followed by one of its completions): each bucket of spans is
  gathered from the rows into a padded batch, attended causally or with its own small mask by
  `scaled_dot_product_attention`, and scattered back, so the work follows the documents
  rather than L^2 per row, and never exceeds the paired layout's.
- `flex_kernel_options` turns a FlexAttention backend name (`FLEX_BACKENDS`) into the
  `kernel_options` that `flex_attention` takes, refusing with a ValueError what this torch or
  this machine cannot run. "flash" is FlexAttention's FlashAttention-4 backend
  (`kernel_options={"BACKEND": "FLASH"}`, CuTeDSL kernels for Hopper and Blackwell, needing
  the `flash_attn.cute` package of flash-attn-4); "triton" is its default Triton kernel.
"""

from __future__ import annotations

import importlib.util
import typing

import torch
import torch.nn.functional as F
from torch import Tensor

from model.masks import DocumentMask

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


def document_attention(q: Tensor, k: Tensor, v: Tensor, mask: DocumentMask) -> Tensor:
    """Attention `[B, heads, L, head_dim]` of `q [B, heads, L, head_dim]` over `k`, `v`
    `[B, kv_heads, L, head_dim]`, one bucket of spans at a time; equal to dense SDPA with
    the full mask on every non-padding token (padding tokens attend to themselves only)."""
    batch, num_heads, seq_len, head_dim = q.shape
    assert (batch, seq_len) == (mask.batch_size, mask.seq_len), "mask built for other rows"
    no_rows = mask.empty_query_slots[:0]

    def tokens(x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(batch * seq_len, x.shape[1], head_dim)

    def per_bucket(slots: Tensor, lengths: list[int]) -> list[Tensor]:
        """[S, h, d] -> per bucket [n, h, length, d]."""
        sizes = [n * length for (n, _, _), length in zip(mask.shapes, lengths)]
        return [part.view(n, length, slots.shape[1], head_dim).transpose(1, 2)
                for (n, _, _), length, part in zip(mask.shapes, lengths, slots.split(sizes))]

    # Queries: each token in one slot, so gathering them back is a gather too. Keys and
    # values: a prompt's are repeated for each of its completions, so their gradient is a
    # sum (index_select's backward adds).
    queries = _Regather.apply(tokens(q), mask.query_slot_token, mask.token_slot,
                              mask.empty_query_slots, no_rows)
    keys, values = (tokens(x).index_select(0, mask.key_slot_token) for x in (k, v))
    query_lengths, key_lengths = [lq for _, lq, _ in mask.shapes], [lk for *_, lk in mask.shapes]
    outputs = [F.scaled_dot_product_attention(q_b, k_b, v_b, attn_mask=m, is_causal=m is None,
                                              enable_gqa=True)
               for q_b, k_b, v_b, m in zip(per_bucket(queries, query_lengths),
                                           per_bucket(keys, key_lengths),
                                           per_bucket(values, key_lengths), mask.masks)]
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


def flex_kernel_options(backend: str) -> dict[str, str] | None:
    """`kernel_options` for `flex_attention` that select `backend` (one of FLEX_BACKENDS);
    a ValueError if it cannot run here. None: torch's own choice, on a torch without a
    BACKEND option (where Triton is the only backend)."""
    if backend not in FLEX_BACKENDS:
        raise ValueError(f"unknown FlexAttention backend {backend!r}; choose one of "
                         f"{FLEX_BACKENDS}")
    supported = _torch_flex_backends()
    if backend == "triton":
        return {"BACKEND": "TRITON"} if "TRITON" in supported else None
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
    return {"BACKEND": "FLASH"}
