"""Rewards: functions of (completion text, sample) -> score and named parts.

    function.py  the interface: `reward.function: file.py:name` or a built-in, loaded and checked
    math.py      last `\\boxed{}` -> normalised match, then math-verify equivalence; format regex
    choice.py    option letter (A-E) -> exact match
    pool.py      RewardPool: worker processes, a timeout per item, adversarial answers score minimum

Trainers score through `RewardPool(cfg.reward).score_batch(...)`; `score_completion` is what each
worker runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lensrl.config import RewardConfig
from lensrl.rewards.choice import choice_reward, extract_choice
from lensrl.rewards.function import RewardFunctionError, call_reward, resolve, reward_sample
from lensrl.rewards.math import (
    AnswerRejected,
    check_answer,
    combine,
    extract_boxed,
    format_score,
    grade_math,
    math_reward,
    normalize_answer,
)
from lensrl.rewards.pool import RewardPool, RewardResult

__all__ = [
    "AnswerRejected",
    "RewardFunctionError",
    "RewardPool",
    "RewardResult",
    "check_answer",
    "choice_reward",
    "combine",
    "extract_answer",
    "extract_boxed",
    "extract_choice",
    "format_score",
    "grade_math",
    "math_reward",
    "normalize_answer",
    "resolve",
    "reward_sample",
    "score_completion",
]


def score_completion(
    completion: str, sample: Mapping[str, Any] | str, cfg: RewardConfig
) -> tuple[float, dict[str, float]]:
    """(score, parts) of one completion under the reward `cfg` names (`reward.function`, else the
    built-in `reward.type`): the call every worker makes. `sample`: the reward-function sample
    dict (a plain string is taken as {"answer": it}).

    Not time-bounded; may raise AnswerRejected or anything the function raises. `RewardPool`
    runs it with a timeout.
    """
    fn, kwargs = resolve(cfg)
    return call_reward(fn, kwargs, completion, {"answer": sample} if isinstance(sample, str) else sample)


def extract_answer(completion: str, cfg: RewardConfig) -> str | None:
    """The answer a completion gives, as the grader will see it (None: none found).

    Cheap, and raises AnswerRejected for a math answer that fails `check_answer`: the pool calls it
    in the parent process to turn away adversarial answers before they reach a worker.
    """
    if cfg.function:
        return None  # a user's function: no cheap pre-check (the pool's timeout still applies)
    if cfg.type == "math":
        pred = extract_boxed(completion)
        if pred is not None:
            check_answer(pred)
        return pred
    if cfg.type == "choice":
        return extract_choice(completion)
    raise ValueError(f"reward.type must be 'math' or 'choice', got {cfg.type!r}")


def overlong_penalty(length: int, max_new_tokens: int, buffer_len: int, factor: float) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", overlong reward shaping; verl's
    `reward_model.overlong_buffer`): 0 up to `max_new_tokens - buffer_len` tokens, then falling
    linearly to `-factor` at `max_new_tokens`. length: the completion's tokens (its stop token
    included). Returns a value <= 0 to add to the score; 0 when `buffer_len` is 0 (off)."""
    if buffer_len <= 0:
        return 0.0
    exceed = length - (max_new_tokens - buffer_len)
    return min(-exceed / buffer_len * factor, 0.0)

