"""SFT on a tiny Qwen2.5-VL: multiple choice and free form, gradient accumulation, eval-only, `lensrl eval`."""

from __future__ import annotations

import json

import pytest
import torch
from trainer_helpers import run_cli, run_main

from lensrl.config import SFTConfig, load_config
from lensrl.logging import read_metrics
from lensrl.trainers.sft import SFTTrainer


def sft_overrides(model_dir, data, out, name, *extra):
    return [
        f"model.path={model_dir}", f"data.train_files=[{data / 'train.parquet'}]",
        f"data.val_files=[{data / 'test.parquet'}]", "data.max_prompt_length=96", "rollout.backend=hf",
        "rollout.max_new_tokens=8", "optim.lr=3e-3", "optim.warmup_steps=0", "reward.format_pattern=null",
        "reward.num_workers=1", "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "trainer.test_freq=0",
        f"trainer.output_dir={out}", f"trainer.run_name={name}", "trainer.loggers=[jsonl]", *extra,
    ]


def test_sft_multiple_choice_learns_and_writes_hf(tiny_qwen25_dir, choice_data, tmp_path, capsys):
    overrides = sft_overrides(tiny_qwen25_dir, choice_data, tmp_path, "mc", "data.prompt_key=question",
                              "data.choice_key=choices", "data.answer_key=correct_answer", "data.image_keys=[image]",
                              "reward.type=choice", "trainer.total_steps=12", "trainer.val_before_train=true",
                              "trainer.loggers=[console,jsonl]")
    trainer = SFTTrainer(load_config(SFTConfig, None, overrides))
    sample = trainer.train_data[0]
    assert sample.target.startswith(f"{sample.answer}. ") and "Choices:\nA. " in sample.prompt
    trainer.fit()
    records = read_metrics(tmp_path / "mc")
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0]
    console = capsys.readouterr().err  # the step line names SFT's loss as the loss
    assert "step 12/12" in console and f"loss={losses[-1]:.3f}" in console and "reward=" not in console
    assert "val/accuracy" in records[0] and "val/accuracy" in records[-1]
    assert (tmp_path / "mc" / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "mc" / "hf" / "preprocessor_config.json").is_file()


def test_gradient_accumulation_equals_one_big_batch(tiny_qwen25_dir, color_data, tmp_path):
    """Micro-batches of 2 accumulated to a global batch of 8 give the same update as one batch of 8."""
    results = []
    for micro in (2, 8):
        overrides = sft_overrides(tiny_qwen25_dir, color_data, tmp_path, f"accum{micro}", "trainer.total_steps=1",
                                  "trainer.val_before_train=false", f"trainer.micro_batch_size={micro}",
                                  "data.val_files=null", "trainer.save_hf=false")
        trainer = SFTTrainer(load_config(SFTConfig, None, overrides))
        metrics = trainer.train_step()
        results.append((metrics["train/loss"], [p.detach().clone() for p in trainer.policy.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_eval_only_when_train_files_is_null(tiny_qwen25_dir, color_data, tmp_path):
    overrides = sft_overrides(tiny_qwen25_dir, color_data, tmp_path, "evalonly", "data.train_files=null")
    SFTTrainer(load_config(SFTConfig, None, overrides)).fit()
    records = read_metrics(tmp_path / "evalonly")
    assert [r["step"] for r in records] == [0] and "val/accuracy" in records[0]
    assert not (tmp_path / "evalonly" / "checkpoints").exists()
    assert not (tmp_path / "evalonly" / "hf").exists()


def test_eval_cli_scores_a_model_folder(tiny_qwen25_dir, color_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TTY_INTERACTIVE", "1")  # rich draws live progress as on a terminal
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    result = run_cli("eval", "--model", str(tiny_qwen25_dir), "--data", str(color_data),
                     f"output_dir={tmp_path}", "run_name=ev", "rollout.max_new_tokens=6", "reward.format_pattern=null",
                     "rollout.backend=hf")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())
    samples = (tmp_path / "ev" / "samples" / "eval.jsonl").read_text().splitlines()
    assert len(samples) == metrics["eval/num_samples"] == 16
    assert "eval: prompts" in result.stderr and "/16" in result.stderr  # the progress bar, prompts done of 16
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0
    first = json.loads(samples[0])
    assert {"prompt", "images", "answer", "completion", "reward"} <= set(first)


def test_missing_model_or_data_path_says_how_to_get_it(tiny_qwen25_dir, color_data, tmp_path, capsys):
    code, err = run_main(capsys, "sft", f"model.path={tmp_path / 'nope'}", f"data.train_files=[{color_data / 'train.parquet'}]")
    assert code != 0 and "lensrl model tiny" in err
    code, err = run_main(capsys, "eval", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "nodata"))
    assert code == 2 and "nodata" in err  # the data is checked before any model loads
    code, err = run_main(capsys, "eval", "--model", str(tmp_path / "nope"), "--data", str(color_data))
    assert code != 0 and "nope" in err
    code, err = run_main(capsys, "sft", f"model.path={tiny_qwen25_dir}",
                         f"data.train_files=[{tmp_path / 'geo3k' / 'train.parquet'}]")
    assert code != 0 and "geo3k" in err and "lensrl data" in err
