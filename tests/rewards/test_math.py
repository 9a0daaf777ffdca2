import pytest

from lensrl.config import RewardConfig
from lensrl.rewards import (
    AnswerRejected,
    extract_boxed,
    format_score,
    grade_math,
    normalize_answer,
    score_completion,
)
from lensrl.rewards.math import MAX_ANSWER_CHARS

# ----------------------------------------------------------------------------------------------
# extract_boxed
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{3}.", "3"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("x \\boxed{a^{b^{c}} + {d}} y", "a^{b^{c}} + {d}"),
        ("first \\boxed{1}, then \\boxed{2}, finally \\boxed{\\sqrt{3}}", "\\sqrt{3}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5$", "5"),
        ("\\boxed {42}", "42"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not counted
        ("\\boxed{}", ""),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "no box here",
        "\\boxed{3",  # never closed
        "\\boxed{1} and then \\boxed{\\frac{1}{2}",  # the LAST box is unbalanced: no fallback
        "\\boxed",
        "\\boxedx{3}",  # another command
        "\\boxed{" + "{" * 10_000,
    ],
)
def test_extract_boxed_none(text):
    assert extract_boxed(text) is None


# ----------------------------------------------------------------------------------------------
# grade_math
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, answer",
    [
        ("35", "35"),
        ("35^\\circ", "35"),
        ("35^{\\circ}", "35"),
        ("35°", "35"),
        ("35 degrees", "35"),
        ("\\frac{5}{2}", "2.5"),
        ("2.5", "\\frac{5}{2}"),
        ("4\\sqrt{3}", "\\sqrt{48}"),
        ("\\dfrac{15}{2}", "\\frac{15}{2}"),
        ("x=3", "3"),
        ("x = 3", "3"),
        ("3", "\\boxed{3}"),
        ("12 \\text{ cm}", "12"),
        ("12 cm^2", "12"),
        ("12cm", "12"),
        ("3 m", "3"),
        ("\\text{12}", "12"),
        ("7.", "7"),
        ("\\left(1, 2\\right)", "(1,2)"),
        ("2\\pi", "2 \\pi"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
    ],
)
def test_grade_math_equivalent(pred, answer):
    assert grade_math(pred, answer)


@pytest.mark.parametrize(
    "pred, answer",
    [
        ("36", "35"),
        ("\\frac{5}{3}", "2.5"),
        ("4\\sqrt{2}", "\\sqrt{48}"),
        ("x=4", "3"),
        ("", "3"),
        ("4", "\\boxed{3}"),
        ("hello", "3"),
    ],
)
def test_grade_math_wrong(pred, answer):
    assert not grade_math(pred, answer)


def test_normalize_answer():
    assert normalize_answer("x = \\dfrac{1}{2}.") == "\\frac{1}{2}"
    assert normalize_answer("$60^{\\circ}$") == "60"
    assert normalize_answer("5\\text{ square units}") == "5"


def test_grade_math_rejects_adversarial_answers():
    with pytest.raises(AnswerRejected):
        grade_math("1" * (MAX_ANSWER_CHARS + 1), "1")
    with pytest.raises(AnswerRejected):
        grade_math("{" * 40 + "1" + "}" * 40, "1")
    with pytest.raises(AnswerRejected):
        grade_math("3\x00", "3")


# ----------------------------------------------------------------------------------------------
# format and combined score
# ----------------------------------------------------------------------------------------------

PATTERN = RewardConfig().format_pattern
GOOD = "<think>a</think> so \\boxed{3}"
NO_THINK = "so \\boxed{3}"


def test_format_score():
    assert format_score(GOOD, PATTERN) == 1.0
    assert format_score("<think>line\nline</think>\n\\boxed{3}\n", PATTERN) == 1.0  # DOTALL
    assert format_score(NO_THINK, PATTERN) == 0.0
    assert format_score("<think>a</think> no box", PATTERN) == 0.0


@pytest.mark.parametrize(
    "completion, answer, score, parts",
    [
        (GOOD, "3", 1.0, {"accuracy": 1.0, "format": 1.0}),
        (NO_THINK, "3", 0.9, {"accuracy": 1.0, "format": 0.0}),
        (GOOD, "4", 0.1, {"accuracy": 0.0, "format": 1.0}),
        ("no answer", "3", 0.0, {"accuracy": 0.0, "format": 0.0}),
        ("<think>a</think> \\boxed{\\frac{1}{2}", "0.5", 0.0, {"accuracy": 0.0, "format": 0.0}),  # unclosed
    ],
)
def test_math_reward_default_weights(completion, answer, score, parts):
    got_score, got_parts = score_completion(completion, answer, RewardConfig())
    assert got_score == pytest.approx(score)
    assert got_parts == parts


def test_math_reward_min_max_mapping():
    cfg = RewardConfig(reward_min_val=-1.0, reward_max_val=1.0)
    assert score_completion(GOOD, "3", cfg)[0] == pytest.approx(1.0)
    assert score_completion("nothing", "3", cfg)[0] == pytest.approx(-1.0)
    assert score_completion(NO_THINK, "3", cfg)[0] == pytest.approx(-1.0 + 2 * 0.9)
    assert score_completion(GOOD, "4", cfg)[0] == pytest.approx(-1.0 + 2 * 0.1)


def test_math_reward_accuracy_only():
    cfg = RewardConfig(format_pattern=None, reward_min_val=-0.5, reward_max_val=2.0)
    assert score_completion(NO_THINK, "3", cfg) == (2.0, {"accuracy": 1.0})
    assert score_completion(NO_THINK, "4", cfg) == (-0.5, {"accuracy": 0.0})


def test_score_completion_dispatches():
    assert score_completion(GOOD, "3", RewardConfig(type="math"))[0] == 1.0
    choice_cfg = RewardConfig(type="choice", format_pattern=None)
    assert score_completion("The answer is B.", "B", choice_cfg) == (1.0, {"accuracy": 1.0})


NUMBER_PAIRS = [  # (prediction, ground truth): plain numbers, the fast path's domain
    ("1000001", "1000000"), ("1000000", "1000000"), ("12", "12.0"), ("0.5", "0.50"), ("0.5", "0.5000001"),
    ("0.5", "0.500001"), ("3.14159", "3.141592"), ("3.141592", "3.1415926"), ("100", "99.99999"),
    ("100", "99.9999999"), ("-3", "3"), ("-0", "0"), ("7", "7.00"), ("123456789", "123456788"),
    ("2.5", "2.50000001"), ("0.333333", "0.3333333"), ("0.1", "0.10000000001"), ("5", "5.000001"),
    ("5", "5.0000001"), ("12345678.9", "12345678.8"), ("1.0000005", "1.0000004"), ("0.0000001", "0.0000002"),
    ("-2.5", "-2.50"), ("10", "010"), ("0.33", "0.333"), ("12345678901234567890", "12345678901234567891"),
    ("45", "45"), ("45", "-45"), ("2.0", "2"), ("36.87", "36.869898"), ("6.93", "6.928"), ("1.5", "1.50"),
    ("0", "0.0"), ("999999", "1000000"),
]


@pytest.mark.parametrize("pred, answer", NUMBER_PAIRS)
def test_plain_numbers_are_graded_as_math_verify_grades_them(pred, answer):
    """The fast path for plain numbers never disagrees with math-verify (`\\boxed{1000001}` against
    1000000 was graded correct by a relative tolerance of 1e-6)."""
    import math_verify

    gold = math_verify.parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    target = math_verify.parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    assert grade_math(pred, answer) == bool(math_verify.verify(gold, target, timeout_seconds=None))
