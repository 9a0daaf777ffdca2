"""load_policy / detect_arch: folders, shapes built on the meta device, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from lensrl.models import shapes
from lensrl.models.load import build_random_model, detect_arch, load_policy
from lensrl.models.processor import Processor
from lensrl.models.tiny import tiny_config
from lensrl.models.tokenizer import tiny_special_token_ids


def test_detect_arch(tiny_qwen25_dir, tiny_qwen3_dir):
    assert detect_arch(tiny_qwen25_dir) == "qwen2_5_vl"
    assert detect_arch(tiny_qwen3_dir) == "qwen3_vl"


def test_missing_folder_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="lensrl model tiny --out") as error:
        load_policy(tmp_path / "nope")
    assert "nope" in str(error.value) and "Qwen" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_policy(tmp_path / "empty")


def test_unsupported_architecture_names_what_was_found(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(ValueError) as error:
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


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
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
