"""Rewards of a user's own: `reward.function: file.py:name`, loaded, called and guarded like the
built-ins (real files, real worker processes)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lensrl.config import ConfigError, GRPOConfig, RewardConfig, load_config
from lensrl.rewards import RewardPool
from lensrl.rewards.function import RewardFunctionError, load_function

REPO = Path(__file__).resolve().parents[2]

USER_REWARDS = textwrap.dedent('''
    import json

    def length_and_answer(completion, sample, bonus=0.0):
        """A dict with a score and named parts, using a keyword argument and another column."""
        right = 1.0 if sample["answer"] in completion else 0.0
        return {"score": right + bonus * sample["difficulty"], "right": right, "chars": float(len(completion))}

    def plain(completion, sample):
        return 0.25

    def raises(completion, sample):
        return {"score": 1.0 / 0.0}

    def not_a_number(completion, sample):
        return "high"

    def hangs(completion, sample):
        while True:
            pass

    def eats_memory(completion, sample):
        return len(bytearray(64 * 2**30))
''')


@pytest.fixture(scope="module")
def rewards_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_a_function_named_by_file_or_module_loads(rewards_file):
    assert load_function(f"{rewards_file}:plain")("x", {}) == 0.25
    assert load_function("lensrl.rewards.math:math_reward").__name__ == "math_reward"


@pytest.mark.parametrize("spec, expected", [
    ("{dir}/nope.py:f", "file {dir}/nope.py not found"),
    ("{file}:missing", "no function 'missing' in {file} (functions there: eats_memory, hangs, length_and_answer,"),
    ("{file}", "expected 'path/to/file.py:function'"),
    ("no_such_module:f", "cannot import module 'no_such_module'"),
])
def test_a_missing_file_or_function_fails_with_the_config(rewards_file, spec, expected):
    spec = spec.format(dir=rewards_file.parent, file=rewards_file)
    with pytest.raises(ConfigError) as e:
        load_config(GRPOConfig, None, ["data.train_files=[t.parquet]", f"reward.function={spec}"])
    assert expected.format(dir=rewards_file.parent, file=rewards_file) in str(e.value)


def test_the_pool_runs_a_users_function_with_its_kwargs_and_columns(rewards_file):
    cfg = RewardConfig(function=f"{rewards_file}:length_and_answer", function_kwargs={"bonus": 0.5}, num_workers=2)
    with RewardPool(cfg) as pool:
        right, wrong = pool.score_batch([("it is 42", {"answer": "42", "difficulty": 2}),
                                         ("no idea", {"answer": "42", "difficulty": 2})])
    assert (right.status, right.score, right.parts) == ("ok", 2.0, {"right": 1.0, "chars": 8.0})
    assert (wrong.score, wrong.parts["right"]) == (1.0, 0.0)


@pytest.mark.parametrize("name, status, detail", [
    ("raises", "error", "ZeroDivisionError"),
    ("not_a_number", "error", "returned score 'high'; expected a finite number"),
    ("hangs", "timeout", "longer than 1.0s"),
    ("eats_memory", "error", "MemoryError"),
])
def test_a_failing_function_scores_the_minimum_and_says_why(rewards_file, name, status, detail):
    cfg = RewardConfig(function=f"{rewards_file}:{name}", num_workers=1, timeout_s=1.0, reward_min_val=-1.0)
    with RewardPool(cfg) as pool:
        (result,) = pool.score_batch([("x", {"answer": "1"})])
    assert (result.status, result.score) == (status, -1.0)
    assert detail in result.detail
    if status == "error" and name == "raises":
        assert "Traceback" in result.detail and "in raises" in result.detail  # the function's own frame


def test_a_plain_float_is_a_score_without_parts(rewards_file):
    with RewardPool(RewardConfig(function=f"{rewards_file}:plain", num_workers=0)) as pool:
        (result,) = pool.score_batch([("x", {"answer": "1"})])
    assert (result.score, result.parts) == (0.25, {})


def test_the_box_iou_recipe_reward():
    box = load_function(str(REPO / "configs" / "rewards" / "box_iou.py") + ":box_iou")
    assert box("[10, 10, 19, 19]", {"answer": "[10, 10, 19, 19]"}) == {"score": 1.0, "iou": 1.0, "format": 1.0}
    half = box("The box is [10, 10, 19, 14].", {"answer": "[10, 10, 19, 19]"})
    assert half["iou"] == pytest.approx(0.5) and half["score"] == pytest.approx(0.9 * 0.5 + 0.1)
    assert box("somewhere", {"answer": "[0, 0, 5, 5]"})["score"] == 0.0


def test_numpy_and_torch_numbers_are_scores_and_bad_parts_are_refused():
    import numpy as np
    import torch

    from lensrl.rewards.function import call_reward

    for value in (np.float32(0.5), np.int64(1), torch.tensor(0.25), 1):
        score, _ = call_reward(lambda c, s, v=value: {"score": v, "part": v}, {}, "x", {})
        assert score == float(value)
    with pytest.raises(RewardFunctionError, match="not finite numbers"):
        call_reward(lambda c, s: {"score": 1.0, "x": float("nan")}, {}, "x", {})
    with pytest.raises(RewardFunctionError, match=r"parts named \['errors', 'mean'\]: those names are lensrl's"):
        call_reward(lambda c, s: {"score": 1.0, "mean": 0.0, "errors": 0.0}, {}, "x", {})


def test_a_function_that_cannot_be_called_so_fails_with_the_config(rewards_file):
    with pytest.raises(ConfigError, match=r"cannot be called as fn\(completion, sample, bonuss=...\)"):
        load_config(GRPOConfig, None, ["data.train_files=[t.parquet]", f"reward.function={rewards_file}:length_and_answer",
                                       "reward.function_kwargs={bonuss: 1}"])
    with pytest.raises(ConfigError, match="reward.function_kwargs is set but reward.function is not"):
        load_config(GRPOConfig, None, ["data.train_files=[t.parquet]", "reward.function_kwargs={bonus: 1}"])
    with pytest.raises(ConfigError, match="reward.type=choice grades option letters: set data.choice_key"):
        load_config(GRPOConfig, None, ["data.train_files=[t.parquet]", "reward.type=choice"])


def test_a_module_in_the_working_directory_loads_however_lensrl_was_started(tmp_path, monkeypatch):
    import sys

    (tmp_path / "cwd_rewards_mod.py").write_text("def r(completion, sample):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_function("cwd_rewards_mod:r")("x", {}) == 1.0
