"""Policy-gradient losses as plain tensor functions: PPO clip (low/high, dual clip), GSPO, KL
penalties, truncated importance sampling and the loss aggregation modes. Semantics follow verl.

Every (B, T) tensor is indexed by sequence and response token; `mask` / `response_mask` is 1 on
tokens that enter the loss and 0 on padding. Values at padded positions do not change any result,
but must be finite where gradients flow (they are multiplied by 0); `truncated_is_weights` and
`rollout_train_gap` accept anything there (-inf, NaN) in the rollout log-probs.

Aggregation with global counts. A trainer splits a mini-batch (one optimizer step) into
micro-batches, across gradient-accumulation steps and ranks. If every micro-batch passes the
counts of the WHOLE mini-batch (`num_tokens`, `num_seqs`) and one constant `horizon`, the sum of
the micro-batch losses equals the loss of the mini-batch computed in one piece, so the gradient does
not depend on how the batch was cut. (Data-parallel gradient averaging divides by the world size;
a trainer that uses it multiplies each rank's loss by the world size.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "abs", "k2", "k3", "low_var_kl")
MAX_LOG_RATIO = 20.0  # log-ratios are clamped to +-20 before exp, as verl, so exp never overflows


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where `mask` is 1 (0 when the mask is empty). Scalar."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def agg_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    horizon: float | None = None,
) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar.

    With l = loss_mat * mask, L_i = number of valid tokens of sequence i:

        token-mean               sum_{i,t} l / num_tokens
        seq-mean-token-mean      sum_i (sum_t l_i / L_i) / num_seqs
        seq-mean-token-sum       sum_{i,t} l / num_seqs
        seq-mean-token-sum-norm  sum_{i,t} l / (horizon * num_seqs)      (Dr.GRPO)

    Args:
        loss_mat: (B, T) per-token loss.
        mask: (B, T) 1 on valid tokens.
        mode: one of AGG_MODES.
        num_tokens: valid tokens to divide by; default mask.sum() of this batch (min 1).
        num_seqs: sequences to divide by; default the sequences of this batch with at least one
            valid token (min 1). Sequences with no valid token contribute 0 in every mode.
        horizon: seq-mean-token-sum-norm only: the constant length each sequence's token sum is
            divided by, the maximum response length (rollout.max_new_tokens) so that it stays the
            same from batch to batch; default T = loss_mat.shape[-1].

    Pass num_tokens / num_seqs counted over a whole mini-batch (all micro-batches and ranks), and
    one horizon, to make micro-batch losses add up to the mini-batch loss.

    Returns:
        Scalar loss.
    """
    mask = mask.to(loss_mat.dtype)
    token_sum = (loss_mat * mask).sum(dim=-1)  # (B,)
    seq_lengths = mask.sum(dim=-1)  # (B,)
    if num_seqs is None:
        num_seqs = (seq_lengths > 0).sum().clamp(min=1)

    if mode == "token-mean":
        if num_tokens is None:
            num_tokens = seq_lengths.sum().clamp(min=1)
        return token_sum.sum() / num_tokens
    if mode == "seq-mean-token-mean":
        seq_means = token_sum / seq_lengths.clamp(min=1)  # (B,)
        return seq_means.sum() / num_seqs
    if mode == "seq-mean-token-sum":
        return token_sum.sum() / num_seqs
    if mode == "seq-mean-token-sum-norm":
        if horizon is None:
            horizon = loss_mat.shape[-1]
        return token_sum.sum() / horizon / num_seqs
    raise ValueError(f"unknown loss_agg_mode {mode!r}; expected one of {', '.join(AGG_MODES)}")


def policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float,
    loss_agg_mode: str,
    level: str = "token",
    is_weights: Tensor | None = None,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    horizon: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped policy loss with dual clip; level="sequence" gives GSPO.

    Per token, with ratio r and advantage A:

        loss1   = -A * r
        loss2   = -A * clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high)
        clipped = max(loss1, loss2)
        loss    = min(clipped, -A * clip_ratio_c)  where A < 0 (dual clip), else clipped
        loss    = loss * w                         with truncated-IS weights w, if given

    level="token" (PPO): r = exp(log_prob - old_log_prob) per token.
    level="sequence" (GSPO): every token of sequence i carries the sequence ratio
    s_i = exp(mean over its valid tokens of (log_prob - old_log_prob)), written as
    s_i,t = sg[s_i] * exp(log_prob_t - sg[log_prob_t]): the value is s_i and the gradient reaches
    each token as s_i * grad log_prob_t. With loss_agg_mode "seq-mean-token-mean" (the paper's) this
    is exactly the gradient of -A_i * s_i averaged over sequences. The dual clip applies at both
    levels (verl's GSPO leaves it out; it only acts on sequences with A < 0 and s_i > clip_ratio_c).

    Args:
        log_prob: (B, T) log-probs of the response tokens under the policy being trained (grad).
        old_log_prob: (B, T) log-probs under the policy that the batch is attributed to (no grad).
        advantages: (B, T) per-token advantages.
        response_mask: (B, T) 1 on valid tokens.
        clip_ratio_low, clip_ratio_high: clip range [1 - low, 1 + high] (DAPO's clip-higher).
        clip_ratio_c: dual-clip bound for A < 0; must be > 1.
        loss_agg_mode: see `agg_loss`.
        level: "token" (PPO) or "sequence" (GSPO).
        is_weights: optional (B, T) truncated importance-sampling weights (`truncated_is_weights`);
            they multiply the per-token loss and carry no gradient.
        num_tokens, num_seqs, horizon: global counts for `agg_loss`.

    Returns:
        loss: scalar.
        metrics: detached scalars (masked means over this batch's valid tokens):
            pg_loss, pg_clipfrac (share of tokens where the clip is active, loss2 > loss1),
            pg_clipfrac_lower (share where the dual clip is active), ppo_kl (mean of old - new).
    """
    if clip_ratio_c <= 1.0:
        raise ValueError(f"actor.clip_ratio_c must be > 1 for the dual clip, got {clip_ratio_c}")
    mask = response_mask.to(log_prob.dtype)
    log_ratio = log_prob - old_log_prob  # (B, T)

    if level == "token":
        ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # (B, T)
    elif level == "sequence":
        seq_lengths = mask.sum(dim=-1).clamp(min=1)  # (B,)
        seq_log_ratio = (log_ratio * mask).sum(dim=-1) / seq_lengths  # (B,)
        # value: log s_i on every token; gradient: d/d log_prob_t only (the stop-gradient trick)
        token_log_ratio = seq_log_ratio.detach().unsqueeze(-1) + log_prob - log_prob.detach()  # (B, T)
        ratio = torch.exp(token_log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # (B, T)
    else:
        raise ValueError(f"unknown policy-loss level {level!r}; expected 'token' or 'sequence'")

    loss1 = -advantages * ratio  # (B, T)
    loss2 = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)  # (B, T)
    clipped = torch.maximum(loss1, loss2)  # (B, T)
    loss3 = -advantages * clip_ratio_c  # (B, T)
    negative = advantages < 0  # (B, T)
    per_token = torch.where(negative, torch.minimum(clipped, loss3), clipped)  # (B, T)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()

    loss = agg_loss(per_token, mask, loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)

    with torch.no_grad():
        metrics = {
            "pg_loss": loss.detach(),
            "pg_clipfrac": masked_mean((loss2 > loss1).float(), mask),
            "pg_clipfrac_lower": masked_mean(((clipped > loss3) & negative).float(), mask),
            "ppo_kl": masked_mean(-log_ratio, mask),
        }
    return loss, metrics


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    With d = logprob - ref_logprob:
        k1                 d
        abs                |d|
        k2                 0.5 * d^2
        k3 / low_var_kl    exp(-d) - (-d) - 1, with -d clamped to [-20, 20] and the result to
                           [-10, 10] (verl's low_var_kl); non-negative, unbiased, low variance

    Args:
        logprob: (B, T) policy log-probs (grad flows through this one).
        ref_logprob: (B, T) reference-model log-probs.
        kind: one of KL_KINDS.

    Returns:
        (B, T) unmasked; aggregate with `agg_loss`.
    """
    diff = logprob - ref_logprob  # (B, T)
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "k2":
        return 0.5 * diff.square()
    if kind in ("k3", "low_var_kl"):
        log_ratio = (-diff).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # log(ref / policy)
        return (torch.exp(log_ratio) - log_ratio - 1).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL kind {kind!r}; expected one of {', '.join(KL_KINDS)}")


def entropy_loss(
    entropy: Tensor,
    mask: Tensor,
    mode: str,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    horizon: float | None = None,
) -> Tensor:
    """Aggregated per-token entropy (B, T) -> scalar, by the same mode as the policy loss.

    The trainer subtracts entropy_coeff times this from the loss (a bonus for entropy).
    """
    return agg_loss(entropy, mask, mode, num_tokens=num_tokens, num_seqs=num_seqs, horizon=horizon)


def truncated_is_weights(
    old_log_prob: Tensor,
    rollout_log_prob: Tensor,
    mask: Tensor,
    clip: float,
    level: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance-sampling weights that correct for the rollout engine's own numerics.

    The rollout engine sampled from pi_rollout; the training forward defines pi_old. Weights:

        token:     w_t = min(exp(old_t - rollout_t), clip)
        sequence:  w_i = min(exp(sum over valid t of (old_t - rollout_t)), clip), on all its tokens

    Computed in float32; the log-ratio is clamped at log(clip) before exp, so nothing overflows.

    Args:
        old_log_prob: (B, T) training-forward log-probs of the sampled tokens.
        rollout_log_prob: (B, T) rollout-engine log-probs of the same tokens.
        mask: (B, T) 1 on valid tokens.
        clip: the cap C (actor.importance_sampling_clip).
        level: "token" or "sequence".

    Returns:
        weights: (B, T) float32, detached, 0 on padding.
        metrics: {"is_weight_mean", "is_clip_frac"}: the mean weight and the share capped at C,
            over valid tokens (token level) or over sequences with a valid token (sequence level).
    """
    with torch.no_grad():
        valid = mask.bool()  # (B, T)
        maskf = valid.float()
        # where(), not multiplication: padding may hold -inf or garbage log-probs
        log_ratio = torch.where(valid, old_log_prob.float() - rollout_log_prob.float(), 0.0)  # (B, T)
        max_log = math.log(clip)
        if level == "token":
            capped = log_ratio > max_log  # (B, T)
            weights = torch.exp(log_ratio.clamp(max=max_log)) * maskf  # (B, T)
            metrics = {
                "is_weight_mean": masked_mean(weights, maskf),
                "is_clip_frac": masked_mean(capped.float(), maskf),
            }
        elif level == "sequence":
            seq_log_ratio = log_ratio.sum(dim=-1)  # (B,)
            seq_capped = seq_log_ratio > max_log  # (B,)
            seq_weights = torch.exp(seq_log_ratio.clamp(max=max_log))  # (B,)
            weights = seq_weights.unsqueeze(-1) * maskf  # (B, T)
            has_tokens = valid.any(dim=-1).float()  # (B,)
            metrics = {
                "is_weight_mean": masked_mean(seq_weights, has_tokens),
                "is_clip_frac": masked_mean(seq_capped.float(), has_tokens),
            }
        else:
            raise ValueError(f"unknown importance-sampling level {level!r}; expected 'token' or 'sequence'")
    return weights, metrics


def rollout_train_gap(train_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the rollout engine's log-probs are from the training forward's, on the same tokens.

    rollout/train_kl: masked mean of the k3 estimate of KL(pi_rollout || pi_train) from the tokens
        the engine sampled: exp(train - rollout) - (train - rollout) - 1 per token (kl_penalty
        "k3" with logprob=rollout, ref=train); >= 0, 0 when the two agree.
    rollout/train_logprob_absdiff: masked mean of |train - rollout|.

    Args:
        train_log_prob, rollout_log_prob: (B, T); mask: (B, T) 1 on valid tokens.

    Returns:
        Detached float32 scalars.
    """
    with torch.no_grad():
        valid = mask.bool()
        train = torch.where(valid, train_log_prob.float(), 0.0)  # (B, T)
        rollout = torch.where(valid, rollout_log_prob.float(), 0.0)  # (B, T)
        maskf = valid.float()
        return {
            # >= 0 exactly; fp32 rounding of exp(d) - d - 1 at |d| ~ 1e-4 gave -1e-9 (read as a negative KL)
            "rollout/train_kl": masked_mean(kl_penalty(rollout, train, "k3").clamp_min(0.0), maskf),
            "rollout/train_logprob_absdiff": masked_mean((train - rollout).abs(), maskf),
        }
