"""LoRA (peft) on the tiny model, fp32 on the CPU: adapters alone train, the base is the KL
reference, checkpoints hold the adapters, and both saved forms load in plain transformers / peft
with the live model's logits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import LETTER_SHARE, assert_same_steps
from test_sft import sft_overrides
from trainer_helpers import grpo_overrides

from lensrl.config import ConfigError, GRPOConfig, SFTConfig, load_config
from lensrl.logging import read_metrics
from lensrl.trainers.grpo import GRPOTrainer
from lensrl.trainers.sft import SFTTrainer

LORA = ["model.lora.rank=8", "model.lora.alpha=16"]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_sft_trains_the_adapters_alone_and_saves_a_merged_and_a_peft_folder(tiny_qwen25_dir, color_data,
                                                                                 tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    overrides = sft_overrides(tiny_qwen25_dir, color_data, tmp_path, "sft", *LORA, "trainer.total_steps=12",
                              "optim.lr=3e-2")
    trainer = SFTTrainer(load_config(SFTConfig, None, overrides))
    trained = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    base = load_file(tiny_qwen25_dir / "model.safetensors")
    trainer.fit()
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "sft") if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.5  # nats per target token, from a random-init tiny base
    state = {n.replace(".base_layer.", "."): p for n, p in trainer.policy.state_dict().items() if "lora_" not in n}
    assert all(torch.equal(state[k], base[k]) for k in base if k in state)  # the base never moved
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    live = _logits(trainer.policy.eval(), ids)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "sft" / "hf")
    torch.testing.assert_close(_logits(merged, ids), live, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(AutoModelForImageTextToText.from_pretrained(tiny_qwen25_dir), ids), live,
                              atol=1e-3)  # and it is not the base
    adapted = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_qwen25_dir),
                                        tmp_path / "sft" / "hf_adapter")
    torch.testing.assert_close(_logits(adapted, ids), live, rtol=1e-4, atol=1e-4)


def test_lora_grpo_uses_the_base_as_reference_and_resumes_from_adapters_only(tiny_qwen25_dir, color_data, tmp_path):
    common = [*LORA, "algorithm.use_kl_loss=true", f"reward.function={LETTER_SHARE}:letter_share", "rollout.seed=5",
              "trainer.save_freq=1", "trainer.save_hf=false"]
    trainer = GRPOTrainer(load_config(GRPOConfig, None, grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "full",
                                                                         *common, "trainer.total_steps=3")))
    assert trainer.ref is trainer.policy  # no second copy of the model
    trainer.fit()
    full = read_metrics(tmp_path / "full")
    assert full[0]["actor/kl_loss"] == 0.0 < full[-1]["actor/kl_loss"]  # B = 0 at the start: the policy is the base
    assert any(r["actor/grad_norm"] > 0 for r in full)
    ckpt = tmp_path / "full" / "checkpoints" / "step_2"
    from torch.distributed.checkpoint import FileSystemReader

    saved = [k for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("model.")]
    assert saved and all(".lora_" in k for k in saved)  # the adapters (and their AdamW state) only

    resumed = GRPOTrainer(load_config(GRPOConfig, None, grpo_overrides(
        tiny_qwen25_dir, color_data, tmp_path, "resumed", *common, "trainer.total_steps=3", f"trainer.resume={ckpt}")))
    resumed.fit()
    assert_same_steps(full[2:], read_metrics(tmp_path / "resumed"))
    a = {n: p for n, p in trainer.policy.named_parameters() if "lora_" in n}
    b = {n: p for n, p in resumed.policy.named_parameters() if "lora_" in n}
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5


@pytest.mark.parametrize("setting, message", [
    ("rollout.backend=engine", "rollout.backend=hf"),
    ("trainer.fsdp.enable=always", "without FSDP"),
    ("model.lora.target_modules=[]", "target_modules"),
])
def test_lora_settings_that_cannot_train_correctly_are_refused(tiny_qwen25_dir, color_data, tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(GRPOConfig, None, grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "x", *LORA, setting))


def test_lora_with_bf16_base_weights_is_accepted():
    cfg = load_config(SFTConfig, None, ["model.dtype=bfloat16", *LORA, "data.train_files=[x.parquet]"])
    assert cfg.model.lora.rank == 8
    with pytest.raises(ConfigError, match="bfloat16"):
        load_config(SFTConfig, None, ["model.dtype=bfloat16", "data.train_files=[x.parquet]"])
