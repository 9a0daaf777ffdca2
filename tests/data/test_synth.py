"""Synthetic rendered tasks: readable, disjoint splits, balanced, deterministic, gradeable answers."""

from __future__ import annotations

import ast
import collections
import math
import re

import pyarrow.parquet as pq
import pytest

from lensrl.config import DataConfig
from lensrl.data.datasets import load_dataset
from lensrl.data.synth import COLORS, COUNTS, SHAPES, TASKS, Surd, make_synth, render_example, save_preview

EASY_ANSWERS = {"color": set(COLORS), "shape": set(SHAPES), "count": set(COUNTS)}
CHOICE_CFG = DataConfig(
    prompt_key="question", choice_key="choices", answer_key="correct_answer", image_keys=["image"]
)

# Integers, k\sqrt{m}, and \frac{...}{d} of either: the forms geometry3k answers take.
ANSWER_FORM = re.compile(r"(\d+)|(\d*)\\sqrt\{(\d+)\}|\\frac\{(\d*)(?:\\sqrt\{(\d+)\})?\}\{(\d+)\}")


def latex_value(answer: str) -> float:
    match = ANSWER_FORM.fullmatch(answer)
    assert match, f"unexpected answer form {answer!r}"
    integer, k, m, frac_k, frac_m, den = match.groups()
    if integer:
        return int(integer)
    if m:
        assert _squarefree(int(m)), answer
        return int(k or 1) * math.sqrt(int(m))
    assert frac_k or frac_m, answer
    if frac_m:
        assert _squarefree(int(frac_m)), answer
    numerator, root, den = int(frac_k or 1), int(frac_m or 1), int(den)
    assert den > 1 and math.gcd(numerator, den) == 1, f"{answer!r} is not in lowest terms"
    return numerator * math.sqrt(root) / den


def _squarefree(n: int) -> bool:
    return n > 1 and all(n % (f * f) for f in range(2, int(math.isqrt(n)) + 1))


def image_bytes(table, column="images"):
    values = table.column(column).to_pylist()
    return [(v[0] if isinstance(v, list) else v)["bytes"] for v in values]


@pytest.mark.parametrize("task", TASKS)
def test_each_task_writes_readable_disjoint_splits(tmp_path, task):
    paths = make_synth(task, n=60, seed=0, out_dir=tmp_path, n_test=20)
    train, test = pq.read_table(paths["train"]), pq.read_table(paths["test"])
    assert (train.num_rows, test.num_rows) == (60, 20)
    assert not set(image_bytes(train)) & set(image_bytes(test))
    assert len(set(train.column("problem").to_pylist())) == 1  # only the image tells the answer

    dataset = load_dataset([paths["train"]], DataConfig(), "train")
    sample = dataset[0]
    assert sample.prompt.startswith("<image>") and len(sample.prompt) < (90 if task == "box" else 40)
    image = sample.load_images()[0]
    assert image.size == ((56, 56) if task in EASY_ANSWERS or task == "box" else (112, 112))
    if task in EASY_ANSWERS:
        assert {s.answer for s in dataset} == EASY_ANSWERS[task]


@pytest.mark.parametrize("task", ["color", "shape", "count", "geo"])
def test_answers_are_balanced(tmp_path, task):
    if task in EASY_ANSWERS:
        make_synth(task, n=100, seed=1, out_dir=tmp_path)
        labels = pq.read_table(tmp_path / "train.parquet").column("answer").to_pylist()
    else:  # geo: balanced over the kinds of problem (the tag column of the choice layout)
        make_synth(task, n=100, seed=1, out_dir=tmp_path, fmt="choice")
        labels = pq.read_table(tmp_path / "train.parquet").column("tag").to_pylist()
    counts = collections.Counter(labels)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_deterministic_by_seed(tmp_path):
    a = make_synth("count", n=30, seed=5, out_dir=tmp_path / "a")
    b = make_synth("count", n=30, seed=5, out_dir=tmp_path / "b")
    c = make_synth("count", n=30, seed=6, out_dir=tmp_path / "c")
    for split in ("train", "test"):
        assert pq.read_table(a[split]).equals(pq.read_table(b[split]))
    assert image_bytes(pq.read_table(a["train"])) != image_bytes(pq.read_table(c["train"]))


def test_image_size_is_a_parameter(tmp_path):
    paths = make_synth("shape", n=5, seed=0, out_dir=tmp_path, image_size=84)
    assert load_dataset(paths["test"], DataConfig())[0].load_images()[0].size == (84, 84)


@pytest.mark.parametrize("task", ["angle", "geo"])
def test_geo_answers_are_gradeable(tmp_path, task):
    make_synth(task, n=150, seed=2, out_dir=tmp_path)
    answers = pq.read_table(tmp_path / "train.parquet").column("answer").to_pylist()
    values = [latex_value(a) for a in answers]
    assert all(v > 0 for v in values)
    if task == "angle":
        assert all(a.isdigit() and 0 < int(a) < 180 for a in answers)
    else:
        assert any("\\sqrt" in a for a in answers) and any("\\frac" in a for a in answers)
        assert any(a.isdigit() for a in answers)


def test_geo_answers_parse_with_math_verify(tmp_path):
    math_verify = pytest.importorskip("math_verify")
    make_synth("geo", n=40, seed=3, out_dir=tmp_path)
    for answer in pq.read_table(tmp_path / "train.parquet").column("answer").to_pylist():
        parsed = math_verify.parse(f"${answer}$")
        assert parsed, answer
        assert abs(float(parsed[0].evalf()) - latex_value(answer)) < 1e-9
        assert math_verify.verify(parsed, math_verify.parse(f"\\boxed{{{answer}}}"))


def test_surd_latex():
    assert Surd(8, 1, 2).latex() == "4"
    assert Surd(5, 1, 2).latex() == "\\frac{5}{2}"
    assert Surd(1, 48).latex() == "4\\sqrt{3}"
    assert Surd(7, 3, 2).latex() == "\\frac{7\\sqrt{3}}{2}"
    assert Surd(1, 13).latex() == "\\sqrt{13}"
    assert Surd(1, 25).latex() == "5"


@pytest.mark.parametrize("task", ["color", "geo"])
def test_choice_format_in_robo2vlm_layout(tmp_path, task):
    paths = make_synth(task, n=40, seed=0, out_dir=tmp_path, fmt="choice")
    table = pq.read_table(paths["train"])
    assert table.column_names == ["id", "question", "choices", "correct_answer", "image", "tag"]
    choices = [ast.literal_eval(c) for c in table.column("choices").to_pylist()]
    assert all(len(c) == 4 and len(set(c)) == 4 for c in choices)
    positions = collections.Counter(table.column("correct_answer").to_pylist())
    assert sorted(positions) == [0, 1, 2, 3] and max(positions.values()) - min(positions.values()) <= 1
    test = pq.read_table(paths["test"])
    assert not set(image_bytes(table, "image")) & set(image_bytes(test, "image"))

    dataset = load_dataset(paths["train"], CHOICE_CFG, "train")
    sample = dataset[0]
    assert sample.target == f"{sample.answer}. {choices[0][table.column('correct_answer')[0].as_py()]}"
    if task == "color":
        assert sample.target.split(". ", 1)[1] in COLORS


def test_render_example_and_preview(tmp_path):
    item = render_example("geo", seed=0, index=3)
    assert item.image.size == (112, 112) and item.question == "Find x."
    assert item.answer not in item.distractors
    answers = save_preview("color", tmp_path / "preview.png", num=10)
    assert len(answers) == 10 and (tmp_path / "preview.png").stat().st_size > 0


def test_a_thousand_rows_render_quickly(tmp_path):
    import time

    start = time.perf_counter()
    make_synth("color", n=1000, seed=0, out_dir=tmp_path, n_test=1)
    assert time.perf_counter() - start < 10


def test_box_answers_are_the_drawn_shapes_bounding_boxes(tmp_path):
    """Every pixel of the shape lies inside the answer box, and each side of the box touches it."""
    import json

    import numpy as np

    paths = make_synth("box", n=12, seed=3, out_dir=tmp_path, n_test=2)
    for sample in load_dataset([paths["train"]], DataConfig(), "train"):
        x1, y1, x2, y2 = json.loads(sample.answer)
        ink = np.asarray(sample.load_images()[0].convert("L")) < 250  # (H, W)
        ys, xs = np.nonzero(ink)
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x1, y1, x2, y2)
