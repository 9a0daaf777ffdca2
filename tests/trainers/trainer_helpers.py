"""Helpers shared by the trainer tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def grpo_overrides(model_dir: Path, data: Path, out: Path, name: str = "run", *extra: str) -> list[str]:
    """A GRPO run small enough for a test: 4 prompts x 4 completions of at most 6 tokens."""
    return [
        f"model.path={model_dir}", f"data.train_files=[{data / 'train.parquet'}]",
        f"data.val_files=[{data / 'test.parquet'}]", "data.max_prompt_length=64", "rollout.backend=hf",
        "rollout.n=4", "rollout.max_new_tokens=6", "trainer.rollout_batch_size=4", "actor.mini_batch_size=4",
        "actor.micro_batch_size=8", "actor.optim.lr=1e-3", "reward.format_pattern=null", "reward.num_workers=1",
        "trainer.total_steps=2", "trainer.test_freq=0", "trainer.val_before_train=false",
        f"trainer.output_dir={out}", f"trainer.run_name={name}", "trainer.loggers=[jsonl]", *extra,
    ]


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lensrl", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=kwargs.pop("cwd", None), **kwargs)


def run_main(capsys, *args: str) -> tuple[int, str]:
    """`lensrl ARGS` in this process (the CLI's own main: argument parsing, checks, error
    messages): (exit code, stderr). For commands that stop before a model trains: a subprocess
    costs seconds of imports each."""
    from transformers.utils import logging as hf_logging

    from lensrl.cli import main

    capsys.readouterr()
    bars = hf_logging.is_progress_bar_enabled()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    return code, capsys.readouterr().err
