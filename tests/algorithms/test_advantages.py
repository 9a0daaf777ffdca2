"""Advantage estimators against hand calculations on tiny batches."""

import pytest
import torch

from lensrl.algorithms.advantages import (
    compute_advantages,
    drop_zero_variance_groups,
    group_stats,
    zero_variance_groups,
)

# Two groups of four: group 0 = [1, 0, 0, 0], group 1 = [1, 1, 0, 0].
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
# Responses of different lengths (T = 3); padding must come out as 0.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])


def per_sequence(values):
    """Expected (B, T): each sequence's value on its valid tokens, 0 on padding."""
    return torch.tensor(values).unsqueeze(-1) * MASK


def test_grpo_hand_values():
    # group 0: mean 0.25; deviations 0.75, -0.25 x3; sum of squares 0.5625 + 3 * 0.0625 = 0.75;
    #          unbiased var 0.75 / 3 = 0.25, std 0.5 -> 0.75 / 0.5 = 1.5, -0.25 / 0.5 = -0.5
    # group 1: mean 0.5; deviations +-0.5; sum of squares 1.0; var 1/3, std 0.577350
    #          -> +-0.5 / 0.577350 = +-0.866025
    advantages = compute_advantages(REWARDS, 4, MASK, "grpo")
    expected = per_sequence([1.5, -0.5, -0.5, -0.5, 0.866025, 0.866025, -0.866025, -0.866025])
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=0)
    assert advantages.shape == (8, 3) and advantages.dtype == torch.float32


def test_dr_grpo_skips_std():
    # r - mean: group 0 mean 0.25, group 1 mean 0.5
    advantages = compute_advantages(REWARDS, 4, MASK, "grpo", norm_adv_by_std=False)
    expected = per_sequence([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    torch.testing.assert_close(advantages, expected)


def test_rloo_leave_one_out():
    # group 0: 1 - mean(0, 0, 0) = 1;      0 - mean(1, 0, 0) = -1/3
    # group 1: 1 - mean(1, 0, 0) = 2/3;    0 - mean(1, 1, 0) = -2/3
    advantages = compute_advantages(REWARDS, 4, MASK, "rloo")
    expected = per_sequence([1.0, -1 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3, -2 / 3, -2 / 3])
    torch.testing.assert_close(advantages, expected)


def test_reinforce_plus_plus_baseline_whitens_over_valid_tokens():
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0])  # groups of two: [1, 0], [2, 2]
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]])
    # r - mean: [0.5, -0.5, 0, 0]; on valid tokens: 0.5, 0.5 | -0.5 | 0, 0 | 0   (6 tokens)
    # token mean = (0.5 + 0.5 - 0.5) / 6 = 1/12
    # deviations 5/12 (x2), -7/12, -1/12 (x3); squares sum (50 + 49 + 3) / 144 = 102/144
    # unbiased var = 102/144 / 5 = 0.1416667, std = 0.3763863
    # 5/12 / std = 1.107016;  -7/12 / std = -1.549822;  the equal group [2, 2] stays exactly 0
    advantages = compute_advantages(rewards, 2, mask, "reinforce_plus_plus_baseline")
    expected = torch.tensor([[1.107016, 1.107016], [-1.549822, 0.0], [0.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_plus_plus_baseline"])
@pytest.mark.parametrize("value", [0.1, 0.9, 1.0, 0.0, 1 / 3])
def test_a_group_whose_rewards_are_all_equal_gets_exactly_zero(estimator, value):
    """Eight rewards of 0.1 (a wrong but well formatted answer) used to give -0.0075 each: r - mean
    is one ulp, the std about one ulp. No signal must mean no update, under every estimator."""
    rewards = torch.tensor([value] * 8 + [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])  # an equal group, a mixed one
    advantages = compute_advantages(rewards, 8, torch.ones(16, 3), estimator)
    assert torch.equal(advantages[:8], torch.zeros(8, 3))
    assert advantages[8:].abs().min() > 0.5


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_baselines_need_two_samples(estimator):
    advantages = compute_advantages(torch.tensor([1.0, 0.0, 0.5]), 1, torch.ones(3, 2), estimator)
    assert torch.equal(advantages, torch.zeros(3, 2))  # no NaN from a std of one sample (the config refuses n=1)


def test_reinforce_plus_plus_baseline_with_one_sample_per_prompt_learns():
    """Its usual setting, n = 1: the batch whitening is the baseline (verl), so better rewards get
    positive advantages."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0])
    advantages = compute_advantages(rewards, 1, torch.ones(4, 2), "reinforce_plus_plus_baseline")
    assert advantages[0, 0] > advantages[2, 0] > 0 > advantages[1, 0]
    torch.testing.assert_close(advantages[1], advantages[3])


def test_near_constant_batches_are_not_blown_up_by_the_whitening():
    """verl floors the variance (rsqrt(var + 1e-8)); dividing by std + 1e-6 turned rewards that
    differ by rounding into advantages of order 1."""
    rewards = torch.tensor([0.5, 0.5 + 2e-7, 0.5, 0.5 - 2e-7])
    advantages = compute_advantages(rewards, 2, torch.ones(4, 2), "reinforce_plus_plus_baseline")
    assert 0 < advantages.abs().max() < 0.01


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="groups of 3"):
        compute_advantages(REWARDS, 3, MASK, "grpo")
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages(REWARDS, 4, MASK, "gae")


def test_zero_variance_groups_and_stats():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])  # groups of two
    # [1, 1] all correct; [0, 1] mixed; [0, 0] all wrong; [0.5, 0.5] equal, neither
    assert zero_variance_groups(rewards, 2).tolist() == [True, False, True, True]
    stats = group_stats(rewards, 2, max_reward=1.0, min_reward=0.0)
    assert stats == {
        "advantage/all_correct_ratio": 0.25,
        "advantage/all_wrong_ratio": 0.25,
        "advantage/zero_variance_ratio": 0.75,
    }


def test_group_stats_tolerates_float_rounding():
    # 0.9 * accuracy + 0.1 * format can land one float32 step away from 1.0
    rewards = torch.tensor([1.0, 1.0]) + 1.2e-7
    assert (rewards != 1.0).all()
    assert group_stats(rewards, 2, max_reward=1.0, min_reward=0.0)["advantage/all_correct_ratio"] == 1.0


def test_drop_zero_variance_groups_keeps_whole_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])  # groups of two
    kept_rows, num_dropped = drop_zero_variance_groups(rewards, 2)
    # groups 1 ([0, 1]) and 3 ([1, 0]) have signal -> rows 2, 3, 6, 7
    assert kept_rows.tolist() == [2, 3, 6, 7]
    assert kept_rows.dtype == torch.int64
    assert num_dropped == 2

    kept_rows, num_dropped = drop_zero_variance_groups(torch.zeros(4), 2)
    assert kept_rows.tolist() == [] and num_dropped == 2
