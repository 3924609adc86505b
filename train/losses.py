"""The DPO loss family on per-sequence log-probs, with TRL's loss names and meanings.

Everything here is a pure function of per-PAIR float32 tensors `[P]`: summed token log-probs
of the chosen and rejected completions under the policy and (unless the loss is
reference-free) the reference model, plus each completion's token count. `preference_loss`
returns UNREDUCED per-pair losses: the trainer sums them and divides by the number of pairs in
the whole optimizer step, so the update does not depend on how the step is split into
micro-batches or ranks. Metrics are per-pair too, under TRL's names, for the trainer to average
globally.

Notation (TRL's `dpo_loss`): beta is `config.beta`; per pair,
    chosen_logratio   a = pi(y_w) - ref(y_w)          rejected_logratio  b = pi(y_l) - ref(y_l)
    logits            z = a - b = (pi(y_w) - pi(y_l)) - (ref(y_w) - ref(y_l))
with pi/ref the summed log-probs, except where a loss says it length-normalizes.

Where this differs from TRL, on purpose:
- `ipo` divides policy and reference log-probs by the completion length inside the ipo term
  only; TRL, once "ipo" is among its loss types, normalizes the log-probs every listed loss
  sees, and the logged `logps/*`.
- the NLL term (`rpo_alpha`, and the `sft` type) is per pair: -pi(y_w) / |y_w|, the chosen
  completion's mean token NLL; the trainer's division by the number of pairs makes it the mean
  over pairs of per-sequence token means. TRL uses one cross-entropy over all chosen tokens of
  the batch (a token-weighted mean); the two agree when chosen completions have equal lengths.
  A batch-level token mean would make gradients depend on micro-batch composition.
- `rewards/*` are one reward per completion, not TRL's weighted sum over loss types (which
  scales them by the weights and counts `sft` as zero): beta * (pi - ref) on summed log-probs
  when a reference is used; beta * pi / length (SimPO/CPO's reward) when every type is
  reference-free.
- `discopop`'s exponential term is evaluated as exp(-x + logsigmoid(x / tau)), the same value
  as exp(-x) * sigmoid(x / tau) without the inf * 0 = NaN of very negative x.

Losses that use batch statistics, and therefore depend on which pairs share a micro-batch (as
in TRL): `aot` and `aot_pair` sort log-ratios across the micro-batch (per-pair entries are then
per sorted rank, not per input pair: only their sum is meaningful); `bco_pair` shifts rewards
by a running mean of per-micro-batch mean rewards carried in `LossState`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

REFERENCE_FREE_TYPES = ("simpo", "sft")
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "sppo_hard",
              "bco_pair", "apo_zero", "apo_down", "aot", "aot_pair", "discopop",
              *REFERENCE_FREE_TYPES)
# exo_pair needs a label distribution strictly inside (0, 1); with label_smoothing = 0 it uses
# this epsilon, as TRL does.
EXO_PAIR_DEFAULT_EPSILON = 1e-3


@dataclass(frozen=True)
class LossConfig:
    """The `[loss]` section of the training config."""

    type: tuple[str, ...] = ("sigmoid",)  # one or more of LOSS_TYPES, summed with `weights`
    weights: tuple[float, ...] = ()      # empty = all 1.0; else one weight per type
    beta: float = 0.1                    # inverse temperature of the implicit reward
    label_smoothing: float = 0.0         # cDPO / robust / exo_pair / aot label noise in [0, 0.5)
    simpo_gamma: float = 0.5             # SimPO target reward margin
    discopop_tau: float = 0.05           # DiscoPOP mixing temperature
    rpo_alpha: float = 0.0               # weight of the chosen NLL term; 0 = off

    def __post_init__(self) -> None:
        # TOML gives lists and a lone string reads naturally: store tuples.
        loss_types = (self.type,) if isinstance(self.type, str) else tuple(self.type)
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

    @property
    def needs_reference(self) -> bool:
        """False when every loss type is reference-free (simpo, sft)."""
        return any(name not in REFERENCE_FREE_TYPES for name in self.type)

    @property
    def loss_weights(self) -> tuple[float, ...]:
        return self.weights or (1.0,) * len(self.type)


@dataclass(frozen=True, eq=False)
class LossState:
    """Statistics carried across steps: bco_pair's running mean of rewards.

    `reward_mean` is the mean, over all `preference_loss` calls so far, of each call's mean
    reward beta * (pi - ref) over its chosen and rejected completions (TRL's `RunningMoments`
    fed one batch mean per step). The caller owns it: keep the returned state, save
    `state_dict()` with checkpoints. Ranks keep their own; all-reducing the mean across ranks
    (as TRL's gather does) is the caller's choice."""

    reward_mean: Tensor = field(default_factory=lambda: torch.zeros(()))
    num_updates: int = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"reward_mean": float(self.reward_mean), "num_updates": self.num_updates}

    @classmethod
    def from_state_dict(cls, state: dict[str, float | int]) -> LossState:
        return cls(torch.tensor(float(state["reward_mean"])), int(state["num_updates"]))


def preference_loss(config: LossConfig, policy_chosen: Tensor, policy_rejected: Tensor,
                    ref_chosen: Tensor | None, ref_rejected: Tensor | None,
                    chosen_num_tokens: Tensor, rejected_num_tokens: Tensor,
                    state: LossState | None = None, check_finite: bool = True,
                    ) -> tuple[Tensor, dict[str, Tensor], LossState]:
    """Per-pair losses `[P]` float32, per-pair metrics `[P]` and the updated `LossState`.

    Inputs are `[P]`: summed log-probs (float32; gradients flow through the policy ones) and
    int token counts. `ref_*` may be None only when `config.needs_reference` is False. The loss
    is sum_k weights[k] * loss_k + rpo_alpha * NLL(chosen). With `check_finite` (the default)
    a non-finite input or loss raises ValueError here, at the cost of one host sync; pass
    False and call `check_finite_pairs` yourself to place that sync elsewhere.

    `aot`, `aot_pair` (sorting across the micro-batch) and `bco_pair` (the running mean in
    `state`) depend on which pairs share a call; every other loss is per pair."""
    _check_pair_inputs(config, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                       chosen_num_tokens, rejected_num_tokens)
    state = LossState() if state is None else state
    inputs = _PairInputs(config, policy_chosen.float(), policy_rejected.float(),
                         None if ref_chosen is None else ref_chosen.float(),
                         None if ref_rejected is None else ref_rejected.float(),
                         chosen_num_tokens, rejected_num_tokens)

    losses = torch.zeros_like(inputs.pi_w)
    for name, weight in zip(config.type, config.loss_weights):
        if name == "bco_pair":
            term, state = _bco_pair(inputs, state)
        else:
            term = _LOSSES[name](inputs)
        losses = losses + weight * term
    nll = -inputs.pi_w / inputs.len_w
    if config.rpo_alpha > 0:
        losses = losses + config.rpo_alpha * nll

    metrics = _metrics(inputs, nll)
    if check_finite:
        named = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
                 "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}
        check_finite_pairs(losses, {k: v for k, v in named.items() if v is not None})
    return losses, metrics, state


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
    def z(self) -> Tensor:       # DPO logits
        return self.a - self.b


def _smoothed_sigmoid(x: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigmoid(x) - eps log sigmoid(-x): DPO's loss on a noisy label (cDPO)."""
    return (-F.logsigmoid(x) * (1 - label_smoothing)
            - F.logsigmoid(-x) * label_smoothing)


def _sigmoid(p: _PairInputs) -> Tensor:
    return _smoothed_sigmoid(p.beta * p.z, p.config.label_smoothing)


def _robust(p: _PairInputs) -> Tensor:
    eps = p.config.label_smoothing
    x = p.beta * p.z
    return (-F.logsigmoid(x) * (1 - eps) + F.logsigmoid(-x) * eps) / (1 - 2 * eps)


def _hinge(p: _PairInputs) -> Tensor:
    return torch.relu(1 - p.beta * p.z)


def _ipo(p: _PairInputs) -> Tensor:
    # IPO on length-normalized log-probs (policy and reference), target margin 1 / (2 beta).
    z = (p.pi_w - p.ref_w) / p.len_w - (p.pi_l - p.ref_l) / p.len_l
    return (z - 1 / (2 * p.beta)) ** 2


def _exo_pair(p: _PairInputs) -> Tensor:
    # KL(q || p_label) with q = (sigmoid(x), sigmoid(-x)) and p_label = (1 - eps, eps).
    eps = p.config.label_smoothing or EXO_PAIR_DEFAULT_EPSILON
    x = p.beta * p.z
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log(1 - eps))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))


def _nca_pair(p: _PairInputs) -> Tensor:
    chosen, rejected = p.beta * p.a, p.beta * p.b
    return (-F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen)
            - 0.5 * F.logsigmoid(-rejected))


def _sppo_hard(p: _PairInputs) -> Tensor:
    return (p.a - 0.5 / p.beta) ** 2 + (p.b + 0.5 / p.beta) ** 2


def _bco_pair(p: _PairInputs, state: LossState) -> tuple[Tensor, LossState]:
    chosen, rejected = p.beta * p.a, p.beta * p.b
    if chosen.numel() == 0:  # an empty micro-batch has no mean: the state stays as it was
        return chosen, state
    batch_mean = torch.cat([chosen, rejected]).mean().detach()
    count = state.num_updates + 1
    # The running mean includes this batch before it is used, as in TRL.
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


def _aot_pair(p: _PairInputs) -> Tensor:
    delta = torch.sort(p.a).values - torch.sort(p.b).values
    return _smoothed_sigmoid(p.beta * delta, p.config.label_smoothing)


def _discopop(p: _PairInputs) -> Tensor:
    x = p.beta * p.z
    mix = torch.sigmoid(x / p.config.discopop_tau)
    # exp(-x) * mix, computed in log space: finite wherever the product is.
    exponential = torch.exp(-x + F.logsigmoid(x / p.config.discopop_tau))
    return -F.logsigmoid(x) * (1 - mix) + exponential


def _simpo(p: _PairInputs) -> Tensor:
    # Reference-free: margin of length-normalized policy log-probs minus gamma / beta.
    x = p.beta * (p.pi_w / p.len_w - p.pi_l / p.len_l - p.config.simpo_gamma / p.beta)
    return _smoothed_sigmoid(x, p.config.label_smoothing)


def _sft(p: _PairInputs) -> Tensor:
    return -p.pi_w / p.len_w


_LOSSES = {"sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo,
           "exo_pair": _exo_pair, "nca_pair": _nca_pair, "sppo_hard": _sppo_hard,
           "apo_zero": _apo_zero, "apo_down": _apo_down, "aot": _aot, "aot_pair": _aot_pair,
           "discopop": _discopop, "simpo": _simpo, "sft": _sft}
assert set(_LOSSES) | {"bco_pair"} == set(LOSS_TYPES)


def _metrics(p: _PairInputs, nll: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        if p.config.needs_reference:
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
                 low_open: bool = False) -> None:
    ok = _is_real(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bounds.append(f"< {high}")
        expected = " and ".join(bounds) if bounds else "finite"
        raise ValueError(f"loss.{name} = {value!r}; expected a finite number {expected}")


def _check_pair_inputs(config: LossConfig, policy_chosen: Tensor, policy_rejected: Tensor,
                       ref_chosen: Tensor | None, ref_rejected: Tensor | None,
                       chosen_num_tokens: Tensor, rejected_num_tokens: Tensor) -> None:
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("give both ref_chosen and ref_rejected, or neither")
    if ref_chosen is None and config.needs_reference:
        needing = [name for name in config.type if name not in REFERENCE_FREE_TYPES]
        raise ValueError(f"loss.type {needing} needs reference log-probs; only "
                         f"{', '.join(REFERENCE_FREE_TYPES)} are reference-free")
    named = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
             "ref_chosen": ref_chosen, "ref_rejected": ref_rejected,
             "chosen_num_tokens": chosen_num_tokens, "rejected_num_tokens": rejected_num_tokens}
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
