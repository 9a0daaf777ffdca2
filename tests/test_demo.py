"""The README's main command: `lensrl demo` makes a model and data, SFTs, GRPOs and shows a gain."""

from __future__ import annotations

import json
import subprocess
import sys

from lensrl.demo import run_demo


def test_demo_grpo_raises_heldout_accuracy_over_sft(tmp_path):
    """One seed at reduced size (the full three-seed demo is benchmarks/demo_seeds.py)."""
    result = run_demo(str(tmp_path / "demo"), seed=1, quick=True)
    assert result["untrained"] < 0.3
    assert result["grpo"] - result["sft"] >= 0.10, result
    saved = json.loads((tmp_path / "demo" / "demo_result.json").read_text())
    assert saved["grpo"] == result["grpo"]
    for phase in ("sft", "grpo"):
        run = tmp_path / "demo" / "runs" / phase
        assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
        assert (run / "hf" / "model.safetensors").is_file()
        assert any((run / "tensorboard").iterdir())


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "lensrl", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "grpo", "sft", "eval", "data", "model", "config"):
        assert command in out
