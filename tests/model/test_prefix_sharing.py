"""Invariant 1 at the model level: in the prefix-shared (and packed) layout, the hidden states
of prompt+chosen and prompt+rejected, and the gradients through them, equal those of each
sequence run alone with a causal mask."""

from __future__ import annotations

import pytest
import torch
from conftest import DENSE, FAMILIES, FLEX, family_model


P, C1, C2 = 7, 5, 9  # prompt, chosen, rejected lengths


def run(model, rows: list[tuple[list[int], list[int], list[int], list[int]]], executor=DENSE):
    """rows: (tokens, positions, segment_ids, document_ids) per row, padded to one length."""
    tensors = [torch.tensor([r[i] for r in rows]) for i in range(4)]
    tokens, positions, segments, documents = tensors
    masks = executor.layer_masks(documents, segments, positions, model.config.attention_windows)
    return model(tokens, positions, masks)


def alone(model, ids: list[int]) -> torch.Tensor:
    n = len(ids)
    return run(model, [(ids, list(range(n)), [0] * n, [0] * n)])[0]


def shared_row(prompt, chosen, rejected, pad_to=0, other=None):
    """A row with the group (and optionally a second group `other`) then padding."""
    tokens = prompt + chosen + rejected
    positions = list(range(P)) + list(range(P, P + C1)) + list(range(P, P + C2))
    segments = [0] * P + [1] * C1 + [2] * C2
    documents = [0] * len(tokens)
    if other is not None:
        tokens = other + tokens
        positions = list(range(len(other))) + positions
        segments = [0] * len(other) + segments
        documents = [1] * len(other) + documents
    pad = pad_to - len(tokens)
    return (tokens + [0] * pad, positions + [0] * pad, segments + [0] * pad,
            documents + [-1] * pad)


@pytest.fixture(params=sorted(FAMILIES))
def model(request):
    return family_model(request.param)


def sample_group(vocab: int):
    g = torch.Generator().manual_seed(1)
    draw = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    return draw(P), draw(C1), draw(C2)


@pytest.mark.parametrize("packed", [False, True])
def test_hidden_states_equal_unshared(model, packed):
    prompt, chosen, rejected = sample_group(model.config.vocab_size)
    other = [3, 1, 4, 1, 5] if packed else None
    offset = 5 if packed else 0
    with torch.no_grad():
        row = run(model, [shared_row(prompt, chosen, rejected, pad_to=32, other=other)])[0]
        ref_chosen = alone(model, prompt + chosen)
        ref_rejected = alone(model, prompt + rejected)
        ref_other = alone(model, other) if packed else None
    start = offset
    assert (row[start:start + P + C1] - ref_chosen).abs().max() <= 1e-5
    assert (row[start + P + C1:start + P + C1 + C2] - ref_rejected[P:]).abs().max() <= 1e-5
    if packed:
        assert (row[:5] - ref_other).abs().max() <= 1e-5


def test_gradients_equal_unshared(model):
    """loss = <w1, h(chosen)> + <w2, h(rejected)> over completion and prompt states. Shared,
    the prompt is computed once and receives both sequences' gradient; unshared it is computed
    twice. The parameter gradients must agree."""
    prompt, chosen, rejected = sample_group(model.config.vocab_size)
    g = torch.Generator().manual_seed(2)
    d = model.config.hidden_size
    # Small weights keep gradients O(1), so 1e-5 is a float32 tolerance, not a loose one.
    w_chosen = 0.01 * torch.randn(P + C1, d, generator=g)
    w_rejected = 0.01 * torch.randn(P + C2, d, generator=g)

    row = run(model, [shared_row(prompt, chosen, rejected, pad_to=24)])[0]
    h_chosen = row[:P + C1]
    h_rejected = torch.cat([row[:P], row[P + C1:P + C1 + C2]])
    ((h_chosen * w_chosen).sum() + (h_rejected * w_rejected).sum()).backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters() if n != "lm_head.weight"}
    model.zero_grad()

    loss = (alone(model, prompt + chosen) * w_chosen).sum() + \
        (alone(model, prompt + rejected) * w_rejected).sum()
    loss.backward()
    for name, grad in shared.items():
        other = dict(model.named_parameters())[name].grad
        # Relative beyond 1: Gemma's scaled embedding has gradients of ~30.
        scale = max(1.0, float(grad.abs().max()))
        assert grad.abs().max() > 0 and (grad - other).abs().max() <= 1e-5 * scale, name


def test_flex_attention_forward_equals_dense(model):
    """The model on a BlockMask (on CPU: eager FlexAttention, which evaluates the mask on every
    pair and so ignores the block structure; tests/model/test_flex_compiled.py checks that with
    compiled FlexAttention)."""
    prompt, chosen, rejected = sample_group(model.config.vocab_size)
    rows = [shared_row(prompt, chosen, rejected, pad_to=128, other=[9, 8, 7]),
            shared_row(prompt, chosen, rejected, pad_to=128)]
    with torch.no_grad():
        dense = run(model, rows, executor=DENSE)
        flex = run(model, rows, executor=FLEX)
    assert (dense - flex).abs().max() <= 1e-5
