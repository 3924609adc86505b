"""Invariants 1-3 of the layout: per-sequence log-probs (and their gradients) in every layout
equal those of prompt+completion run alone; groups never see each other; padding contributes
nothing; overlong examples are cut by the stated policy and counted, or refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DENSE, FAMILIES, family_model, random_examples

from prefixdpo.data.example import Example, Group
from prefixdpo.data.layout import Numbering, collate, fit_to_length
from prefixdpo.data.loader import fit_examples

LAYOUTS = ["shared+packed", "shared", "paired+packed", "paired"]


def rows_for(examples, layout, per_row=3):
    """Rows as the loader would make them: several examples per packed row, one document per
    unpacked row."""
    if layout.endswith("+packed"):
        return [list(range(i, min(i + per_row, len(examples))))
                for i in range(0, len(examples), per_row)]
    rows = []
    for i, e in enumerate(examples):
        docs = len(e.groups) if layout.startswith("shared") else e.num_sequences
        rows.extend([[i]] * docs)
    return rows


def sequence_log_probs(model, examples, layout, row_length=128):
    numbering = Numbering(examples)
    batch = collate(rows_for(examples, layout), examples, numbering, layout, row_length)
    masks = DENSE.layer_masks(batch.document_ids, batch.segment_ids, batch.positions,
                              model.config.attention_windows)
    token_logps = model(batch.input_ids, batch.positions, masks, batch.target_index,
                        batch.target_ids)
    sums = torch.zeros(batch.num_sequences).index_add(0, batch.target_sequence, token_logps)
    # Back to dataset order.
    out = torch.zeros(numbering.num_sequences)
    return out.index_add(0, batch.sequence_ids, sums), batch


def alone_log_probs(model, examples):
    """The oracle: each prompt+completion as its own causal sequence, log-softmax of logits."""
    out = []
    for e in examples:
        for g in e.groups:
            for c in g.completions:
                ids = torch.from_numpy(np.concatenate([g.prompt, c])).long()[None]
                n = ids.shape[1]
                positions = torch.arange(n)[None]
                zeros = torch.zeros_like(ids)
                masks = DENSE.layer_masks(zeros, zeros, positions,
                                          model.config.attention_windows)
                logits = model.logits(model(ids, positions, masks))[0].float()
                logps = logits.log_softmax(-1)[len(g.prompt) - 1:n - 1]
                out.append(logps.gather(-1, torch.from_numpy(c).long()[:, None]).sum())
    return torch.stack(out)


@pytest.fixture(params=sorted(FAMILIES))
def model(request):
    return family_model(request.param)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sequence_log_probs_equal_unshared(model, layout):
    examples = random_examples(10, model.config.vocab_size)
    ours, _ = sequence_log_probs(model, examples, layout)
    ours.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = alone_log_probs(model, examples)
    expected.sum().backward()
    assert (ours - expected).abs().max() <= 1e-5
    for name, p in model.named_parameters():
        scale = max(1.0, float(p.grad.abs().max()))  # Gemma's scaled embedding: ~30
        assert (grads[name] - p.grad).abs().max() <= 1e-5 * scale, name


def test_shared_layout_has_fewer_tokens_and_same_pairs():
    examples = random_examples(10, 50)
    numbering = Numbering(examples)
    shared = collate(rows_for(examples, "shared+packed"), examples, numbering, "shared+packed", 128)
    paired = collate(rows_for(examples, "paired+packed"), examples, numbering, "paired+packed", 128)
    assert shared.num_tokens == sum(e.num_shared_tokens for e in examples)
    assert paired.num_tokens == sum(e.num_paired_tokens for e in examples)
    assert shared.num_tokens < paired.num_tokens
    assert shared.num_pairs == paired.num_pairs == numbering.num_pairs == 14
    assert len(shared.target_ids) == len(paired.target_ids)  # same completion tokens scored


def test_no_duplicated_token_and_predecessors():
    """One group: the first token of each completion is predicted by the last prompt token."""
    example = Example(0, (Group(np.array([5, 6, 7], np.int32),
                                (np.array([8, 9], np.int32), np.array([10], np.int32))),),
                      ((0, 1),))
    batch = collate([[0]], [example], Numbering([example]), "shared+packed", 8)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 0, 0]
    assert batch.positions[0].tolist() == [0, 1, 2, 3, 4, 3, 0, 0]
    assert batch.segment_ids[0].tolist() == [0, 0, 0, 1, 1, 2, 0, 0]
    assert batch.document_ids[0].tolist() == [0, 0, 0, 0, 0, 0, -1, -1]
    assert batch.target_index.tolist() == [2, 3, 2]
    assert batch.target_ids.tolist() == [8, 9, 10]
    assert batch.target_sequence.tolist() == [0, 0, 1]
    assert batch.sequence_num_tokens.tolist() == [2, 1]
    assert batch.chosen_sequence.tolist() == [0] and batch.rejected_sequence.tolist() == [1]
    assert batch.num_tokens == 6 and isinstance(batch.num_tokens, int)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_host_counts_match_the_tensors(layout):
    """`sequence_num_tokens` and `num_tokens`, counted while collating, are what the tensors
    hold: targets per sequence slot, non-padding tokens. They survive `to` as they are."""
    examples = random_examples(10, 50)
    batch = collate(rows_for(examples, layout), examples, Numbering(examples), layout, 128)
    assert batch.sequence_num_tokens.tolist() == torch.bincount(
        batch.target_sequence, minlength=batch.num_sequences).tolist()
    # Each sequence's count is its completion's length, in the dataset's numbering.
    lengths = [len(c) for e in examples for g in e.groups for c in g.completions]
    assert batch.sequence_num_tokens.tolist() == [lengths[i] for i in batch.sequence_ids]
    assert batch.num_tokens == int((batch.document_ids != -1).sum())
    moved = batch.to("meta")
    assert moved.num_tokens == batch.num_tokens and moved.sequence_num_tokens.is_meta


def test_groups_do_not_see_each_other_and_padding_is_inert(model):
    """Changing a packed neighbour's tokens or the padding leaves a group's log-probs alone."""
    examples = random_examples(3, model.config.vocab_size, seed=3)
    numbering = Numbering(examples)
    rows = [[0, 1, 2]]

    def logps(batch):
        masks = DENSE.layer_masks(batch.document_ids, batch.segment_ids, batch.positions,
                                  model.config.attention_windows)
        with torch.no_grad():
            return model(batch.input_ids, batch.positions, masks, batch.target_index,
                         batch.target_ids)

    batch = collate(rows, examples, numbering, "shared+packed", 128)
    base = logps(batch)
    first_doc = batch.document_ids[0] == 0
    batch.input_ids[0, ~first_doc] = (batch.input_ids[0, ~first_doc] + 1) % model.config.vocab_size
    changed = logps(batch)
    mine = torch.isin(batch.target_sequence, torch.arange(examples[0].num_sequences))
    assert torch.equal(base[mine], changed[mine])
    assert not torch.equal(base[~mine], changed[~mine])


def test_fit_to_length_caps_longest_completions_first():
    e = Example(0, (Group(np.arange(4, dtype=np.int32),
                          (np.arange(10, dtype=np.int32), np.arange(3, dtype=np.int32))),), ((0, 1),))
    cut = fit_to_length(e, 12, shared=True)  # 4 + min(10, m) + min(3, m) <= 12 -> m = 5
    assert [len(c) for c in cut.groups[0].completions] == [5, 3] and cut.truncated
    assert cut.groups[0].completions[0].tolist() == [0, 1, 2, 3, 4]  # keeps the start
    assert fit_to_length(e, 17, shared=True) is e
    # Paired: 2 x 4 prompt tokens + min(10, m) + min(3, m) <= 12 -> m = 2
    assert [len(c) for c in fit_to_length(e, 12, shared=False).groups[0].completions] == [2, 2]
    assert fit_to_length(e, 5, shared=True) is None  # prompt + 1 + 1 = 6 > 5


def test_fit_examples_counts_and_refuses():
    long = Example(7, (Group(np.arange(100, dtype=np.int32),
                             (np.arange(100, dtype=np.int32), np.arange(90, dtype=np.int32))),),
                   ((0, 1),), id="x7")
    short = random_examples(3, 50)
    fitted, report = fit_examples(short + [long], "shared+packed", 256, "truncate")
    assert report.packing_length == 256 and report.num_truncated == 1
    assert fitted[-1].num_shared_tokens <= 256 and fitted[-1].truncated
    with pytest.raises(ValueError, match=r"example 7 \(id x7\) needs 290 tokens .* 256"):
        fit_examples(short + [long], "shared+packed", 256, "error")
    with pytest.raises(ValueError, match="prompts alone do not fit"):
        fit_examples([long], "paired+packed", 128, "truncate")
    _, auto = fit_examples(short + [long], "shared+packed", "auto", "error")
    assert auto.packing_length == 384 and auto.num_truncated == 0  # never below the longest
