"""`linear_log_probs` (chunked, recomputing) against `reference_linear_log_probs` (logits
materialized): values and gradients for hidden and weight, odd sizes, ignored targets, dtypes,
tied weights, strided inputs, what is saved for backward, input errors (host-side on CPU,
device-side as on CUDA), non-finite values passed through, and the probe that decides whether
half-precision weights may stay half."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prefixdpo.kernels.log_probs import (DEFAULT_CHUNK_SIZE, linear_log_probs, linear_logit_stats,
                     reference_linear_log_probs, reference_log_sum_sq_probs)
import prefixdpo.kernels.log_probs as log_probs_module
from prefixdpo.kernels.log_probs import _LinearLogProbs

IGNORE = -100


def make_inputs(num_tokens: int, vocab: int, dim: int, dtype=torch.float32, ignored=True,
                seed=0, device="cpu"):
    """Random float64 values rounded to `dtype`; with `ignored`, every 4th target (from the
    second) is ignore_index."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    targets = torch.randint(0, vocab, (num_tokens,), generator=generator)
    if ignored:
        targets[1::4] = IGNORE
    hidden = hidden.to(device=device, dtype=dtype).requires_grad_()
    weight = weight.to(device=device, dtype=dtype).requires_grad_()
    return hidden, weight, targets.to(device)


def values_and_grads(fn, hidden, weight, targets, grad_out, **kwargs):
    out = fn(hidden, weight, targets, **kwargs)
    grad_hidden, grad_weight = torch.autograd.grad(out, (hidden, weight), grad_out)
    return out, grad_hidden, grad_weight


@pytest.mark.parametrize("num_tokens,vocab,dim,chunk_size", [
    (37, 53, 19, 8),      # N not a multiple of the chunk
    (37, 53, 19, 64),     # one chunk larger than N
    (37, 53, 19, 37),     # exactly one chunk
    (37, 53, 19, 1),      # one row per chunk
    (5, 1001, 3, 2),      # vocab much larger than dim
    (64, 7, 33, 16),      # tiny vocab, N a multiple of the chunk
])
def test_matches_reference_float32(num_tokens, vocab, dim, chunk_size):
    hidden, weight, targets = make_inputs(num_tokens, vocab, dim)
    assert (targets == IGNORE).any() and (targets != IGNORE).any()
    grad_out = torch.randn(num_tokens, generator=torch.Generator().manual_seed(1))
    ours = values_and_grads(linear_log_probs, hidden, weight, targets, grad_out,
                            chunk_size=chunk_size)
    ref = values_and_grads(reference_linear_log_probs, hidden, weight, targets, grad_out)
    assert ours[0].dtype == torch.float32 and ours[0].shape == (num_tokens,)
    assert torch.all(ours[0][targets == IGNORE] == 0)
    assert torch.all(ours[0][targets != IGNORE] < 0)
    for name, a, b in zip(("log_probs", "grad_hidden", "grad_weight"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_reference_is_the_log_softmax_definition():
    """The oracle itself, against log(exp(z_t) / sum_v exp(z_v)) in float64 for one token."""
    hidden, weight, targets = make_inputs(3, 11, 4, dtype=torch.float64, ignored=False)
    logits = (hidden @ weight.t()).detach()
    out = reference_linear_log_probs(hidden, weight, targets)
    for i in range(3):
        expected = logits[i, targets[i]] - math.log(sum(math.exp(z) for z in logits[i].tolist()))
        assert abs(out[i].item() - expected) < 1e-6


def test_default_chunk_size_and_model_call_signature():
    hidden, weight, targets = make_inputs(DEFAULT_CHUNK_SIZE + 3, 13, 5)
    # The model calls it positionally with three arguments.
    out = linear_log_probs(hidden, weight, targets)
    torch.testing.assert_close(out, reference_linear_log_probs(hidden, weight, targets),
                               rtol=1e-5, atol=1e-5)


def test_all_targets_ignored_gives_zeros_and_zero_grads():
    hidden, weight, targets = make_inputs(9, 17, 4)
    targets = torch.full_like(targets, IGNORE)
    out, grad_hidden, grad_weight = values_and_grads(linear_log_probs, hidden, weight, targets,
                                                     torch.ones(9), chunk_size=4)
    assert torch.equal(out, torch.zeros(9))
    assert torch.equal(grad_hidden, torch.zeros_like(hidden))
    assert torch.equal(grad_weight, torch.zeros_like(weight))


def test_custom_ignore_index():
    hidden, weight, targets = make_inputs(12, 10, 4, ignored=False)
    targets[::3] = -1
    ours = linear_log_probs(hidden, weight, targets, ignore_index=-1, chunk_size=5)
    ref = reference_linear_log_probs(hidden, weight, targets, ignore_index=-1)
    assert torch.all(ours[::3] == 0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs():
    """bf16 hidden/weight: logits and accumulation in float32, so the log-probs equal the
    float32 computation on the same (bf16-representable) values to float32 rounding
    (rtol 1e-5). Gradients come back in bf16: within one bf16 rounding (relative 2^-8 = 0.4%)
    of the float32 reference gradients, so rtol 1e-2 with an absolute floor of 1e-3 of the
    largest entry."""
    hidden, weight, targets = make_inputs(29, 41, 12, dtype=torch.bfloat16)
    grad_out = torch.randn(29, generator=torch.Generator().manual_seed(2))
    out, grad_hidden, grad_weight = values_and_grads(linear_log_probs, hidden, weight, targets,
                                                     grad_out, chunk_size=8)
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref, ref_grad_hidden, ref_grad_weight = values_and_grads(reference_linear_log_probs, h32,
                                                             w32, targets, grad_out)
    assert out.dtype == torch.float32
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for ours, expected in ((grad_hidden, ref_grad_hidden), (grad_weight, ref_grad_weight)):
        torch.testing.assert_close(ours.float(), expected, rtol=1e-2,
                                   atol=1e-3 * expected.abs().max().item())


def test_float64_gradients_are_exact():
    """float64 inputs compute in float64 (the output is float32 by contract): gradients agree
    with the float64 reference to 1e-12."""
    hidden, weight, targets = make_inputs(23, 31, 7, dtype=torch.float64)
    grad_out = torch.randn(23, generator=torch.Generator().manual_seed(3))
    ours = values_and_grads(linear_log_probs, hidden, weight, targets, grad_out, chunk_size=6)
    ref = values_and_grads(reference_linear_log_probs, hidden, weight, targets, grad_out)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-12, atol=1e-12)


def test_gradient_matches_finite_differences():
    """d log p_t / d hidden against central differences of log p_t = z_t - log sum_v exp z_v,
    evaluated in float64 with plain ops (the kernel's output is float32, too coarse for FD)."""
    hidden, weight, targets = make_inputs(4, 9, 3, dtype=torch.float64, ignored=False)
    grad_hidden, = torch.autograd.grad(linear_log_probs(hidden, weight, targets,
                                                        chunk_size=3)[2], hidden)

    def log_prob(h_row):
        logits = weight.detach() @ h_row
        return (logits[targets[2]] - logits.logsumexp(0)).item()

    step = 1e-6
    for j in range(3):
        plus, minus = hidden[2].detach().clone(), hidden[2].detach().clone()
        plus[j] += step
        minus[j] -= step
        numeric = (log_prob(plus) - log_prob(minus)) / (2 * step)
        assert abs(grad_hidden[2, j].item() - numeric) < 1e-8


def test_tied_embedding_gets_gradient_from_both_uses():
    """The head weight is the embedding matrix: its gradient is the sum of the lookup's and
    the head's contributions, equal to the reference path's, and differs from either alone."""
    torch.manual_seed(0)
    embed = nn.Embedding(23, 8)
    ids = torch.randint(0, 23, (15,))
    targets = torch.randint(0, 23, (15,))
    targets[3] = IGNORE

    def grad_of(fn, detach_lookup=False, detach_head=False):
        embed.zero_grad()
        hidden = torch.tanh(embed(ids))
        if detach_lookup:
            hidden = hidden.detach()
        weight = embed.weight.detach() if detach_head else embed.weight
        fn(hidden, weight, targets).sum().backward()
        return embed.weight.grad.clone()

    def ours(h, w, t):
        return linear_log_probs(h, w, t, chunk_size=4)

    both = grad_of(ours)
    torch.testing.assert_close(both, grad_of(reference_linear_log_probs), rtol=1e-5, atol=1e-6)
    lookup_only = grad_of(ours, detach_head=True)
    head_only = grad_of(ours, detach_lookup=True)
    torch.testing.assert_close(both, lookup_only + head_only, rtol=1e-5, atol=1e-6)
    assert (both - head_only).abs().max() > 1e-3 and (both - lookup_only).abs().max() > 1e-3


def test_non_contiguous_inputs():
    hidden, weight, targets = make_inputs(40, 26, 10)
    # Every other row and column of a wider hidden, a transposed-storage weight, strided ids.
    wide = torch.randn(40, 20, dtype=torch.float32)
    wide[:, ::2] = hidden.detach()
    strided_hidden = wide[:, ::2].requires_grad_()
    weight_t = weight.detach().t().contiguous().t().requires_grad_()
    long_targets = torch.stack([targets, targets], 1).flatten()[::2]
    assert not strided_hidden.is_contiguous() and not weight_t.is_contiguous()
    assert not long_targets.is_contiguous()
    grad_out = torch.randn(40)
    ours = values_and_grads(linear_log_probs, strided_hidden, weight_t, long_targets, grad_out,
                            chunk_size=16)
    ref = values_and_grads(reference_linear_log_probs, hidden, weight, targets, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_saves_nothing_of_size_tokens_times_vocab():
    """Exactly hidden, weight, targets and a per-token logsumexp are saved for backward."""
    num_tokens, vocab, dim = 64, 100, 8
    hidden, weight, targets = make_inputs(num_tokens, vocab, dim)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = linear_log_probs(hidden, weight, targets, chunk_size=16)
    assert sorted(saved) == sorted([(num_tokens, dim), (vocab, dim), (num_tokens,),
                                    (num_tokens,)])
    assert max(math.prod(shape) for shape in saved) < num_tokens * vocab
    # ... while the reference keeps [N, V] tensors alive.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        reference_linear_log_probs(hidden, weight, targets)
    assert max(math.prod(shape) for shape in saved) == num_tokens * vocab
    out.sum().backward()
    assert hidden.grad is not None and weight.grad is not None


def test_weight_without_grad_and_no_grad_mode():
    hidden, weight, targets = make_inputs(10, 12, 4)
    frozen = weight.detach()
    out = linear_log_probs(hidden, frozen, targets, chunk_size=3)
    grad_hidden, = torch.autograd.grad(out.sum(), hidden)
    ref_grad, = torch.autograd.grad(reference_linear_log_probs(hidden, frozen, targets).sum(),
                                    hidden)
    torch.testing.assert_close(grad_hidden, ref_grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        out = linear_log_probs(hidden, weight, targets)
    assert not out.requires_grad


def test_empty_input_returns_empty_and_zero_weight_grad():
    hidden, weight, targets = make_inputs(0, 12, 4)
    out = linear_log_probs(hidden, weight, targets)
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert hidden.grad.shape == (0, 4)


def test_vocab_of_one_gives_log_prob_zero():
    hidden, weight, targets = make_inputs(6, 1, 3, ignored=False)
    out = linear_log_probs(hidden, weight, targets, chunk_size=4)
    assert torch.equal(out, torch.zeros(6))


def _bad_inputs():
    h, w, t = torch.randn(4, 3), torch.randn(7, 3), torch.tensor([0, 1, 2, 3])
    return [
        ((h[None], w, t), "expected hidden \\[N, D\\]"),
        ((h, w[None], t), "expected hidden \\[N, D\\]"),
        ((h, w, t[None]), "expected targets \\[N\\]"),
        ((h, torch.randn(7, 4), t), "hidden size mismatch"),
        ((h, w, t[:3]), "3 entries for 4 hidden states"),
        ((h, w.double(), t), "share one floating dtype"),
        ((h.long(), w.long(), t), "share one floating dtype"),
        ((h, w, t.int()), "int64"),
        ((h, torch.randn(0, 3), t[:4]), "empty vocabulary"),
        ((h, w, torch.tensor([0, 1, 7, 3])), "target id 7 at position 2 is outside"),
        ((h, w, torch.tensor([0, -5, 1, 3])), "target id -5 at position 1"),
        ((h, w, t, -100, 0), "chunk_size must be a positive int"),
        ((h, w, t, -100, 2.0), "chunk_size must be a positive int"),
        ((h, w, t.to("meta")), "one device"),
    ]


@pytest.mark.parametrize("args,message", _bad_inputs())
def test_bad_inputs_raise_clear_errors(args, message):
    with pytest.raises(ValueError, match=message):
        linear_log_probs(*args)


def test_non_finite_hidden_propagates_to_its_token_only():
    """No check, no error: a NaN hidden state gives that token a NaN log-prob and NaN
    gradients (for the training step's non-finite policy to act on); the other tokens' values
    are exactly those of the clean input."""
    hidden, weight, targets = make_inputs(10, 12, 4, ignored=False)
    clean = linear_log_probs(hidden, weight, targets, chunk_size=4).detach()
    bad = hidden.detach().clone()
    bad[6, 1] = float("nan")
    bad.requires_grad_()
    out = linear_log_probs(bad, weight, targets, chunk_size=4)
    assert math.isnan(out[6].item())
    rest = torch.arange(10) != 6
    assert torch.equal(out[rest], clean[rest])
    grad_hidden, grad_weight = torch.autograd.grad(out.sum(), (bad, weight))
    assert torch.isnan(grad_hidden[6]).all() and torch.isfinite(grad_hidden[rest]).all()
    assert not torch.isfinite(grad_weight).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_makes_the_output_non_finite(value):
    """A NaN weight entry reaches every token's logsumexp; an inf one, every token whose
    hidden state has the sign that makes its logit +inf."""
    hidden, weight, targets = make_inputs(10, 12, 4, ignored=False)
    weight = weight.detach().clone()
    weight[3, 2] = value
    out = linear_log_probs(hidden, weight, targets, chunk_size=4)
    if math.isnan(value):
        assert torch.isnan(out).all()
    else:
        assert not torch.isfinite(out[hidden[:, 2] > 0]).any()
    grad_hidden, = torch.autograd.grad(out.sum(), hidden)
    assert not torch.isfinite(grad_hidden).all()


@pytest.fixture
def device_side_checks(monkeypatch):
    """Value checks as on CUDA: device-side asserts instead of host reads."""
    monkeypatch.setattr(log_probs_module, "values_checked_on_host", lambda tensor: False)


@pytest.mark.parametrize("bad_target", [12, -5])
def test_device_side_target_check(device_side_checks, bad_target):
    """On CUDA an out-of-range target fails `torch._assert_async` (on CPU, which runs it
    eagerly, a RuntimeError) instead of a host-read ValueError; valid and ignored targets
    pass it."""
    hidden, weight, targets = make_inputs(10, 12, 4)
    torch.testing.assert_close(linear_log_probs(hidden, weight, targets, chunk_size=4),
                               reference_linear_log_probs(hidden, weight, targets))
    targets[2] = bad_target
    with pytest.raises(RuntimeError, match="outside the vocabulary \\[0, 12\\)"):
        linear_log_probs(hidden, weight, targets, chunk_size=4)


class _FakeHalfMatmuls:
    """Stand-ins for the CUDA-only mixed-dtype ops, so their probe can be run on CPU: correct
    by default, or broken in one of the ways old torch versions are."""

    def __init__(self, monkeypatch, mm="ok", addmm="ok"):
        real_mm = torch.mm

        def mm_op(a, b, out_dtype=None):
            if mm == "raises":
                raise RuntimeError("expected mat1 and mat2 to have the same dtype")
            result = real_mm(a.float(), b.float())
            return result.to(torch.bfloat16).float() if mm == "rounds" else result

        def addmm_op(acc, a, b, dtype, out):
            if addmm == "raises":
                raise RuntimeError("self and mat2 must have the same dtype")
            product = real_mm(a.float(), b.float())
            # "overwrites": the accumulator is ignored, as a broken out= path would.
            return out.copy_(product if addmm == "overwrites" else acc + product)

        monkeypatch.setattr(torch, "mm", mm_op)
        monkeypatch.setattr(torch.ops.aten.addmm, "dtype_out", addmm_op, raising=False)


@pytest.mark.parametrize("mm,addmm,works", [
    ("ok", "ok", True),
    ("raises", "ok", False),
    ("rounds", "ok", False),        # logits rounded to bf16: not the float32 result
    ("ok", "raises", False),
    ("ok", "overwrites", False),    # no accumulation into the float32 gradient
])
def test_half_matmul_probe_falls_back_to_float32(monkeypatch, mm, addmm, works):
    _FakeHalfMatmuls(monkeypatch, mm, addmm)
    assert log_probs_module.half_matmuls_work(torch.device("cpu")) is works


def test_half_matmuls_unsupported_on_cpu_and_never_probed_there(monkeypatch):
    """The real ops do not exist on CPU, so the probe says no; and CPU never runs it: bf16
    CPU inputs take the float32 path without asking."""
    assert log_probs_module.half_matmuls_work(torch.device("cpu")) is False

    def no_probe(device):
        raise AssertionError("probed on CPU")

    monkeypatch.setattr(log_probs_module, "half_matmuls_work", no_probe)
    log_probs_module._half_matmuls_supported.cache_clear()
    try:
        hidden, weight, targets = make_inputs(6, 9, 4, dtype=torch.bfloat16)
        assert log_probs_module._operand_weight(weight, use_compiled=True).dtype == torch.float32
        linear_log_probs(hidden, weight, targets)
        assert not log_probs_module._half_matmuls_supported(torch.device("cpu"))
    finally:
        log_probs_module._half_matmuls_supported.cache_clear()


def test_logit_stats_match_explicit_logits():
    hidden, weight, _ = make_inputs(21, 37, 6)
    logits = (hidden @ weight.t()).detach()
    mean_logit, entropy = linear_logit_stats(hidden, weight, chunk_size=8)
    probs = logits.softmax(-1)
    torch.testing.assert_close(mean_logit, logits.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1), rtol=1e-5, atol=1e-5)
    assert not mean_logit.requires_grad
    # A uniform distribution over 37 tokens has entropy ln 37.
    _, uniform = linear_logit_stats(torch.zeros(2, 6), weight.detach())
    torch.testing.assert_close(uniform, torch.full((2,), math.log(37)))


def test_inside_an_fsdp2_module_with_tied_embeddings(tmp_path):
    """One gloo rank: the head weight is FSDP2-unsharded inside the root's forward, tied to the
    embedding; two steps of accumulated gradients equal the plain module's."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")

    class TinyLM(nn.Module):
        def __init__(self, log_probs):
            super().__init__()
            self.log_probs = log_probs
            self.embed_tokens = nn.Embedding(31, 8)
            self.proj = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 31, bias=False)
            self.lm_head.weight = self.embed_tokens.weight

        def forward(self, ids, targets):
            hidden = torch.tanh(self.proj(self.embed_tokens(ids)))
            return self.log_probs(hidden, self.lm_head.weight, targets)

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        plain = TinyLM(reference_linear_log_probs)
        sharded = TinyLM(lambda h, w, t: linear_log_probs(h, w, t, chunk_size=4))
        sharded.load_state_dict(plain.state_dict())
        fully_shard(sharded.proj)
        fully_shard(sharded)
        ids, targets = torch.randint(0, 31, (13,)), torch.randint(0, 31, (13,))
        targets[5] = IGNORE
        for _ in range(2):
            out, ref = sharded(ids, targets), plain(ids, targets)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
            out.sum().backward()
            ref.sum().backward()
        for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
            assert type(p).__name__ == "DTensor", name
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-6,
                                       msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_log_sum_sq_probs_from_the_same_pass(chunk_size):
    """WPO's per-token log(sum_v p_v^2), returned beside the log-probs: equal to the oracle's
    log((softmax ** 2).sum()), 0 where ignored, without gradient; the log-probs and their
    gradients are those of the plain call."""
    hidden, weight, targets = make_inputs(37, 53, 19)
    log_probs, log_sum_sq = linear_log_probs(hidden, weight, targets, chunk_size=chunk_size,
                                             log_sum_sq_probs=True)
    assert log_sum_sq.dtype == torch.float32 and not log_sum_sq.requires_grad
    torch.testing.assert_close(log_sum_sq, reference_log_sum_sq_probs(hidden, weight, targets),
                               rtol=1e-5, atol=1e-6)
    assert torch.all(log_sum_sq[targets == IGNORE] == 0)
    # log sum p^2 <= max log p <= 0, and >= -log V (uniform)
    kept = log_sum_sq[targets != IGNORE]
    assert torch.all(kept <= 0) and torch.all(kept >= -math.log(53) - 1e-5)
    grad_out = torch.randn(37, generator=torch.Generator().manual_seed(1))
    ours = torch.autograd.grad(log_probs, (hidden, weight), grad_out)
    plain = torch.autograd.grad(linear_log_probs(hidden, weight, targets, chunk_size=chunk_size),
                                (hidden, weight), grad_out)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_log_sum_sq_probs_stays_finite_for_large_logits():
    """Logits of 1e4: exp(2 z) overflows float32, log(sum p^2) is computed from z - lse.
    Logits 10000, 0 and 9999: p = (1, 0, e^-1) / (1 + e^-1)."""
    hidden = torch.tensor([[100.0, 0.0]])
    weight = torch.tensor([[100.0, 0.0], [0.0, 1.0], [99.99, 0.0]])
    _, log_sum_sq = linear_log_probs(hidden, weight, torch.tensor([0]), log_sum_sq_probs=True)
    z = (hidden @ weight.t()).double()[0]
    p = (z - z.max()).exp() / (z - z.max()).exp().sum()
    torch.testing.assert_close(log_sum_sq.double(), p.pow(2).sum().log()[None], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.slow
def test_compiled_chunk_path_on_cpu():
    """The CUDA executor's compiled per-chunk functions, run by inductor on CPU: padded last
    chunks, three different N and no recompilation."""
    import torch._dynamo

    hidden, weight, targets = make_inputs(45, 29, 11)
    grad_out = torch.randn(45)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (45, 16, 3):
            h = hidden[:n]
            ours = values_and_grads(
                lambda *args: _LinearLogProbs.apply(*args, IGNORE, 16, True),
                h, weight, targets[:n], grad_out[:n])
            ref = values_and_grads(reference_linear_log_probs, h, weight, targets[:n],
                                   grad_out[:n])
            for a, b in zip(ours, ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            _, log_sum_sq = _LinearLogProbs.apply(h, weight, targets[:n], IGNORE, 16, True,
                                                  True)
            torch.testing.assert_close(log_sum_sq, reference_log_sum_sq_probs(
                h, weight, targets[:n]), rtol=1e-5, atol=1e-6)


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return "cuda"


@pytest.mark.gpu
def test_cuda_float32_matches_reference():
    device = _cuda_or_skip()
    hidden, weight, targets = make_inputs(1000, 3001, 64, device=device)
    grad_out = torch.randn(1000, device=device)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False        # compare float32 with float32
    try:
        ours = values_and_grads(linear_log_probs, hidden, weight, targets, grad_out,
                                chunk_size=256)
        ref = values_and_grads(reference_linear_log_probs, hidden, weight, targets, grad_out)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_bfloat16_matches_reference():
    """bf16 on CUDA: logits in float32 via out_dtype, so log-probs match the float32 reference
    on the same values up to matmul summation order (atol 1e-3 on values ~ -8); gradients
    pass through a bf16 logit gradient as a bf16 nn.Linear would: relative 2e-2."""
    device = _cuda_or_skip()
    hidden, weight, targets = make_inputs(1000, 3001, 64, dtype=torch.bfloat16, device=device)
    grad_out = torch.randn(1000, device=device)
    ours = values_and_grads(linear_log_probs, hidden, weight, targets, grad_out, chunk_size=256)
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref = values_and_grads(reference_linear_log_probs, h32, w32, targets, grad_out)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-4, atol=1e-3)
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
