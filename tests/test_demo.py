"""The README's main command: `lensrl demo` makes a model and data, SFTs, GRPOs and shows a gain;
and GRPO with LoRA from the same SFT model gains too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lensrl.config import GRPOConfig, load_config
from lensrl.demo import RECIPES, run_demo
from lensrl.logging import read_metrics
from lensrl.trainers.grpo import GRPOTrainer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One seed at reduced size (the full three-seed demo is benchmarks/demo_seeds.py)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run_demo(str(out), seed=1, quick=True)


@pytest.mark.learning
def test_demo_grpo_raises_heldout_accuracy_over_sft(demo):
    out, result = demo
    assert result["untrained"] < 0.3
    assert result["grpo"] - result["sft"] >= 0.10, result
    saved = json.loads((out / "demo_result.json").read_text())
    assert saved["grpo"] == result["grpo"]
    for phase in ("sft", "grpo"):
        run = out / "runs" / phase
        assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
        assert (run / "hf" / "model.safetensors").is_file()
        assert any((run / "tensorboard").iterdir())


@pytest.mark.learning
def test_lora_grpo_from_the_demos_sft_raises_heldout_accuracy(demo):
    """LoRA GRPO (peft adapters alone, rank 32, on the language model and the vision tower) from
    the demo's SFT model raises held-out accuracy as full-parameter GRPO does, in more steps. The
    tiny demo's gain needs the vision tower and the language model trained together: full GRPO
    restricted to either, or to the norms and biases, stayed at 59% -> 60% in 30 steps, and so did
    LoRA on the language model alone. LoRA on both, 8 samples a prompt: 59 -> 60 -> 63 -> 80% at
    steps 0, 20, 40, 60 (lr 2e-3; at 3e-3 it collapsed to 0% by step 40; trainer.seed=2 stayed at
    60%); 4 samples a prompt, half the cost, as here: 59 -> 60 -> 60 -> 73% (2026-12-01, seed 1). Like
    the demo's own gain, it is a trajectory of one seed: numerics that change (summation order)
    can move it."""
    out, result = demo
    runs, data = out / "runs", out / "data"
    overrides = [f"model.path={runs / 'sft' / 'hf'}", f"data.train_files=[{data / 'train.parquet'}]",
                 f"data.val_files=[{data / 'test.parquet'}]", f"trainer.output_dir={runs}", "trainer.run_name=lora",
                 "trainer.seed=1", "data.seed=1", "trainer.resume=never", "trainer.total_steps=60",
                 "trainer.loggers=[jsonl]", "model.lora.rank=32", "model.lora.alpha=64", "model.lora.vision_tower=true",
                 "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,qkv]",
                 "actor.optim.lr=2e-3", "rollout.n=4"]
    trainer = GRPOTrainer(load_config(GRPOConfig, RECIPES / "tiny_demo_grpo.yaml", overrides))
    assert all("lora_" in n for n, p in trainer.policy.named_parameters() if p.requires_grad)
    assert any(".visual." in n and p.requires_grad for n, p in trainer.policy.named_parameters())
    trainer.fit()
    after = [r["val/accuracy"] for r in read_metrics(runs / "lora") if "val/accuracy" in r][-1]
    assert after - result["sft"] >= 0.10, (result, after)


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "lensrl", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "grpo", "sft", "eval", "data", "model", "config"):
        assert command in out
