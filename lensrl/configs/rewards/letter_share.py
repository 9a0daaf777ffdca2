"""A reward for smoke tests and benchmarks of the training machinery, not for a task: the share
of letters among a completion's characters. A random-weight model earns it in varying amounts,
so every group has reward variance and every step a gradient.

    reward:
      function: configs/rewards/letter_share.py:letter_share
"""

from __future__ import annotations


def letter_share(completion: str, sample: dict) -> dict[str, float]:
    """{"score": letters / characters, "accuracy": the same} (0 for an empty completion)."""
    share = sum(ch.isalpha() for ch in completion) / max(len(completion), 1)
    return {"score": share, "accuracy": share}
