"""Advantages from scalar rewards of groups of completions that share a prompt.

A batch of B sequences is laid out group by group: with `group_size` n, group g occupies rows
g*n .. g*n+n-1, so `rewards.view(-1, n)` has one row per prompt. Every function here is a plain
tensor function; the semantics follow verl, whose numbers users already know.

    rewards (B,) --compute_advantages--> advantages (B, T), zero on padding

Estimators (r: the sequence's reward, mean/std over its group, std unbiased as torch.std):

    grpo                          (r - mean) / (std + eps)     norm_adv_by_std=False: r - mean (Dr.GRPO)
    rloo                          r - mean of the other n-1    = n / (n - 1) * (r - mean)
    reinforce_plus_plus_baseline  r - mean (with n = 1: r itself), broadcast to tokens, then whitened
                                  over all valid tokens of the batch: (a - mean_tok) * rsqrt(var_tok + 1e-8)
                                  (verl's masked_whiten)

A group whose rewards are all equal (n > 1) carries no signal: its advantage is exactly 0 under
every estimator (float rounding of r - mean would otherwise leave +-1 ulp, which a std of about
one ulp turns into advantages of order 0.01). GRPO and RLOO need n >= 2 (the config refuses n = 1);
with n = 1 they return 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus_baseline")


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """(B,) -> (num_groups, group_size), checking that the batch holds whole groups."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (B,), got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"a batch of {rewards.numel()} rewards does not split into groups of {group_size} "
            "(rollout.n); rows must be laid out group by group"
        )
    return rewards.view(-1, group_size)


def compute_advantages(
    rewards: Tensor,
    group_size: int,
    response_mask: Tensor,
    estimator: str,
    norm_adv_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Per-token advantages, the sequence's advantage repeated over its response tokens.

    Args:
        rewards: (B,) one scalar reward per sequence, B = num_groups * group_size.
        group_size: completions per prompt (n).
        response_mask: (B, T) 1 on response tokens that enter the loss, 0 on padding.
        estimator: "grpo", "rloo" or "reinforce_plus_plus_baseline".
        norm_adv_by_std: grpo only; False drops the division by the group std (Dr.GRPO).
        eps: added to the standard deviation before dividing.

    Returns:
        (B, T) float32 advantages, zero where `response_mask` is 0. No gradient.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}"
        )
    if response_mask.dim() != 2 or response_mask.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"response_mask must have shape (B, T) with B = {rewards.shape[0]}, got {tuple(response_mask.shape)}"
        )
    if rewards.numel() == 0:
        return torch.zeros_like(response_mask, dtype=torch.float32)
    with torch.no_grad():
        grouped = _grouped(rewards.float(), group_size)  # (G, n)
        mask = response_mask.float()  # (B, T)
        signal = ~zero_variance_groups(grouped.reshape(-1), group_size)  # (G,); False for groups of one
        centered = (grouped - grouped.mean(dim=1, keepdim=True)) * signal[:, None]  # (G, n), exact 0 w/o signal

        if estimator == "reinforce_plus_plus_baseline" and group_size == 1:
            scores = grouped  # no group baseline: the batch whitening below is the baseline (verl)
        elif group_size == 1:
            scores = torch.zeros_like(grouped)
        elif estimator == "grpo":
            std = grouped.std(dim=1, keepdim=True)  # (G, 1) unbiased, as verl
            scores = centered / (std + eps) if norm_adv_by_std else centered
        elif estimator == "rloo":
            # r_i - (sum - r_i) / (n - 1) = (n * r_i - sum) / (n - 1) = n / (n - 1) * (r_i - mean)
            scores = centered * group_size / (group_size - 1)
        else:  # reinforce_plus_plus_baseline: whitened below, over tokens
            scores = centered

        advantages = scores.reshape(-1, 1) * mask  # (B, T)
        if estimator == "reinforce_plus_plus_baseline":
            advantages = _masked_whiten(advantages, mask) * mask
            if group_size > 1:  # a group without signal stays at exactly 0 after the shift
                advantages = advantages * signal.repeat_interleave(group_size)[:, None]
    return advantages


def _masked_whiten(values: Tensor, mask: Tensor, var_eps: float = 1e-8) -> Tensor:
    """(values - mean) * rsqrt(var + var_eps), mean and unbiased variance over the entries where mask
    is 1: verl's `masked_whiten`, whose variance floor keeps a near-constant batch from blowing
    rounding noise up (dividing by std + 1e-6 amplifies it ~100x more)."""
    num_valid = mask.sum()
    mean = (values * mask).sum() / num_valid.clamp(min=1)
    variance = (((values - mean) ** 2) * mask).sum() / (num_valid - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(variance + var_eps)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(num_groups,) bool: True where every reward of the group is equal (no learning signal).

    Args:
        rewards: (B,) laid out group by group.
    """
    grouped = _grouped(rewards, group_size)  # (G, n)
    return grouped.amax(dim=1) == grouped.amin(dim=1)


def group_stats(rewards: Tensor, group_size: int, max_reward: float, min_reward: float) -> dict[str, float]:
    """Share of groups whose rewards are all equal, and of those, all at the max or all at the min.

    Pass the accuracy part of the reward (or the combined score with its own max and min): a group
    counts as all correct when every reward equals `max_reward` (within float tolerance), all wrong
    when every reward equals `min_reward`.

    Returns:
        {"advantage/all_correct_ratio", "advantage/all_wrong_ratio", "advantage/zero_variance_ratio"},
        each a fraction of the num_groups groups.
    """
    grouped = _grouped(rewards.float(), group_size)  # (G, n)
    all_correct = torch.isclose(grouped, torch.full_like(grouped, max_reward)).all(dim=1)  # (G,)
    all_wrong = torch.isclose(grouped, torch.full_like(grouped, min_reward)).all(dim=1)  # (G,)
    zero_variance = zero_variance_groups(rewards, group_size)  # (G,)
    return {
        "advantage/all_correct_ratio": all_correct.float().mean().item(),
        "advantage/all_wrong_ratio": all_wrong.float().mean().item(),
        "advantage/zero_variance_ratio": zero_variance.float().mean().item(),
    }


def drop_zero_variance_groups(rewards: Tensor, group_size: int) -> tuple[Tensor, int]:
    """Row indices kept after dropping groups whose rewards are all equal (DAPO dynamic sampling).

    Whole groups are kept or dropped, so `batch[kept_rows]` is still laid out group by group.

    Args:
        rewards: (B,) laid out group by group.

    Returns:
        kept_rows: (num_kept_groups * group_size,) int64 row indices, ascending.
        num_dropped_groups: how many groups were dropped.
    """
    keep = ~zero_variance_groups(rewards, group_size)  # (G,)
    kept_rows = keep.repeat_interleave(group_size).nonzero().flatten()  # (num_kept_rows,)
    return kept_rows, int((~keep).sum().item())
