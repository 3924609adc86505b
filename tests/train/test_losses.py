"""The DPO loss family against hand-derived values (tests/train/test_trl_parity.py checks it
against TRL's own code).

Every expected number is computed with plain Python `math` from the formula in the test's
docstring, on these hand-picked pairs (log-probs are sums over tokens):

    pair              0      1
    pi(y_w)         -10     -7        policy, chosen
    pi(y_l)         -12     -6        policy, rejected
    ref(y_w)        -11     -7
    ref(y_l)        -11     -9
    |y_w|             4      2        chosen token counts
    |y_l|             5      3

so  a = pi(y_w) - ref(y_w) = [1, 0],   b = pi(y_l) - ref(y_l) = [-1, 3],
    z = a - b = [2, -3]  (TRL's `logits`),  policy margins [2, -1], reference margins [0, 2].
"""

from __future__ import annotations

import math

import pytest
import torch

from prefixdpo.train.losses import (LOSS_TYPES, LossConfig, LossState, check_finite_pairs,
                          preference_loss)

PI_W, PI_L, REF_W, REF_L = [-10.0, -7.0], [-12.0, -6.0], [-11.0, -7.0], [-11.0, -9.0]
NUM_W, NUM_L = [4, 2], [5, 3]
A = [w - r for w, r in zip(PI_W, REF_W)]          # [1, 0]
B = [w - r for w, r in zip(PI_L, REF_L)]          # [-1, 3]
Z = [a - b for a, b in zip(A, B)]                 # [2, -3]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def run(config: LossConfig, state=None, with_reference=True, policy_grad=False):
    pi_w = torch.tensor(PI_W, requires_grad=policy_grad)
    pi_l = torch.tensor(PI_L, requires_grad=policy_grad)
    ref_w, ref_l = (torch.tensor(REF_W), torch.tensor(REF_L)) if with_reference else (None, None)
    losses, metrics, state = preference_loss(config, pi_w, pi_l, ref_w, ref_l,
                                             torch.tensor(NUM_W), torch.tensor(NUM_L), state)
    return losses, metrics, state, (pi_w, pi_l)


def assert_losses(config: LossConfig, expected: list[float], **kwargs):
    losses, *_ = run(config, **kwargs)
    assert losses.dtype == torch.float32 and losses.shape == (2,)
    assert losses.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_sigmoid_at_policy_equal_reference_is_ln2():
    """z = 0 when the policy equals the reference: -log sigmoid(0) = ln 2, for any beta."""
    for beta in (0.1, 2.0):
        losses, metrics, _ = preference_loss(
            LossConfig(beta=beta), torch.tensor(PI_W), torch.tensor(PI_L), torch.tensor(PI_W),
            torch.tensor(PI_L), torch.tensor(NUM_W), torch.tensor(NUM_L))
        assert losses.tolist() == pytest.approx([math.log(2)] * 2, rel=1e-6)
        assert metrics["rewards/margins"].tolist() == [0.0, 0.0]


def test_sigmoid():
    """DPO: -log sigmoid(beta z). beta = 0.1: [-log sigmoid(0.2), -log sigmoid(-0.3)]."""
    assert_losses(LossConfig(beta=0.1), [-log_sigmoid(0.1 * z) for z in Z])


def test_sigmoid_label_smoothing_is_cdpo():
    """cDPO: -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z), eps = 0.2, beta = 0.5."""
    eps, beta = 0.2, 0.5
    assert_losses(LossConfig(beta=beta, label_smoothing=eps),
                  [-(1 - eps) * log_sigmoid(beta * z) - eps * log_sigmoid(-beta * z) for z in Z])


def test_robust():
    """Robust DPO: (-(1 - eps) log sigmoid(x) + eps log sigmoid(-x)) / (1 - 2 eps), x = beta z.
    eps = 0.1, beta = 0.5."""
    eps, beta = 0.1, 0.5
    assert_losses(LossConfig(type=("robust",), beta=beta, label_smoothing=eps),
                  [(-(1 - eps) * log_sigmoid(beta * z) + eps * log_sigmoid(-beta * z))
                   / (1 - 2 * eps) for z in Z])


def test_hinge():
    """RSO hinge: max(0, 1 - beta z). beta = 0.25: z = 2 -> 0.5; z = -3 -> 1.75."""
    assert_losses(LossConfig(type=("hinge",), beta=0.25), [0.5, 1.75])


def test_ipo_uses_length_normalized_log_probs():
    """IPO: (z' - 1 / (2 beta))^2 with z' = a / |y_w| - b / |y_l| (policy and reference both
    divided by the completion length). Pair 0: 1/4 - (-1)/5 = 0.45; pair 1: 0/2 - 3/3 = -1.
    beta = 0.5 -> target 1: (0.45 - 1)^2 = 0.3025, (-1 - 1)^2 = 4."""
    assert_losses(LossConfig(type=("ipo",), beta=0.5), [0.3025, 4.0])


@pytest.mark.parametrize("label_smoothing,eps", [(0.0, 1e-3), (0.25, 0.25)])
def test_exo_pair(label_smoothing, eps):
    """EXO: KL between q = (sigmoid(x), sigmoid(-x)) and labels (1 - eps, eps), x = beta z:
    sigmoid(x) (log sigmoid(x) - log(1 - eps)) + sigmoid(-x) (log sigmoid(-x) - log eps);
    eps = label_smoothing, or 1e-3 when that is 0 (TRL's default)."""
    beta = 0.5
    expected = [sigmoid(beta * z) * (log_sigmoid(beta * z) - math.log(1 - eps))
                + sigmoid(-beta * z) * (log_sigmoid(-beta * z) - math.log(eps)) for z in Z]
    assert_losses(LossConfig(type=("exo_pair",), beta=beta, label_smoothing=label_smoothing),
                  expected)


def test_nca_pair():
    """NCA: -log sigmoid(beta a) - 1/2 log sigmoid(-beta a) - 1/2 log sigmoid(-beta b)."""
    beta = 0.5
    assert_losses(LossConfig(type=("nca_pair",), beta=beta),
                  [-log_sigmoid(beta * a) - 0.5 * log_sigmoid(-beta * a)
                   - 0.5 * log_sigmoid(-beta * b) for a, b in zip(A, B)])


def test_sppo_hard():
    """SPPO (hard labels): (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2. beta = 0.5 -> targets +-1:
    pair 0: (1 - 1)^2 + (-1 + 1)^2 = 0; pair 1: (0 - 1)^2 + (3 + 1)^2 = 17."""
    assert_losses(LossConfig(type=("sppo_hard",), beta=0.5), [0.0, 17.0])


def test_bco_pair_is_trl_1_16s_without_a_shift():
    """BCO (TRL 1.16): -log sigmoid(beta a) - log sigmoid(-beta b); the state is untouched."""
    beta = 0.5
    state = LossState(torch.tensor(3.0), 7)
    losses, _, returned, _ = run(LossConfig(type=("bco_pair",), beta=beta), state=state)
    assert losses.tolist() == pytest.approx(
        [-log_sigmoid(beta * a) - log_sigmoid(-beta * b) for a, b in zip(A, B)], rel=1e-6)
    assert returned is state


def test_bco_pair_running_mean_is_explicit_state():
    """BCO with `bco_running_mean` (TRL before 1.0): -log sigmoid(beta a - delta)
    - log sigmoid(-(beta b - delta)), delta the running mean of per-call mean rewards, this
    call included. beta = 0.5: rewards beta a = [0.5, 0], beta b = [-0.5, 1.5], call mean
    m1 = 1.5 / 4 = 0.375 = delta_1. A second call on the same pairs with every log-prob + 1 for
    the policy: beta a = [1, 0.5], beta b = [0, 2], m2 = 3.5 / 4 = 0.875,
    delta_2 = (0.375 + 0.875) / 2 = 0.625."""
    beta = 0.5
    config = LossConfig(type=("bco_pair",), beta=beta, bco_running_mean=True)

    def expected(shift, delta):
        return [-log_sigmoid(beta * (a + shift) - delta) - log_sigmoid(-(beta * (b + shift)
                                                                          - delta))
                for a, b in zip(A, B)]

    losses, _, state, _ = run(config)
    assert losses.tolist() == pytest.approx(expected(0, 0.375), rel=1e-6)
    assert state.num_updates == 1 and state.reward_mean.item() == pytest.approx(0.375)
    losses, _, state2 = preference_loss(
        config, torch.tensor(PI_W) + 1, torch.tensor(PI_L) + 1, torch.tensor(REF_W),
        torch.tensor(REF_L), torch.tensor(NUM_W), torch.tensor(NUM_L), state)
    assert losses.tolist() == pytest.approx(expected(1, 0.625), rel=1e-6)
    assert state2.num_updates == 2 and state2.reward_mean.item() == pytest.approx(0.625)
    # The state round-trips through a checkpoint, and the caller's old state is untouched.
    restored = LossState.from_state_dict(state2.state_dict())
    assert restored.num_updates == 2 and restored.reward_mean.item() == pytest.approx(0.625)
    assert state.num_updates == 1


def test_state_passes_through_losses_without_statistics():
    state = LossState(torch.tensor(3.0), 7)
    _, _, returned, _ = run(LossConfig(), state=state)
    assert returned is state
    # Nothing to share between ranks either: no collective (there is no process group here).
    assert not LossConfig(type=("bco_pair",)).carries_state
    assert state.synchronized(LossConfig(type=("bco_pair",))) is state
    assert state.to(torch.device("cpu")) is state


def _synchronize_on_rank(rank: int, store_path: str, results) -> None:
    """Rank 0 has done 3 updates with mean 1.0, rank 1 one update with mean 5.0."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank,
                            world_size=2)
    try:
        state = LossState(torch.tensor([1.0, 5.0][rank]), [3, 1][rank])
        synced = state.synchronized(LossConfig(type=("bco_pair",), bco_running_mean=True))
        results.put((rank, synced.reward_mean.item(), synced.num_updates))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_running_mean_is_shared_by_the_ranks(tmp_path):
    """After a step every rank holds the update-weighted mean of the ranks' means,
    (3 x 1.0 + 1 x 5.0) / 4 = 2.0, and the largest update count, 3."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_synchronize_on_rank,
                                 args=(rank, str(tmp_path / "store"), results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    got = sorted(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert got == [(0, pytest.approx(2.0), 3), (1, pytest.approx(2.0), 3)]


def test_apo_zero():
    """APO-zero: 1 - sigmoid(beta a) + sigmoid(beta b). beta = 0.5."""
    beta = 0.5
    assert_losses(LossConfig(type=("apo_zero",), beta=beta),
                  [1 - sigmoid(beta * a) + sigmoid(beta * b) for a, b in zip(A, B)])


def test_apo_down():
    """APO-down: sigmoid(beta a) + 1 - sigmoid(beta (a - b)). beta = 0.5."""
    beta = 0.5
    assert_losses(LossConfig(type=("apo_down",), beta=beta),
                  [sigmoid(beta * a) + 1 - sigmoid(beta * (a - b)) for a, b in zip(A, B)])


def test_aot_sorts_margins_across_the_batch():
    """AOT: delta = sort(policy margins) - sort(reference margins) = sort([2, -1]) - sort([0, 2])
    = [-1, 2] - [0, 2] = [-1, 0], then the (smoothed) sigmoid loss on beta delta. Entries are
    per sorted rank, so only the sum is compared with the unsorted DPO's meaning."""
    beta, eps = 0.5, 0.1
    expected = [-(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d)
                for d in (-1.0, 0.0)]
    assert_losses(LossConfig(type=("aot",), beta=beta, label_smoothing=eps), expected)


def test_aot_unpaired():
    """AOT (unpaired): delta = sort(a) - sort(b) = [0, 1] - [-1, 3] = [1, -2]."""
    beta = 0.5
    assert_losses(LossConfig(type=("aot_unpaired",), beta=beta),
                  [-log_sigmoid(beta * d) for d in (1.0, -2.0)])


def test_aot_pair_is_a_deprecated_name_of_aot_unpaired(caplog):
    """The old name still works, as TRL's `aot_unpaired`, with a one-line warning."""
    with caplog.at_level("WARNING", logger="prefixdpo.train.losses"):
        config = LossConfig(type=("sigmoid", "aot_pair"), beta=0.5)
    assert config.type == ("sigmoid", "aot_unpaired")
    [record] = caplog.records
    message = record.getMessage()
    assert "\n" not in message and "deprecated" in message and "'aot_unpaired'" in message


def test_sigmoid_norm_uses_length_normalized_log_ratios():
    """sigmoid_norm (TRL 1.16): -log sigmoid(beta (a / |y_w| - b / |y_l|)). Pair 0:
    1/4 + 1/5 = 0.45; pair 1: 0/2 - 3/3 = -1. beta = 0.5."""
    assert_losses(LossConfig(type=("sigmoid_norm",), beta=0.5),
                  [-log_sigmoid(0.5 * 0.45), -log_sigmoid(0.5 * -1.0)])


@pytest.mark.parametrize("kind,f", [
    ("reverse_kl", lambda x: x),
    ("forward_kl", lambda x: 1 - math.exp(-x)),
    ("js_divergence", lambda x: math.log(2) + log_sigmoid(x)),
    ("alpha_divergence", lambda x: (math.exp(-0.5 * x) - 1) / -0.5),
])
def test_f_divergence_scores_replace_the_log_ratios(kind, f):
    """f-DPO: the scores f'(exp(a)), f'(exp(b)) replace a, b in sigmoid: -log sigmoid(beta
    (f(a) - f(b))); alpha_divergence with alpha 0.5: (t^-0.5 - 1) / -0.5. beta = 0.5."""
    beta = 0.5
    assert_losses(LossConfig(beta=beta, f_divergence_type=kind),
                  [-log_sigmoid(beta * (f(a) - f(b))) for a, b in zip(A, B)])


def test_alpha_divergence_at_alpha_one_is_reverse_kl():
    losses, *_ = run(LossConfig(f_divergence_type="alpha_divergence",
                                f_alpha_divergence_coef=1.0))
    assert losses.tolist() == pytest.approx([-log_sigmoid(0.1 * z) for z in Z], rel=1e-6)


def test_use_weighting_multiplies_each_type_by_the_pair_weight():
    """WPO: every loss type's per-pair term times the pair's weight; the rpo NLL is not
    weighted. Weights [0.5, 2]; 1.0 sigmoid + 0.5 hinge, rpo 0.1, beta 0.25."""
    beta, weights = 0.25, [0.5, 2.0]
    config = LossConfig(type=("sigmoid", "hinge"), weights=(1.0, 0.5), beta=beta,
                        rpo_alpha=0.1, use_weighting=True)
    losses, *_ = preference_loss(config, torch.tensor(PI_W), torch.tensor(PI_L),
                                 torch.tensor(REF_W), torch.tensor(REF_L), torch.tensor(NUM_W),
                                 torch.tensor(NUM_L), pair_weights=torch.tensor(weights))
    expected = [w * (-log_sigmoid(beta * z) + 0.5 * max(0.0, 1 - beta * z)) + 0.1 * -pw / n
                for w, z, pw, n in zip(weights, Z, PI_W, NUM_W)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="needs pair_weights"):
        run(config)


def test_wpo_pair_weights():
    """w(y) = exp(mean token (log p - log sum p^2)); the pair's weight is w(y_w) w(y_l)."""
    from prefixdpo.train.losses import wpo_pair_weights

    weights = wpo_pair_weights(torch.tensor([-2.0, 0.0]), torch.tensor([-3.0, 1.0]),
                               torch.tensor([4, 2]), torch.tensor([3, 0]))
    assert weights.tolist() == pytest.approx([math.exp(-0.5 - 1.0), math.exp(0.0 + 1.0)])


def test_nll_uses_the_plain_chosen_log_probs_when_given():
    """With LD-DPO the losses see LD-weighted sums, the NLL (sft, rpo) the plain ones."""
    plain = torch.tensor([-20.0, -8.0])
    losses, metrics, _ = preference_loss(
        LossConfig(type=("sft",)), torch.tensor(PI_W), torch.tensor(PI_L), None, None,
        torch.tensor(NUM_W), torch.tensor(NUM_L), policy_chosen_nll=plain)
    assert losses.tolist() == [5.0, 4.0] and metrics["nll_loss"].tolist() == [5.0, 4.0]
    assert metrics["logps/chosen"].tolist() == PI_W


def test_discopop():
    """DiscoPOP: x = beta z, m = sigmoid(x / tau): -log sigmoid(x) (1 - m) + exp(-x) m.
    beta = 0.5, tau = 0.5 (so both terms matter)."""
    beta, tau = 0.5, 0.5
    expected = []
    for z in Z:
        x = beta * z
        m = sigmoid(x / tau)
        expected.append(-log_sigmoid(x) * (1 - m) + math.exp(-x) * m)
    assert_losses(LossConfig(type=("discopop",), beta=beta, discopop_tau=tau), expected)


def test_discopop_stays_finite_for_very_negative_margins():
    """x = -100 / tau = 0.05: exp(-x) overflows float32 but exp(-x) sigmoid(x / tau) ~
    exp(100 - 2000) = 0, so the loss is -log sigmoid(-100) = 100 (to float32)."""
    losses, *_ = preference_loss(LossConfig(type=("discopop",), beta=1.0),
                                 torch.tensor([-100.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                                 torch.tensor([0.0]), torch.tensor([1]), torch.tensor([1]))
    assert losses.item() == pytest.approx(100.0, rel=1e-6)


def test_simpo_is_reference_free_and_length_normalized():
    """SimPO: -log sigmoid(beta (pi(y_w)/|y_w| - pi(y_l)/|y_l|) - gamma). Pair 0: -10/4 + 12/5
    = -0.1; pair 1: -7/2 + 6/3 = -1.5. beta = 2, gamma = 0.5: x = [-0.7, -3.5]."""
    config = LossConfig(type=("simpo",), beta=2.0, simpo_gamma=0.5)
    assert not config.needs_reference
    assert_losses(config, [-log_sigmoid(-0.7), -log_sigmoid(-3.5)], with_reference=False)
    # References, if given, change nothing.
    assert_losses(config, [-log_sigmoid(-0.7), -log_sigmoid(-3.5)], with_reference=True)


def test_sft_is_chosen_nll_per_token():
    """sft: the chosen completion's mean token NLL, -pi(y_w) / |y_w| = [10/4, 7/2]."""
    config = LossConfig(type=("sft",))
    assert not config.needs_reference
    assert_losses(config, [2.5, 3.5], with_reference=False)
    # With a reference the rewards are TRL's beta (pi - ref), without SimPO's.
    _, metrics, _, _ = run(config, with_reference=True)
    assert metrics["rewards/chosen"].tolist() == pytest.approx([0.1 * a for a in A])
    _, metrics, _, _ = run(config, with_reference=False)
    assert metrics["rewards/chosen"].tolist() == pytest.approx(
        [0.1 * pw / n for pw, n in zip(PI_W, NUM_W)])


def test_rpo_alpha_adds_chosen_nll():
    """RPO: sigmoid DPO + alpha (-pi(y_w) / |y_w|). alpha = 0.5, beta = 0.1."""
    alpha, beta = 0.5, 0.1
    assert_losses(LossConfig(beta=beta, rpo_alpha=alpha),
                  [-log_sigmoid(beta * z) + alpha * (-pw / n) for z, pw, n in
                   zip(Z, PI_W, NUM_W)])


def test_combined_losses_are_the_weighted_sum():
    """Weighted sum: 0.7 sigmoid + 0.3 sft + 2.0 hinge (+ rpo 0.1 NLL), beta = 0.25."""
    beta = 0.25
    config = LossConfig(type=("sigmoid", "sft", "hinge"), weights=(0.7, 0.3, 2.0), beta=beta,
                        rpo_alpha=0.1)
    expected = [0.7 * -log_sigmoid(beta * z) + 0.3 * (-pw / n) + 2.0 * max(0.0, 1 - beta * z)
                + 0.1 * (-pw / n) for z, pw, n in zip(Z, PI_W, NUM_W)]
    assert_losses(config, expected)
    # Empty weights mean 1.0 each.
    assert_losses(LossConfig(type=("sigmoid", "hinge"), beta=beta),
                  [-log_sigmoid(beta * z) + max(0.0, 1 - beta * z) for z in Z])


def test_sigmoid_gradient():
    """d/d pi(y_w) of -log sigmoid(beta z) = -beta sigmoid(-beta z), and the negative of it for
    pi(y_l). beta = 0.5."""
    beta = 0.5
    losses, _, _, (pi_w, pi_l) = run(LossConfig(beta=beta), policy_grad=True)
    grad_w, grad_l = torch.autograd.grad(losses.sum(), (pi_w, pi_l))
    expected = [-beta * sigmoid(-beta * z) for z in Z]
    assert grad_w.tolist() == pytest.approx(expected, rel=1e-6)
    assert grad_l.tolist() == pytest.approx([-g for g in expected], rel=1e-6)


def test_metrics_use_trl_names_and_values():
    """rewards = beta a and beta b per pair (beta = 0.5: [0.5, 0] and [-0.5, 1.5]), margins
    their difference, accuracies chosen > rejected, logps the summed policy log-probs."""
    _, metrics, _, _ = run(LossConfig(beta=0.5))
    assert metrics["rewards/chosen"].tolist() == [0.5, 0.0]
    assert metrics["rewards/rejected"].tolist() == [-0.5, 1.5]
    assert metrics["rewards/margins"].tolist() == [1.0, -1.5]
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert metrics["logps/chosen"].tolist() == PI_W
    assert metrics["logps/rejected"].tolist() == PI_L
    assert metrics["nll_loss"].tolist() == [2.5, 3.5]
    assert all(not m.requires_grad and m.shape == (2,) for m in metrics.values())


def test_reference_free_metrics_are_simpo_rewards():
    """Without a reference, rewards are beta * mean token log-prob (CPO/SimPO): beta = 2:
    chosen [2 (-10/4), 2 (-7/2)] = [-5, -7], rejected [2 (-12/5), 2 (-6/3)] = [-4.8, -4]."""
    _, metrics, _, _ = run(LossConfig(type=("simpo",), beta=2.0), with_reference=False)
    assert metrics["rewards/chosen"].tolist() == pytest.approx([-5.0, -7.0])
    assert metrics["rewards/rejected"].tolist() == pytest.approx([-4.8, -4.0])
    assert metrics["rewards/accuracies"].tolist() == [0.0, 0.0]


def test_losses_are_unreduced_so_splits_sum_to_the_whole():
    """Per-pair losses of two one-pair micro-batches equal the two-pair batch's (for the
    losses without batch statistics)."""
    config = LossConfig(type=("sigmoid", "ipo"), rpo_alpha=0.5)
    whole, *_ = run(config)
    parts = [preference_loss(config, torch.tensor(PI_W[i:i + 1]), torch.tensor(PI_L[i:i + 1]),
                             torch.tensor(REF_W[i:i + 1]), torch.tensor(REF_L[i:i + 1]),
                             torch.tensor(NUM_W[i:i + 1]), torch.tensor(NUM_L[i:i + 1]))[0]
             for i in range(2)]
    assert torch.cat(parts).tolist() == pytest.approx(whole.tolist(), rel=1e-6)


def test_every_type_runs_and_needs_reference_is_right():
    for name in LOSS_TYPES:
        config = LossConfig(type=(name,))
        assert config.needs_reference == (name not in ("simpo", "sft"))
        losses, *_ = run(config, with_reference=config.needs_reference)
        assert torch.isfinite(losses).all()
    assert LossConfig(type=("simpo", "sigmoid")).needs_reference


@pytest.mark.parametrize("name", LOSS_TYPES)
def test_an_empty_micro_batch_gives_no_loss_and_keeps_the_state(name):
    """The loader completes an epoch's last step with empty micro-batches: every loss type must
    give an empty, finite result there, and bco_pair's running mean must not move (a mean of
    nothing would be NaN and poison every later step)."""
    config = LossConfig(type=(name,))
    empty = torch.zeros(0)
    ref = empty if config.needs_reference else None
    state = LossState(torch.tensor(0.25), 3)
    losses, metrics, new_state = preference_loss(
        config, empty.clone().requires_grad_(), empty, ref, ref, torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long), state)
    assert losses.shape == (0,) and losses.sum().item() == 0.0
    assert all(v.shape == (0,) for v in metrics.values())
    assert new_state.state_dict() == state.state_dict()


def test_missing_reference_is_an_error():
    with pytest.raises(ValueError, match="needs reference log-probs"):
        run(LossConfig(type=("sft", "sigmoid")), with_reference=False)


@pytest.mark.parametrize("kwargs,message", [
    (dict(type=("dpo",)), "loss.type has unknown loss 'dpo'"),
    (dict(type=()), "loss.type is empty"),
    (dict(type=("sigmoid", "sigmoid")), "lists a loss twice"),
    (dict(type=("sigmoid", "ipo"), weights=(1.0,)), "loss.weights has 1 entries for 2"),
    (dict(weights=(-1.0,)), "loss.weights"),
    (dict(beta=0.0), "loss.beta = 0.0"),
    (dict(beta=float("nan")), "loss.beta"),
    (dict(label_smoothing=0.5), "loss.label_smoothing = 0.5"),
    (dict(label_smoothing=-0.1), "loss.label_smoothing"),
    (dict(discopop_tau=0.0), "loss.discopop_tau"),
    (dict(rpo_alpha=-1.0), "loss.rpo_alpha"),
    (dict(simpo_gamma=float("inf")), "loss.simpo_gamma"),
    (dict(beta="0.1"), "loss.beta"),
    (dict(ld_alpha=1.5), "loss.ld_alpha = 1.5; expected a finite number >= 0.0 and <= 1.0"),
    (dict(ld_alpha=-0.1), "loss.ld_alpha"),
    (dict(f_divergence_type="kl"), "loss.f_divergence_type = 'kl'; expected one of"),
    (dict(type=("sigmoid", "nca_pair"), f_divergence_type="forward_kl"),
     "has no meaning for loss.type \\['nca_pair'\\]"),
    (dict(type=("simpo",), f_divergence_type="js_divergence"), "loss.type \\['simpo'\\]"),
    (dict(type=("aot",), use_weighting=True), "cannot weigh \\['aot'\\]"),
    (dict(type=("aot_pair",), use_weighting=True), "cannot weigh \\['aot_unpaired'\\]"),
    (dict(f_alpha_divergence_coef=float("inf")), "loss.f_alpha_divergence_coef"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


def test_config_accepts_toml_lists_and_a_single_string():
    config = LossConfig(type=["sigmoid", "sft"], weights=[1.0, 0.5])
    assert config.type == ("sigmoid", "sft") and config.weights == (1.0, 0.5)
    assert LossConfig(type="ipo").type == ("ipo",)


@pytest.mark.parametrize("field,value,message", [
    ("policy_chosen", float("nan"), "non-finite policy_chosen at pair 1"),
    ("ref_rejected", float("-inf"), "non-finite ref_rejected at pair 1"),
])
def test_non_finite_inputs_are_reported(field, value, message):
    tensors = dict(policy_chosen=torch.tensor(PI_W), policy_rejected=torch.tensor(PI_L),
                   ref_chosen=torch.tensor(REF_W), ref_rejected=torch.tensor(REF_L))
    tensors[field][1] = value
    with pytest.raises(ValueError, match=message):
        preference_loss(LossConfig(), *tensors.values(), torch.tensor(NUM_W),
                        torch.tensor(NUM_L))


def test_zero_length_completion_is_reported_by_length_normalized_losses():
    """SimPO divides by the length as is; IPO and sigmoid_norm clamp it at 1, as TRL does."""
    with pytest.raises(ValueError, match="non-finite loss at pair 0.*zero tokens"):
        preference_loss(LossConfig(type=("simpo",)), torch.tensor([-1.0]),
                        torch.tensor([-1.0]), None, None, torch.tensor([0]), torch.tensor([1]))
    losses, *_ = preference_loss(LossConfig(type=("ipo",)), torch.tensor([0.0]),
                                 torch.tensor([-1.0]), torch.tensor([0.0]),
                                 torch.tensor([-1.0]), torch.tensor([0]), torch.tensor([1]))
    assert losses.tolist() == pytest.approx([(0.0 - 0.0 - 5.0) ** 2])


def test_check_finite_helper_for_the_trainer():
    check_finite_pairs(torch.zeros(2), {"policy_chosen": torch.zeros(2)})
    with pytest.raises(ValueError, match="non-finite loss at pair 1"):
        check_finite_pairs(torch.tensor([0.0, float("nan")]), {"x": torch.zeros(2)})


@pytest.mark.parametrize("change,message", [
    (dict(policy_rejected=torch.zeros(3)), "policy_rejected has shape \\(3,\\)"),
    (dict(policy_chosen=torch.zeros(2, 1)), "expected per-pair tensors"),
    (dict(chosen_num_tokens=torch.tensor([4.0, 2.0])), "integer tensor of token counts"),
    (dict(ref_chosen=None), "both ref_chosen and ref_rejected"),
    (dict(policy_chosen=torch.tensor([1, 2])), "floating point log-probs"),
])
def test_bad_pair_inputs(change, message):
    args = dict(policy_chosen=torch.tensor(PI_W), policy_rejected=torch.tensor(PI_L),
                ref_chosen=torch.tensor(REF_W), ref_rejected=torch.tensor(REF_L),
                chosen_num_tokens=torch.tensor(NUM_W), rejected_num_tokens=torch.tensor(NUM_L))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        preference_loss(LossConfig(), **args)


def test_published_sigmoid_implementations_agree_with_ours():
    """benchmarks/dpo_loss.py's from-the-math versions of the original DPO code, TRL and
    NeMo-Aligner, and ours, each in float32 against a float64 oracle on small logits: loss and
    logit gradients within 1e-4 relative."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "dpo_loss.py"
    spec = importlib.util.spec_from_file_location("dpo_loss_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    errors = module.check_part1_agreement("cpu", shape=(2, 32, 50))
    assert set(errors) == {"rafailov", "trl", "nemo", "ours"}
    assert max(errors.values()) < 1e-4, errors
