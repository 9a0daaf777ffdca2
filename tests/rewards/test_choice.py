import pytest

from lensrl.config import RewardConfig
from lensrl.rewards import extract_choice, score_completion


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{C}", "C"),
        ("so \\boxed{\\text{(D)}}", "D"),
        ("\\boxed{B. the red cube}", "B"),
        ("The answer is C.", "C"),
        ("Answer: (E)", "E"),
        ("answer: **A**", "A"),
        ("B. The gripper is open.", "B"),
        ("(D) because it is closest", "D"),
        ("A", "A"),
        ("I think it is between A and C, so I pick C", "C"),
        ("Option A is wrong. The answer is B, not D.", "B"),  # "answer is" beats later letters
        ("<think>maybe A? The answer is A</think> \\boxed{E}", "E"),
        ("<think>The answer is A</think> I choose D", "D"),  # only after </think>
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


@pytest.mark.parametrize(
    "text",
    ["no letter here", "The answer is F", "I like CATS and DOGS", "", "<think>A</think> unsure"],
)
def test_extract_choice_none(text):
    assert extract_choice(text) is None


def test_extract_choice_num_choices():
    assert extract_choice("The answer is D", num_choices=3) is None
    assert extract_choice("The answer is G", num_choices=8) == "G"


def test_score_completion():
    cfg = RewardConfig(type="choice", format_pattern=None)
    assert score_completion("The answer is B.", "B", cfg) == (1.0, {"accuracy": 1.0})
    assert score_completion("The answer is B.", "c", cfg) == (0.0, {"accuracy": 0.0})
    assert score_completion("\\boxed{B}", "(B)", cfg)[0] == 1.0


def test_choice_reward_format_and_range():
    cfg = RewardConfig(type="choice", reward_min_val=-1.0, reward_max_val=1.0)
    score, parts = score_completion("<think>look</think> \\boxed{A}", "A", cfg)
    assert (score, parts) == (1.0, {"accuracy": 1.0, "format": 1.0})
    score, parts = score_completion("A", "A", cfg)
    assert score == pytest.approx(0.8) and parts == {"accuracy": 1.0, "format": 0.0}
    assert score_completion("B", "A", cfg)[0] == -1.0


def test_choice_reward_bad_answer_key():
    with pytest.raises(ValueError, match="option letter"):
        score_completion("A", "the red one", RewardConfig(type="choice"))
