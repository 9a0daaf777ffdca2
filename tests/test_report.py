"""`lensrl report`: PNG plots and an HTML page from run folders, written as the trainers write them
(metrics.jsonl, config.yaml, samples/<kind>_step_N.jsonl naming images by their parquet row), and
from a real one-step GRPO run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from lensrl.report import ReportError, load_run, read_records, series, topic_panels, write_report

REPO = Path(__file__).resolve().parents[1]
VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Page(HTMLParser):
    """The page's <img src>s and text, and whether every element it opens is closed in order."""

    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []
        self.text: list[str] = []
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse_page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.errors and not page.stack, (page.errors, page.stack)
    return page


def assert_real_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.width >= 300 and image.height >= 200
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 20  # lines, text, axes: not a blank canvas


def assert_images_exist(page: _Page, out: Path) -> None:
    assert page.srcs
    for src in page.srcs:
        assert not src.startswith(("/", "http")), src  # relative: the folder is the report
        assert (out / src).is_file(), src
        with Image.open(out / src) as image:
            image.load()


# A GRPO step's metrics under lensrl's names (before the verl rename) and under verl's.
OLD_NAMES = {"reward": "reward/mean", "old": "timing_s/old_logprob", "update": "timing_s/update",
             "sync": "timing_s/weight_sync", "val_time": "timing_s/val", "cpu": "perf/cpu_memory_gb",
             "per_source": "val/test/acc/mean@1"}
NEW_NAMES = {"reward": "critic/score/mean", "old": "timing_s/old_log_prob", "update": "timing_s/update_actor",
             "sync": "timing_s/update_weights", "val_time": "timing_s/testing", "cpu": "perf/cpu_memory_used_gb",
             "per_source": "val-core/test/acc/mean@1"}


def grpo_records(names: dict[str, str], steps: int, offset: float) -> list[dict]:
    records = [{"step": 0, "val/accuracy": 0.1, "val/reward/mean": 0.1, names["per_source"]: 0.1,
                names["val_time"]: 1.5}]
    for step in range(1, steps + 1):
        r = {"step": step, names["reward"]: offset + 0.1 * step, "reward/std": 0.3, "reward/accuracy": 0.05 * step,
             "reward/format": 1.0, "reward/errors": 0.0, "response_length/mean": 40.0 - step,
             "response_length/clip_ratio": 0.1, "actor/entropy": 2.0 - 0.1 * step, "actor/pg_loss": 0.01,
             "actor/pg_clipfrac": 0.02, "actor/pg_clipfrac_lower": 0.0, "actor/grad_norm": 0.5, "actor/lr": 1e-6,
             "rollout/train_kl": 1e-4, "rollout/is_weight_mean": 1.0, "rollout/is_clip_frac": 0.001,
             "timing_s/gen": 2.0, "timing_s/reward": 0.1, names["old"]: 0.5, names["update"]: 3.0,
             names["sync"]: 0.2, "timing_s/step": 6.0, "perf/throughput": 1000.0 + step, names["cpu"]: 3.0}
        if step % 2 == 0:
            r.update({"val/accuracy": 0.1 + 0.1 * step, "val/reward/mean": 0.1 * step,
                      names["per_source"]: 0.1 * step, names["val_time"]: 1.0})
        if step == 3:
            r["actor/grad_norm"] = "nan"  # RunLogger writes non-finite numbers as strings
        records.append(r)
    return records


def write_run(folder: Path, records: list[dict], samples: dict[str, list[dict]] | None = None,
              config: str = "trainer:\n  total_steps: 4\n") -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "config.yaml").write_text(config)
    for name, rows in (samples or {}).items():
        (folder / "samples").mkdir(exist_ok=True)
        (folder / "samples" / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    from lensrl.data.synth import make_synth

    out = tmp_path_factory.mktemp("report_data")
    make_synth("color", 8, 0, out, n_test=2)
    return out


def sample(data: Path, row: int, completion: str, reward: float) -> dict:
    """A samples/ record as GRPOTrainer._log_samples writes it."""
    return {"prompt": "<image>What colour is the shape?", "images": [f"{data / 'train.parquet'} row {row} column "
                                                                     "'images'[0]"],
            "answer": "red", "completion": completion, "reward": reward, "reward_accuracy": reward,
            "finish_reason": "stop"}


def test_two_grpo_runs_overlaid_old_and_new_metric_names(tmp_path, synth_data):
    samples = {f"train_step_{s}.jsonl": [sample(synth_data, s, f"answer {s} <script>alert(1)</script>", 1.0)]
               for s in (1, 2, 4)}
    gone = {**sample(synth_data, 1, "x", 0.0), "images": ["moved/train.parquet row 1 column 'images'[0]"]}
    samples["val_step_0.jsonl"] = [sample(synth_data, 0, "\n\n", 0.0), gone]
    old = write_run(tmp_path / "old_names", grpo_records(OLD_NAMES, 4, 0.0), samples,
                    config="trainer:\n  total_steps: 4\n  run_name: <b>old</b>\n")
    new = write_run(tmp_path / "new_names", grpo_records(NEW_NAMES, 3, 0.5), samples)
    out = tmp_path / "cmp"
    report = write_report([old, new], out)

    assert report.html == out / "report.html" and report.empty_topics == []
    for topic in ("reward", "validation", "entropy", "response_length", "rollout_gap", "clip_fraction", "optimizer",
                  "time_split", "timing", "throughput", "loss"):
        assert report.figures[topic] == out / f"{topic}.png"
        assert_real_png(out / f"{topic}.png")
    page = parse_page(report.html)
    assert_images_exist(page, out)
    assert any(src.startswith("images/") for src in page.srcs)  # the samples' parquet images, rendered
    text = "".join(page.text)
    assert "old_names" in text and "new_names" in text  # the summary's columns: both runs
    assert "<script>" not in report.html.read_text() and "<script>alert(1)</script>" in text  # escaped, shown
    assert "<b>old</b>" in text  # the config, escaped
    assert "only whitespace" in text  # a blank completion says so
    assert "image not found: moved/train.parquet" in text  # an image whose file is gone: said in its place
    assert "0.5 (step 4)" in text and "4 of 4" in text  # best validation accuracy and its step; steps

    # old and new names of one concept are one panel, and both runs have data in it
    runs = [load_run(old), load_run(new)]
    panels = {stem: dict(p) for stem, p in topic_panels(runs).items()}
    assert panels["timing"]["old_log_prob"] == ("timing_s/old_log_prob", "timing_s/old_logprob")
    assert panels["timing"]["update_weights"] == ("timing_s/update_weights", "timing_s/weight_sync")
    assert panels["timing"]["testing"] == ("timing_s/testing", "timing_s/val")
    assert panels["validation"]["test: acc mean@1"] == ("val-core/test/acc/mean@1", "val/test/acc/mean@1")
    assert "reward part: accuracy" in panels["reward"] and "reward part: errors" not in panels["reward"]
    for stem, title in (("reward", "score (mean reward)"), ("timing", "update_actor"),
                        ("throughput", "CPU memory (GB)"), ("validation", "test: acc mean@1")):
        assert all(series(run.records, panels[stem][title])[0] for run in runs), (stem, title)


def test_first_candidate_key_wins_and_non_finite_values_are_floats(tmp_path):
    run = write_run(tmp_path / "both", [{"step": 1, "critic/score/mean": 0.7, "reward/mean": 0.2},
                                        {"step": 2, "reward/mean": 0.3, "actor/grad_norm": "inf"}])
    records = load_run(run).records
    assert series(records, ("critic/score/mean", "reward/mean"))[:2] == ([1, 2], [0.7, 0.3])
    assert series(records, ("actor/grad_norm",))[1] == [float("inf")]


def test_sft_run_gets_sft_plots(tmp_path, synth_data):
    records = [{"step": 0, "val/accuracy": 0.0, "val/reward/mean": 0.0, "val/test/acc/mean@1": 0.0,
                "timing_s/val": 0.2}]
    records += [{"step": s, "train/loss": 7.0 / s, "train/grad_norm": 10.0 / s, "train/lr": 3e-3,
                 "train/target_tokens": 51.0, "timing_s/step": 0.5, "perf/throughput": 700.0,
                 "perf/cpu_memory_gb": 0.6, **({"val/accuracy": 0.25 * s, "val/test/acc/mean@1": 0.25 * s}
                                               if s % 2 == 0 else {})} for s in range(1, 5)]
    val = [{"source": str(synth_data / "test.parquet"), "row": 0, "prompt": "<image>What colour is the shape?",
            "images": [f"{synth_data / 'test.parquet'} row 0 column 'images'[0]"], "answer": "red",
            "completion": "\\boxed{red}", "reward": 1.0, "reward_accuracy": 1.0, "finish_reason": "stop",
            "response_length": 4, "status": "ok"}]
    run = write_run(tmp_path / "sft", records, {"val_step_0.jsonl": val, "val_step_4.jsonl": val})
    report = write_report([run])  # one run: the report goes to RUN/report

    assert report.html == run / "report" / "report.html"
    assert set(report.figures) == {"loss", "optimizer", "validation", "timing", "throughput"}
    for path in report.figures.values():
        assert_real_png(path)
    assert {"Reward", "Entropy", "PPO clip fractions"} <= set(report.empty_topics)
    page = parse_page(report.html)
    assert_images_exist(page, run / "report")
    text = "".join(page.text)
    assert "no data for: Reward" in text and "SFT loss" in text and "1 (step 4)" in text
    assert "val step 0" in text and "val step 4" in text  # first and last step side by side


def test_bad_metrics_line_names_file_and_line(tmp_path):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.1}\n{"step": 2, "reward/me\n{"step": 3}\n')
    with pytest.raises(ReportError, match=r"bad/metrics.jsonl line 2: not valid JSON"):
        load_run(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n["not", "a record"]\n')
    with pytest.raises(ReportError, match=r"line 2: not a JSON object with an integer 'step'"):
        load_run(run)
    # a last line cut by a crash (what a resumed run moves aside) is skipped with a warning
    (run / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.1}\n{"step": 2, "rew')
    records, warnings = read_records(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1] and "line 2: an unfinished last line" in warnings[0]


def test_not_a_run_folder(tmp_path):
    with pytest.raises(ReportError, match="no metrics.jsonl"):
        load_run(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ReportError, match="not a folder"):
        load_run(tmp_path / "file.txt")
    with pytest.raises(ReportError, match="need --out"):
        write_report([tmp_path, tmp_path])


def test_cli_missing_folder_is_one_clear_error(tmp_path, capsys):
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "lensrl", "report", "/nonexistent/run"], capture_output=True,
                            text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: /nonexistent/run: no such folder")
    assert "metrics.jsonl" in lines[0]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "critic/score/mean": 0.5}\n')
    from lensrl.cli import main  # the same entry point, in this process

    for bad, said in (("--samples=-1", "must be >= 0"), ("--out=/proc/no/such", "cannot create the report folder")):
        with pytest.raises(SystemExit) as exit_:
            main(["report", str(tmp_path), bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and said in err, err[-500:]


def test_report_of_a_real_grpo_run(tiny_qwen25_dir, synth_data, tmp_path):
    """One GRPO step of the tiny model, as the trainer writes its folder, then the report of it."""
    from lensrl.config import GRPOConfig, load_config
    from lensrl.trainers.grpo import GRPOTrainer

    overrides = [
        f"model.path={tiny_qwen25_dir}", f"data.train_files=[{synth_data / 'train.parquet'}]",
        f"data.val_files=[{synth_data / 'test.parquet'}]", "data.max_prompt_length=64", "rollout.backend=hf",
        "rollout.n=2", "rollout.max_new_tokens=4", "trainer.rollout_batch_size=2", "actor.mini_batch_size=2",
        "actor.micro_batch_size=8", "reward.format_pattern=null", "reward.num_workers=1", "trainer.total_steps=1",
        "trainer.val_before_train=false", "trainer.save_hf=false", "trainer.save_last=false",
        f"trainer.output_dir={tmp_path}", "trainer.run_name=real", "trainer.loggers=[jsonl]",
    ]
    GRPOTrainer(load_config(GRPOConfig, None, overrides)).fit()
    report = write_report([tmp_path / "real"])

    for topic in ("reward", "validation", "entropy", "response_length", "timing", "time_split", "optimizer"):
        assert_real_png(report.figures[topic])
    page = parse_page(report.html)
    assert_images_exist(page, tmp_path / "real" / "report")
    assert sum(src.startswith("images/") for src in page.srcs) >= 2  # train and val samples' images
    text = "".join(page.text)
    assert "train step 1" in text and "val step 1" in text and "1 of 1" in text


def test_float_noise_around_a_constant_is_not_drawn_as_a_plunge():
    from matplotlib.figure import Figure

    from lensrl.report import _no_noise_zoom

    ax = Figure().add_subplot()
    weights = [1.0, 1.0 + 1e-7, 1.0 - 1e-7, 1.0]  # rollout/is_weight_mean where rollout and training agree
    ax.plot(range(4), weights)
    _no_noise_zoom(ax, weights)
    low, high = ax.get_ylim()
    assert high - low == pytest.approx(1e-3) and low < 1.0 < high
    kl = [1e-5, 8e-5, 2e-6]  # a curve that moves by more than 0.1% of its size keeps matplotlib's range
    ax2 = Figure().add_subplot()
    ax2.plot(range(3), kl)
    before = ax2.get_ylim()
    _no_noise_zoom(ax2, kl)
    assert ax2.get_ylim() == before
