"""Free-form math answers: take the last `\\boxed{...}`, grade it against the ground truth, score format.

Grading is a normalised string match first (cheap, covers most geometry answers), then HF
math-verify for symbolic and numeric equivalence (`2.5` vs `\\frac{5}{2}`, `4\\sqrt{3}` vs
`\\sqrt{48}`). math-verify's own signal-based timeouts are switched off here: they only work in
the main thread and would fight any other alarm. Bounding the time is the caller's job, and
`RewardPool` (pool.py) does it by running these functions in worker processes it can kill.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from lensrl.config import RewardConfig

# Cheap guards applied before any parsing: a real answer is short and shallow.
MAX_ANSWER_CHARS = 300
MAX_BRACE_DEPTH = 12


class AnswerRejected(ValueError):
    """An extracted answer too long, too deep or too strange to hand to a symbolic parser."""


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_RE = re.compile(r"\\\\|\\[{}]|[{}]")  # escaped braces and `\\` are skipped, not counted


def extract_boxed(text: str) -> str | None:
    """Content of the LAST `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) in `text`.

    Braces are matched, so nested braces are kept whole. Returns None when there is no box or the
    last one is never closed (an earlier box is not used instead).
    """
    last = None
    for last in _BOXED_RE.finditer(text):  # noqa: B007 - we want the final match
        pass
    if last is None:
        return None
    start = last.end()
    while start < len(text) and text[start] in " \t":
        start += 1
    if start >= len(text):
        return None
    if text[start] != "{":
        if start == last.end() or last.group() != "\\boxed":
            return None  # `\boxed` glued to something that is not a brace, or `\fbox 3`
        token = re.match(r"[^\s$]+", text[start:])  # `\boxed 5`: the token after the space
        return token.group() if token else None
    depth = 0
    for brace in _BRACE_RE.finditer(text, start):
        token = brace.group()
        if len(token) == 2:
            continue
        depth += 1 if token == "{" else -1
        if depth == 0:
            return text[start + 1 : brace.start()]
    return None


def _unwrap_boxed(text: str) -> str:
    boxed = extract_boxed(text) if "\\boxed" in text or "\\fbox" in text else None
    return boxed if boxed is not None else text


def check_answer(answer: str) -> None:
    """Raise AnswerRejected for answers that no dataset has but that can hang a parser."""
    if len(answer) > MAX_ANSWER_CHARS:
        raise AnswerRejected(f"answer has {len(answer)} characters (limit {MAX_ANSWER_CHARS})")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in answer):
        raise AnswerRejected("answer contains control characters")
    depth = max_depth = 0
    for brace in _BRACE_RE.finditer(answer):
        token = brace.group()
        if len(token) == 1:
            depth += 1 if token == "{" else -1
            max_depth = max(max_depth, depth)
    if max_depth > MAX_BRACE_DEPTH:
        raise AnswerRejected(f"answer nests braces {max_depth} deep (limit {MAX_BRACE_DEPTH})")


# ----------------------------------------------------------------------------------------------
# Normalisation and grading
# ----------------------------------------------------------------------------------------------

_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree(?![A-Za-z])")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_SPACING_RE = re.compile(r"\\[,;:! ]|~")
_UNIT_WORDS = (
    r"units?|degrees?|deg|radians?|cm|mm|km|meters?|centimeters?|millimeters?|kilometers?"
    r"|inches|inch|feet|foot|ft|yards?|yd|miles?"
)
_SHORT_UNITS = r"m|in|mi|rad"  # could be algebra (`2m`): a unit only as a separate word
_UNIT_RE = re.compile(
    rf"(?<=[\d}}.)])(?:\s*(?:square\s+|sq\.?\s+|cubic\s+)?(?:{_UNIT_WORDS})"
    rf"|\s+(?:square\s+)?(?:{_SHORT_UNITS}))"
    r"\s*(?:\^\s*\{?\s*[23]\s*\}?|²|³)?\s*$"
)
_VARIABLE_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?=")


def _clean(text: str) -> str:
    """Drop what never changes an answer's value: `$`, units, degrees, `\\left`, `\\text{}` wrappers."""
    text = text.strip().replace("$", "")
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = _LEFT_RIGHT_RE.sub("", text)
    text = _DEGREE_RE.sub("", text)
    for _ in range(3):  # nested wrappers, innermost first
        text = _TEXT_WRAPPER_RE.sub(r" \1 ", text)
    text = _SPACING_RE.sub(" ", text)
    for _ in range(2):  # "5 square units", then a leftover "cm"
        text = _UNIT_RE.sub("", text)
    return text.strip().rstrip(".").strip()


def normalize_answer(text: str) -> str:
    """The canonical string form used for the exact-match check (no spaces, no `x=`)."""
    text = re.sub(r"\s+", "", _clean(text))
    return _VARIABLE_RE.sub("", text).rstrip(".")


class _QuietTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@functools.cache
def _math_verify():
    """Import math-verify once, silencing its warning about the timeouts we switch off on purpose."""
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_QuietTimeoutWarning())
    return math_verify


def grade_math(pred: str, answer: str) -> bool:
    """True when `pred` equals the ground truth `answer` (which may itself be `\\boxed{}`).

    Raises AnswerRejected for predictions that fail `check_answer`. Not time-bounded on its own:
    run it through `RewardPool` for that.
    """
    check_answer(pred)
    answer = _unwrap_boxed(answer)
    pred = _unwrap_boxed(pred)
    normalized = normalize_answer(pred)
    if not normalized:
        return False
    gold_normalized = normalize_answer(answer)
    if normalized == gold_normalized:
        return True
    verdict = _plain_verdict(normalized, gold_normalized)
    if verdict is not None:
        return verdict
    math_verify = _math_verify()
    # Timeouts off (None): they use signal.alarm, which fails outside the main thread and would
    # cancel any alarm of the caller's. The pool's worker processes bound the time instead.
    gold = math_verify.parse(f"\\boxed{{{_clean(answer) or answer}}}", parsing_timeout=None)
    target = math_verify.parse(f"\\boxed{{{_clean(pred) or pred}}}", parsing_timeout=None)
    if not gold or not target:
        return False
    return bool(math_verify.verify(gold, target, timeout_seconds=None))


_PLAIN_WORDS = re.compile(r"[A-Za-z]{2,}( [A-Za-z]+)*")
_PLAIN_INTEGER = re.compile(r"-?\d+")
_PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def _plain_verdict(pred: str, gold: str) -> bool | None:
    """Decide without math-verify only where its verdict is certain; None: ask math-verify.

    Plain words: case-insensitive equality. Two integers: exact equality (`1000001` is not
    `1000000`). Two decimals of the same value (`2.50`, `2.5`): equal. Decimals that differ go to
    math-verify, whose rounding rules (6 places, integers against decimals) decide them."""
    if _PLAIN_WORDS.fullmatch(pred) and _PLAIN_WORDS.fullmatch(gold):
        return pred.lower() == gold.lower()
    if _PLAIN_INTEGER.fullmatch(pred) and _PLAIN_INTEGER.fullmatch(gold):
        return int(pred) == int(gold)
    if _PLAIN_NUMBER.fullmatch(pred) and _PLAIN_NUMBER.fullmatch(gold) and Decimal(pred) == Decimal(gold):
        return True
    return None


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.DOTALL)


def format_score(text: str, pattern: str) -> float:
    """1.0 when the whole of `text` matches the regex `pattern` (`.` matches newlines), else 0.0."""
    return 1.0 if _compile(pattern).fullmatch(text) else 0.0


def combine(accuracy: float, format_ok: float | None, cfg: RewardConfig) -> tuple[float, dict[str, float]]:
    """Score and parts from accuracy and format (None: no format reward).

    combined = (1 - w) * accuracy + w * format, mapped onto [reward_min_val, reward_max_val]: all
    wrong scores reward_min_val, all right reward_max_val.
    """
    parts = {"accuracy": float(accuracy)}
    combined = float(accuracy)
    if format_ok is not None:
        parts["format"] = float(format_ok)
        combined = (1.0 - cfg.format_weight) * accuracy + cfg.format_weight * format_ok
    low, high = cfg.reward_min_val, cfg.reward_max_val
    score = low + (high - low) * combined
    return min(max(score, low), high), parts


def math_reward(completion: str, sample: Mapping[str, Any], cfg: RewardConfig) -> dict[str, float]:
    """Reward of one completion against the free-form ground truth `sample["answer"]` (the
    reward-function interface, `lensrl.rewards.function`): {"score", "accuracy", "format"}.

    Raises AnswerRejected when the boxed answer fails `check_answer` (the pool scores it minimum).
    """
    pred = extract_boxed(completion)
    accuracy = 1.0 if pred is not None and grade_math(pred, str(sample["answer"])) else 0.0
    format_ok = None
    if cfg.format_pattern:  # a box that is never closed is no answer, whatever the regex says
        written = sample.get("assistant_prefix", "") + completion  # as the template wrote the answer
        format_ok = format_score(written, cfg.format_pattern) if pred is not None else 0.0
    score, parts = combine(accuracy, format_ok, cfg)
    return {"score": score, **parts}
