"""Run loggers against the real libraries: wandb in offline mode (no network), PIL images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# wandb starts its service process per run; every case runs in a child so the test process keeps
# none of wandb's global state (and its offline files are all written when the child exits).
SCRIPT = r"""
import sys
from PIL import Image
from lensrl.logging import RunLogger

run_dir, start = sys.argv[1], int(sys.argv[2])
logger = RunLogger(run_dir, ["wandb"], total_steps=4, config={"a": 1}, run_name="r", start_step=start)
logger.log({"critic/score/mean": 0.5 + start}, step=start + 1)
logger.log_generations(start + 1, [{"prompt": "what colour?", "completion": "red", "answer": "red", "reward": 1.0,
                                    "image": Image.new("RGB", (8, 8), "red")}])
logger.close()
"""


def _run(run_dir, start: int) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir), str(start)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_resumed_run_continues_the_same_wandb_run_and_logs_generations_with_images(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    _run(run_dir, 0)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    _run(run_dir, 1)  # the resumed run (trainer.resume=auto builds its logger in the same folder)
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    offline = sorted(p for p in (run_dir / "wandb").iterdir() if p.name.startswith("offline-run-"))
    assert offline and all(p.name.endswith(f"-{run_id}") for p in offline)
    tables = list((run_dir / "wandb").rglob("*.table.json"))
    assert tables, "no wandb Table of generations was written"
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "image", "completion", "answer", "reward"]
    assert table["data"][0][1] == "what colour?" and table["data"][0][5] == 1.0
    assert list((run_dir / "wandb").rglob("media/images/val/generations/*.png"))  # the prompt's image went with it


def test_a_new_run_folder_starts_a_new_wandb_run(tmp_path):
    pytest.importorskip("wandb")
    _run(tmp_path / "a", 0)
    _run(tmp_path / "b", 0)
    assert (tmp_path / "a" / "wandb_run_id").read_text() != (tmp_path / "b" / "wandb_run_id").read_text()


def test_generations_need_no_image(tmp_path):
    from lensrl.logging import RunLogger

    logger = RunLogger(tmp_path, ["tensorboard"], total_steps=1)
    logger.log_generations(0, [{"prompt": "p | q", "completion": "a\nb", "answer": 1, "reward": 0.0, "image": None}])
    logger.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    table = events.Tensors("val/generations/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "p \\| q" in table and "a<br>b" in table  # escaped for the markdown table


def test_a_progress_bar_shows_its_description_as_written():
    """Bracketed words ("[train] ...", the dataset scan's) are text, not rich markup to swallow."""
    code = ("from lensrl.logging import progress_bar\n"
            "with progress_bar('[train] measuring prompts', 3) as advance:\n"
            "    advance(3)\n")
    env = {**os.environ, "TTY_INTERACTIVE": "1", "TTY_COMPATIBLE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[train] measuring prompts" in result.stderr and "3/3" in result.stderr
