"""Losses against hand calculations, plus the gradient details that matter."""

import math

import pytest
import torch

from lensrl.algorithms.losses import (
    AGG_MODES,
    agg_loss,
    entropy_loss,
    kl_penalty,
    policy_loss,
    rollout_train_gap,
    truncated_is_weights,
)

CLIP = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}  # range [0.8, 1.28]

# ----------------------------------------------------------------------------------------------
# agg_loss
# ----------------------------------------------------------------------------------------------

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # lengths 2, 1, 0 (an empty sequence)


@pytest.mark.parametrize(
    ("mode", "kwargs", "expected"),
    [
        ("token-mean", {}, 7 / 3),  # (1 + 2 + 4) / 3 tokens
        ("seq-mean-token-mean", {}, 2.75),  # ((1 + 2) / 2 + 4 / 1) / 2 non-empty seqs
        ("seq-mean-token-sum", {}, 3.5),  # ((1 + 2) + 4) / 2
        ("seq-mean-token-sum-norm", {}, 7 / 6),  # (3 + 4) / horizon T=3 / 2
        ("seq-mean-token-sum-norm", {"horizon": 4}, 0.875),  # 7 / 4 / 2
        ("token-mean", {"num_tokens": 14}, 0.5),  # 7 / 14
        ("seq-mean-token-mean", {"num_seqs": 11}, 0.5),  # 5.5 / 11
        ("seq-mean-token-sum", {"num_seqs": 14}, 0.5),  # 7 / 14
        ("seq-mean-token-sum-norm", {"num_seqs": 7, "horizon": 2}, 0.5),  # 7 / 2 / 7
    ],
)
def test_agg_loss_hand_values(mode, kwargs, expected):
    loss = agg_loss(LOSS, MASK, mode, **kwargs)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected)


def test_agg_loss_unknown_mode():
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        agg_loss(LOSS, MASK, "mean")


def test_agg_loss_empty_mask_is_zero_not_nan():
    for mode in AGG_MODES:
        assert agg_loss(LOSS, torch.zeros(3, 3), mode).item() == 0.0


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_with_global_counts_add_up_to_the_whole(mode):
    """Cut a mini-batch into micro-batches (each padded only to its own longest response), aggregate
    each with the mini-batch's counts, and the sum equals the mini-batch loss in one piece."""
    torch.manual_seed(0)
    lengths = torch.tensor([5, 2, 0, 3, 1, 4])  # one sequence with no valid token
    horizon = 5
    mask = (torch.arange(horizon) < lengths.unsqueeze(-1)).float()  # (6, 5)
    loss_mat = torch.randn(6, horizon, requires_grad=True)

    whole = agg_loss(loss_mat, mask, mode, horizon=horizon)
    num_tokens = mask.sum()  # 15
    num_seqs = (lengths > 0).sum()  # 5

    total = 0.0
    for rows in ([0, 1], [2], [3, 4, 5]):
        width = int(lengths[rows].max().clamp(min=1))  # micro-batch's own padding
        total = total + agg_loss(
            loss_mat[rows, :width],
            mask[rows, :width],
            mode,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            horizon=horizon,
        )
    torch.testing.assert_close(total, whole)

    grad_whole = torch.autograd.grad(whole, loss_mat)[0]
    grad_split = torch.autograd.grad(total, loss_mat)[0]
    torch.testing.assert_close(grad_split, grad_whole)


def test_entropy_loss_is_aggregated_entropy():
    entropy = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert entropy_loss(entropy, mask, "token-mean").item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert entropy_loss(entropy, mask, "seq-mean-token-mean").item() == pytest.approx(2.25)  # (1.5 + 3) / 2


# ----------------------------------------------------------------------------------------------
# policy_loss: PPO clip, dual clip, truncated IS
# ----------------------------------------------------------------------------------------------

# One sequence, four valid tokens and one padding token. Ratios and advantages:
#   t0: r = 1.1, A = +1  inside [0.8, 1.28]                 loss = -1.1              grad -1.1 / 4
#   t1: r = 1.5, A = +1  loss1 -1.5 < loss2 -1.28 -> clip   loss = -1.28             grad 0
#   t2: r = 0.5, A = -1  loss1 0.5 < loss2 0.8   -> clip    loss = min(0.8, 3) = 0.8 grad 0
#   t3: r = 4.0, A = -1  loss1 4 > loss2 1.28, no clip;     dual clip: min(4, 3) = 3 grad 0
RATIOS = [1.1, 1.5, 0.5, 4.0, 1.0]
ADVANTAGES = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.0]])
RESPONSE_MASK = torch.tensor([[1, 1, 1, 1, 0]])
OLD = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])


def new_log_prob(ratios=RATIOS, old=OLD):
    return (old + torch.tensor([[math.log(r) for r in ratios]])).requires_grad_()


def test_ppo_clip_hand_values_and_metrics():
    log_prob = new_log_prob()
    loss, metrics = policy_loss(log_prob, OLD, ADVANTAGES, RESPONSE_MASK, **CLIP, loss_agg_mode="token-mean")
    # (-1.1 - 1.28 + 0.8 + 3) / 4 = 1.42 / 4
    assert loss.item() == pytest.approx(0.355, abs=1e-6)
    assert metrics["pg_loss"].item() == pytest.approx(0.355, abs=1e-6)
    assert metrics["pg_clipfrac"].item() == pytest.approx(0.5)  # t1, t2
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(0.25)  # t3
    # mean of old - new = -(ln 1.1 + ln 1.5 + ln 0.5 + ln 4) / 4 = -ln(3.3) / 4
    assert metrics["ppo_kl"].item() == pytest.approx(-0.2984806, abs=1e-6)
    assert not any(v.requires_grad for v in metrics.values())


def test_ppo_gradient_is_zero_in_clipped_and_dual_clipped_regions():
    log_prob = new_log_prob()
    loss, _ = policy_loss(log_prob, OLD, ADVANTAGES, RESPONSE_MASK, **CLIP, loss_agg_mode="token-mean")
    loss.backward()
    # d/dlogp (-A * r) / 4 = -A * r / 4 on the unclipped token only
    expected = torch.tensor([[-1.1 / 4, 0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(log_prob.grad, expected)


def test_ppo_global_token_count():
    loss, _ = policy_loss(
        new_log_prob(), OLD, ADVANTAGES, RESPONSE_MASK, **CLIP, loss_agg_mode="token-mean", num_tokens=8
    )
    assert loss.item() == pytest.approx(1.42 / 8, abs=1e-6)


def test_dual_clip_needs_c_above_one():
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(
            new_log_prob(), OLD, ADVANTAGES, RESPONSE_MASK, 0.2, 0.28, 1.0, loss_agg_mode="token-mean"
        )


def test_is_weights_scale_the_loss_and_carry_no_gradient():
    weights = torch.tensor([[2.0, 0.5, 1.0, 1.0, 0.0]], requires_grad=True)
    log_prob = new_log_prob()
    loss, _ = policy_loss(
        log_prob, OLD, ADVANTAGES, RESPONSE_MASK, **CLIP, loss_agg_mode="token-mean", is_weights=weights
    )
    # (2 * -1.1 + 0.5 * -1.28 + 0.8 + 3) / 4 = (-2.2 - 0.64 + 3.8) / 4 = 0.24
    assert loss.item() == pytest.approx(0.24, abs=1e-6)
    loss.backward()
    assert weights.grad is None
    torch.testing.assert_close(log_prob.grad, torch.tensor([[2 * -1.1 / 4, 0.0, 0.0, 0.0, 0.0]]))


def test_is_weights_equal_scaling_the_advantage():
    torch.manual_seed(0)
    log_prob = torch.randn(4, 6) * 0.3
    old = torch.randn(4, 6) * 0.3
    advantages = torch.randn(4, 1).expand(4, 6)
    mask = (torch.rand(4, 6) > 0.2).float()
    weights = torch.rand(4, 6) * 2
    with_weights, _ = policy_loss(
        log_prob, old, advantages, mask, **CLIP, loss_agg_mode="token-mean", is_weights=weights
    )
    scaled, _ = policy_loss(log_prob, old, advantages * weights, mask, **CLIP, loss_agg_mode="token-mean")
    torch.testing.assert_close(with_weights, scaled)


# ----------------------------------------------------------------------------------------------
# GSPO (level="sequence")
# ----------------------------------------------------------------------------------------------


def test_gspo_value_and_per_token_gradient():
    # seq 0: log-ratios 0.1, 0.3 (+ padding) -> mean 0.2, s0 = e^0.2 = 1.221403, A = +1, unclipped
    # seq 1: log-ratios -0.1, 0.1, 0.3      -> mean 0.1, s1 = e^0.1 = 1.105171, A = -1, unclipped
    old = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -1.5, -2.5]])
    log_prob = (old + torch.tensor([[0.1, 0.3, 5.0], [-0.1, 0.1, 0.3]])).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([[1.0], [-1.0]]).expand(2, 3) * mask
    loss, metrics = policy_loss(
        log_prob, old, advantages, mask, **CLIP, loss_agg_mode="seq-mean-token-mean", level="sequence"
    )
    # seq-mean-token-mean: (-1.221403 + 1.105171) / 2 = -0.058116
    assert loss.item() == pytest.approx(-0.0581159, abs=1e-6)
    assert metrics["pg_clipfrac"].item() == 0.0
    loss.backward()
    # d/dlogp_{i,t} = (1/2 seqs) * (1/L_i) * (-A_i * s_i):
    #   seq 0: -1.221403 / 4 = -0.305351 on its 2 tokens;   seq 1: 1.105171 / 6 = 0.184195 on 3 tokens
    expected = torch.tensor([[-0.305351, -0.305351, 0.0], [0.184195, 0.184195, 0.184195]])
    torch.testing.assert_close(log_prob.grad, expected, atol=1e-6, rtol=0)

    # the same gradient as the sequence objective -mean_i A_i * exp(mean_t(logp - old)) written directly
    direct_log_prob = log_prob.detach().clone().requires_grad_()
    seq_ratio = torch.exp(((direct_log_prob - old) * mask).sum(-1) / mask.sum(-1))
    (-(torch.tensor([1.0, -1.0]) * seq_ratio).mean()).backward()
    torch.testing.assert_close(log_prob.grad, direct_log_prob.grad)


def test_gspo_clips_whole_sequences():
    # seq 0: mean log-ratio 0.5 -> s = 1.648721 > 1.28 with A = +1: loss -1.28 on both tokens, no grad
    # seq 1: mean 0.0 -> s = 1, A = +1: loss -1 on its one token
    old = torch.zeros(2, 2)
    log_prob = torch.tensor([[0.2, 0.8], [0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = torch.ones(2, 2)
    loss, metrics = policy_loss(
        log_prob, old, advantages, mask, **CLIP, loss_agg_mode="token-mean", level="sequence"
    )
    assert loss.item() == pytest.approx((-1.28 * 2 - 1.0) / 3, abs=1e-6)
    assert metrics["pg_clipfrac"].item() == pytest.approx(2 / 3)  # 2 of the 3 valid tokens
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([[0.0, 0.0], [-1 / 3, 0.0]]))


def test_gspo_equals_ppo_on_one_token_sequences():
    torch.manual_seed(0)
    log_prob, old, advantages = torch.randn(5, 1), torch.randn(5, 1), torch.randn(5, 1)
    mask = torch.ones(5, 1)
    token, _ = policy_loss(log_prob, old, advantages, mask, **CLIP, loss_agg_mode="token-mean")
    sequence, _ = policy_loss(
        log_prob, old, advantages, mask, **CLIP, loss_agg_mode="token-mean", level="sequence"
    )
    torch.testing.assert_close(token, sequence)


# ----------------------------------------------------------------------------------------------
# KL penalty, truncated importance sampling, rollout/train gap
# ----------------------------------------------------------------------------------------------


def test_kl_penalty_hand_values():
    logprob = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])  # d = logprob - ref = [0.5, -1.0]
    torch.testing.assert_close(kl_penalty(logprob, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(kl_penalty(logprob, ref, "abs"), torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(kl_penalty(logprob, ref, "k2"), torch.tensor([[0.125, 0.5]]))  # d^2 / 2
    # exp(-d) + d - 1:  e^-0.5 + 0.5 - 1 = 0.106531;  e^1 - 1 - 1 = 0.718282
    k3 = torch.tensor([[0.106531, 0.718282]])
    torch.testing.assert_close(kl_penalty(logprob, ref, "k3"), k3, atol=1e-6, rtol=0)
    torch.testing.assert_close(kl_penalty(logprob, ref, "low_var_kl"), k3, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown KL kind"):
        kl_penalty(logprob, ref, "k4")


def test_low_var_kl_is_clamped_and_finite():
    # d = -100: exp(100) would overflow float32; the log-ratio clamps at 20 and the result at 10
    kl = kl_penalty(torch.tensor([-101.0, -1.0]), torch.tensor([-1.0, -101.0]), "low_var_kl")
    # second: d = +100 -> exp(-20) + 20 - 1 = 19.000000002 -> clamped to 10
    assert kl.tolist() == [10.0, 10.0]


def test_truncated_is_weights_token_level():
    # old - rollout = ln 0.5, ln 1.5, ln 3, (padding with -inf rollout log-prob)
    rollout = torch.tensor([[-1.0, -1.0, -1.0, float("-inf")]], dtype=torch.float64)
    old = rollout + torch.tensor([[math.log(0.5), math.log(1.5), math.log(3.0), 0.0]], dtype=torch.float64)
    old.requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0]])
    weights, metrics = truncated_is_weights(old, rollout, mask, clip=2.0)
    # min(0.5, 2), min(1.5, 2), min(3, 2), padding 0
    torch.testing.assert_close(weights, torch.tensor([[0.5, 1.5, 2.0, 0.0]]))
    assert weights.dtype == torch.float32 and not weights.requires_grad
    assert metrics["is_weight_mean"].item() == pytest.approx(4 / 3)  # (0.5 + 1.5 + 2) / 3
    assert metrics["is_clip_frac"].item() == pytest.approx(1 / 3)


def test_truncated_is_weights_sequence_level():
    old = torch.tensor([[math.log(0.5), math.log(1.5)], [math.log(3.0), 0.0], [500.0, 500.0]])
    rollout = torch.zeros(3, 2)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
    weights, metrics = truncated_is_weights(old, rollout, mask, clip=2.0, level="sequence")
    # seq 0: exp(ln 0.5 + ln 1.5) = 0.75;  seq 1: exp(ln 3 + 0) = 3 -> 2;  seq 2: exp(500) -> 2, no inf
    torch.testing.assert_close(weights, torch.tensor([[0.75, 0.75], [2.0, 2.0], [2.0, 0.0]]))
    assert metrics["is_weight_mean"].item() == pytest.approx((0.75 + 2 + 2) / 3)  # over sequences
    assert metrics["is_clip_frac"].item() == pytest.approx(2 / 3)


def test_rollout_train_gap():
    train = torch.tensor([[-1.0, -2.0, 0.0]])
    rollout = torch.tensor([[-1.5, -1.0, float("-inf")]])  # train - rollout = 0.5, -1.0, padding
    mask = torch.tensor([[1, 1, 0]])
    gap = rollout_train_gap(train, rollout, mask)
    # k3 per token: exp(t - r) - (t - r) - 1:  e^0.5 - 1.5 = 0.148721;  e^-1 + 1 - 1 = 0.367879
    assert gap["rollout/train_kl"].item() == pytest.approx((0.148721 + 0.367879) / 2, abs=1e-6)
    assert gap["rollout/train_logprob_absdiff"].item() == pytest.approx(0.75)  # (0.5 + 1) / 2

    same = rollout_train_gap(train, train, mask)
    assert same["rollout/train_kl"].item() == 0.0
    assert same["rollout/train_logprob_absdiff"].item() == 0.0


def test_rollout_train_kl_is_never_negative_when_the_two_nearly_agree():
    """k3 = exp(d) - d - 1 >= 0, but in fp32 at |d| ~ 1e-4 it rounds below zero; the metric showed
    -1e-9 (a negative KL) on a GPU run whose rollout and trainer agreed to 1e-5."""
    generator = torch.Generator().manual_seed(0)
    train = -torch.rand(64, 32, generator=generator) * 5
    rollout = train + torch.randn(64, 32, generator=generator) * 1e-4
    raw = kl_penalty(rollout.float(), train.float(), "k3")
    assert (raw < 0).any()  # what the metric used to average
    assert rollout_train_gap(train, rollout, torch.ones(64, 32))["rollout/train_kl"] >= 0
