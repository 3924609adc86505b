"""One optimizer step, in process: the first loss is ln 2, the update does not depend on the
micro-batch split, the loss is normalized by the step's pair count that comes with the
batches, and a non-finite loss (from the reference or the model's own weights) leaves the
weights alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import DENSE, random_examples, tiny_config

from prefixdpo.data.loader import PreferenceLoader, StepBatches, fit_examples
from prefixdpo.model.transformer import build_model
from prefixdpo.train.config import OptimSection
from prefixdpo.train.distributed import Distributed
from prefixdpo.train.loop import train_step
from prefixdpo.train.losses import LossConfig, LossState
from prefixdpo.train.optim import build_optimizer
from prefixdpo.train.reference import TableReference
from prefixdpo.train.scoring import score_sequences

CPU = Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)


def setup_run(layout="shared+packed", micro_batch_size=8, grad_accum=1, seed=0):
    model = build_model(tiny_config(), seed=0)
    examples, report = fit_examples(random_examples(48, model.config.vocab_size, seed=seed),
                                    layout, 128, "error")
    table, _ = score_sequences(model, examples, layout="shared+packed", packing_length=128,
                               micro_batch_size=4, device=CPU.device, executor=DENSE,
                               progress=False)
    loader = PreferenceLoader(examples, layout, micro_batch_size, grad_accum,
                              packing_length=report.packing_length, pad_multiple=8, seed=1)
    return model, TableReference(table.float()), loader


def step(model, reference, batches, loss=LossConfig(), optimizer=None):
    optimizer = optimizer or build_optimizer(model, OptimSection(lr=1e-2), CPU.device)
    return train_step(model, batches, reference=reference, loss_config=loss,
                      loss_state=LossState(), optimizer=optimizer, max_grad_norm=0.0, env=CPU,
                      executor=DENSE)[0]


@pytest.mark.parametrize("layout", ["shared+packed", "paired"])
def test_first_loss_is_ln2(layout):
    """Policy == reference: every DPO logit is 0 and -log sigmoid(0) = ln 2, whatever the
    layout the reference was computed in."""
    model, reference, loader = setup_run(layout)
    result = step(model, reference, next(iter(loader)))
    assert abs(result.loss - math.log(2)) < 1e-6
    assert result.metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert result.finite and result.num_pairs > 0


def test_update_does_not_depend_on_micro_batch_split():
    """1 micro-batch of 8 rows and 4 micro-batches of 2 rows hold the same pairs; the loss is
    divided by the step's pair count, so the gradients agree. Plain SGD with lr 1 makes the
    update equal to the gradient (Adam's first update, g / |g|, would amplify rounding noise
    in near-zero gradient entries)."""
    one, reference, loader_one = setup_run(micro_batch_size=8, grad_accum=1)
    four = copy.deepcopy(one)
    _, _, loader_four = setup_run(micro_batch_size=2, grad_accum=4)
    # Two steps, so the second starts from weights the first moved.
    results = []
    for model, loader in ((one, loader_one), (four, loader_four)):
        it = iter(loader)
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        for _ in range(2):
            model_result = step(model, reference, next(it), optimizer=sgd)
        results.append(model_result)
    assert results[0].num_pairs == results[1].num_pairs
    assert results[0].loss == pytest.approx(results[1].loss, abs=1e-6)
    for (name, a), b in zip(one.named_parameters(), four.parameters()):
        assert (a - b).abs().max() <= 1e-6, name


def test_nonfinite_loss_skips_the_update():
    model, reference, loader = setup_run()
    reference.table[:] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = step(model, reference, next(iter(loader)))
    assert not result.finite and math.isnan(result.loss)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_nonfinite_weights_skip_the_update():
    """The log-prob kernel does not refuse non-finite logits: a NaN weight makes the loss NaN
    and the step skips the update (train.nonfinite decides what the run does next)."""
    model, reference, loader = setup_run()
    with torch.no_grad():
        model.lm_head.weight[5, 3] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = step(model, reference, next(iter(loader)))
    assert not result.finite and math.isnan(result.loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_loss_is_divided_by_the_pair_count_that_comes_with_the_step():
    """Another rank's pairs count too: the same micro-batches in a step said to hold twice as
    many pairs give half the loss and half the gradient."""
    model, reference, loader = setup_run()
    batches = next(iter(loader))
    assert batches.num_pairs == sum(b.num_pairs for b in batches)
    losses, grads = [], []
    for num_pairs in (batches.num_pairs, 2 * batches.num_pairs):
        sgd = torch.optim.SGD(model.parameters(), lr=0.0)
        result, _ = train_step(
            model, StepBatches(list(batches), num_pairs, 7), reference=reference,
            loss_config=LossConfig(), loss_state=LossState(), optimizer=sgd, max_grad_norm=0.0,
            env=CPU, executor=DENSE)
        assert result.num_pairs == num_pairs and result.num_tokens == 7
        losses.append(result.loss)
        grads.append(result.metrics["grad_norm"])
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[1] == pytest.approx(losses[0] / 2, rel=1e-6)
    assert grads[1] == pytest.approx(grads[0] / 2, rel=1e-5) and grads[0] > 0


def test_plain_lists_are_refused():
    model, reference, loader = setup_run()
    with pytest.raises(TypeError, match="StepBatches.single_process"):
        step(model, reference, list(next(iter(loader))))
