"""Prompt text: instructions, `<image>` placeholders, multiple-choice layout, answer clean-up.

Pure functions on strings, shared by the dataset loader, the converters and the synthetic tasks.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from lensrl.data.sample import IMAGE_PLACEHOLDER, DataError

# The R1-style instruction verl / EasyR1 / ChatLearn append to each geometry3k problem
# ("{problem} {instruction}"); `lensrl data geo3k --instruction r1` uses it.
R1_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final "
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST "
    "BE put in \\boxed{}."
)

# RLinf's geometry3k system prompt.
RLINF_GEO3K_SYSTEM_PROMPT = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: \\boxed{$Answer}."
)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def count_placeholders(text: str) -> int:
    """Number of `<image>` placeholders in `text`."""
    return text.count(IMAGE_PLACEHOLDER)


def append_instruction(prompt: str, instruction: str | None) -> str:
    """`"{prompt} {instruction}"`, or the prompt unchanged when there is no instruction."""
    return f"{prompt} {instruction}" if instruction else prompt


def index_to_letter(index: int) -> str:
    """0 -> "A", 1 -> "B", ..."""
    if not 0 <= index < len(LETTERS):
        raise ValueError(f"choice index {index} is outside 0..{len(LETTERS) - 1}")
    return LETTERS[index]


def letter_to_index(letter: str) -> int:
    """ "A" -> 0, "b" -> 1, ..."""
    position = LETTERS.find(letter.strip().upper())
    if len(letter.strip()) != 1 or position < 0:
        raise ValueError(f"{letter!r} is not a choice letter A-Z")
    return position


def format_choices(question: str, choices: list[str]) -> str:
    """The multiple-choice prompt: `"{question}\\nChoices:\\nA. c0\\nB. c1..."`."""
    lines = [f"{index_to_letter(i)}. {choice}" for i, choice in enumerate(choices)]
    return question + "\nChoices:\n" + "\n".join(lines)


def choice_target(index: int, choices: list[str]) -> str:
    """The assistant text for a multiple-choice answer: `"{Letter}. {choice text}"`."""
    return f"{index_to_letter(index)}. {choices[index]}"


def parse_choices(value: Any, where: str = "") -> list[str]:
    """Choices as a list of strings, from a list or a string holding a Python-style list.

    Strings are parsed with `ast.literal_eval`, which only accepts literals: code is never run.
    `where` (e.g. "train.parquet row 3") prefixes error messages.
    """
    prefix = f"{where}: " if where else ""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise DataError(
                f"{prefix}choices {_clip(value)!r} is not a Python-style list of strings "
                "(e.g. \"['left', 'right']\")"
            ) from None
    if isinstance(parsed, tuple):
        parsed = list(parsed)
    if not isinstance(parsed, list) or not parsed or not all(isinstance(c, str) for c in parsed):
        raise DataError(f"{prefix}choices must be a non-empty list of strings, got {_clip(repr(value))}")
    if len(parsed) > len(LETTERS):
        raise DataError(f"{prefix}{len(parsed)} choices; at most {len(LETTERS)} are supported")
    return parsed


def answer_index(answer: Any, choices: list[str], where: str = "") -> int:
    """The index of the correct choice from an int index, the choice text, a letter or a digit
    string (in that order: the text of a choice wins, so answer '2' among choices ['1', '2', '3']
    is the choice '2', not index 2). A digit string among numeric choices that matches none of
    them is ambiguous (a value or an index?) and raises DataError naming `where`."""
    prefix = f"{where}: " if where else ""
    index: int | None = None
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str):
        text = answer.strip()
        letter = re.fullmatch(r"\(?([A-Za-z])\)?\.?", text)
        matches = [i for i, choice in enumerate(choices) if choice.strip() == text]
        if len(matches) > 1:
            raise DataError(f"{prefix}answer {answer!r} matches {len(matches)} of the choices {choices}")
        if matches:
            index = matches[0]
        elif letter:
            index = letter_to_index(letter.group(1))
        elif text.lstrip("-").isdigit():
            if all(_is_number(choice) for choice in choices):
                raise DataError(f"{prefix}answer {answer!r} is ambiguous: the choices {choices} are numbers and "
                                "none is it, so it may be a value or an index; give the choice text or a letter")
            index = int(text)
    if index is None:
        raise DataError(
            f"{prefix}answer {answer!r} is neither a choice index, a letter nor one of the choices {choices}"
        )
    if not 0 <= index < len(choices):
        raise DataError(f"{prefix}answer index {index} is out of range for {len(choices)} choices {choices}")
    return index


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def unwrap_boxed(answer: str) -> str:
    """`"\\boxed{x}"` -> `"x"` when the whole answer is one boxed expression; otherwise unchanged."""
    text = answer.strip()
    if not text.startswith("\\boxed{") or not text.endswith("}"):
        return answer
    depth = 0
    start = len("\\boxed{") - 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                # The brace that closes \boxed{ must be the last character.
                return text[start + 1 : i].strip() if i == len(text) - 1 else answer
    return answer


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
