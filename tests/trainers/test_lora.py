"""LoRA (peft) on the tiny model, fp32 on the CPU: adapters alone train, the base is the KL
reference, the rollout engine samples the merged policy, 2 FSDP2 ranks train what 1 rank trains,
checkpoints hold the adapters (and resume at another rank count), and both saved forms load in
plain transformers / peft with the live model's logits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import assert_same_steps, assert_same_weights, grpo_args, launch
from test_sft import sft_overrides
from trainer_helpers import grpo_overrides

from lensrl.config import ConfigError, GRPOConfig, SFTConfig, load_config
from lensrl.logging import read_metrics
from lensrl.rollout.engine import EngineRollout
from lensrl.train.lora import adapters_disabled
from lensrl.trainers.grpo import GRPOTrainer
from lensrl.trainers.sft import SFTTrainer

LORA = ["model.lora.rank=8", "model.lora.alpha=16"]
LORA_GRPO = [*LORA, "algorithm.use_kl_loss=true", "rollout.backend=engine"]


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
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    with adapters_disabled(trainer.policy):
        start = _logits(trainer.policy, ids)
    assert torch.equal(_logits(trainer.policy, ids), start)  # B = 0: the step-0 policy is the base (GRPO's reference)
    base = load_file(tiny_qwen25_dir / "model.safetensors")
    trainer.fit()
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "sft") if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.5  # nats per target token, from a random-init tiny base
    state = {n.replace(".base_layer.", "."): p for n, p in trainer.policy.state_dict().items() if "lora_" not in n}
    assert all(torch.equal(state[k], base[k]) for k in base if k in state)  # the base never moved
    live = _logits(trainer.policy.eval(), ids)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "sft" / "hf")
    torch.testing.assert_close(_logits(merged, ids), live, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(AutoModelForImageTextToText.from_pretrained(tiny_qwen25_dir), ids), live,
                              atol=1e-3)  # and it is not the base
    adapted = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_qwen25_dir),
                                        tmp_path / "sft" / "hf_adapter")
    torch.testing.assert_close(_logits(adapted, ids), live, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def lora_grpo(tiny_qwen25_dir, color_data, tmp_path_factory):
    """3 LoRA GRPO steps (test_distributed's run: a reward with signal at every step, seeded
    sampling, two mini-batches a step, a checkpoint after each) with a KL loss against the base,
    the engine serving the merged policy: in this process at one rank, and under torchrun at 2
    gloo ranks (FSDP2: frozen base and adapters sharded together) with activation checkpointing.
    Returns (folder, the one-rank trainer)."""
    out = tmp_path_factory.mktemp("lora_grpo")
    trainer = GRPOTrainer(load_config(GRPOConfig, None, grpo_args(tiny_qwen25_dir, color_data, out, "one", *LORA_GRPO)))
    trainer.fit()
    launch(2, "grpo", grpo_args(tiny_qwen25_dir, color_data, out, "two", *LORA_GRPO, "model.gradient_checkpointing=true"))
    return out, trainer


def test_lora_grpo_uses_the_base_as_reference_and_the_engine_serves_the_merged_policy(lora_grpo):
    out, trainer = lora_grpo
    assert trainer.ref is trainer.policy  # no second copy of the model
    assert isinstance(trainer.rollout, EngineRollout) and trainer.rollout_model is trainer.rollout_copy.model
    served = trainer.rollout_copy
    base = [n for n, _ in trainer.policy.named_parameters() if ".lora_" not in n]
    assert served.merged and set(served.aliased) == set(base) - set(served.merged)  # only adapted weights copied
    steps = read_metrics(out / "one")
    assert all(r["actor/kl_loss"] > 0 and r["actor/grad_norm"] > 0 for r in steps)
    # the engine's log-probabilities are the trainer's (peft's forward), after every update of the adapters
    assert all(r["rollout/train_logprob_absdiff"] < 1e-5 for r in steps), [r["rollout/train_logprob_absdiff"] for r in steps]
    assert_adapters_only(out / "one" / "checkpoints" / "step_2")


def test_lora_grpo_two_ranks_equal_one_rank(lora_grpo):
    out, _ = lora_grpo
    one, two = read_metrics(out / "one"), read_metrics(out / "two")
    assert_same_steps(one, two)
    assert_same_weights(out / "one" / "hf", out / "two" / "hf")
    a = load_file(out / "one" / "hf_adapter" / "adapter_model.safetensors")
    b = load_file(out / "two" / "hf_adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and max((a[k] - b[k]).abs().max().item() for k in a) < 5e-5
    assert len(list((out / "two" / "checkpoints" / "step_3").glob("*.distcp"))) == 2  # one shard file per rank
    assert_adapters_only(out / "two" / "checkpoints" / "step_2")


def test_a_two_rank_lora_checkpoint_resumes_at_one_rank(lora_grpo, tiny_qwen25_dir, color_data):
    """The 2-rank run's step-2 checkpoint (adapters and their AdamW state, sharded) resumed in one
    process, on the FSDP path with compiled blocks (trainer.fsdp.enable=always, model.compile=always:
    the policy's peft layers and the engine's merged copy) and activation checkpointing: step 3 and
    the weights are the uninterrupted run's."""
    out, _ = lora_grpo
    ckpt = out / "two" / "checkpoints" / "step_2"
    launch(1, "grpo", grpo_args(tiny_qwen25_dir, color_data, out, "resumed", *LORA_GRPO, f"trainer.resume={ckpt}",
                                "trainer.fsdp.enable=always", "model.compile=always",
                                "model.gradient_checkpointing=true"))
    resumed = read_metrics(out / "resumed")
    assert [r["step"] for r in resumed] == [3]
    assert_same_steps(read_metrics(out / "one")[2:], resumed)
    assert_same_weights(out / "one" / "hf", out / "resumed" / "hf")


def test_resuming_with_other_lora_settings_is_refused(lora_grpo):
    """Fewer target_modules would load silently and drop trained adapters; another rank, or full
    parameters, failed deep in torch's loader: each is refused naming both settings."""
    from dataclasses import replace

    from lensrl.trainers.common import check_lora_resume

    out, trainer = lora_grpo
    ckpt, saved = out / "two" / "checkpoints" / "step_2", trainer.cfg.model.lora
    check_lora_resume(ckpt, saved)  # the same settings (dropout may differ)
    check_lora_resume(ckpt, replace(saved, dropout=0.1))
    for other, said in [(replace(saved, target_modules=["q_proj"]), "target_modules=['q_proj']"),
                        (replace(saved, rank=16), "rank=16"), (None, "full-parameter training")]:
        with pytest.raises(ConfigError, match=re.escape(said)):
            check_lora_resume(ckpt, other)


def test_resuming_lora_adapters_on_other_base_weights_is_refused(lora_grpo, color_data, tmp_path):
    """model.path changed between runs to weights of the same shapes: the adapters would load and
    train on top of a base they were not trained with, without a word; refused, naming both."""
    import shutil

    from lensrl.models.tiny import make_tiny_model

    out, _ = lora_grpo
    shutil.copytree(out / "one", tmp_path / "runs" / "one")  # the fixture's run stays as it was
    other = make_tiny_model(tmp_path / "other_seed", arch="qwen2_5_vl", preset="1m", seed=1)
    overrides = grpo_args(other, color_data, tmp_path / "runs", "one", *LORA_GRPO, "trainer.total_steps=4")
    with pytest.raises(ConfigError, match=r"LoRA adapters trained on other base weights than this run's model\.path"):
        GRPOTrainer(load_config(GRPOConfig, None, overrides)).fit()


def test_a_lora_target_that_names_nothing_is_refused(tiny_qwen25_dir, color_data, tmp_path):
    overrides = sft_overrides(tiny_qwen25_dir, color_data, tmp_path, "typo", *LORA,
                              "model.lora.target_modules=[q_proj,bogus]")
    with pytest.raises(ConfigError, match="'bogus' names no module"):
        SFTTrainer(load_config(SFTConfig, None, overrides))


def assert_adapters_only(ckpt: Path) -> None:
    """The checkpoint's model entries are the adapters (their AdamW state beside them), not the base."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    model = [k for k in saved if k.startswith("model.")]
    assert model and all(".lora_" in k for k in model)
    assert all(".lora_" in k for k in saved if k.startswith("optim.state."))


def test_lora_settings_that_cannot_train_correctly_are_refused(tiny_qwen25_dir, color_data, tmp_path):
    """No target is refused with the config; the engine and FSDP are accepted (the runs above)."""
    with pytest.raises(ConfigError, match="target_modules"):
        load_config(GRPOConfig, None, grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "x", *LORA,
                                                     "model.lora.target_modules=[]"))
    for setting in ("rollout.backend=engine", "trainer.fsdp.enable=always"):
        load_config(GRPOConfig, None, grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "x", *LORA, setting))
    # from the fresh-user review: each of these ran, silently doing something else than asked
    refused = {  # settings -> what the message says
        ("model.lora.alpha=inf",): "alpha a finite number > 0",  # inf wrote a NaN model
        ("model.lora.rank=0", "model.lora.target_modules=[qkv]"): "model.lora.target_modules set while model.lora.rank=0",
        ("model.lora.rank=0", "model.lora.vision_tower=true"): "model.lora.vision_tower set while",
        ("model.freeze_vision_tower=true", "model.lora.vision_tower=true"): "contradict each other",
        ("algorithm.use_kl_loss=true", "ref.dtype=bfloat16"): "do not apply with LoRA",
        ("ref.offload_params=true",): "do not apply with LoRA",
    }
    for settings, message in refused.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(GRPOConfig, None, grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "x", *LORA, *settings))


def test_a_bf16_base_writes_the_trained_policy_not_a_rounded_one(tiny_qwen25_dir, color_data, tmp_path):
    """With a bf16 base, hf/ is merged and written in fp32: a bf16 merge rounded a small update away
    (a reviewer's 3 steps at lr 1e-5: 97% of the adapted weights equal to the base), so hf/ was not
    the policy that trained. Here each adapted weight is exactly W + scale * B A in fp32."""
    from lensrl.train.lora import ADAPTER

    overrides = sft_overrides(tiny_qwen25_dir, color_data, tmp_path, "bf16", *LORA, "model.dtype=bfloat16",
                              "trainer.total_steps=2", "optim.lr=1e-4")
    trainer = SFTTrainer(load_config(SFTConfig, None, overrides))
    trainer.fit()
    from transformers import AutoModelForImageTextToText

    assert {t.dtype for t in load_file(tmp_path / "bf16" / "hf" / "model.safetensors").values()} == {torch.float32}
    written = AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16" / "hf").state_dict()  # config.json: float32
    state, checked = trainer.policy.state_dict(), 0
    for name, tensor in state.items():
        if name.endswith(".base_layer.weight"):
            layer = name.removesuffix(".base_layer.weight")
            assert tensor.dtype == torch.bfloat16
            a, b = state[f"{layer}.lora_A.{ADAPTER}.weight"], state[f"{layer}.lora_B.{ADAPTER}.weight"]
            expected = tensor.float() + 2.0 * b.float() @ a.float()  # alpha 16 / rank 8
            torch.testing.assert_close(written[layer + ".weight"], expected, rtol=1e-6, atol=1e-7)
            checked += int(not torch.equal(expected.to(torch.bfloat16).float(), expected))  # bf16 would lose it
    assert checked > 0


def test_lora_on_a_layer_that_is_not_linear_is_refused(tiny_qwen25_dir, color_data, tmp_path):
    """`proj` in the vision tower also names the patch embedding, a Conv3d: refused naming the key."""
    overrides = sft_overrides(tiny_qwen25_dir, color_data, tmp_path, "conv", *LORA, "model.lora.target_modules=[proj]",
                              "model.lora.vision_tower=true")
    with pytest.raises(ConfigError, match=r"'proj' names model.visual.patch_embed.proj \(Conv3d\), not a Linear"):
        SFTTrainer(load_config(SFTConfig, None, overrides))


def test_lora_with_bf16_base_weights_is_accepted():
    cfg = load_config(SFTConfig, None, ["model.dtype=bfloat16", *LORA, "data.train_files=[x.parquet]"])
    assert cfg.model.lora.rank == 8
    with pytest.raises(ConfigError, match="bfloat16"):
        load_config(SFTConfig, None, ["model.dtype=bfloat16", "data.train_files=[x.parquet]"])


def test_the_default_targets_adapt_a_moe_policys_attention(tiny_moe_dir):
    """The default list names gate/up/down_proj, which a Qwen3-VL-MoE decoder lacks (stacked
    experts): accepted, its attention adapted, the experts frozen."""
    from lensrl.config import LoraSettings
    from lensrl.models.load import load_policy
    from lensrl.train.lora import add_lora

    model, _ = load_policy(tiny_moe_dir)
    assert add_lora(model, LoraSettings(rank=4)) > 0
    trained = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # a list of the user's own naming an MLP projection: refused, saying why and what there is
    fresh, _ = load_policy(tiny_moe_dir)
    with pytest.raises(ConfigError, match=r"'gate_proj' names no module of the language model \(its MLPs are "
                                          r"stacked experts, which LoRA does not adapt\); its Linear projections: "
                                          r"k_proj, o_proj, q_proj, v_proj$"):
        add_lora(fresh, LoraSettings(rank=4, target_modules=["q_proj", "gate_proj"]))


def test_mfu_counts_no_weight_gradient_for_the_frozen_base(tiny_qwen25_dir, tiny_moe_dir):
    """perf/mfu/actor's FLOPs per token: 6 a trained parameter, 4 a frozen one (forward and input
    gradient, no weight gradient). Full-parameter training is 6N; a LoRA policy is far below it,
    and a LoRA MoE counts its frozen experts at their active share."""
    from lensrl.config import LoraSettings
    from lensrl.models.load import active_parameters, load_policy, update_flops_per_token
    from lensrl.train.lora import add_lora

    model, _ = load_policy(tiny_qwen25_dir)
    every = sum(p.numel() for p in model.parameters())
    assert update_flops_per_token(model) == 6 * every
    trained = add_lora(model, LoraSettings(rank=4))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == every and trained == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert update_flops_per_token(model) == 6 * trained + 4 * every
    moe, _ = load_policy(tiny_moe_dir)
    dense_share = active_parameters(moe)
    add_lora(moe, LoraSettings(rank=4))
    assert active_parameters(moe, requires_grad=False) == dense_share  # the frozen base: experts at K / E
    assert update_flops_per_token(moe) == 6 * active_parameters(moe, requires_grad=True) + 4 * dense_share


def test_a_vision_tower_lora_that_adapts_nothing_in_it_is_refused(tiny_qwen3_dir):
    """Qwen3-VL's vision tower has qkv / linear_fc1 / linear_fc2, none of the default names: with
    vision_tower=true and the defaults nothing in the tower would train (it did, silently); naming
    its projections adapts them."""
    from lensrl.config import LoraSettings
    from lensrl.models.load import load_policy
    from lensrl.train.lora import add_lora

    model, _ = load_policy(tiny_qwen3_dir)
    with pytest.raises(ConfigError, match=r"vision_tower=true, but no name .* vision tower.*its Linear projections: "
                                          r"linear_fc1, linear_fc2, qkv \(add those"):
        add_lora(model, LoraSettings(rank=4, vision_tower=True))
    model, _ = load_policy(tiny_qwen3_dir)
    add_lora(model, LoraSettings(rank=4, vision_tower=True, target_modules=["q_proj", "linear_fc1", "linear_fc2"]))
    trained = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
               if p.requires_grad and ".visual." in n}
    assert trained == {"linear_fc1", "linear_fc2"}


def test_a_rank_above_a_layers_width_is_named(tiny_qwen25_dir):
    from lensrl.config import LoraSettings
    from lensrl.models.load import load_policy
    from lensrl.train.lora import add_lora

    model, _ = load_policy(tiny_qwen25_dir)
    narrowest = min(min(m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".language_model." in f".{n}" and n.endswith("k_proj"))
    with pytest.warns(UserWarning, match=rf"model\.lora\.rank={narrowest + 1} is above the width of .*k_proj "
                                         rf"\({narrowest}\)"):
        add_lora(model, LoraSettings(rank=narrowest + 1))
    model, _ = load_policy(tiny_qwen25_dir)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lora.rank")
        add_lora(model, LoraSettings(rank=narrowest))
