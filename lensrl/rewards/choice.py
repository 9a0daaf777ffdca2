"""Multiple choice (Robo2VLM): find the option letter a response picked and compare it with the key."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from lensrl.config import RewardConfig
from lensrl.rewards.math import combine, extract_boxed, format_score

_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def _letter_at_start(text: str, letters: str) -> str | None:
    """`A`, `(A)`, `A.`, `A)`, `A: red cube`, `**B**` at the start of `text` -> the letter."""
    text = _WRAPPER_RE.sub(r"\1", text).strip().strip("*").strip()
    match = re.match(rf"\(?([{letters}])\)?(?:[.):,\s*]|$)", text)
    return match.group(1) if match else None


def extract_choice(text: str, num_choices: int = 5) -> str | None:
    """The option letter (A, B, ... for `num_choices` options) a response picked, or None.

    Looks, in order, at: the last `\\boxed{}`; the last "answer is X" / "Answer: X"; a response
    that starts with "X." or "(X)"; the last standalone capital letter. When the response has a
    `</think>`, only the text after the last one counts.
    """
    letters = string.ascii_uppercase[: max(1, min(num_choices, 26))]
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    boxed = extract_boxed(text)
    if boxed is not None:
        letter = _letter_at_start(boxed, letters)
        if letter:
            return letter
    said = None
    for said in re.finditer(  # noqa: B007 - we want the final match
        rf"(?i:answer)(?:\s+is)?[\s:：*(\[]*([{letters}])(?![A-Za-z0-9])",
        text,  # one class: no backtracking
    ):
        pass
    if said is not None:
        return said.group(1)
    letter = _letter_at_start(text, letters)
    if letter:
        return letter
    standalone = re.findall(rf"(?<![\w\\])([{letters}])(?!\w)", text)
    return standalone[-1] if standalone else None


def _answer_letter(answer: str) -> str:
    answer = answer.strip()
    if len(answer) == 1 and answer.upper() in string.ascii_uppercase:
        return answer.upper()
    letter = extract_choice(answer, num_choices=26)
    if letter is None:
        raise ValueError(f"multiple-choice answer {answer[:80]!r} is not an option letter (A, B, ...)")
    return letter


def choice_reward(completion: str, sample: Mapping[str, Any], cfg: RewardConfig) -> dict[str, float]:
    """Reward of one response to a multiple-choice question whose key is the letter
    `sample["answer"]` (the reward-function interface): {"score", "accuracy", "format"}."""
    gold = _answer_letter(str(sample["answer"]))
    num_choices = max(5, string.ascii_uppercase.index(gold) + 1)
    accuracy = 1.0 if extract_choice(completion, num_choices) == gold else 0.0
    format_ok = format_score(completion, cfg.format_pattern) if cfg.format_pattern else None
    score, parts = combine(accuracy, format_ok, cfg)
    return {"score": score, **parts}
