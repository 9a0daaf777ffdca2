"""load_policy / detect_arch: folders, shapes built on the meta device, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from lensrl.models import shapes
from lensrl.models.errors import ModelError
from lensrl.models.load import (
    build_random_model,
    detect_arch,
    experts_implementation,
    load_policy,
    model_blocks,
)
from lensrl.models.processor import Processor
from lensrl.models.tiny import tiny_config
from lensrl.models.tokenizer import tiny_special_token_ids


def test_detect_arch(tiny_qwen25_dir, tiny_qwen3_dir, tiny_moe_dir):
    assert detect_arch(tiny_qwen25_dir) == "qwen2_5_vl"
    assert detect_arch(tiny_qwen3_dir) == "qwen3_vl"
    assert detect_arch(tiny_moe_dir) == "qwen3_vl_moe"


def test_load_moe_folder_unchanged_with_grouped_experts(tiny_moe_dir):
    """A Qwen3-VL-MoE folder loads as transformers' own class, every stored weight used as stored
    (experts stacked), with the grouped-GEMM experts kernel; its blocks are the vision blocks and
    the decoder layers."""
    model, processor = load_policy(tiny_moe_dir)
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert model.config.get_text_config()._experts_implementation == "grouped_mm"
    assert experts_implementation("cpu") == "grouped_mm"  # torch >= 2.9 has a CPU kernel
    stored = load_file(tiny_moe_dir / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stored.items())
    vision, layers = model_blocks(model)
    assert vision == list(model.model.visual.blocks) and len(vision) == model.config.vision_config.depth
    assert layers == list(model.model.language_model.layers) and len(layers) == 3
    assert all(type(layer.mlp).__name__ == "Qwen3VLMoeTextSparseMoeBlock" for layer in layers)
    assert processor.image_token_id == model.config.image_token_id


def test_missing_folder_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="lensrl model tiny --out") as error:
        load_policy(tmp_path / "nope")
    assert "nope" in str(error.value) and "Qwen" in str(error.value)
    with pytest.raises(FileNotFoundError) as error:  # a recipe's folder named after a release: that release's download
        load_policy(tmp_path / "Qwen3-VL-30B-A3B-Instruct")
    assert f"hf download Qwen/Qwen3-VL-30B-A3B-Instruct --local-dir {tmp_path / 'Qwen3-VL-30B-A3B-Instruct'}" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_policy(tmp_path / "empty")


def test_unsupported_architecture_names_what_was_found(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(ModelError) as error:
        load_policy(folder)
    message = str(error.value)
    assert "'llama'" in message and "LlamaForCausalLM" in message
    assert "qwen2_5_vl" in message and "qwen3_vl" in message


def test_pickled_weights_are_refused(tmp_path, tiny_qwen25_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_qwen25_dir / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_policy(folder)


def test_load_tiny_folder(tiny_qwen3_dir):
    model, processor = load_policy(tiny_qwen3_dir, dtype=torch.bfloat16)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration" and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert isinstance(processor, Processor) and processor.image_token_id == model.config.image_token_id
    assert processor.eos_token_ids[0] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_random_model_matches_transformers_construction(arch):
    """Meta-built, then materialised: same buffers and same function as a normally built model."""
    ids = tiny_special_token_ids()
    config = tiny_config(arch, "1m", ids, vocab_size=max(ids.values()) + 1)
    model = build_random_model(config, dtype=torch.float32, device="cpu", seed=0)
    reference = shapes.model_class(arch)(config).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    for (name, buffer), (_, expected) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(buffer, expected, rtol=0, atol=0, msg=name)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert not param.any(), name
        elif param.ndim == 1:
            assert bool((param == 1).all()), name
    weight = model.get_input_embeddings().weight
    assert weight.std().item() == pytest.approx(0.02, rel=0.1)
    again = build_random_model(config, seed=0)
    assert torch.equal(again.get_input_embeddings().weight, weight)

    reference.load_state_dict(model.state_dict())
    input_ids = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)


def test_load_policy_builds_a_named_shape(monkeypatch, tmp_path):
    """The shape path end to end, on a shape small enough for a CPU test."""
    monkeypatch.setenv("LENSRL_CACHE_DIR", str(tmp_path))
    preset = tiny_config("qwen3_vl", "1m", tiny_special_token_ids(), 1088)
    text = preset.get_text_config()
    shape = shapes.Shape(
        "qwen3_vl",
        dict(
            vocab_size=4096,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
        ),
        dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            num_position_embeddings=256,
            deepstack_visual_indexes=[1],
        ),
        tie_word_embeddings=False,
        min_pixels=64 * 64,
        max_pixels=128 * 128,
    )
    monkeypatch.setitem(shapes.SHAPES, "tiny_test_shape", shape)
    model, processor = load_policy("tiny_test_shape", dtype=torch.bfloat16, device="cpu")
    assert model.get_input_embeddings().weight.shape == (4096, text.hidden_size)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert processor.image_token_id == model.config.image_token_id
    assert (tmp_path / "shapes" / "tiny_test_shape" / "config.json").is_file()
    # the weightless folder's config is the model's: transformers can build it too
    folder_config = json.loads((tmp_path / "shapes" / "tiny_test_shape" / "config.json").read_text())
    assert folder_config["text_config"]["vocab_size"] == 4096
    assert AutoModelForImageTextToText.from_config(model.config) is not None


def test_load_policy_builds_a_moe_shape(monkeypatch, tmp_path):
    """A Qwen3-VL-MoE shape (the 30B-A3B's layout, CPU-test widths): stacked experts and the router
    initialised on the target device like every other weight, the grouped experts kernel set."""
    monkeypatch.setenv("LENSRL_CACHE_DIR", str(tmp_path))
    shape = shapes.Shape(
        "qwen3_vl_moe",
        dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32),
        dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, num_position_embeddings=256,
             deepstack_visual_indexes=[1]),
        tie_word_embeddings=False, min_pixels=64 * 64, max_pixels=128 * 128,
    )
    monkeypatch.setitem(shapes.SHAPES, "tiny_moe_shape", shape)
    model, processor = load_policy("tiny_moe_shape", dtype=torch.bfloat16, device="cpu")
    experts = model.model.language_model.layers[1].mlp.experts
    assert experts.gate_up_proj.shape == (16, 64, 128) and experts.down_proj.shape == (16, 128, 32)
    assert experts.gate_up_proj.dtype == torch.bfloat16
    assert experts.gate_up_proj.float().std().item() == pytest.approx(0.02, rel=0.1)
    assert model.model.language_model.layers[0].mlp.gate.weight.float().std().item() == pytest.approx(0.02, rel=0.1)
    assert model.config.get_text_config()._experts_implementation == "grouped_mm"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 17, 300, 42, 9]])).logits
    assert logits.shape == (1, 5, 2048) and torch.isfinite(logits).all()
    assert processor.num_image_tokens(128, 128) == 16


# ------------------------------------------------------------------------------------------------
# damaged folders: ModelError naming the folder, the file and what is wrong
# ------------------------------------------------------------------------------------------------


def _truncate(folder):
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)


def _garbage(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(os.urandom(weights.stat().st_size))


def _missing_shard(folder):
    """Two shards and their index, as `save_pretrained` writes a large model; the second deleted."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {name: shard for shard, members in shards.items() for name in members}
    for shard, members in shards.items():
        save_file({name: tensors[name] for name in members}, folder / shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model-00002-of-00002.safetensors").unlink()


def _invalid_config_json(folder):
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])  # cut off mid-way, as a failed copy leaves it


def _unsupported_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llava", architectures=["LlavaForConditionalGeneration"])
    (folder / "config.json").write_text(json.dumps(config))


def _missing_weight(folder):
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.gate_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _wrong_shape(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.gate_proj.weight"] = tensors["model.layers.0.mlp.gate_proj.weight"][:-1]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


DAMAGE = {  # damage: (function, the file the message names, what it says is wrong)
    "truncated weights": (_truncate, "model.safetensors", ["is truncated", "bytes of tensor data", "expected"]),
    "garbage weights": (_garbage, "model.safetensors", ["is not a safetensors file", "header of"]),
    "missing shard": (_missing_shard, "model-00002-of-00002.safetensors",
                      ["model.safetensors.index.json lists 2 shard files", "missing"]),
    "invalid config.json": (_invalid_config_json, "config.json", ["is not valid JSON", ": line ", "model_type"]),
    "unsupported model_type": (_unsupported_model_type, "config.json", ["'llava'", "lensrl supports qwen2_5_vl"]),
    "missing weight": (_missing_weight, "model.safetensors",
                       ["1 weight that config.json's architecture needs is in none", "layers.0.mlp.gate_proj"]),
    "wrong shape": (_wrong_shape, "model.safetensors", ["another shape than config.json gives", "gate_proj"]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_folder_names_the_folder_the_file_and_what_is_wrong(tiny_qwen25_dir, tmp_path, damage):
    """Damage a copy of a good folder: ModelError (exit status 2 from the CLI), whose message names
    the folder, the file and what is wrong, instead of a raw transformers / safetensors error, or
    (missing or reshaped weights) a model silently left partly random."""
    damage_folder, file_name, phrases = DAMAGE[damage]
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_qwen25_dir, folder)
    damage_folder(folder)
    with pytest.raises(ModelError) as error:
        load_policy(folder)
    message = str(error.value)
    assert str(folder) in message and file_name in message, message
    for phrase in phrases:
        assert phrase in message, (phrase, message)


def test_eval_on_a_damaged_folder_exits_2_naming_the_file(tiny_qwen25_dir, tmp_path):
    """The CLI: one `error:` line naming the truncated file, exit status 2, no traceback."""
    from lensrl.data.synth import make_synth

    folder = tmp_path / "damaged"
    shutil.copytree(tiny_qwen25_dir, folder)
    _truncate(folder)
    data = tmp_path / "data"
    make_synth("color", n=4, seed=0, out_dir=data)
    result = subprocess.run([sys.executable, "-m", "lensrl", "eval", "--model", str(folder), "--data", str(data),
                             f"output_dir={tmp_path / 'runs'}"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: model folder {folder}: model.safetensors is truncated"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout


def test_a_training_checkpoint_given_as_a_model_says_how_to_convert_it(tmp_path):
    from lensrl.models.load import check_model_folder

    ckpt = tmp_path / "run" / "checkpoints" / "step_3"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"lensrl convert --ckpt {ckpt}"):
        check_model_folder(ckpt)


def test_a_lora_adapter_folder_is_named_as_one(tmp_path):
    """`lensrl eval --model RUN/hf_adapter` (the peft folder a LoRA run writes): told what it is and
    what to use instead, not the generic 'no config.json'."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(FileNotFoundError, match="peft LoRA adapter folder.*hf/"):
        load_policy(tmp_path)
