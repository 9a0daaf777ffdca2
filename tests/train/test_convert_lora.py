"""`lensrl convert` of a LoRA checkpoint (the adapters only): the base folder's weights with the
adapters merged in, which plain transformers loads, or a peft adapter folder (`--lora-format peft`);
both compute the logits of the policy that wrote the checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from lensrl.cli import main as cli_main
from lensrl.config import SFTConfig, load_config
from lensrl.data.synth import make_synth
from lensrl.models.processor import Processor
from lensrl.train.convert import ConvertError, convert_checkpoint, hf_weight_names
from lensrl.train.lora import adapter_state_dict, merged_state_dict
from lensrl.trainers.sft import SFTTrainer
from tests.train.test_convert import SHARD, load_hf, logits, make_run, safetensors_contents

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.05, "vision_tower": True}


@pytest.fixture(scope="module")
def lora_run(tiny_qwen25_dir, tmp_path_factory):
    """(live policy, its checkpoint, processor): a real LoRA SFT run of 2 steps on the tiny
    Qwen2.5-VL, adapters in the language model and the vision tower, checkpoint at step 2."""
    root = tmp_path_factory.mktemp("lora_convert")
    data = root / "data"
    make_synth("color", 16, 0, data, n_test=4)
    lora = [f"model.lora.{key}={str(value).lower()}" for key, value in LORA.items()]
    overrides = [
        f"model.path={tiny_qwen25_dir}", f"data.train_files=[{data / 'train.parquet'}]", "data.max_prompt_length=96",
        "optim.lr=3e-2", "optim.warmup_steps=0", "reward.num_workers=1", "trainer.global_batch_size=8",
        "trainer.micro_batch_size=8", "trainer.test_freq=0", "trainer.val_before_train=false",
        "trainer.total_steps=2", "trainer.save_hf=false", f"trainer.output_dir={root / 'runs'}",
        "trainer.run_name=lora", "trainer.loggers=[jsonl]", *lora,
    ]
    trainer = SFTTrainer(load_config(SFTConfig, None, overrides))
    trainer.fit()
    ckpt = root / "runs" / "lora" / "checkpoints" / "step_2"
    return trainer.policy.eval(), ckpt, Processor.from_pretrained(tiny_qwen25_dir)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_merged_folder_is_the_trained_policy(lora_run, tiny_qwen25_dir, tmp_path):
    live, ckpt, processor = lora_run
    meta = json.loads((ckpt / "meta.json").read_text())  # the settings travel with the checkpoint
    assert {k: meta["lora"][k] for k in LORA} == LORA and "q_proj" in meta["lora"]["target_modules"]

    out = convert_checkpoint(ckpt, tmp_path / "merged", max_shard_size_bytes=SHARD, progress=False)
    assert not list(tmp_path.glob(".tmp_*")) and (out / "lensrl_run.yaml").is_file()
    written = safetensors_contents(out)
    assert len({file for file, _ in written.values()}) > 3  # streamed shard by shard
    base = load_file(tiny_qwen25_dir / "model.safetensors")
    assert set(written) == set(base)  # save_pretrained's names (Qwen2.5-VL: visual.*, model.layers.*)
    moved = {name for name, (_, tensor) in written.items() if not torch.equal(tensor, base[name])}
    assert any(n.startswith("visual.") and n.endswith("mlp.up_proj.weight") for n in moved)
    assert any(n.startswith("model.layers.") and n.endswith("q_proj.weight") for n in moved)
    assert all(n.endswith("_proj.weight") for n in moved)  # the adapted Linears only

    # W + (alpha / rank) * B @ A, as peft merges the live model's adapters
    expected = merged_state_dict(live)
    names = hf_weight_names(AutoModelForImageTextToText.from_pretrained(tiny_qwen25_dir))
    assert max(max_diff(written[name][1], expected[fqn]) for name, fqn in names.items()) < 1e-6
    converted = load_hf(out)  # plain transformers, nothing missing or unexpected
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    policy = logits(live, processor)
    assert max_diff(logits(converted, processor), policy) < 1e-4
    assert max_diff(logits(load_hf(tiny_qwen25_dir), processor), policy) > 1e-2  # and it is not the base


def test_peft_folder_loads_on_the_base_from_the_checkpoint_alone(lora_run, tiny_qwen25_dir, tmp_path):
    live, ckpt, processor = lora_run
    out = tmp_path / "adapter"
    cli_main(["convert", "--ckpt", str(ckpt), "--out", str(out), "--lora-format", "peft", "--no-progress"])
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.05)
    assert config["base_model_name_or_path"] == str(tiny_qwen25_dir) and "visual" in config["target_modules"]
    weights, expected = load_file(out / "adapter_model.safetensors"), adapter_state_dict(live)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    adapted = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_qwen25_dir), out).eval()
    assert max_diff(logits(adapted, processor), logits(live, processor)) < 1e-4

    # a copy of the checkpoint away from its run folder: the settings come from its meta.json
    lone = tmp_path / "copied" / "step_2"
    shutil.copytree(ckpt, lone)
    again = convert_checkpoint(lone, tmp_path / "again", base=str(tiny_qwen25_dir), lora_format="peft",
                               progress=False)
    assert json.loads((again / "adapter_config.json").read_text()) == config
    assert (again / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


def test_merged_in_bfloat16_and_from_a_base_in_another_layout(lora_run, tiny_qwen25_dir, tmp_path, capsys):
    live, ckpt, processor = lora_run
    out = convert_checkpoint(ckpt, tmp_path / "bf16", dtype="bfloat16", progress=False)
    written = load_file(out / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reference = convert_checkpoint(ckpt, tmp_path / "fp32", progress=False)
    fp32 = load_file(reference / "model.safetensors")
    assert all(torch.equal(written[k], fp32[k].to(torch.bfloat16)) for k in fp32)

    # a base folder under the module names (model.language_model.*, model.visual.*), which
    # transformers renames on load: loaded whole by transformers, merged the same
    renamed = tmp_path / "renamed_base"
    shutil.copytree(tiny_qwen25_dir, renamed)
    names = hf_weight_names(load_hf(tiny_qwen25_dir))
    base = load_file(tiny_qwen25_dir / "model.safetensors")
    save_file({names[k]: v for k, v in base.items()}, str(renamed / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    other = convert_checkpoint(ckpt, tmp_path / "from_renamed", base=str(renamed), progress=False)
    assert "layout transformers converts on load: loading it whole" in capsys.readouterr().err
    again = load_file(other / "model.safetensors")
    assert again.keys() == fp32.keys() and all(torch.equal(again[k], fp32[k]) for k in fp32)


def test_what_cannot_be_converted_is_refused(lora_run, tiny_qwen25_dir, tmp_path, capsys, monkeypatch):
    _, ckpt, _ = lora_run
    monkeypatch.setenv("LENSRL_CACHE_DIR", str(tmp_path / "cache"))  # where a shape name's folder is made
    # a full-parameter checkpoint has no adapters to write
    _, full = make_run(tmp_path / "full_run", tiny_qwen25_dir)
    with pytest.raises(ConvertError, match=r"--lora-format peft: .*step_2 is a full-parameter checkpoint \(its DCP "
                                           r"index .*\.metadata lists no '\.lora_A\.'"):
        convert_checkpoint(full, tmp_path / "out", lora_format="peft", progress=False)
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one error line, status 2
        cli_main(["convert", "--ckpt", str(full), "--out", str(tmp_path / "out"), "--lora-format", "peft"])
    assert exit_info.value.code == 2 and "error: --lora-format peft:" in capsys.readouterr().err

    # a LoRA checkpoint whose base cannot be found
    lone = tmp_path / "copied" / "step_2"
    shutil.copytree(ckpt, lone)
    with pytest.raises(FileNotFoundError, match=r"LoRA checkpoint: it holds the adapters only.*config\.yaml does not "
                                                r"exist; pass --base"):
        convert_checkpoint(lone, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match=r"LoRA checkpoint.*base model .*moved_away \(--base\) is not a folder"):
        convert_checkpoint(lone, tmp_path / "out", base=str(tmp_path / "moved_away"), progress=False)
    weightless = tmp_path / "weightless"  # the run's config and tokenizer, no weights (a shape name's folder)
    shutil.copytree(tiny_qwen25_dir, weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ConvertError, match=r"merged into the base model's weights, and base model .*weightless has "
                                           r"none: .*no \*\.safetensors weights.*or --lora-format peft"):
        convert_checkpoint(lone, tmp_path / "out", base=str(weightless), progress=False)
    with pytest.raises(ConvertError, match=r"does not fit its base model and LoRA settings: .*layers\.0\.mlp\.down_proj: "
                                           r"lora_A \(4, 384\) and lora_B \(128, 4\), expected \(4, 11008\) and "
                                           r"\(2048, 4\).*; pass the --base"):
        convert_checkpoint(lone, tmp_path / "out", base="qwen2_5_vl_3b", lora_format="peft", progress=False)

    # no record of the settings: neither meta.json nor a run config.yaml
    meta = json.loads((lone / "meta.json").read_text())
    del meta["lora"]
    (lone / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConvertError, match=r"holds LoRA adapters .*lora_A\.default\.weight.* but neither .*meta\.json "
                                           r"\(key \"lora\"\) nor .*config\.yaml \(model\.lora"):
        convert_checkpoint(lone, tmp_path / "out", base=str(tiny_qwen25_dir), progress=False)
    # a checkpoint written before meta.json held them, in its run folder: the run's config.yaml gives them
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(ckpt.parent.parent / "config.yaml", run / "config.yaml")
    shutil.copytree(lone, run / "checkpoints" / "step_2")
    out = convert_checkpoint(run / "checkpoints" / "step_2", tmp_path / "out", lora_format="peft", progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 8.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp_")]


def test_adapters_are_not_merged_into_other_base_weights_of_the_same_shapes(lora_run, tiny_qwen25_dir, tiny_qwen3_dir,
                                                                           tmp_path):
    """The checkpoint records its base (model_type and a fingerprint of its weights): a base of the
    same shapes but other weights (another seed: another fine-tune of the same release, say) gave a
    merged model nobody trained, without a word; another architecture is refused too."""
    from lensrl.models.tiny import make_tiny_model

    _, ckpt, _ = lora_run
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["base"]["model_type"] == "qwen2_5_vl" and len(meta["base"]["weights"]) == 16
    other = make_tiny_model(tmp_path / "other_seed", arch="qwen2_5_vl", preset="1m", seed=1)
    with pytest.raises(ConvertError, match=r"LoRA adapters trained on other base weights than the base model "
                                           r".*other_seed's \(weights fingerprint [0-9a-f]{16} when trained, "
                                           r"[0-9a-f]{16} now\)"):
        convert_checkpoint(ckpt, tmp_path / "out", base=str(other), progress=False)
    with pytest.raises(ConvertError, match=r"trained from a qwen2_5_vl model, and the base model .* is a qwen3_vl model"):
        convert_checkpoint(ckpt, tmp_path / "out", base=str(tiny_qwen3_dir), lora_format="peft", progress=False)
    assert not (tmp_path / "out").exists()
