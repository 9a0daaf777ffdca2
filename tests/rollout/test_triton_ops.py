"""The engine's Triton kernels on CPU, under Triton's interpreter (skipped without Triton).

The checks run in a fresh process (triton_interpreter_checks.py) because TRITON_INTERPRET must be
set before triton is first imported. On GPU the engine also checks the kernels against its torch
ops before using them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_match_torch_ops_and_the_engine_matches_generate(tiny_qwen25_dir):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(HERE / "triton_interpreter_checks.py"), str(tiny_qwen25_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=HERE.parents[1],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "engine on Triton kernels matches generate" in result.stdout
