"""The loss family against TRL's own code (TRL >= 1.16, `trl/trainer/dpo_trainer.py`), not
against a re-derivation: `test_matches_trl[<option>]` for every TRL loss type and option.

Two levels, both running TRL's code unchanged:
- loss level: `DPOTrainer._compute_loss` on a trainer made with `object.__new__` and the
  attributes its `__init__` sets from a `DPOConfig`, called with stand-in models that return
  given per-token log-probs (and `log_sum_sq_probs`) the way TRL's fused LM head does. Ours:
  `train.forward.pair_losses` (the trainer's own path: our packed layout, the reduction
  kernels, the loss) with stand-ins that return the same per-token values for our flat
  targets, and the reference through our precomputed table (`score_sequences`) or our live
  reference. Compared: the loss, the logged metrics (rewards/*, logps/*) and the gradient
  w.r.t. the policy's per-token log-probs, to 1e-5 relative.
- model level, where TRL needs a model (ld_alpha splits per-token log-probs, use_weighting
  needs the head's log(sum p^2), sync_ref_model updates weights): TRL's `DPOTrainer.train()`
  and our `train_step` run the first two optimizer steps of the same tiny Llama on the same
  pairs and token ids (plain SGD, no clipping); the logged loss and metrics of both steps agree
  to 1e-5 relative, the second step showing that the first update (the gradient) agreed.

Where ours differs from TRL on purpose, `test_documented_difference_from_trl[<option>]` says
how and checks our documented form against TRL's.
"""

from __future__ import annotations

import inspect
import math
import re
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import DENSE, DOCUMENTS
from torch import nn

trl = pytest.importorskip("trl", reason="TRL is in the test extra: pip install -e '.[test]'")

from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

from prefixdpo.data.example import Example, Group  # noqa: E402
from prefixdpo.data.layout import Numbering, collate  # noqa: E402
from prefixdpo.data.loader import StepBatches  # noqa: E402
from prefixdpo.train.forward import pair_losses  # noqa: E402
from prefixdpo.train.losses import LossConfig, LossState, preference_loss  # noqa: E402
from prefixdpo.train.reference import LiveReference, TableReference  # noqa: E402
from prefixdpo.train.scoring import score_sequences  # noqa: E402

RTOL = 1e-5
ID_BASE = 1000  # loss-level token ids: ID_BASE * (sequence number + 1) + index in completion
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                  "sft", "sigmoid_norm")


# ---- the data --------------------------------------------------------------------------------

def make_examples(ranked: bool, equal_chosen: bool, seed: int = 0,
                  vocab: int | None = None) -> list[Example]:
    """Five pairs of one prompt each; chosen and rejected lengths differ both ways (LD-DPO's
    split matters) and, unless `equal_chosen`, the chosen lengths differ too. With `ranked`, a
    sixth example of three ranked completions and its three pairs (sequences in two pairs).

    With a `vocab`, token ids are random in it; without, a completion token's id names it,
    `ID_BASE * (sequence number + 1) + index`, for the loss-level stand-ins to read."""
    rng = np.random.default_rng(seed)
    number = 0

    def completion(n: int) -> np.ndarray:
        nonlocal number
        number += 1
        if vocab is not None:
            return rng.integers(4, vocab, n).astype(np.int32)
        return (ID_BASE * number + np.arange(n)).astype(np.int32)

    def prompt(n: int) -> np.ndarray:
        return rng.integers(4, vocab or 60, n).astype(np.int32)

    chosen_lengths = [4] * 5 if equal_chosen else [3, 6, 4, 2, 5]
    rejected_lengths = [5, 2, 4, 7, 3]
    examples = []
    for i, (c, r) in enumerate(zip(chosen_lengths, rejected_lengths)):
        group = Group(prompt(2 + i % 3), (completion(c), completion(r)))
        examples.append(Example(i, (group,), ((0, 1),)))
    if ranked:
        lengths = (4, 4, 4) if equal_chosen else (5, 3, 6)
        group = Group(prompt(3), tuple(completion(n) for n in lengths))
        examples.append(Example(5, (group,), ((0, 1), (0, 2), (1, 2))))
    return examples


class Sequences:
    """Every sequence of the examples (dataset numbering) with its prompt and completion
    lengths, and the pairs as (chosen, rejected) sequence numbers."""

    def __init__(self, examples: list[Example]):
        numbering = Numbering(examples)
        self.prompt_lengths, self.lengths, self.pairs = [], [], []
        for i, example in enumerate(examples):
            first = int(numbering.sequence_offsets[i])
            for group in example.groups:
                for completion in group.completions:
                    self.prompt_lengths.append(len(group.prompt))
                    self.lengths.append(len(completion))
            self.pairs += [(first + c, first + r) for c, r in example.pairs]
        self.width = max(self.lengths)

    def total(self, values: torch.Tensor, sequence: int) -> torch.Tensor:
        return values[sequence, :self.lengths[sequence]].sum()


def token_values(sequences: Sequences, seed: int, low: float = -4.0, high: float = -0.5
                 ) -> torch.Tensor:
    """`[S, width]` float32 values in [low, high]: a sequence's completion token j at column
    j. In [-4, -0.5] the rewards are of order one and WPO's weights too."""
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(len(sequences.lengths), sequences.width,
                                           generator=generator)


# ---- TRL's side ------------------------------------------------------------------------------

class TrlStandIn(nn.Module):
    """What TRL's fused LM head returns for its batch of rows (`FusedCausalLMOutput`): the
    given per-token log-probs and log(sum p^2), zero where the label is -100."""

    def __init__(self, log_probs: torch.Tensor, log_sum_sq_probs: torch.Tensor | None = None):
        super().__init__()
        self.log_probs, self.log_sum_sq_probs = log_probs, log_sum_sq_probs
        self.is_gradient_checkpointing = False

    def forward(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=True,
                **kwargs):
        mask = labels[:, 1:] != -100
        zeros = torch.zeros(mask.shape)
        sum_sq = None if self.log_sum_sq_probs is None else self.log_sum_sq_probs * mask
        return FusedCausalLMOutput(log_probs=self.log_probs * mask, entropy=zeros,
                                   mean_logits=zeros, is_top1=torch.zeros_like(mask),
                                   log_sum_sq_probs=sum_sq, label_mask=mask)


def trl_rows(sequences: Sequences):
    """TRL's collated batch (chosen rows, then rejected rows, each prompt + completion, padded
    right, as `DataCollatorForPreference` lays them out) and the index pairs that gather
    per-sequence values into its `[2P, L - 1]` grid of next-token log-probs."""
    pairs = sequences.pairs
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    width = max(sequences.prompt_lengths[s] + sequences.lengths[s] for s in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids)
    source, target = [], []
    for row, s in enumerate(rows):
        p, n = sequences.prompt_lengths[s], sequences.lengths[s]
        input_ids[row, :p + n] = 5
        attention[row, :p + n] = 1
        completion[row, p:p + n] = 1
        for j in range(n):
            source.append((s, j))
            target.append((row, p - 1 + j))  # token p + j is predicted at position p - 1 + j
    inputs = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
    return inputs, torch.tensor(source).T, torch.tensor(target).T


def trl_grid(values: torch.Tensor, inputs, source, target) -> torch.Tensor:
    rows, width = inputs["input_ids"].shape
    return torch.zeros(rows, width - 1).index_put(tuple(target), values[tuple(source)])


def trl_trainer(policy: nn.Module, reference: nn.Module, **options) -> DPOTrainer:
    """A DPOTrainer as its `__init__` leaves it for `_compute_loss`, without a model to load:
    the attributes it sets from its `DPOConfig`, an accelerator of one process, a reference
    model (not precomputed log-probs)."""
    args = DPOConfig(output_dir="unused", report_to="none", use_cpu=True, **options)
    trainer = object.__new__(DPOTrainer)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                  gather_for_metrics=lambda x: x)
    trainer.__dict__.update(
        args=args, model=policy, ref_model=reference, accelerator=accelerator,
        aux_loss_enabled=False, beta=args.beta, precompute_ref_logps=False,
        loss_types=args.loss_type, loss_weights=args.loss_weights or [1.0] * len(args.loss_type),
        ld_alpha=args.ld_alpha, f_divergence_type=args.f_divergence_type,
        f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        label_smoothing=args.label_smoothing, use_weighting=args.use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    return trainer


# ---- our side --------------------------------------------------------------------------------

class OurStandIn(nn.Module):
    """Our model's interface (`Transformer.forward` with targets): each target's value, found
    from its token id, which names its sequence and its index in the completion, whatever
    batch the caller built (training's, or the scoring pass's)."""

    def __init__(self, values: torch.Tensor, log_sum_sq: torch.Tensor | None = None):
        super().__init__()
        self.values, self.log_sum_sq = values, log_sum_sq
        self.config = SimpleNamespace(attention_windows=(None,))

    def forward(self, input_ids, positions, masks, target_index, target_ids,
                log_sum_sq_probs=False):
        sequence, rank = target_ids // ID_BASE - 1, target_ids % ID_BASE
        out = self.values[sequence, rank]
        if log_sum_sq_probs:
            return out, self.log_sum_sq[sequence, rank]
        return out


def one_row_batch(examples: list[Example]):
    """Our micro-batch of all the examples, packed in one row."""
    length = sum(g.num_tokens for e in examples for g in e.groups)
    return collate([list(range(len(examples)))], examples, Numbering(examples),
                   "shared+packed", -(-length // 8) * 8)


def our_reference(kind: str, stand_in: OurStandIn, examples: list[Example], ld: bool):
    """Our precomputed table (scored by `score_sequences`, the trainer's pass before training)
    or our live reference, over the reference stand-in."""
    if kind == "live":
        return LiveReference(stand_in)
    scored = score_sequences(stand_in, examples, layout="shared+packed", packing_length=512,
                             micro_batch_size=1, device=torch.device("cpu"), executor=DENSE,
                             progress=False, shared_prefix=ld)
    return TableReference(scored[0].float(), scored[2].float() if ld else None)


def our_loss_config(trl_options: dict, changes: dict | None = None) -> LossConfig:
    """TRL's DPOConfig options under our names (the README's table), then `changes`."""
    names = {"loss_type": "type", "loss_weights": "weights"}
    options = {names.get(k, k): v for k, v in trl_options.items()
               if k not in ("precompute_ref_log_probs", "sync_ref_model",
                            "ref_model_sync_steps", "ref_model_mixup_alpha")}
    return LossConfig(**{**options, **(changes or {})})


def run_both(case: dict, our_changes: dict | None = None, seed: int = 0):
    """TRL's `_compute_loss` and our `pair_losses` on the same per-token values: (loss, logged
    metrics, gradient w.r.t. the policy's per-token log-probs) of each."""
    examples = make_examples(case.get("ranked", False), case.get("equal_chosen", False), seed)
    sequences = Sequences(examples)
    policy = token_values(sequences, seed + 1).requires_grad_()
    reference = token_values(sequences, seed + 2)
    log_sum_sq = token_values(sequences, seed + 3)

    inputs, source, target = trl_rows(sequences)
    trl_policy = TrlStandIn(trl_grid(policy, inputs, source, target),
                            trl_grid(log_sum_sq, inputs, source, target)).train()
    trl_reference = TrlStandIn(trl_grid(reference, inputs, source, target))
    trainer = trl_trainer(trl_policy, trl_reference, **case["trl"])
    trl_loss = trainer._compute_loss(trl_policy, inputs, False)
    trl_grad, = torch.autograd.grad(trl_loss, policy)
    trl_metrics = {name: trainer._metrics["train"][name][-1] for name in METRICS}

    config = our_loss_config(case["trl"], our_changes)
    batch = one_row_batch(examples)
    ref = our_reference(case.get("reference", "table"), OurStandIn(reference), examples,
                        config.uses_ld)
    losses, metrics, _ = pair_losses(OurStandIn(policy, log_sum_sq), batch, ref, config,
                                     LossState(), executor=DENSE)
    our_loss = losses.sum() / batch.num_pairs
    our_grad, = torch.autograd.grad(our_loss, policy)
    our_metrics = {name: metrics[name].mean().item() for name in METRICS}
    return (trl_loss.item(), trl_metrics, trl_grad), (our_loss.item(), our_metrics, our_grad)


def assert_same(trl_side, ours, what: str):
    (trl_loss, trl_metrics, trl_grad), (our_loss, our_metrics, our_grad) = trl_side, ours
    assert our_loss == pytest.approx(trl_loss, rel=RTOL), f"{what}: loss"
    for name in METRICS:
        assert our_metrics[name] == pytest.approx(trl_metrics[name], rel=RTOL, abs=1e-7), \
            f"{what}: {name}"
    torch.testing.assert_close(our_grad, trl_grad, rtol=RTOL, atol=1e-7,
                               msg=lambda m: f"{what}: gradient: {m}")


# ---- the cases -------------------------------------------------------------------------------

# id -> TRL's DPOConfig options (ours are the same under our names), and the data and
# reference our side uses.
LOSS_CASES: dict[str, dict] = {
    **{name: dict(trl=dict(loss_type=[name])) for name in TRL_LOSS_TYPES},
    # TRL's exo_pair refuses label_smoothing 0; robust, aot and aot_unpaired use it.
    "exo_pair": dict(trl=dict(loss_type=["exo_pair"], label_smoothing=1e-3)),
    "robust": dict(trl=dict(loss_type=["robust"], label_smoothing=0.1)),
    "aot": dict(trl=dict(loss_type=["aot"], label_smoothing=0.1)),
    "aot_unpaired": dict(trl=dict(loss_type=["aot_unpaired"], label_smoothing=0.1)),
    "discopop": dict(trl=dict(loss_type=["discopop"], discopop_tau=0.5)),
    # TRL's sft is one token mean over the batch's chosen tokens, ours a mean of per-sequence
    # means: equal when the chosen completions have equal lengths (see the documented test).
    "sft": dict(trl=dict(loss_type=["sft"]), equal_chosen=True),
    **{f"f_divergence={kind}": dict(trl=dict(loss_type=["sigmoid"], f_divergence_type=kind))
       for kind in ("reverse_kl", "forward_kl", "js_divergence")},
    "f_divergence=alpha_divergence": dict(trl=dict(
        loss_type=["sigmoid"], f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.3)),
    "f_divergence=forward_kl+ipo+hinge": dict(trl=dict(
        loss_type=["ipo", "hinge"], f_divergence_type="forward_kl")),
    "f_divergence=js_divergence+sigmoid_norm+exo_pair+robust+discopop": dict(trl=dict(
        loss_type=["sigmoid_norm", "exo_pair", "robust", "discopop"],
        f_divergence_type="js_divergence", label_smoothing=0.01)),
    # MPO's combination, the example of TRL's `loss_weights`
    "loss_weights": dict(trl=dict(loss_type=["sigmoid", "bco_pair", "sft"],
                                  loss_weights=[0.8, 0.2, 1.0]), equal_chosen=True),
    # LD-DPO and WPO with the per-token values given (the model-level ids run them whole)
    "ld_alpha+sigmoid": dict(trl=dict(loss_type=["sigmoid"], ld_alpha=0.3)),
    "ld_alpha+ipo+live_reference": dict(trl=dict(loss_type=["ipo"], ld_alpha=0.5),
                                        reference="live"),
    "ld_alpha+aot+ranked_group": dict(trl=dict(loss_type=["aot"], ld_alpha=0.25),
                                      ranked=True),
    "ld_alpha=0+f_divergence=forward_kl": dict(trl=dict(
        loss_type=["sigmoid"], ld_alpha=0.0, f_divergence_type="forward_kl")),
    "use_weighting+sigmoid": dict(trl=dict(loss_type=["sigmoid"], use_weighting=True)),
    "use_weighting+ld_alpha+ranked_group": dict(trl=dict(
        loss_type=["ipo", "nca_pair"], use_weighting=True, ld_alpha=0.5), ranked=True,
        reference="live"),
}

# Where TRL needs a model: two training steps of a tiny Llama (run_trl_two_steps).
MODEL_CASES: dict[str, dict] = {
    "ld_alpha": dict(loss_type=["sigmoid"], ld_alpha=0.3, precompute_ref_log_probs=True),
    "use_weighting": dict(loss_type=["sigmoid"], use_weighting=True,
                          precompute_ref_log_probs=True),
    "sync_ref_model": dict(loss_type=["sigmoid"], sync_ref_model=True, ref_model_sync_steps=1,
                           ref_model_mixup_alpha=0.5, precompute_ref_log_probs=False),
}


@pytest.mark.parametrize("option", [*LOSS_CASES, *MODEL_CASES])
def test_matches_trl(option, trl_model_runs):
    if option in MODEL_CASES:
        check_two_steps(option, *trl_model_runs(option))
        return
    trl_side, ours = run_both(LOSS_CASES[option])
    assert_same(trl_side, ours, option)
    assert trl_side[2].abs().sum() > 0


def test_every_trl_loss_type_and_option_has_a_case():
    """The ids name every loss type TRL's `_compute_loss` knows (read from its code) and every
    option TRL documents for DPO (f-divergences, LD-DPO, WPO, TR-DPO)."""
    source = inspect.getsource(DPOTrainer._compute_loss)
    assert set(re.findall(r'loss_type == "(\w+)"', source)) == set(TRL_LOSS_TYPES)
    ids = {*LOSS_CASES, *MODEL_CASES}
    assert set(TRL_LOSS_TYPES) <= ids
    for option in ("f_divergence=forward_kl", "f_divergence=js_divergence",
                   "f_divergence=alpha_divergence", "ld_alpha", "use_weighting",
                   "sync_ref_model", "loss_weights"):
        assert option in ids


def test_simpo_matches_trls_cpo_trainer():
    """`simpo` is TRL's CPOTrainer `loss_type="simpo"` (average log-probs, cpo_alpha 0): the
    losses, rewards and gradients of `CPOTrainer.cpo_loss`, with label smoothing."""
    from trl.experimental.cpo import CPOTrainer

    generator = torch.Generator().manual_seed(0)
    pi_w = (-30 * torch.rand(6, generator=generator)).requires_grad_()
    pi_l = (-30 * torch.rand(6, generator=generator)).requires_grad_()
    n_w, n_l = torch.tensor([3, 9, 4, 12, 5, 7]), torch.tensor([6, 2, 8, 4, 11, 3])
    trainer = object.__new__(CPOTrainer)
    trainer.__dict__.update(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0,
                            label_smoothing=0.1,
                            accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, chosen, rejected = trainer.cpo_loss(pi_w / n_w, pi_l / n_l)
    trl_grads = torch.autograd.grad(losses.mean(), (pi_w, pi_l))
    config = LossConfig(type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=0.1)
    ours, metrics, _ = preference_loss(config, pi_w, pi_l, None, None, n_w, n_l)
    our_grads = torch.autograd.grad(ours.mean(), (pi_w, pi_l))
    torch.testing.assert_close(ours, losses, rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen, rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(metrics["rewards/rejected"], rejected, rtol=RTOL, atol=1e-7)
    for a, b in zip(our_grads, trl_grads):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-7)


# ---- where ours differs from TRL on purpose --------------------------------------------------

@pytest.mark.parametrize("option", ["sft_per_sequence_mean", "sigmoid_label_smoothing_is_cdpo",
                                    "exo_pair_label_smoothing_0", "bco_running_mean"])
def test_documented_difference_from_trl(option):
    sequences = Sequences(make_examples(False, False))
    policy, reference = token_values(sequences, 1), token_values(sequences, 2)  # run_both's
    a = torch.stack([0.1 * (sequences.total(policy, c) - sequences.total(reference, c))
                     for c, _ in sequences.pairs])
    b = torch.stack([0.1 * (sequences.total(policy, r) - sequences.total(reference, r))
                     for _, r in sequences.pairs])
    logsigmoid = torch.nn.functional.logsigmoid
    if option == "sft_per_sequence_mean":
        # TRL: -(sum of all chosen token log-probs) / (their count), one mean over the batch.
        # Ours: the mean over pairs of each chosen completion's mean token NLL (independent of
        # how pairs are grouped into micro-batches). Unequal chosen lengths tell them apart.
        trl_side, ours = run_both(dict(trl=dict(loss_type=["sft"])))
        chosen = [policy[c, :sequences.lengths[c]] for c, _ in sequences.pairs]
        assert trl_side[0] == pytest.approx(-torch.cat(chosen).mean().item(), rel=RTOL)
        per_sequence = torch.stack([-values.mean() for values in chosen]).mean().item()
        assert ours[0] == pytest.approx(per_sequence, rel=RTOL)
        assert ours[0] != pytest.approx(trl_side[0], rel=1e-3)
    elif option == "sigmoid_label_smoothing_is_cdpo":
        # TRL 1.16's sigmoid ignores label_smoothing; ours is cDPO (TRL before 1.0):
        # -(1 - eps) log sigmoid(x) - eps log sigmoid(-x), x = beta * logits.
        trl_side, ours = run_both(dict(trl=dict(loss_type=["sigmoid"], label_smoothing=0.2)))
        plain, _ = run_both(dict(trl=dict(loss_type=["sigmoid"])))
        assert trl_side[0] == pytest.approx(plain[0], rel=RTOL)  # no effect in TRL
        x = a - b
        cdpo = (-0.8 * logsigmoid(x) - 0.2 * logsigmoid(-x)).mean().item()
        assert ours[0] == pytest.approx(cdpo, rel=RTOL)
    elif option == "exo_pair_label_smoothing_0":
        # TRL refuses exo_pair with label_smoothing 0 (in DPOTrainer.__init__); ours takes the
        # EXO paper's 1e-3 then: the same as TRL with label_smoothing = 1e-3.
        assert "Label smoothing must be greater than 0.0 when using 'exo_pair' loss" in \
            inspect.getsource(DPOTrainer.__init__)
        trl_side, ours = run_both(dict(trl=dict(loss_type=["exo_pair"], label_smoothing=1e-3)),
                                  our_changes=dict(label_smoothing=0.0))
        assert_same(trl_side, ours, option)
    else:
        # bco_pair is TRL 1.16's by default (test_matches_trl[bco_pair]); with
        # bco_running_mean it shifts the rewards by their running mean (TRL before 1.0): at
        # the first call, the batch's mean reward.
        trl_side, ours = run_both(dict(trl=dict(loss_type=["bco_pair"])),
                                  our_changes=dict(bco_running_mean=True))
        delta = torch.cat([a, b]).mean()
        assert abs(delta.item()) > 1e-3
        shifted = (-logsigmoid(a - delta) - logsigmoid(-(b - delta))).mean().item()
        assert ours[0] == pytest.approx(shifted, rel=RTOL)
        unshifted = (-logsigmoid(a) - logsigmoid(-b)).mean().item()
        assert trl_side[0] == pytest.approx(unshifted, rel=RTOL)


# ---- model level: two training steps of a tiny Llama -----------------------------------------

LR = 1.0   # plain SGD: the second step's loss shows the first update
VOCAB = 64


def tiny_model_folder(folder):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rms_norm_eps=1e-5)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def word_level_tokenizer():
    """A tokenizer object for TRL's pad and EOS ids; the pairs come as token ids."""
    import transformers
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")), pad_token="t0",
        bos_token="t1", eos_token="t2", unk_token="t3")


def run_trl_two_steps(folder, examples: list[Example], options: dict, workdir) -> list[dict]:
    """TRL's `DPOTrainer.train()`: two steps of all the pairs (plain SGD, no clipping), with
    its reference precomputed or a live model; its logged metrics of each step."""
    import datasets
    import transformers

    datasets.disable_progress_bars()

    class PreTokenized(DPOTrainer):
        """The pairs are given as token ids: TRL's tokenization is skipped."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    rows = [{"prompt_ids": e.groups[0].prompt.tolist(),
             "chosen_ids": e.groups[0].completions[0].tolist(),
             "rejected_ids": e.groups[0].completions[1].tolist()} for e in examples]
    no_checkpointing = {"activation_checkpointing" if "activation_checkpointing" in
                        DPOConfig.__dataclass_fields__ else "gradient_checkpointing": False}
    args = DPOConfig(output_dir=str(workdir), report_to="none", save_strategy="no",
                     disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
                     per_device_train_batch_size=len(rows),
                     max_steps=2, logging_steps=1, max_grad_norm=0.0,
                     lr_scheduler_type="constant", warmup_steps=0, max_length=None,
                     dataloader_num_workers=0, **no_checkpointing, **options)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(folder,
                                                                 attn_implementation="eager")

    model = load()
    trainer = PreTokenized(model=model, ref_model=None if args.precompute_ref_log_probs
                           else load(), args=args, train_dataset=datasets.Dataset.from_list(rows),
                           processing_class=word_level_tokenizer(),
                           optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    return logged


def run_ours_two_steps(folder, examples: list[Example], options: dict, workdir) -> list[dict]:
    """Our `train_step` for the same two steps, through the trainer's own pieces: the model
    read from the same checkpoint, the reference precomputed (`reference_log_probs`) or live
    and synced after each step (`loop.sync_reference`), the documents attention executor."""
    from prefixdpo.model.hf_checkpoint import load_model
    from prefixdpo.train.config import ReferenceSection
    from prefixdpo.train.distributed import Distributed
    from prefixdpo.train.loop import sync_reference, train_step
    from prefixdpo.train.reference import reference_log_probs

    env = Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    section = ReferenceSection(
        mode="precomputed" if options["precompute_ref_log_probs"] else "live",
        **{k: v for k, v in options.items() if k in ("sync_ref_model", "ref_model_sync_steps",
                                                      "ref_model_mixup_alpha")})
    config = our_loss_config(options)
    model = load_model(folder)
    if section.mode == "live":
        reference = LiveReference(load_model(folder).requires_grad_(False))
    else:
        table = reference_log_probs(
            model, examples, key="trl-parity", run_dir=workdir / "ours", cache_dir=workdir,
            name="train", micro_batch_size=1, packing_length="auto", device=env.device,
            executor=DOCUMENTS, rank=0, world_size=1, log=lambda *args: None,
            shared_prefix=config.uses_ld)
        reference = TableReference(*table) if config.uses_ld else TableReference(table)
    step_batches = StepBatches.single_process([one_row_batch(examples)])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    logged, state = [], LossState()
    for step in (1, 2):
        result, state = train_step(model, step_batches, reference=reference, loss_config=config,
                                   loss_state=state, optimizer=optimizer, max_grad_norm=0.0,
                                   env=env, executor=DOCUMENTS)
        assert sync_reference(reference, model, step, section) == section.sync_ref_model
        logged.append({"loss": result.loss, **result.metrics})
    return logged


@pytest.fixture(scope="module")
def trl_model_runs(tmp_path_factory):
    """The model-level runs, made once for the module when first asked for (TRL's trainer
    set-up dominates): option -> (TRL's logged steps, ours)."""
    runs = {}

    def get(option: str):
        if "folder" not in runs:
            runs["folder"] = tiny_model_folder(tmp_path_factory.mktemp("tiny-llama"))
        if option not in runs:
            examples = make_examples(False, False, seed=4, vocab=VOCAB)
            workdir = tmp_path_factory.mktemp(f"trl-{option}")
            options = MODEL_CASES[option]
            runs[option] = (run_trl_two_steps(runs["folder"], examples, options, workdir),
                            run_ours_two_steps(runs["folder"], examples, options, workdir))
        return runs[option]

    return get


def check_two_steps(option: str, theirs: list[dict], ours: list[dict]):
    for step, (t, o) in enumerate(zip(theirs, ours), start=1):
        assert o["loss"] == pytest.approx(t["loss"], rel=RTOL), f"{option}: step {step} loss"
        for name in METRICS:
            assert o[name] == pytest.approx(t[name], rel=RTOL, abs=1e-6), \
                f"{option}: step {step} {name}"
    # The policy moved at the first update, so the second step checks it.
    assert theirs[1]["loss"] != pytest.approx(theirs[0]["loss"], rel=1e-3)
    if option != "use_weighting":  # the policy is the reference at step 1: ln 2
        assert theirs[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
