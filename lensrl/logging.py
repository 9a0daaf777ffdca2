"""Where a run's numbers go: console progress, metrics.jsonl, TensorBoard events, wandb, samples/.

Only rank 0 writes; other ranks get a `RunLogger` whose methods do nothing, so trainers call it
unconditionally.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, highlight=False)

@contextlib.contextmanager
def progress_bar(description: str, total: int, show: bool = True) -> Iterator[Callable[[int], None]]:
    """A transient rich progress bar with ETA on the console (stderr) for a long phase; yields
    `advance(n)`. Nothing is drawn when not `show` (other ranks) or when stderr is no terminal."""
    if not show or total <= 0:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(escape(description), total=total)  # "[train] ..." is text, not markup
        yield lambda n: bar.advance(task, n)


# The numbers the progress line shows when the step logged them (first found wins).
_PROGRESS_KEYS = {
    "loss": ("train/loss",),
    "reward": ("critic/score/mean",),
    "acc": ("reward/accuracy",),
    "val": ("val/accuracy", "val/reward/mean"),
}


class RunLogger:
    """Fan metrics out to the configured sinks: "console", "jsonl", "tensorboard", "wandb"."""

    def __init__(
        self,
        run_dir: str | Path,
        loggers: list[str],
        total_steps: int,
        config: dict[str, Any] | None = None,
        run_name: str = "run",
        wandb_project: str = "lensrl",
        enabled: bool = True,
        start_step: int = 0,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.loggers = set(loggers)
        unknown = self.loggers - {"console", "jsonl", "tensorboard", "wandb"}
        if unknown:
            raise ValueError(f"unknown logger(s) {sorted(unknown)}; choose from console, jsonl, tensorboard, wandb")
        self._tb = None
        self._wandb = None
        self._jsonl = None
        self._start_time = time.time()
        self._start_step = start_step
        self._last: dict[str, float] = {}
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if "jsonl" in self.loggers:
            settle_metrics(self.run_dir / "metrics.jsonl", start_step)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if "tensorboard" in self.loggers:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events a crashed run logged after the step this one resumes from are
            # dropped, so no step is plotted twice (TensorBoard's own mechanism for resumes)
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        if "wandb" in self.loggers:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("trainer.loggers has 'wandb' but wandb is not installed: pip install 'lensrl[wandb]'") from None
            # one wandb run per run folder: a resumed run continues the same curves (its id is kept
            # in the folder; wandb's own resume="allow" needs it)
            id_file = self.run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
            self._wandb = wandb.init(project=wandb_project, name=run_name, id=run_id, config=config,
                                     dir=str(self.run_dir), resume="allow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._last = clean
        if self._jsonl is not None:
            record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
            self._jsonl.write(json.dumps(record) + "\n")  # one whole line per write
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def progress(self, step: int, extra: str = "") -> None:
        """One line per step: step, elapsed<ETA, reward, accuracy."""
        if not (self.enabled and "console" in self.loggers):
            return
        elapsed = time.time() - self._start_time
        done = max(step - self._start_step, 1)
        eta = elapsed / done * max(self.total_steps - step, 0)
        parts = [f"step {step}/{self.total_steps}", f"[{_clock(elapsed)}<{_clock(eta)}]"]
        for label, keys in _PROGRESS_KEYS.items():
            value = next((self._last[k] for k in keys if k in self._last), None)
            if value is not None:
                parts.append(f"{label}={value:.3f}")
        if extra:
            parts.append(extra)
        console.print(" ".join(parts))

    def info(self, message: str) -> None:
        if self.enabled and "console" in self.loggers:
            console.print(message)

    def log_generations(self, step: int, rows: list[dict[str, Any]], tag: str = "val/generations") -> None:
        """A few generations (EasyR1's val_generations_to_log) to TensorBoard and wandb. rows: dicts
        with prompt, completion, answer, reward and "image" (a PIL image or None). TensorBoard: one
        markdown table as text under `tag` and each image under `tag/<i>`; wandb: a Table under `tag`
        and the images, captioned with their completions, under `tag/images`."""
        if not self.enabled or not rows:
            return
        def cell(text: Any) -> str:
            return str(text).replace("|", "\\|").replace("\n", "<br>")

        if self._tb is not None:
            import numpy as np

            lines = ["| # | prompt | completion | answer | reward |", "|---|---|---|---|---|"]
            lines += [f"| {i} | {cell(r['prompt'])} | {cell(r['completion'])} | {cell(r['answer'])} | {r['reward']:.3f} |"
                      for i, r in enumerate(rows)]
            self._tb.add_text(tag, "\n".join(lines), step)
            for i, r in enumerate(rows):
                if r.get("image") is not None:
                    self._tb.add_image(f"{tag}/{i}", np.asarray(r["image"].convert("RGB")), step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            import wandb

            table = wandb.Table(columns=["step", "prompt", "image", "completion", "answer", "reward"])
            images = []
            for i, r in enumerate(rows):
                image = wandb.Image(r["image"], caption=f"{i}: {r['completion'][:200]}") if r.get("image") is not None \
                    else None
                table.add_data(step, r["prompt"], image, r["completion"], str(r["answer"]), r["reward"])
                images += [image] if image is not None else []
            # the images also on their own (media panel): offline runs keep a Table's images only as a reference
            self._wandb.log({tag: table, **({f"{tag}/images": images} if images else {})}, step=step)

    def write_samples(self, step: int, records: list[dict[str, Any]], name: str = "train") -> None:
        """Append a few samples (prompt, image reference, completion, reward) to samples/<name>_step_N.jsonl."""
        if not self.enabled or not records:
            return
        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        with open(folder / f"{name}_step_{step}.jsonl", "w") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60:02d}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}"


def settle_metrics(path: Path, start_step: int) -> int:
    """Make `path` (a run's metrics.jsonl) the record of steps 1..`start_step` only, before a run
    that starts (or resumes) at `start_step` appends to it: records of later steps (logged by a
    run that crashed before its next checkpoint, which this run will log again) and lines that are
    not whole JSON records (a crash mid-write) move, in order, to metrics.after_step_N.jsonl beside
    it, never deleted. Returns the number of lines moved."""
    if not path.is_file():
        return 0
    keep, aside = [], []
    for line in path.read_text(errors="replace").splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            whole = line.endswith("\n") and isinstance(record, dict) and isinstance(record.get("step"), int)
        except ValueError:
            whole = False
        (keep if whole and record["step"] <= start_step else aside).append(line)
    if not aside:
        return 0
    with open(path.with_name(f"metrics.after_step_{start_step}.jsonl"), "a") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in aside)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)

    console.print(f"[yellow]{escape(str(path))}: {len(aside)} line(s) after step {start_step} (a run that stopped "
                  f"before its next checkpoint, or a cut line) moved to metrics.after_step_{start_step}.jsonl"
                  "[/yellow]", soft_wrap=True)
    return len(aside)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def is_interactive() -> bool:
    return sys.stderr.isatty()
