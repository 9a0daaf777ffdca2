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


CHOICES = ["red cube", "blue cylinder", "green sphere", "yellow cone"]

LABELLED = [  # (response, the letter it picks or None); choices A-D are CHOICES above
    # ordinary sentences that start with the article "A" or the pronoun "I" pick nothing by that
    ("A gripper is visible above the cube; I pick option C.", "C"),
    ("A robot arm holds the object. The answer is B.", "B"),
    ("I see the gripper to the left, so the answer is D.", "D"),
    ("I am not sure which one it is.", None),
    ("A cube and a sphere are on the table.", None),
    ("I think the arm will move up next.", None),
    ("A small object lies near the edge.", None),
    ("In the image I see a gripper. Answer: C", "C"),
    ("A", "A"),
    ("A.", "A"),
    ("(B)", "B"),
    ("**C**", "C"),
    ("D) yellow cone", "D"),
    ("B. The gripper is closed.", "B"),
    ("C: the green one", "C"),
    ("The correct option is D.", "D"),
    ("My choice is B", "B"),
    ("I choose A because it is nearest.", "A"),
    ("I would go with option C.", "C"),
    ("Let me select B.", "B"),
    ("The final answer is (A).", "A"),
    ("answer: **D**", "D"),
    ("Answer - B", "B"),
    ("\\boxed{C}", "C"),
    ("So the result is \\boxed{\\text{(D)}}.", "D"),
    ("\\boxed{blue cylinder}", "B"),
    ("It is the green sphere.", "C"),
    ("The robot picks up the yellow cone.", "D"),
    ("Either the red cube or the blue cylinder.", None),  # two choices named: no pick
    ("The red cube, clearly.", "A"),
    ("Option A is tempting, but the answer is C.", "C"),
    ("(A) looks right at first; the answer is (B).", "B"),
    ("The answer is Apple.", None),  # a word, not a letter
    ("I'd say B is wrong and D is right.", "D"),  # a verdict on D
    ("<think>A is likely. Or I?</think> The answer is B.", "B"),
    ("<think>The answer is A</think> I choose D", "D"),
    ("<think>Hmm.</think>\nC. yellow? no, C is the green sphere", "C"),
    ("Is it A or B? I cannot tell.", None),
    ("The arm moves toward object B in the picture.", None),
    ("A: the gripper is above it.", "A"),
    ("It is not E.", None),  # only A-D exist
    ("", None),
    ("no letter here", None),
    ("I like CATS and DOGS", None),
    ("The answer is A green sphere.", "C"),  # "A" is the article: the choice is named
    ("The answer is c", "C"),
    ("(b)", "B"),
    ("d", "D"),
    ("C is correct.", "C"),
    ("B is the answer.", "B"),
    ("I think it is C.", "C"),
    ("The answer is a blue cylinder.", "B"),
]


@pytest.mark.parametrize("text, expected", LABELLED)
def test_a_letter_counts_only_where_it_stands_as_an_answer(text, expected):
    assert extract_choice(text, num_choices=4, choices=CHOICES) == expected


def test_a_policy_cannot_win_by_starting_with_the_article_a():
    """"A ..." sentences scored as option A taught policies to open every answer with "A"."""
    sample = {"answer": "A", "choices": CHOICES}
    cfg = RewardConfig(type="choice", format_pattern=None)
    assert score_completion("A gripper is above the cube, which is blue.", sample, cfg)[0] == 0.0
    assert score_completion("The answer is A.", sample, cfg)[0] == 1.0
