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


_STATEMENT = r"(?:(?i:\b(?:the\s+)?(?:final\s+)?(?:answer|choice|option)\b(?:\s+(?:is|would\s+be|should\s+be))?)" \
             r"|(?i:\b(?:pick|choose|select|go\s+with)(?:\s+option)?))"


def extract_choice(text: str, num_choices: int = 5, choices: list[str] | None = None) -> str | None:
    """The option letter (A, B, ... for `num_choices` options) a response picked, or None.

    A letter counts only where it stands as an answer, so a sentence that starts with the
    article "A" or the pronoun "I" picks nothing. In order (when the response has a `</think>`,
    only the text after the last one counts):
      1. the last `\\boxed{}`: a letter at its start, or the full text of one choice;
      2. the last statement: "answer is C", "Answer: (C)", "option C", "I choose C";
      3. the last parenthesised letter "(C)";
      4. a line that starts with "C." / "C)" / "C:" / "**C**", or a response that is only "C";
      5. the full text of exactly one of `choices` (case-insensitive, as whole words).
    """
    letters = string.ascii_uppercase[: max(1, min(num_choices, 26))]
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    boxed = extract_boxed(text)
    if boxed is not None:
        letter = _letter_at_start(boxed, letters) or _choice_by_text(boxed, choices, letters)
        if letter:
            return letter
    lower = letters.lower()
    stated = []  # (position, letter) of every statement
    for m in re.finditer(rf"{_STATEMENT}\s*[:：-]?\s*[(\[]?\**([{letters}{lower}])\**[)\]]?(?![\w'])", text):
        letter, rest = m.group(1), text[m.end():]
        if letter.islower() and not re.match(r"\s*(?:[.,;:!)]|$)", rest):
            continue  # "the answer is a circle": an article
        named = _choice_by_text(rest, choices, letters, at_start=True) if re.match(r" +[a-z]", rest) else None
        stated.append((m.start(), named or letter.upper()))  # "the answer is A circle": the choice named
    verdicts = rf"(?<![\w'])([{letters}])\s+is\s+(?:the\s+)?(?:correct|right|answer|best)\b" \
               rf"|\bit(?:\s+is|'s)\s+(?:option\s+)?\(?([{letters}])\)?(?![\w'])"  # "C is correct", "it is C."
    stated += [(m.start(), m.group(1) or m.group(2)) for m in re.finditer(verdicts, text)]
    if stated:
        return max(stated)[1]
    parenthesised = re.findall(rf"\(([{letters}{lower}])\)", text)
    if parenthesised:
        return parenthesised[-1].upper()
    for line in text.splitlines():
        match = re.match(rf"\s*(?:\*\*)?\(?([{letters}])(?:\*\*)?(?:[.):](?:\s|$)|\s*$)", line)
        if match:
            return match.group(1)
    alone = re.fullmatch(rf"\s*\(?([{lower}])\)?\.?\s*", text)  # a response that is only "c" or "c."
    if alone:
        return alone.group(1).upper()
    return _choice_by_text(text, choices, letters)


def _choice_by_text(text: str, choices: list[str] | None, letters: str, at_start: bool = False) -> str | None:
    """The letter of the one choice whose full text appears in `text` (`at_start`: where `text`
    begins, after spaces); None: none or several."""
    if not choices:
        return None
    lead = r"^\s*" if at_start else r"(?<!\w)"
    found = [i for i, choice in enumerate(choices[: len(letters)]) if choice.strip() and
             re.search(rf"{lead}{re.escape(choice.strip())}(?!\w)", text, re.IGNORECASE)]
    # "red cube" inside "the red cube on the left" beside "red": the longest match is meant
    found = [i for i in found if not any(j != i and choices[i].strip().lower() in choices[j].strip().lower()
                                         for j in found)]
    return letters[found[0]] if len(found) == 1 else None


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
    `sample["answer"]` (the reward-function interface): {"score", "accuracy", "format"}.
    `sample["choices"]` (when present) lets a response that names a choice's text count."""
    gold = _answer_letter(str(sample["answer"]))
    choices = sample.get("choices")
    num_choices = max(len(choices) if choices else 5, string.ascii_uppercase.index(gold) + 1)
    accuracy = 1.0 if extract_choice(completion, num_choices, choices) == gold else 0.0
    written = sample.get("assistant_prefix", "") + completion  # as the template wrote the answer
    format_ok = format_score(written, cfg.format_pattern) if cfg.format_pattern else None
    score, parts = combine(accuracy, format_ok, cfg)
    return {"score": score, **parts}
