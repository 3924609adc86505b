"""The loader: every example once per epoch, ranks disjoint and covering, the same step data
for any split into ranks and micro-batches, exact mid-epoch resume."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import random_examples

from prefixdpo.data.loader import PreferenceLoader, fit_examples

LAYOUTS = ["shared+packed", "shared", "paired+packed", "paired"]


def make(examples, layout, **kwargs):
    examples, report = fit_examples(examples, layout, 128, "error")
    defaults = dict(micro_batch_size=4, packing_length=report.packing_length, seed=3,
                    pad_multiple=8)
    return PreferenceLoader(examples, layout, **dict(defaults, **kwargs))


def pair_ids(batches) -> list[int]:
    return [p for b in batches for p in b.pair_ids.tolist()]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_epoch_covers_every_pair_once(layout):
    examples = random_examples(41, 50)
    loader = make(examples, layout, grad_accum=2)
    steps = loader.steps_in_epoch(0)
    seen = pair_ids(b for step in itertools.islice(iter(loader), steps) for b in step)
    assert sorted(seen) == list(range(loader.numbering.num_pairs))
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["step"] == steps
    # Shapes are fixed in packed layouts; every micro-batch has micro_batch_size rows.
    for step in itertools.islice(iter(loader), 3):
        for batch in step:
            assert batch.input_ids.shape[0] == 4
            if layout.endswith("+packed"):
                assert batch.input_ids.shape[1] == 128


def test_epochs_are_shuffled_differently_and_deterministically():
    examples = random_examples(40, 50)
    first = make(examples, "shared+packed")
    again = make(examples, "shared+packed")
    order = lambda loader, epoch: [r for mb in loader.micro_batch_plan(epoch) for r in mb]  # noqa
    assert order(first, 0) == order(again, 0)
    assert order(first, 0) != order(first, 1)
    assert order(first, 0) != order(make(examples, "shared+packed", seed=4), 0)


@pytest.mark.parametrize("layout", ["shared+packed", "paired"])
def test_ranks_are_disjoint_and_the_step_does_not_depend_on_the_split(layout):
    """1 rank x 4 micro-batches, 2 ranks x 2 and 4 ranks x 1: the same pairs in each step, and
    every rank runs the same number of micro-batches, empty ones included."""
    examples = random_examples(57, 50)
    splits = {(1, 4), (2, 2), (4, 1)}
    per_split = {}
    for world, accum in splits:
        loaders = [make(examples, layout, grad_accum=accum, world_size=world, rank=r)
                   for r in range(world)]
        steps = loaders[0].steps_in_epoch(0)
        assert all(loader.steps_in_epoch(0) == steps for loader in loaders)
        iters = [iter(loader) for loader in loaders]
        per_step = []
        for _ in range(steps):
            rank_pairs = [pair_ids(next(it)) for it in iters]
            flat = [p for ids in rank_pairs for p in ids]
            assert len(flat) == len(set(flat))  # disjoint across ranks
            per_step.append(sorted(flat))
        per_split[(world, accum)] = per_step
    reference = per_split[(1, 4)]
    assert all(v == reference for v in per_split.values())
    assert sorted(p for step in reference for p in step) == list(range(
        make(examples, layout).numbering.num_pairs))


def test_last_step_is_completed_with_empty_micro_batches():
    """9 one-row examples, 4 rows per micro-batch: micro-batches of 4, 4 and 1 examples. With
    2 ranks x 2 micro-batches the one step has 4 slots, so rank 1's second one is empty."""
    examples = [e for e in random_examples(15, 50) if e.index % 5 < 3]
    assert len(examples) == 9
    loaders = [make(examples, "shared", grad_accum=2, world_size=2, rank=r) for r in range(2)]
    assert loaders[0].steps_in_epoch(0) == 1
    rank0, rank1 = (next(iter(loader)) for loader in loaders)
    assert sorted(b.num_pairs for b in [*rank0, *rank1]) == [0, 1, 4, 4]
    assert rank0.num_pairs == rank1.num_pairs == 9
    assert rank1[1].num_pairs == 0 and rank1[1].num_tokens == 0
    assert rank1[1].input_ids.shape[0] == 4 and len(rank1[1].target_ids) == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_totals_count_every_rank_without_collating_them(layout):
    """Each rank's StepBatches carries the whole step's pairs and non-padding tokens, counted
    from the plan: equal on every rank to the sums over all ranks' collated micro-batches."""
    examples = random_examples(57, 50)
    loaders = [make(examples, layout, grad_accum=2, world_size=3, rank=r) for r in range(3)]
    iters = [iter(loader) for loader in loaders]
    for _ in range(loaders[0].steps_in_epoch(0) + 1):  # into the next epoch
        steps = [next(it) for it in iters]
        batches = [b for step in steps for b in step]
        for step in steps:
            assert len(step) == 2
            assert step.num_pairs == sum(b.num_pairs for b in batches)
            assert step.num_tokens == sum(b.num_tokens for b in batches) > 0
    assert loaders[0].state_dict()["epoch"] == 1


@pytest.mark.parametrize("layout", ["shared+packed", "paired"])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(layout):
    examples = random_examples(150, 50)
    uninterrupted = make(examples, layout, grad_accum=2)
    total = uninterrupted.steps_in_epoch(0) + 3  # crosses into the next epoch
    stop = total - 5                             # and stops mid-epoch
    assert 0 < stop < uninterrupted.steps_in_epoch(0)
    it = iter(uninterrupted)
    reference = [next(it) for _ in range(total)]
    assert uninterrupted.state_dict()["epoch"] >= 1

    first = make(examples, layout, grad_accum=2)  # a separate run, stopped after `stop` steps
    it = iter(first)
    for _ in range(stop):
        next(it)
    resumed = make(examples, layout, grad_accum=2)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    rest = [next(it) for _ in range(total - stop)]
    for got, want in zip(rest, reference[stop:], strict=True):
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pair_ids, b.pair_ids)


def test_resume_refuses_a_changed_plan():
    examples = random_examples(50, 50)
    state = make(examples, "shared", grad_accum=2).state_dict()
    with pytest.raises(ValueError, match="data seed"):
        make(examples, "shared", grad_accum=2, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch"):
        make(examples, "shared", grad_accum=4).load_state_dict(state)
    with pytest.raises(ValueError, match="training examples differ"):
        make(random_examples(50, 50, seed=1), "shared", grad_accum=2).load_state_dict(state)
    with pytest.raises(ValueError, match="data.layout was 'shared'"):
        make(examples, "paired", grad_accum=2).load_state_dict(state)


def test_one_pass_in_order_across_ranks():
    examples = random_examples(23, 50)
    loaders = [make(examples, "shared+packed", world_size=2, rank=r, shuffle=False)
               for r in range(2)]
    passes = [list(loader.one_pass()) for loader in loaders]
    assert len(passes[0]) == len(passes[1])
    assert sorted(pair_ids(passes[0]) + pair_ids(passes[1])) == list(
        range(loaders[0].numbering.num_pairs))


def test_background_errors_reach_the_caller():
    examples = random_examples(10, 50)
    loader = make(examples, "shared")
    loader.build = lambda rows: (_ for _ in ()).throw(RuntimeError("broken batch"))
    with pytest.raises(RuntimeError, match="broken batch"):
        next(iter(loader))


def test_unpacked_example_larger_than_micro_batch_is_refused():
    examples = random_examples(5, 50)  # example 4 has three completions: three paired rows
    with pytest.raises(ValueError, match="needs 3 rows .* raise train.micro_batch_size"):
        make(examples, "paired", micro_batch_size=2)


def test_an_explicit_packing_length_with_an_unpacked_layout_is_said_to_be_ignored(caplog):
    """Before: data.layout = "paired" with data.packing_length = 1024 was taken without a
    word that the length does nothing."""
    import logging

    examples = random_examples(6, 100)
    with caplog.at_level(logging.WARNING, logger="prefixdpo.data.loader"):
        fit_examples(examples, "paired", 1024, "truncate")
        fit_examples(examples, "paired", "auto", "truncate")
        fit_examples(examples, "shared", 1024, "truncate", names={"packing_length": "--pl"})
    assert [r.getMessage() for r in caplog.records] == [
        "data.packing_length = 1024 is ignored: layout 'paired' does not pack rows (each row "
        "is padded to the longest of its micro-batch)",
        "--pl = 1024 is ignored: layout 'shared' does not pack rows (each row is padded to the "
        "longest of its micro-batch)"]


@pytest.mark.parametrize("layout", ["paired", "shared"])
def test_unpacked_micro_batches_fit_a_token_budget(layout):
    """With a token budget, an unpacked micro-batch takes whole examples, in the shuffled order,
    while its rows padded to the longest (rounded up to the row multiple) fit the budget: the
    next example would have broken it. Every example lies in exactly one micro-batch."""
    from prefixdpo.data.layout import document_lengths, is_shared
    from prefixdpo.data.packing import round_up

    examples = random_examples(120, 50, seed=1, max_len=40)
    budget, multiple = 256, 8
    loader = PreferenceLoader.with_token_budget(examples, layout, budget, pad_multiple=multiple,
                                                seed=2, prefetch=0)
    plan = loader.micro_batch_plan(0)
    assert sorted(i for rows in plan for i in {row[0] for row in rows}) == \
        list(range(len(examples)))
    assert len({len(rows) for rows in plan}) > 1, "rows per micro-batch follow the lengths"

    def longest(positions) -> int:
        return max(max(document_lengths(examples[i], is_shared(layout))) for i in positions)

    for rows, following in zip(plan, plan[1:] + [None]):
        batch = loader.build(rows)
        positions = {row[0] for row in rows}
        assert batch.input_ids.shape == (len(rows), round_up(longest(positions), multiple))
        if len(positions) > 1:  # an example alone may exceed the budget
            assert batch.input_ids.numel() <= budget
        if following is not None:
            nxt = following[0][0]
            rows_after = len(rows) + len(document_lengths(examples[nxt], is_shared(layout)))
            assert rows_after * round_up(longest(positions | {nxt}), multiple) > budget
    assert loader.build([]).input_ids.shape == (1, multiple)  # an epoch's padding micro-batch


def test_packed_token_budget_is_a_row_count():
    examples, report = fit_examples(random_examples(40, 50), "shared+packed", 128, "error")
    loader = PreferenceLoader.with_token_budget(examples, "shared+packed", 300,
                                                packing_length=report.packing_length)
    assert loader.micro_batch_size == 2 and not loader.micro_batch_tokens
    with pytest.raises(ValueError, match="holds no packed row"):
        PreferenceLoader.with_token_budget(examples, "shared+packed", 100,
                                           packing_length=report.packing_length)


def test_pack_lays_out_given_examples_as_the_plan_does():
    """Packed: best-fit-decreasing rows of the given examples (the plan packs its windows so);
    unpacked: one row per document, in the given order."""
    examples = random_examples(30, 50)
    packed = make(examples, "paired+packed")
    rows = packed.pack([3, 7, 11, 12, 20])
    assert sorted(i for row in rows for i in row) == [3, 7, 11, 12, 20]
    assert all(sum(packed.lengths[i] for i in row) <= packed.packing_length for row in rows)
    unshuffled = make(examples, "paired+packed", shuffle=False)
    assert [r for micro in unshuffled.micro_batch_plan(0) for r in micro] == \
        unshuffled.pack(list(range(len(examples))))
    paired = make(examples, "paired")
    assert paired.pack([4, 3]) == [[4]] * paired.num_documents[4] + [[3]] * \
        paired.num_documents[3]
