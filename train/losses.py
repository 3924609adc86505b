"""The DPO loss family on per-sequence log-probs, with TRL's (1.16) loss names and meanings.

Everything here is a pure function of per-PAIR float32 tensors `[P]`: summed token log-probs
of the chosen and rejected completions under the policy and (unless the loss is
reference-free) the reference model, plus each completion's token count. `preference_loss`
returns UNREDUCED per-pair losses: the trainer sums them and divides by the number of pairs in
the whole optimizer step, so the update does not depend on how the step is split into
micro-batches or ranks. Metrics are per pair too, under TRL's names, for the trainer to average
globally.

Notation (TRL's `DPOTrainer._compute_loss`): beta is `config.beta`; per pair,
    chosen_logratio   a = pi(y_w) - ref(y_w)          rejected_logratio  b = pi(y_l) - ref(y_l)
    scores            f(a), f(b): the f-divergence's f'(exp(.)) (`f_divergence_type`; the
                      default reverse_kl is the identity)
    delta             f(a) - f(b)  (with reverse_kl: (pi(y_w) - pi(y_l)) - (ref(y_w) - ref(y_l)))
with pi/ref the summed log-probs (LD-weighted with `ld_alpha` < 1: the caller passes them so,
see `kernels.reduce.ld_log_probs`), except where a loss says it length-normalizes.

Options with TRL's names: `f_divergence_type` / `f_alpha_divergence_coef` (f-DPO, for the
loss types TRL allows them with), `ld_alpha` (LD-DPO; applied by the caller to the sums),
`use_weighting` (WPO: each pair's loss times its `pair_weights`, computed by the caller from
the policy's token statistics), `label_smoothing`, `discopop_tau`, and `weights` (TRL's
`loss_weights`) for several types at once.

Where this differs from TRL, on purpose:
- the NLL term (`rpo_alpha`, and the `sft` type) is per pair: -pi(y_w) / |y_w|, the chosen
  completion's mean token NLL; the trainer's division by the number of pairs makes it the mean
  over pairs of per-sequence token means. TRL uses one cross-entropy over all chosen tokens of
  the batch (a token-weighted mean); the two agree when chosen completions have equal lengths.
  A batch-level token mean would make gradients depend on micro-batch composition. TRL removed
  `rpo_alpha` (an NLL term beside any loss); it is kept here.
- `sigmoid` with `label_smoothing` > 0 is cDPO (TRL before 1.0); TRL 1.16's sigmoid ignores
  label_smoothing. With label_smoothing 0 (the default) the two are the same.
- `exo_pair` with label_smoothing 0 uses epsilon 1e-3 (the EXO paper's value); TRL 1.16
  refuses label_smoothing 0 for it.
- `simpo` (reference-free, length-normalized, `simpo_gamma`) is TRL's CPOTrainer
  `loss_type="simpo"` (with `cpo_alpha = 0`), not a DPOTrainer type.
- `bco_pair` is TRL 1.16's (no reward shift); `bco_running_mean = true` restores the running
  mean shift of TRL before 1.0 and the BCO paper, carried in `LossState`.
- `rewards/*` are one reward per completion: beta * (pi - ref) whenever reference log-probs are
  given, as TRL logs them; SimPO/CPO's beta * pi / length when there is none, or when every
  type is reference-free and SimPO is one of them.
- `discopop`'s exponential term is evaluated as exp(-x + logsigmoid(x / tau)), the same value
  as exp(-x) * sigmoid(x / tau) without the inf * 0 = NaN of very negative x.
- `aot_pair` is the deprecated name of TRL's `aot_unpaired` (accepted with a warning).

Losses that use batch statistics, and therefore depend on which pairs share a micro-batch (as
in TRL): `aot` and `aot_unpaired` sort log-ratios across the micro-batch (per-pair entries are
then per sorted rank, not per input pair: only their sum is meaningful); `bco_pair` with
`bco_running_mean` shifts rewards by a running mean of per-micro-batch mean rewards.

(Over the usual ~500 lines: every loss type is a few lines of one formula in the notation
above, and they share the options, the metrics and the list of departures from TRL, so one
file reads as the one table of what each `loss.type` computes.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

REFERENCE_FREE_TYPES = ("simpo", "sft")
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "sppo_hard",
              "bco_pair", "apo_zero", "apo_down", "aot", "aot_unpaired", "discopop",
              "sigmoid_norm", *REFERENCE_FREE_TYPES)
# Old names still accepted, with a one-line deprecation warning.
DEPRECATED_TYPES = {"aot_pair": "aot_unpaired"}
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The loss types built on the chosen-rejected score difference, which TRL lets an f-divergence
# other than reverse_kl change (the others have no valid f-divergence generalization).
F_DIVERGENCE_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                      "discopop", "sft")
# WPO's weights are per input pair; these losses sort pairs, so TRL refuses the two together.
UNWEIGHTABLE_TYPES = ("aot", "aot_unpaired")
# exo_pair needs a label distribution strictly inside (0, 1); with label_smoothing = 0 it uses
# this epsilon (the EXO paper's value; TRL 1.16 refuses 0 instead).
EXO_PAIR_DEFAULT_EPSILON = 1e-3

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossConfig:
    """The `[loss]` section of the training config (TRL's `DPOConfig` names where TRL has the
    option; TRL's `loss_type` / `loss_weights` are `type` / `weights`)."""

    type: tuple[str, ...] = ("sigmoid",)  # one or more of LOSS_TYPES, summed with `weights`
    weights: tuple[float, ...] = ()      # empty = all 1.0; else one weight per type
    beta: float = 0.1                    # inverse temperature of the implicit reward
    label_smoothing: float = 0.0         # cDPO / robust / exo_pair / aot label noise in [0, 0.5)
    simpo_gamma: float = 0.5             # SimPO target reward margin
    discopop_tau: float = 0.05           # DiscoPOP mixing temperature
    rpo_alpha: float = 0.0               # weight of the chosen NLL term; 0 = off
    f_divergence_type: str = "reverse_kl"  # f-DPO: reverse_kl | forward_kl | js_divergence |
    #                                        alpha_divergence
    f_alpha_divergence_coef: float = 0.5   # alpha of alpha_divergence
    ld_alpha: float = 1.0                # LD-DPO weight of the tokens past the shorter
    #                                      completion's length, in [0, 1]; 1 = off (TRL's None)
    use_weighting: bool = False          # WPO: weigh each pair by the policy's probability of
    #                                      its completions
    bco_running_mean: bool = False       # bco_pair: shift rewards by their running mean (TRL
    #                                      before 1.0); TRL 1.16 has no shift

    def __post_init__(self) -> None:
        # TOML gives lists and a lone string reads naturally: store tuples.
        loss_types = (self.type,) if isinstance(self.type, str) else tuple(self.type)
        for old, new in DEPRECATED_TYPES.items():
            if old in loss_types:
                logger.warning("loss.type %r is deprecated: it is TRL's %r; use that name",
                               old, new)
                loss_types = tuple(new if name == old else name for name in loss_types)
        object.__setattr__(self, "type", loss_types)
        object.__setattr__(self, "weights", tuple(self.weights))
        if not loss_types:
            raise ValueError("loss.type is empty; expected one or more of: "
                             + ", ".join(LOSS_TYPES))
        for name in loss_types:
            if name not in LOSS_TYPES:
                raise ValueError(f"loss.type has unknown loss {name!r}; expected one of: "
                                 + ", ".join(LOSS_TYPES))
        if len(set(loss_types)) != len(loss_types):
            raise ValueError(f"loss.type lists a loss twice: {list(loss_types)}; give one entry "
                             "per loss and set its weight in loss.weights")
        if self.weights and len(self.weights) != len(loss_types):
            raise ValueError(f"loss.weights has {len(self.weights)} entries for "
                             f"{len(loss_types)} loss types; give one weight per type, or none")
        for weight in self.weights:
            if not _is_real(weight) or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"loss.weights = {list(self.weights)}; expected finite "
                                 "numbers >= 0")
        _check_range("beta", self.beta, low=0.0, low_open=True)
        _check_range("label_smoothing", self.label_smoothing, low=0.0, high=0.5)
        _check_range("simpo_gamma", self.simpo_gamma)
        _check_range("discopop_tau", self.discopop_tau, low=0.0, low_open=True)
        _check_range("rpo_alpha", self.rpo_alpha, low=0.0)
        _check_range("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        _check_range("ld_alpha", self.ld_alpha, low=0.0, high=1.0, high_closed=True)
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"loss.f_divergence_type = {self.f_divergence_type!r}; expected "
                             f"one of: {', '.join(F_DIVERGENCES)}")
        if self.f_divergence_type != "reverse_kl":
            others = [name for name in loss_types if name not in F_DIVERGENCE_TYPES]
            if others:
                raise ValueError(f"loss.f_divergence_type = {self.f_divergence_type!r} has no "
                                 f"meaning for loss.type {others}; it applies to "
                                 f"{', '.join(F_DIVERGENCE_TYPES)} (use reverse_kl with the "
                                 "others)")
        if self.use_weighting:
            sorting = [name for name in loss_types if name in UNWEIGHTABLE_TYPES]
            if sorting:
                raise ValueError(f"loss.use_weighting cannot weigh {sorting}: they sort the "
                                 "pairs, which would misalign the per-pair weights (as in TRL)")

    @property
    def needs_reference(self) -> bool:
        """False when every loss type is reference-free (simpo, sft)."""
        return any(name not in REFERENCE_FREE_TYPES for name in self.type)

    @property
    def loss_weights(self) -> tuple[float, ...]:
        return self.weights or (1.0,) * len(self.type)

    @property
    def uses_ld(self) -> bool:
        """Whether LD-DPO changes the log-probs (ld_alpha < 1)."""
        return self.ld_alpha < 1.0

    @property
    def carries_state(self) -> bool:
        """Whether `preference_loss` advances a `LossState` (bco_pair's running mean)."""
        return "bco_pair" in self.type and self.bco_running_mean


@dataclass(frozen=True, eq=False)
class LossState:
    """Statistics carried across steps: bco_pair's running mean of rewards.

    `reward_mean` is the mean, over all `preference_loss` calls so far, of each call's mean
    reward beta * (pi - ref) over its chosen and rejected completions (TRL's `RunningMoments`
    fed one batch mean per step). The caller owns it: keep the returned state, save
    `state_dict()` with checkpoints. Ranks keep their own between `synchronized` calls (TRL
    gathers the rewards of all ranks instead)."""

    reward_mean: Tensor = field(default_factory=lambda: torch.zeros(()))
    num_updates: int = 0

    def to(self, device: torch.device) -> LossState:
        """The state with its mean on `device`, so that a loss never copies it there inside a
        micro-batch (a blocking copy: a host sync). Asynchronous: the source is never written
        again."""
        if self.reward_mean.device == device:
            return self
        return LossState(self.reward_mean.to(device, non_blocking=True), self.num_updates)

    def synchronized(self, config: LossConfig) -> LossState:
        """The state made the same on every rank after a step, where `config`'s losses carry
        one (each rank advances its own from its own micro-batches), so the one saved with a
        checkpoint is every rank's: the update-weighted mean of the ranks' means and the
        largest update count. Collective when there is a state to share: call it on every
        rank, after the step's backward passes; the mean stays on its device."""
        if not config.carries_state:
            return self
        device = self.reward_mean.device
        n = float(self.num_updates)
        parts = torch.stack([self.reward_mean.to(torch.float64) * n,
                             torch.full((), n, dtype=torch.float64, device=device)])
        torch.distributed.all_reduce(parts)
        weighted, total = parts.unbind()
        mean = torch.where(total > 0, weighted / total.clamp(min=1.0), 0.0).float()
        count = torch.full((1,), self.num_updates, dtype=torch.int64, device=device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return LossState(mean, int(count.item()))

    def state_dict(self) -> dict[str, float | int]:
        return {"reward_mean": float(self.reward_mean), "num_updates": self.num_updates}

    @classmethod
    def from_state_dict(cls, state: dict[str, float | int]) -> LossState:
        return cls(torch.tensor(float(state["reward_mean"])), int(state["num_updates"]))


def preference_loss(config: LossConfig, policy_chosen: Tensor, policy_rejected: Tensor,
                    ref_chosen: Tensor | None, ref_rejected: Tensor | None,
                    chosen_num_tokens: Tensor, rejected_num_tokens: Tensor,
                    state: LossState | None = None, check_finite: bool = True, *,
                    pair_weights: Tensor | None = None,
                    policy_chosen_nll: Tensor | None = None,
                    ) -> tuple[Tensor, dict[str, Tensor], LossState]:
    """Per-pair losses `[P]` float32, per-pair metrics `[P]` and the updated `LossState`.

    Inputs are `[P]`: summed log-probs (float32; gradients flow through the policy ones;
    LD-weighted when `config.ld_alpha` < 1) and int token counts. `ref_*` may be None only when
    `config.needs_reference` is False. The loss is
    sum_k weights[k] * loss_k * pair_weights + rpo_alpha * NLL(chosen).

    `pair_weights` `[P]` (no gradient): WPO's weight of each pair, required with
    `config.use_weighting` (see `wpo_pair_weights`). `policy_chosen_nll`: the chosen
    completions' plain (not LD-weighted) log-prob sums for the NLL term (`sft`, `rpo_alpha`,
    `nll_loss`), as TRL takes them from the unweighted tokens; default `policy_chosen`.

    With `check_finite` (the default) a non-finite input or loss raises ValueError here, at the
    cost of one host sync; pass False and call `check_finite_pairs` yourself to place that sync
    elsewhere. `aot`, `aot_unpaired` (sorting across the micro-batch) and `bco_pair` with
    `bco_running_mean` (the running mean in `state`) depend on which pairs share a call; every
    other loss is per pair."""
    _check_pair_inputs(config, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                       chosen_num_tokens, rejected_num_tokens, pair_weights, policy_chosen_nll)
    state = LossState() if state is None else state
    inputs = _PairInputs(config, policy_chosen.float(), policy_rejected.float(),
                         None if ref_chosen is None else ref_chosen.float(),
                         None if ref_rejected is None else ref_rejected.float(),
                         chosen_num_tokens, rejected_num_tokens)
    weights = None if pair_weights is None else pair_weights.detach().float()

    losses = torch.zeros_like(inputs.pi_w)
    nll_source = inputs.pi_w if policy_chosen_nll is None else policy_chosen_nll.float()
    nll = -nll_source / inputs.len_w
    for name, weight in zip(config.type, config.loss_weights):
        if name == "bco_pair":
            term, state = _bco_pair(inputs, state)
        elif name == "sft":
            term = nll
        else:
            term = _LOSSES[name](inputs)
        if weights is not None:
            term = term * weights
        losses = losses + weight * term
    if config.rpo_alpha > 0:
        losses = losses + config.rpo_alpha * nll

    metrics = _metrics(inputs, nll)
    if check_finite:
        named = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
                 "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}
        check_finite_pairs(losses, {k: v for k, v in named.items() if v is not None})
    return losses, metrics, state


def wpo_pair_weights(chosen_aligned_logps: Tensor, rejected_aligned_logps: Tensor,
                     chosen_num_tokens: Tensor, rejected_num_tokens: Tensor) -> Tensor:
    """WPO's per-pair weight (TRL's `use_weighting`, Eq. 2 of the WPO paper), no gradient:
    w(y) = exp(mean over y's tokens of (log p_t - log sum_v p_v^2)) under the policy, and the
    pair's weight w(y_w) * w(y_l). Inputs `[P]`: each completion's sum over its tokens of
    log p_t - log(sum_v p_v^2) (plain, not LD-weighted), and its token count (clamped at 1)."""
    with torch.no_grad():
        chosen = chosen_aligned_logps.double() / chosen_num_tokens.clamp(min=1).double()
        rejected = rejected_aligned_logps.double() / rejected_num_tokens.clamp(min=1).double()
        return (chosen.exp() * rejected.exp()).float()


def check_finite_pairs(losses: Tensor, inputs: dict[str, Tensor]) -> None:
    """Raise ValueError naming the first non-finite input (or the loss) and its pair index.
    One host sync."""
    tensors = {**{name: t.detach() for name, t in inputs.items()}, "loss": losses.detach()}
    flags = torch.stack([~torch.isfinite(t).all() for t in tensors.values()]).tolist()
    for (name, tensor), bad in zip(tensors.items(), flags):
        if bad:
            index = int((~torch.isfinite(tensor)).nonzero()[0, 0])
            hint = ("a completion with zero tokens?" if name == "loss" else
                    "a diverged model or a bad checkpoint?")
            raise ValueError(f"non-finite {name} at pair {index}: {float(tensor[index])} "
                             f"({hint})")


# ---- the losses ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _PairInputs:
    config: LossConfig
    pi_w: Tensor                 # policy log-prob of the chosen completion (sum over tokens)
    pi_l: Tensor
    ref_w: Tensor | None
    ref_l: Tensor | None
    num_w: Tensor                # token counts
    num_l: Tensor

    @property
    def beta(self) -> float:
        return self.config.beta

    @property
    def len_w(self) -> Tensor:
        return self.num_w.to(self.pi_w.dtype)

    @property
    def len_l(self) -> Tensor:
        return self.num_l.to(self.pi_l.dtype)

    @property
    def a(self) -> Tensor:       # chosen log-ratio
        return self.pi_w - self.ref_w

    @property
    def b(self) -> Tensor:       # rejected log-ratio
        return self.pi_l - self.ref_l

    @property
    def score_w(self) -> Tensor:  # f-divergence score of the chosen log-ratio
        return _f_divergence_score(self.a, self.config)

    @property
    def score_l(self) -> Tensor:
        return _f_divergence_score(self.b, self.config)

    @property
    def delta(self) -> Tensor:   # TRL's delta_score; with reverse_kl the DPO logits a - b
        return self.score_w - self.score_l

    @property
    def delta_per_token(self) -> Tensor:  # scores divided by the completion lengths
        return self.score_w / self.len_w.clamp(min=1.0) - self.score_l / self.len_l.clamp(
            min=1.0)


# The largest exponent alpha_divergence takes, by dtype, as in TRL (exp stays representable).
_ALPHA_DIVERGENCE_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0,
                           torch.float64: 80.0}


def _f_divergence_score(logratio: Tensor, config: LossConfig) -> Tensor:
    """f'(t) at t = exp(logratio) for the configured f-divergence (f-DPO), as TRL computes it:
    reverse_kl log t; forward_kl 1 - 1/t; js_divergence log(2t / (t + 1)); alpha_divergence
    (t^(alpha - 1) - 1) / (alpha - 1), its exponent clamped at 80 (log t near alpha = 1)."""
    kind = config.f_divergence_type
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1 - torch.exp(-logratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    coef = config.f_alpha_divergence_coef
    if abs(coef - 1.0) < 1e-6:
        return logratio
    exponent = torch.clamp((coef - 1.0) * logratio, max=_ALPHA_DIVERGENCE_CLAMP[logratio.dtype])
    return (torch.exp(exponent) - 1.0) * (1.0 / (coef - 1.0))


def _smoothed_sigmoid(x: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigmoid(x) - eps log sigmoid(-x): DPO's loss on a noisy label (cDPO)."""
    return (-F.logsigmoid(x) * (1 - label_smoothing)
            - F.logsigmoid(-x) * label_smoothing)


def _sigmoid(p: _PairInputs) -> Tensor:
    return _smoothed_sigmoid(p.beta * p.delta, p.config.label_smoothing)


def _sigmoid_norm(p: _PairInputs) -> Tensor:
    # DPO on length-normalized scores (TRL 1.16; no label smoothing there).
    return -F.logsigmoid(p.beta * p.delta_per_token)


def _robust(p: _PairInputs) -> Tensor:
    eps = p.config.label_smoothing
    x = p.beta * p.delta
    return (-F.logsigmoid(x) * (1 - eps) + F.logsigmoid(-x) * eps) / (1 - 2 * eps)


def _hinge(p: _PairInputs) -> Tensor:
    return torch.relu(1 - p.beta * p.delta)


def _ipo(p: _PairInputs) -> Tensor:
    # IPO on length-normalized scores (policy and reference), target margin 1 / (2 beta).
    return (p.delta_per_token - 1 / (2 * p.beta)) ** 2


def _exo_pair(p: _PairInputs) -> Tensor:
    # KL(q || p_label) with q = (sigmoid(x), sigmoid(-x)) and p_label = (1 - eps, eps).
    eps = p.config.label_smoothing or EXO_PAIR_DEFAULT_EPSILON
    x = p.beta * p.delta
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))


def _nca_pair(p: _PairInputs) -> Tensor:
    chosen, rejected = p.beta * p.a, p.beta * p.b
    return (-F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen)
            - 0.5 * F.logsigmoid(-rejected))


def _sppo_hard(p: _PairInputs) -> Tensor:
    return (p.a - 0.5 / p.beta) ** 2 + (p.b + 0.5 / p.beta) ** 2


def _bco_pair(p: _PairInputs, state: LossState) -> tuple[Tensor, LossState]:
    chosen, rejected = p.beta * p.a, p.beta * p.b
    if not p.config.bco_running_mean:  # TRL 1.16
        return -F.logsigmoid(chosen) - F.logsigmoid(-rejected), state
    if chosen.numel() == 0:  # an empty micro-batch has no mean: the state stays as it was
        return chosen, state
    batch_mean = torch.cat([chosen, rejected]).mean().detach()
    count = state.num_updates + 1
    # The running mean includes this batch before it is used, as TRL before 1.0 did.
    reward_mean = state.reward_mean.to(batch_mean) + (batch_mean - state.reward_mean.to(
        batch_mean)) / count
    losses = -F.logsigmoid(chosen - reward_mean) - F.logsigmoid(-(rejected - reward_mean))
    return losses, LossState(reward_mean, count)


def _apo_zero(p: _PairInputs) -> Tensor:
    return 1 - torch.sigmoid(p.beta * p.a) + torch.sigmoid(p.beta * p.b)


def _apo_down(p: _PairInputs) -> Tensor:
    return torch.sigmoid(p.beta * p.a) + 1 - torch.sigmoid(p.beta * (p.a - p.b))


def _aot(p: _PairInputs) -> Tensor:
    # Sorted policy margins against sorted reference margins, across the micro-batch.
    delta = (torch.sort(p.pi_w - p.pi_l).values - torch.sort(p.ref_w - p.ref_l).values)
    return _smoothed_sigmoid(p.beta * delta, p.config.label_smoothing)


def _aot_unpaired(p: _PairInputs) -> Tensor:
    delta = torch.sort(p.a).values - torch.sort(p.b).values
    return _smoothed_sigmoid(p.beta * delta, p.config.label_smoothing)


def _discopop(p: _PairInputs) -> Tensor:
    x = p.beta * p.delta
    mix = torch.sigmoid(x / p.config.discopop_tau)
    # exp(-x) * mix, computed in log space: finite wherever the product is.
    exponential = torch.exp(-x + F.logsigmoid(x / p.config.discopop_tau))
    return -F.logsigmoid(x) * (1 - mix) + exponential


def _simpo(p: _PairInputs) -> Tensor:
    # Reference-free: margin of length-normalized policy log-probs minus gamma / beta.
    x = p.beta * (p.pi_w / p.len_w - p.pi_l / p.len_l - p.config.simpo_gamma / p.beta)
    return _smoothed_sigmoid(x, p.config.label_smoothing)


_LOSSES = {"sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo,
           "exo_pair": _exo_pair, "nca_pair": _nca_pair, "sppo_hard": _sppo_hard,
           "apo_zero": _apo_zero, "apo_down": _apo_down, "aot": _aot,
           "aot_unpaired": _aot_unpaired, "discopop": _discopop, "sigmoid_norm": _sigmoid_norm,
           "simpo": _simpo}
assert set(_LOSSES) | {"bco_pair", "sft"} == set(LOSS_TYPES)


def _metrics(p: _PairInputs, nll: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        simpo_only = "simpo" in p.config.type and not p.config.needs_reference
        if p.ref_w is not None and not simpo_only:
            chosen, rejected = p.beta * p.a, p.beta * p.b
        else:
            chosen, rejected = p.beta * p.pi_w / p.len_w, p.beta * p.pi_l / p.len_l
        return {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/accuracies": (chosen > rejected).float(),
            "rewards/margins": chosen - rejected,
            "logps/chosen": p.pi_w.detach(),
            "logps/rejected": p.pi_l.detach(),
            "nll_loss": nll.detach(),
        }


# ---- validation -----------------------------------------------------------------------------

def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(name: str, value: object, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_closed: bool = False) -> None:
    ok = _is_real(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high if high_closed else value < high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bounds.append(f"{'<=' if high_closed else '<'} {high}")
        expected = " and ".join(bounds) if bounds else "finite"
        raise ValueError(f"loss.{name} = {value!r}; expected a finite number {expected}")


def _check_pair_inputs(config: LossConfig, policy_chosen: Tensor, policy_rejected: Tensor,
                       ref_chosen: Tensor | None, ref_rejected: Tensor | None,
                       chosen_num_tokens: Tensor, rejected_num_tokens: Tensor,
                       pair_weights: Tensor | None = None,
                       policy_chosen_nll: Tensor | None = None) -> None:
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("give both ref_chosen and ref_rejected, or neither")
    if config.use_weighting and pair_weights is None:
        raise ValueError("loss.use_weighting needs pair_weights (see wpo_pair_weights)")
    if ref_chosen is None and config.needs_reference:
        needing = [name for name in config.type if name not in REFERENCE_FREE_TYPES]
        raise ValueError(f"loss.type {needing} needs reference log-probs; only "
                         f"{', '.join(REFERENCE_FREE_TYPES)} are reference-free")
    named = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
             "ref_chosen": ref_chosen, "ref_rejected": ref_rejected,
             "chosen_num_tokens": chosen_num_tokens, "rejected_num_tokens": rejected_num_tokens,
             "pair_weights": pair_weights, "policy_chosen_nll": policy_chosen_nll}
    shape = tuple(policy_chosen.shape)
    if len(shape) != 1:
        raise ValueError(f"expected per-pair tensors [P]; policy_chosen has shape {shape}")
    for name, tensor in named.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, policy_chosen {shape}; "
                             "expected one value per pair")
        if tensor.device != policy_chosen.device:
            raise ValueError(f"{name} is on {tensor.device}, policy_chosen on "
                             f"{policy_chosen.device}")
        counts = name.endswith("num_tokens")
        if counts and (tensor.is_floating_point() or tensor.is_complex()
                       or tensor.dtype == torch.bool):
            raise ValueError(f"{name} must be an integer tensor of token counts; got "
                             f"{tensor.dtype}")
        if not counts and not tensor.is_floating_point():
            raise ValueError(f"{name} must be floating point log-probs; got {tensor.dtype}")
