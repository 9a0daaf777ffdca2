"""`lensrl report RUN [RUN ...] [--out DIR]`: what run folders logged, as PNG plots and one HTML page.

    lensrl report runs/grpo                     runs/grpo/report/report.html, one PNG per topic beside it
    lensrl report runs/a runs/b --out cmp       cmp/report.html: the runs overlaid, one colour each

The report is a folder: `report.html` refers to its plots (`<topic>.png`) and to the sample images
(`images/*.png`) by relative path, so the folder is the report: copy or serve it whole. Nothing outside
it is referenced and nothing is fetched from the network. The page holds the plots (one figure per
topic, one panel per metric, every run overlaid with its folder name in the legend, x = step; the
time split of a step as stacked bars, one panel per run), a summary table (last values, best
validation and its step, steps, time), sample completions of the first and last logged step beside
their images and rewards, and each run's config.yaml.

Metric names are looked up by the candidate keys in `METRICS` (and the key families below it): the
first key a record has wins, the new (verl) name first, so runs logged before and after the rename
plot alike. A topic no run has data for gets no figure; the page says which topics had none.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------
# Metric names: each concept by its candidate keys, first match wins, the new (verl) name first.
# This is the one place that knows the names; everything below asks it.
# ------------------------------------------------------------------------------------------------
METRICS: dict[str, tuple[str, ...]] = {
    # GRPO
    "score": ("critic/score/mean", "reward/mean"),
    "entropy": ("actor/entropy",),
    "response_length": ("response_length/mean",),
    "clip_ratio": ("response_length/clip_ratio",),
    "train_kl": ("rollout/train_kl",),
    "is_weight_mean": ("rollout/is_weight_mean",),
    "is_clip_frac": ("rollout/is_clip_frac",),
    "pg_clipfrac": ("actor/pg_clipfrac",),
    "pg_clipfrac_lower": ("actor/pg_clipfrac_lower",),
    "pg_loss": ("actor/pg_loss",),
    "kl_loss": ("actor/kl_loss",),
    # SFT (sft.py logs train/loss, train/grad_norm, train/lr)
    "sft_loss": ("train/loss",),
    # both
    "grad_norm": ("actor/grad_norm", "train/grad_norm"),
    "lr": ("actor/lr", "train/lr"),
    "val_accuracy": ("val/accuracy",),
    "val_reward": ("val/reward/mean",),
    "throughput": ("perf/throughput",),
    "throughput_per_gpu": ("perf/throughput_per_gpu",),
    "mfu": ("perf/mfu/actor", "perf/mfu"),
    "gpu_memory": ("perf/max_memory_allocated_gb",),
    "cpu_memory": ("perf/cpu_memory_used_gb", "perf/cpu_memory_gb"),
    # time per step (every other timing_s/* key is plotted under its own name)
    "time_step": ("timing_s/step",),
    "time_old_log_prob": ("timing_s/old_log_prob", "timing_s/old_logprob"),
    "time_update_actor": ("timing_s/update_actor", "timing_s/update"),
    "time_update_weights": ("timing_s/update_weights", "timing_s/weight_sync"),
    "time_testing": ("timing_s/testing", "timing_s/val"),
}
# Key families, as templates; the same rule: the first template a record has wins.
VAL_PER_SOURCE = ("val-core/{source}/{kind}/mean@{n}", "val/{source}/{kind}/mean@{n}")  # kind: acc | reward
REWARD_PART = "reward/{part}"
NOT_REWARD_PARTS = {"mean", "std", "errors", "timeouts", "worker_restarts", "worker_deaths", "grader_timeouts"}
TIMING_PREFIX = "timing_s/"

# Topics: (file stem, heading, panels as (title, METRICS name)); "reward", "validation" and
# "timing" also get the panels of their key families; "time_split" is one stacked-bar panel per run.
TOPICS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("reward", "Reward", [("score (mean reward)", "score")]),
    ("validation", "Validation", [("accuracy", "val_accuracy"), ("mean reward", "val_reward")]),
    ("loss", "Loss", [("SFT loss", "sft_loss"), ("policy loss", "pg_loss"), ("KL loss", "kl_loss")]),
    ("entropy", "Entropy", [("entropy", "entropy")]),
    ("response_length", "Response length", [("mean length (tokens)", "response_length"),
                                            ("clip ratio (hit max_new_tokens)", "clip_ratio")]),
    ("rollout_gap", "Rollout vs training (KL, IS weights)", [("rollout-train KL", "train_kl"),
                                                             ("IS weight mean", "is_weight_mean"),
                                                             ("IS clip fraction", "is_clip_frac")]),
    ("clip_fraction", "PPO clip fractions", [("clip fraction", "pg_clipfrac"),
                                             ("clip fraction (lower, dual clip)", "pg_clipfrac_lower")]),
    ("optimizer", "Gradient norm and learning rate", [("grad norm", "grad_norm"), ("learning rate", "lr")]),
    ("time_split", "Where a step's time goes (s, stacked)", []),
    ("timing", "Time per step and phase (s)", []),
    ("throughput", "Throughput, MFU, memory", [("tokens/s", "throughput"), ("tokens/s per GPU", "throughput_per_gpu"),
                                               ("MFU", "mfu"), ("GPU memory (GB, peak)", "gpu_memory"),
                                               ("CPU memory (GB)", "cpu_memory")]),
]
# Phases of a step in the order they run (timing panels follow it; others after, alphabetically).
TIMING_ORDER = ["step", "data", "gen", "reward", "adv", "spread", "old_log_prob", "router_mismatch", "ref",
                "update_actor", "update_weights", "testing"]
# The summary table: (row label, METRICS name), last logged value of each run.
SUMMARY_LAST = [("score (mean reward)", "score"), ("validation accuracy", "val_accuracy"),
                ("validation mean reward", "val_reward"), ("SFT loss", "sft_loss"), ("policy loss", "pg_loss"),
                ("entropy", "entropy"), ("response length", "response_length"), ("grad norm", "grad_norm"),
                ("learning rate", "lr"), ("step time (s)", "time_step"), ("tokens/s", "throughput"), ("MFU", "mfu")]
SAMPLE_FILE = re.compile(r"^(?:(?P<kind>[A-Za-z0-9-]+)_)?step_(?P<step>\d+)\.jsonl$")
IMAGE_ORIGIN = re.compile(r"^(?P<path>.+) row (?P<row>\d+) column '(?P<key>.+)'\[(?P<index>\d+)\]$")
THUMBNAIL = 256  # longest side of a sample image in the report, pixels


class ReportError(ValueError):
    """Input `lensrl report` cannot use: the message names the path and what was expected."""


@dataclass
class Run:
    """One run folder as the report reads it."""

    path: Path
    label: str
    records: list[dict[str, Any]]  # metrics.jsonl, in order; non-finite values as float('nan'/'inf')
    config_text: str | None  # config.yaml as written
    samples: dict[str, dict[int, Path]] = field(default_factory=dict)  # kind ("train", "val") -> step -> file
    warnings: list[str] = field(default_factory=list)

    def keys(self) -> set[str]:
        return {k for r in self.records for k in r}


@dataclass
class Report:
    """What `write_report` wrote: the page, one PNG per topic drawn, the topics without data."""

    html: Path
    figures: dict[str, Path]
    empty_topics: list[str]
    warnings: list[str]


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a metrics.jsonl file, in order, and warnings.

    Values logged as strings ("nan", "inf": `RunLogger.log` writes non-finite numbers so) become
    floats. A last line without its newline (a write cut by a crash, which a resumed run moves to
    metrics.after_step_N.jsonl) is skipped with a warning. Raises ReportError naming the file and
    line for any other line that is not a JSON object with an integer "step"."""
    path = Path(path)
    records, warnings = [], []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror or e})") from None
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cut = number == len(lines)  # the text after the last newline: an unfinished write
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a JSON object with an integer 'step'")
        except ValueError as e:
            if cut:
                warnings.append(f"{path} line {number}: an unfinished last line (a cut write), skipped")
                continue
            reason = "not valid JSON" if isinstance(e, json.JSONDecodeError) else str(e)
            raise ReportError(f"{path} line {number}: {reason} (expected one JSON record per line, as lensrl "
                              f"writes: {line.strip()[:80]!r})") from None
        records.append({k: _number(v) for k, v in record.items()})
    return records, warnings


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)  # "nan", "inf", "-inf"
        except ValueError:
            return value
    return value


def load_run(path: str | Path, label: str | None = None) -> Run:
    """A run folder (`runs/NAME`: metrics.jsonl, config.yaml, samples/) as a Run.

    Raises ReportError when `path` is not a folder, has no metrics.jsonl, or its metrics.jsonl has
    a malformed line (`read_records`)."""
    path = Path(path)
    expected = "a run folder holding metrics.jsonl (trainer.output_dir/trainer.run_name of lensrl grpo or sft)"
    if not path.exists():
        raise ReportError(f"{path}: no such folder; expected {expected}")
    if not path.is_dir():
        raise ReportError(f"{path}: not a folder; expected {expected}")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        hint = " (an eval run: its numbers are in eval_metrics.json)" if (path / "eval_metrics.json").is_file() else ""
        raise ReportError(f"{path}: no metrics.jsonl{hint}; expected {expected} with the jsonl logger on")
    records, warnings = read_records(metrics)
    config = path / "config.yaml"
    config_text = config.read_text(encoding="utf-8", errors="replace") if config.is_file() else None
    samples: dict[str, dict[int, Path]] = {}
    if (path / "samples").is_dir():
        for f in (path / "samples").iterdir():
            m = SAMPLE_FILE.match(f.name)
            if m and f.is_file():
                samples.setdefault(m["kind"] or "train", {})[int(m["step"])] = f
    return Run(path, label or path.resolve().name, records, config_text, samples, warnings)


def series(records: list[dict[str, Any]], candidates: tuple[str, ...]) -> tuple[list[int], list[float], list[str]]:
    """(steps, values, keys used) of one metric: each record's value under the first of `candidates`
    it has (records with none are left out). Non-numeric values are left out too."""
    steps, values, used = [], [], []
    for r in records:
        key = next((k for k in candidates if k in r), None)
        if key is None or not isinstance(r[key], (int, float)) or isinstance(r[key], bool):
            continue
        steps.append(int(r["step"]))
        values.append(float(r[key]))
        if key not in used:
            used.append(key)
    return steps, values, used


# ------------------------------------------------------------------------------------------------
# Which panels each topic has
# ------------------------------------------------------------------------------------------------


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name in ("source", "kind", "part", "n"):
        pattern = pattern.replace(re.escape("{" + name + "}"), {"n": r"(?P<n>\d+)", "kind": r"(?P<kind>acc|reward)"}
                                  .get(name, rf"(?P<{name}>[^/]+)"))
    return re.compile(f"^{pattern}$")


def _family_panels(keys: set[str], templates: tuple[str, ...], title: str) -> list[tuple[str, tuple[str, ...]]]:
    """Panels of a key family: one per distinct set of template fields, candidates in template order."""
    found: dict[tuple, None] = {}
    for template in templates:
        regex = _template_regex(template)
        for key in sorted(keys):
            m = regex.match(key)
            if m:
                found.setdefault(tuple(sorted(m.groupdict().items())), None)
    panels = []
    for fields in found:
        values = dict(fields)
        if values.get("part") in NOT_REWARD_PARTS:
            continue
        panels.append((title.format(**values), tuple(t.format(**values) for t in templates)))
    return panels


def _timing_panels(keys: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """One panel per timing_s/* phase any run logged, old and new names of a phase merged."""
    by_name: dict[str, tuple[str, ...]] = {}
    aliases = {k: cands for cands in METRICS.values() if cands[0].startswith(TIMING_PREFIX) for k in cands}
    for key in keys:
        if key.startswith(TIMING_PREFIX):
            cands = aliases.get(key, (key,))
            by_name[cands[0][len(TIMING_PREFIX):]] = cands

    def order(name: str) -> tuple:
        rank = TIMING_ORDER.index(name) if name in TIMING_ORDER else len(TIMING_ORDER)
        return (name.startswith("slowest/"), rank, name)

    return [(name, by_name[name]) for name in sorted(by_name, key=order)]


def topic_panels(runs: list[Run]) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """{topic: [(panel title, candidate keys)]} of the panels at least one run has data for."""
    keys = set().union(*(run.keys() for run in runs)) if runs else set()
    out = {}
    for stem, _, panels in TOPICS:
        chosen = [(title, METRICS[name]) for title, name in panels]
        if stem == "reward":
            chosen += _family_panels(keys, (REWARD_PART,), "reward part: {part}")
        elif stem == "validation":
            chosen += _family_panels(keys, VAL_PER_SOURCE, "{source}: {kind} mean@{n}")
        elif stem == "timing":
            chosen += _timing_panels(keys)
        elif stem == "time_split":  # one panel per run with phases: its stacked split
            out[stem] = [(run.label, ()) for run in runs if _phases(run)]
            continue
        out[stem] = [(t, c) for t, c in chosen if any(series(run.records, c)[0] for run in runs)]
    return out


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------


def _figure_modules():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("lensrl report draws its plots with matplotlib, which is not installed: "
                          "pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def plot_topic(runs: list[Run], heading: str, panels: list[tuple[str, tuple[str, ...]]], out: Path) -> Path:
    """One PNG (`out`) of one topic: a panel per metric, every run that has it overlaid (legend:
    the run labels), x = step. Uses matplotlib's Agg canvas (no display, no pyplot state).
    Raises ReportError when matplotlib is missing."""
    Figure, FigureCanvasAgg = _figure_modules()
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.8 * cols, 3.3 * rows + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(heading, fontsize=13, fontweight="bold")
    for index, (title, candidates) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, index + 1)
        used_keys: list[str] = []
        all_steps: list[int] = []
        all_values: list[float] = []
        for i, run in enumerate(runs):
            steps, values, used = series(run.records, candidates)
            if not steps:
                continue
            all_steps += steps
            used_keys += [k for k in used if k not in used_keys]
            values = [v if math.isfinite(v) else float("nan") for v in values]
            all_values += [v for v in values if math.isfinite(v)]
            ax.plot(steps, values, label=run.label, color=_colour(i), linewidth=1.4,
                    marker="o" if len(steps) <= 40 else None, markersize=3)
        _integer_steps(ax, all_steps)
        _no_noise_zoom(ax, all_values)
        ax.set_title(f"{title}\n{' | '.join(used_keys)}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.savefig(out, dpi=100)
    return out


def _no_noise_zoom(ax, values: list[float]) -> None:
    """A curve that moves by less than 0.1% of its size (IS weights of 1 +- 1e-7) keeps a y-range of
    0.1% of its size around its middle, so float noise is not drawn as a plunge; matplotlib's own
    offset labels (e.g. "+1" over "1e-7") are turned off."""
    if not values:
        return
    low, high = min(values), max(values)
    span = 1e-3 * max(abs(low), abs(high))
    if 0 < high - low < span or (high == low and span > 0):
        middle = (low + high) / 2
        ax.set_ylim(middle - span / 2, middle + span / 2)
    ax.ticklabel_format(axis="y", useOffset=False)


def _colour(index: int) -> str:
    """matplotlib's default cycle, then tab20 (more than ten runs or phases stay apart)."""
    if index < 10:
        return f"C{index}"
    from matplotlib import colormaps

    rgba = colormaps["tab20"]((index - 10) % 20)
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgba[:3])


def _integer_steps(ax, steps: list[int]) -> None:
    """Whole-number step ticks; the steps themselves when there are few."""
    distinct = sorted(set(steps))
    if 0 < len(distinct) <= 12:
        ax.set_xticks(distinct)
        if len(distinct) == 1:
            ax.set_xlim(distinct[0] - 1, distinct[0] + 1)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)


def _phases(run: Run) -> dict[str, list[float]]:
    """{phase: seconds at each training step (0 where not logged)} of the phases a step is made of
    (timing_s/* but the step total, validation and the slowest rank's copies), in step order."""
    steps = series(run.records, METRICS["time_step"])[0]
    out = {}
    for name, candidates in _timing_panels(run.keys()):
        if name in ("step", "testing") or name.startswith("slowest/"):
            continue
        by_step = dict(zip(*series(run.records, candidates)[:2]))
        out[name] = [by_step.get(step, 0.0) for step in steps]
    return out if steps and out else {}


def plot_time_split(runs: list[Run], heading: str, out: Path) -> Path:
    """One PNG (`out`): per run with timing_s/* phases, its phases stacked per step (x = step) and
    the logged step total as a dashed line (the gap between them: time no phase counts).
    Raises ReportError when matplotlib is missing."""
    Figure, FigureCanvasAgg = _figure_modules()
    runs = [run for run in runs if _phases(run)]
    names = list(dict.fromkeys(name for run in runs for name in _phases(run)))  # one colour per phase, all runs
    cols = min(len(runs), 2)
    rows = math.ceil(len(runs) / cols)
    fig = Figure(figsize=(7.2 * cols, 3.8 * rows + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(heading, fontsize=13, fontweight="bold")
    for index, run in enumerate(runs):
        ax = fig.add_subplot(rows, cols, index + 1)
        phases = _phases(run)
        steps, total, _ = series(run.records, METRICS["time_step"])
        clean = {name: [v if math.isfinite(v) else 0.0 for v in values] for name, values in phases.items()}
        colours = [_colour(names.index(name)) for name in clean]
        if len(steps) > 200:  # a long run: stacked areas (a bar per step and phase would be slow and unreadable)
            ax.stackplot(steps, *clean.values(), labels=list(clean), colors=colours)
        else:
            width = 0.8 * min((b - a for a, b in zip(steps, steps[1:]) if b > a), default=1)
            bottom = [0.0] * len(steps)
            for (name, values), colour in zip(clean.items(), colours):
                ax.bar(steps, values, width=width, bottom=bottom, label=name, color=colour)
                bottom = [b + v for b, v in zip(bottom, values)]
        ax.plot(steps, total, color="black", linestyle="--", linewidth=1.2, marker="_", markersize=10,
                label="step (total)")
        _integer_steps(ax, steps)
        ax.set_title(run.label, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("seconds", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(out, dpi=100)
    return out


# ------------------------------------------------------------------------------------------------
# Sample images: samples/ records name each image by where it came from
# ("data/train.parquet row 17 column 'images'[0]"); the row is read again from that file.
# ------------------------------------------------------------------------------------------------


class _Images:
    """Writes each sample image once, as a thumbnail PNG under out/images/, and says where."""

    def __init__(self, out: Path):
        self.folder = out / "images"
        self.tables: dict[tuple[str, str], Any] = {}
        self.done: dict[tuple[str, str], tuple[str | None, str]] = {}

    def get(self, reference: Any, run: Run) -> tuple[str | None, str]:
        """(src relative to the report, "") or (None, why the image could not be shown)."""
        key = (str(run.path), reference if isinstance(reference, str) else json.dumps(reference, default=str)[:200])
        if key not in self.done:
            try:
                image = self._load(reference, run)
                image.thumbnail((THUMBNAIL, THUMBNAIL))
                self.folder.mkdir(parents=True, exist_ok=True)
                name = hashlib.sha1("\0".join(key).encode()).hexdigest()[:16] + ".png"
                image.save(self.folder / name)
                self.done[key] = (f"images/{name}", "")
            except Exception as e:  # any unreadable image: the page says so in its place
                self.done[key] = (None, f"{type(e).__name__}: {e}" if not isinstance(e, ReportError) else str(e))
        return self.done[key]

    def _load(self, reference: Any, run: Run):
        from lensrl.data.sample import ImageSource

        if not isinstance(reference, str):  # bytes-like structs as a dataset row holds them
            return ImageSource(reference, "sample image").load()
        m = IMAGE_ORIGIN.match(reference)
        if m is None:  # a path or data: URI as written
            if reference.startswith("data:image"):
                return ImageSource(reference, "sample image").load()
            path = self._find(reference, run)
            if path is None:
                raise ReportError(f"image not found: {reference}")
            return ImageSource(str(path), reference).load()
        source, row, column, index = m["path"], int(m["row"]), m["key"], int(m["index"])
        try:
            value, base_dir = self._cell(source, row, column, run)
        except ReportError as e:
            raise ReportError(f"{e}; image: {reference}") from None
        if isinstance(value, list):
            value = value[index]
        elif index != 0:
            raise ReportError(f"{source} row {row} column '{column}' holds one image, not a list")
        return ImageSource(value, reference, base_dir=base_dir).load()

    def _find(self, name: str, run: Run) -> Path | None:
        """A file named relative to where the run was started: the current folder, the run folder,
        or the folder above trainer.output_dir (runs/NAME/../..)."""
        p = Path(name)
        places = [p] if p.is_absolute() else [Path.cwd() / p, run.path / p, run.path.parent / p,
                                              run.path.parent.parent / p]
        return next((q for q in places if q.is_file()), None)

    def _cell(self, source: str, row: int, column: str, run: Run) -> tuple[Any, str | None]:
        """The value at (row, column) of a data source as lensrl's loader named it."""
        import pyarrow.parquet as pq

        path = self._find(source, run)
        if path is not None and path.suffix not in (".jsonl", ".json"):
            f = pq.ParquetFile(path)
            start = 0
            for group in range(f.num_row_groups):
                size = f.metadata.row_group(group).num_rows
                if row < start + size:
                    cache = (f"{path}#{group}", column)
                    if cache not in self.tables:
                        self.tables[cache] = f.read_row_group(group, columns=[column]).column(column)
                    return self.tables[cache][row - start].as_py(), str(path.resolve().parent)
                start += size
            raise ReportError(f"{path} has {start} rows, not row {row}")
        cache = (str(path or source), column)
        if cache not in self.tables:
            from lensrl.data.sources import _file_source, resolve_sources

            if path is not None:
                table_source = _file_source(str(path))
            elif "@" in source:  # a hub dataset (`id@split (file)`) or a save_to_disk folder (`folder@split`)
                spec, _, rest = source.partition(" (")
                split = spec.rpartition("@")[2]
                try:  # from the local caches only, as training read it
                    found = [s for s in resolve_sources([spec if rest else spec.rpartition("@")[0]], split)
                             if s.name == source]
                except Exception:
                    found = []
                if not found:
                    raise ReportError(f"image not found: {source} is not in the local caches")
                table_source = found[0]
            else:
                raise ReportError(f"image not found: {source} (looked from the current folder and the run's)")
            self.tables[cache] = (table_source.read([column]).column(column), table_source.base_dir)
        values, base_dir = self.tables[cache]
        return values[row].as_py(), base_dir


def _read_samples(path: Path, limit: int, warnings: list[str]) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if len(records) >= limit:
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            warnings.append(f"{path} line {number}: not a JSON record, skipped")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #1d2230;
       max-width: 1500px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; border-bottom: 1px solid #ccd; padding-bottom: 4px;
margin-top: 32px; } h3 { font-size: 15px; margin: 18px 0 6px; }
.muted { color: #667; font-size: 13px; }
table.summary { border-collapse: collapse; font-size: 13px; }
table.summary th, table.summary td { border: 1px solid #d5d8e0; padding: 4px 10px; text-align: right; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
table.summary thead th { background: #eef0f6; }
figure { margin: 12px 0 20px; } figure img { max-width: 100%; border: 1px solid #e3e5ea; }
.pair { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 16px; }
.card { display: flex; gap: 10px; border: 1px solid #dfe2ea; border-radius: 6px; padding: 8px; margin-bottom: 8px;
        background: #fafbfd; }
.card img { width: 128px; height: auto; image-rendering: pixelated; border: 1px solid #ccd; flex: none; }
.card .noimg { width: 128px; font-size: 11px; color: #a33; flex: none; word-break: break-all; }
.card .text { min-width: 0; flex: 1; font-size: 13px; }
.card pre { white-space: pre-wrap; word-break: break-word; margin: 2px 0 6px; background: #fff; padding: 4px;
            border: 1px solid #eceef3; font-size: 12px; }
.reward { font-weight: bold; } .reward.good { color: #137333; } .reward.bad { color: #a50e0e; }
pre.config { background: #f6f7fa; border: 1px solid #dfe2ea; padding: 10px; font-size: 12px; overflow-x: auto; }
.warn { color: #8a5a00; font-size: 13px; }
"""


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def summarize(run: Run) -> dict[str, str]:
    """{row label: text} of a run's end-of-run summary: steps, time, best validation (and its step),
    and the last logged value of each SUMMARY_LAST metric (with its step when earlier than the last)."""
    out: dict[str, str] = {}
    steps = [int(r["step"]) for r in run.records]
    last = max(steps, default=0)
    planned = _planned_steps(run.config_text)
    out["steps"] = f"{last}" + (f" of {planned}" if planned else "")
    step_time = sum(series(run.records, METRICS["time_step"])[1])
    val_time = sum(series(run.records, METRICS["time_testing"])[1])
    out["total time (steps + validation)"] = _duration(step_time + val_time) if step_time + val_time else "-"
    for label, name in (("best validation accuracy", "val_accuracy"), ("best validation mean reward", "val_reward")):
        s, v, _ = series(run.records, METRICS[name])
        finite = [(value, step) for step, value in zip(s, v) if math.isfinite(value)]
        if finite:
            best = max(finite, key=lambda pair: pair[0])  # the first step reaching the best value
            out[label] = f"{_fmt(best[0])} (step {best[1]})"
            break
    for label, name in SUMMARY_LAST:
        s, v, _ = series(run.records, METRICS[name])
        if s:
            out[f"last {label}"] = _fmt(v[-1]) + ("" if s[-1] == last else f" (step {s[-1]})")
    return out


def _planned_steps(config_text: str | None) -> int | None:
    if not config_text:
        return None
    try:
        import yaml

        value = (yaml.safe_load(config_text) or {}).get("trainer", {}).get("total_steps")
        return value if isinstance(value, int) and value > 0 else None
    except Exception:
        return None


def _summary_table(runs: list[Run]) -> str:
    summaries = [summarize(run) for run in runs]
    order = ["steps", "total time (steps + validation)", "best validation accuracy", "best validation mean reward",
             *(f"last {label}" for label, _ in SUMMARY_LAST)]  # the rows in this order, whichever runs have them
    labels = [label for label in order if any(label in s for s in summaries)]
    head = "".join(f"<th>{html.escape(run.label)}</th>" for run in runs)
    rows = "".join(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{html.escape(s.get(label, '-'))}</td>"
                                                                  for s in summaries) + "</tr>" for label in labels)
    return f'<table class="summary"><thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _sample_card(record: dict[str, Any], run: Run, images: _Images) -> str:
    pictures = []
    refs = record.get("images") or []
    for ref in refs if isinstance(refs, list) else [refs]:
        src, why = images.get(ref, run)
        if src:
            pictures.append(f'<img src="{html.escape(src)}" alt="{html.escape(str(ref))}" '
                            f'title="{html.escape(str(ref))}">')
        else:
            pictures.append(f'<div class="noimg">{html.escape(why)}</div>')
    reward = record.get("reward")
    parts = {k[len("reward_"):]: v for k, v in record.items() if k.startswith("reward_")}
    parts_text = ", ".join(f"{k} {_fmt(v) if isinstance(v, (int, float)) else v}" for k, v in parts.items())
    r_text = _fmt(reward) if isinstance(reward, (int, float)) else "-"
    cls = "good" if isinstance(reward, (int, float)) and reward > 0 else "bad"
    extra = [f"answer: {record['answer']}"] if record.get("answer") is not None else []
    if record.get("finish_reason"):
        extra.append(f"finish: {record['finish_reason']}")
    if record.get("status") not in (None, "ok"):
        extra.append(f"status: {record['status']}")
    completion = str(record.get("completion", ""))
    blank = f" (only whitespace: {html.escape(repr(completion))})" if completion and not completion.strip() else ""
    return (
        f'<div class="card">{"".join(pictures)}<div class="text">'
        f'<span class="reward {cls}">reward {html.escape(r_text)}</span>'
        + (f' <span class="muted">({html.escape(parts_text)})</span>' if parts_text else "")
        + f'<div class="muted">{html.escape(" · ".join(str(e) for e in extra))}</div>'
        f'<div class="muted">prompt</div><pre>{html.escape(str(record.get("prompt", "")))}</pre>'
        f'<div class="muted">completion{blank}</div><pre>{html.escape(completion)}</pre>'
        "</div></div>"
    )


def _samples_section(run: Run, images: _Images, max_samples: int, warnings: list[str]) -> str:
    if not run.samples:
        return '<p class="muted">no samples/ in this run</p>'
    parts = []
    for kind in sorted(run.samples, key=lambda k: (k != "train", k != "val", k)):
        steps = sorted(run.samples[kind])
        shown = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
        columns = []
        for step in shown:
            records = _read_samples(run.samples[kind][step], max_samples, warnings)
            cards = "".join(_sample_card(r, run, images) for r in records) or '<p class="muted">empty</p>'
            columns.append(f"<div><h3>{html.escape(kind)} step {step}</h3>{cards}</div>")
        note = "" if len(steps) > 1 else " (one step logged)"
        parts.append(f'<p class="muted">{html.escape(kind)}: first and last logged step of {len(steps)}{note}</p>'
                     f'<div class="pair">{"".join(columns)}</div>')
    return "".join(parts)


def write_report(runs: list[str | Path], out: str | Path | None = None, max_samples: int = 4) -> Report:
    """Write the report of `runs` (run folders) into `out`: report.html, `<topic>.png` per topic with
    data, images/ for the sample thumbnails.

    Args:
        runs: one or more run folders, each holding metrics.jsonl (config.yaml and samples/ are optional).
        out: the report folder (created); default `RUN/report` for one run, required for several.
        max_samples: completions shown per samples file (first and last logged step of each kind).
    Returns:
        a Report: the page's path, the figures written ({topic: path}), the topics no run had data for,
        and warnings (also printed to stderr: cut metric lines, unreadable sample lines).
    Raises:
        ReportError: no runs, several runs without `out`, a run that is not a folder or lacks
        metrics.jsonl, a malformed metrics.jsonl line (file and line named), matplotlib missing.
    """
    if not runs:
        raise ReportError("no run folder given")
    if out is None:
        if len(runs) > 1:
            raise ReportError(f"{len(runs)} runs need --out DIR (where the report of them together goes)")
        out = Path(runs[0]) / "report"
    labels = _labels([Path(r) for r in runs])
    loaded = [load_run(r, label) for r, label in zip(runs, labels)]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out}: exists and is not a folder; --out must be a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"--out {out}: cannot create the report folder ({e.strerror})") from None
    warnings = [w for run in loaded for w in run.warnings]

    panels = topic_panels(loaded)
    figures, empty = {}, []
    for stem, heading, _ in TOPICS:
        target = out / f"{stem}.png"
        if panels[stem] and stem == "time_split":
            figures[stem] = plot_time_split(loaded, heading, target)
        elif panels[stem]:
            figures[stem] = plot_topic(loaded, heading, panels[stem], target)
        else:
            empty.append(heading)
            target.unlink(missing_ok=True)  # a figure of an earlier report in this folder

    images = _Images(out)
    headings = {stem: heading for stem, heading, _ in TOPICS}
    body = [f"<h1>lensrl report: {html.escape(', '.join(run.label for run in loaded))}</h1>",
            f'<p class="muted">written {html.escape(time.strftime("%Y-%m-%d %H:%M:%S"))} from '
            + ", ".join(f"<code>{html.escape(str(run.path.resolve()))}</code>" for run in loaded) + "</p>",
            "<h2>Summary</h2>", _summary_table(loaded), "<h2>Curves</h2>"]
    for stem, path in figures.items():
        body.append(f'<figure id="{stem}"><img src="{html.escape(path.name)}" alt="{html.escape(headings[stem])}">'
                    "</figure>")
    if empty:
        body.append(f'<p class="muted">no data for: {html.escape(", ".join(empty))}</p>')
    sample_warnings: list[str] = []
    for run in loaded:
        body.append(f"<h2>Samples: {html.escape(run.label)}</h2>")
        body.append(_samples_section(run, images, max_samples, sample_warnings))
    warnings += sample_warnings
    for run in loaded:
        body.append(f"<h2>Config: {html.escape(run.label)}</h2>")
        earlier = sorted(p.name for p in run.path.glob("config.*.yaml"))
        if earlier:
            body.append(f'<p class="muted">earlier configs in the folder (a resumed run with other settings): '
                        f"{html.escape(', '.join(earlier))}</p>")
        body.append(f'<pre class="config">{html.escape(run.config_text)}</pre>' if run.config_text is not None
                    else '<p class="muted">no config.yaml</p>')
    if warnings:
        body.append("<h2>Warnings</h2>" + "".join(f'<p class="warn">{html.escape(w)}</p>' for w in warnings))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>lensrl report: '
            f"{html.escape(', '.join(run.label for run in loaded))}</title><style>{_CSS}</style></head>\n"
            f"<body>\n{chr(10).join(body)}\n</body></html>\n")
    target = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    if warnings:
        from rich.markup import escape

        from lensrl.logging import console

        for w in warnings:
            console.print(f"[yellow]warning: {escape(w)}[/yellow]", soft_wrap=True)
    return Report(target, figures, empty, warnings)


def _labels(paths: list[Path]) -> list[str]:
    """Each run's folder name; folders of the same name get their parent's name in front."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
