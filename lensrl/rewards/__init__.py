"""Rewards: pure functions of (completion text, ground truth) -> (score, named parts).

    math.py    last `\\boxed{}` -> normalised match, then math-verify equivalence; format regex
    choice.py  option letter (A-E) -> exact match
    pool.py    RewardPool: worker processes, a timeout per item, adversarial answers score minimum

Trainers score through `RewardPool(cfg.reward).score_batch(...)`; `score_completion` is what each
worker runs.
"""

from __future__ import annotations

from lensrl.config import RewardConfig
from lensrl.rewards.choice import choice_reward, extract_choice
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
    "score_completion",
]


def score_completion(
    completion: str, sample_answer: str, cfg: RewardConfig
) -> tuple[float, dict[str, float]]:
    """(score, parts) of one completion for the reward type `cfg.type` ("math" or "choice").

    Not time-bounded; may raise AnswerRejected. `RewardPool` runs it with a timeout.
    """
    if cfg.type == "math":
        return math_reward(completion, sample_answer, cfg)
    if cfg.type == "choice":
        return choice_reward(completion, sample_answer, cfg)
    raise ValueError(f"reward.type must be 'math' or 'choice', got {cfg.type!r}")


def extract_answer(completion: str, cfg: RewardConfig) -> str | None:
    """The answer a completion gives, as the grader will see it (None: none found).

    Cheap, and raises AnswerRejected for a math answer that fails `check_answer`: the pool calls it
    in the parent process to turn away adversarial answers before they reach a worker.
    """
    if cfg.type == "math":
        pred = extract_boxed(completion)
        if pred is not None:
            check_answer(pred)
        return pred
    if cfg.type == "choice":
        return extract_choice(completion)
    raise ValueError(f"reward.type must be 'math' or 'choice', got {cfg.type!r}")
