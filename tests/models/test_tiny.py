"""Tiny model folders, the tiny tokenizer and the named real shapes."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoTokenizer

from lensrl.data.sample import ImageSource, Sample
from lensrl.models.processor import Processor
from lensrl.models.rope import mm_token_type_ids
from lensrl.models.shapes import SHAPES, shape_config, shape_dir
from lensrl.models.tiny import PRESETS, count_parameters, make_tiny_model, tiny_config
from lensrl.models.tokenizer import SPECIAL_TOKENS, build_tokenizer, tiny_special_token_ids, train_tokenizer

ARCH_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def tiny_dir(request, tiny_qwen25_dir, tiny_qwen3_dir):
    if request.param == "qwen3_vl_moe":
        return request.getfixturevalue("tiny_moe_dir")
    return {"qwen2_5_vl": tiny_qwen25_dir, "qwen3_vl": tiny_qwen3_dir}[request.param]


def test_tokenizer_is_small_fast_deterministic_and_loads(tmp_path):
    start = time.perf_counter()
    train_tokenizer(tmp_path / "a")
    assert time.perf_counter() - start < 5
    train_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert 1000 <= len(tokenizer) <= 2100
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    ids = tiny_special_token_ids()
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [ids[t] for t in SPECIAL_TOKENS]
    # Qwen's layout: special tokens right after the learned vocabulary, <|endoftext|> first
    assert ids["<|endoftext|>"] == len(tokenizer) - len(SPECIAL_TOKENS)

    text = "Find x. <think> \\frac{5}{2} = 4\\sqrt{3}, 45° </think> \\boxed{12}\nA. left\nB. right"
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(encoded) == text
    assert encoded == build_tokenizer().encode(text).ids  # transformers' Qwen2Tokenizer == the trained one
    assert len(encoded) < len(text) / 2  # the BPE learned the domain


def test_chat_template_follows_qwen2_vl(tiny_qwen25_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen25_dir)
    content = [{"type": "text", "text": "Look "}, {"type": "image"}, {"type": "text", "text": " Find x."}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nLook <|vision_start|><|image_pad|><|vision_end|> Find x.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenize=False
    )
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_tiny_folder_loads_and_generates_with_plain_transformers(tiny_dir, make_image):
    config = json.loads((tiny_dir / "config.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert type(model).__name__ == ARCH_CLASSES[config["model_type"]]
    assert config["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config["vision_start_token_id"] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert model.generation_config.eos_token_id[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    preprocessor = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert preprocessor["patch_size"] == config["vision_config"]["patch_size"]

    # text only, through the tokenizer's chat template
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Find x."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 4

    # with an image, through lensrl's processor (transformers 5.x needs mm_token_type_ids in generate)
    sample = Sample(prompt="<image> How many circles?", images=[ImageSource(make_image(90, 60))])
    processed = Processor.from_pretrained(tiny_dir)(sample)
    input_ids = processed.input_ids[None]
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=processed.pixel_values,
        image_grid_thw=processed.image_grid_thw,
        mm_token_type_ids=mm_token_type_ids(input_ids, config["image_token_id"]),
        max_new_tokens=4,
        do_sample=False,
    )
    assert torch.equal(out[0, : input_ids.shape[1]], input_ids[0])


def test_make_tiny_model_is_deterministic(tmp_path, tiny_qwen25_dir):
    again = make_tiny_model(tmp_path / "again", arch="qwen2_5_vl", preset="1m", seed=0)
    first, second = load_file(tiny_qwen25_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = load_file(
        make_tiny_model(tmp_path / "other", arch="qwen2_5_vl", preset="1m", seed=1) / "model.safetensors"
    )
    key = next(k for k in first if k.endswith("embed_tokens.weight"))
    assert not torch.equal(other[key], first[key])


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_preset_sizes(arch):
    ids = tiny_special_token_ids()
    bounds = {"1m": (0.5e6, 2e6), "5m": (3e6, 8e6), "20m": (12e6, 30e6), "50m": (35e6, 75e6)}
    assert set(PRESETS) == set(bounds)
    for preset, (low, high) in bounds.items():
        config = tiny_config(arch, preset, ids, vocab_size=max(ids.values()) + 1)
        assert low <= count_parameters(config) <= high, preset
        vision = config.vision_config
        if arch == "qwen2_5_vl":
            assert vision.fullatt_block_indexes == [vision.depth - 1]
        else:
            assert all(0 <= i < vision.depth for i in vision.deepstack_visual_indexes)
        if arch == "qwen3_vl_moe":  # the dense preset's size: 8 experts of an eighth of its MLP width, top-2
            text = config.get_text_config()
            assert (text.num_experts, text.num_experts_per_tok) == (8, 2) and text.mlp_only_layers == []
            assert text.moe_intermediate_size * text.num_experts == PRESETS[preset].intermediate_size


def test_tiny_moe_folder_holds_stacked_experts_and_qwen3_conventions(tiny_moe_dir, tiny_qwen3_dir):
    """The MoE folder is a Qwen3-VL folder whose decoder MLPs are routed experts, stored stacked
    as transformers 5 writes Qwen3-VL-MoE: same tokenizer, chat template and processor files."""
    weights = load_file(tiny_moe_dir / "model.safetensors")
    config = json.loads((tiny_moe_dir / "config.json").read_text())
    text = config["text_config"]
    hidden, width = text["hidden_size"], text["moe_intermediate_size"]
    for layer in range(text["num_hidden_layers"]):
        prefix = f"model.language_model.layers.{layer}.mlp."
        assert weights[prefix + "experts.gate_up_proj"].shape == (8, 2 * width, hidden)
        assert weights[prefix + "experts.down_proj"].shape == (8, hidden, width)
        assert weights[prefix + "gate.weight"].shape == (8, hidden)
        assert weights[prefix + "gate.weight"].std() > 0.01  # initialised, not transformers' zeros
        assert not any(k.startswith(prefix + "gate_proj") for k in weights)
    assert config["model_type"] == "qwen3_vl_moe" and config["architectures"] == [ARCH_CLASSES["qwen3_vl_moe"]]
    assert text["num_experts"] == 8 and "num_local_experts" not in text  # spelt as Qwen's config.json
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "preprocessor_config.json", "video_preprocessor_config.json"):
        assert (tiny_moe_dir / name).read_text() == (tiny_qwen3_dir / name).read_text(), name
    dense = json.loads((tiny_qwen3_dir / "config.json").read_text())
    assert config["vision_config"] | {"model_type": None} == dense["vision_config"] | {"model_type": None}


@pytest.mark.parametrize(
    "name, billions, hidden",
    [
        ("qwen2_5_vl_3b", 3.75, 2048),
        ("qwen2_5_vl_7b", 8.29, 3584),
        ("qwen3_vl_2b", 2.13, 2048),
        ("qwen3_vl_4b", 4.44, 2560),
        ("qwen3_vl_30b_a3b", 31.07, 2048),
        ("qwen3_vl_30b_a3b_12l", 8.64, 2048),
        ("qwen3_vl_30b_a3b_4l", 3.65, 2048),
    ],
)
def test_real_shapes(name, billions, hidden):
    config = shape_config(name)
    text = config.get_text_config()
    assert text.hidden_size == hidden and text.vocab_size in (151936, 152064)
    assert config.vision_config.out_hidden_size == hidden
    assert config.image_token_id == tiny_special_token_ids()["<|image_pad|>"]
    assert count_parameters(config) / 1e9 == pytest.approx(billions, abs=0.01)
    assert SHAPES[name].arch == config.model_type


def test_shape_dir_gives_a_matching_processor(tmp_path):
    folder = shape_dir("qwen2_5_vl_3b", cache_dir=tmp_path)
    assert shape_dir("qwen2_5_vl_3b", cache_dir=tmp_path) == folder  # reused
    processor = Processor.from_pretrained(folder)
    assert processor.num_image_tokens(448, 448) == 256
    assert processor.image_token_id == shape_config("qwen2_5_vl_3b").image_token_id
    assert (
        Processor.from_pretrained(shape_dir("qwen3_vl_2b", cache_dir=tmp_path)).num_image_tokens(448, 448)
        == 196
    )


def test_qwen3_vl_30b_a3b_shape_is_the_published_config():
    """Text widths from reference/model_shapes.md, vision tower from the published config.json
    (transformers' Qwen3VLMoeVisionConfig defaults but for out_hidden_size)."""
    from transformers import Qwen3VLMoeVisionConfig

    config = shape_config("qwen3_vl_30b_a3b")
    text, vision = config.get_text_config(), config.vision_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (48, 32, 4, 128)
    assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (128, 8, 768)
    assert text.mlp_only_layers == [] and text.decoder_sparse_step == 1 and not config.tie_word_embeddings
    assert text.rope_parameters["rope_theta"] == 5e6 and text.rope_parameters["mrope_section"] == [24, 20, 20]
    defaults = Qwen3VLMoeVisionConfig()
    for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "num_position_embeddings", "patch_size"):
        assert getattr(vision, key) == getattr(defaults, key), key
    assert list(vision.deepstack_visual_indexes) == [8, 16, 24] and vision.out_hidden_size == 2048
    # about 3.3B of the text model's parameters are active per token (reference/model_shapes.md)
    experts = text.num_hidden_layers * text.num_experts * 3 * text.hidden_size * text.moe_intermediate_size
    active_text = count_parameters(config) - experts * (1 - 8 / 128) - _vision_parameters(config)
    assert active_text / 1e9 == pytest.approx(3.3, abs=0.1)


def _vision_parameters(config) -> int:
    from lensrl.models.shapes import model_class

    with torch.device("meta"):
        model = model_class(config.model_type)(config)
    return sum(p.numel() for p in model.model.visual.parameters())


def test_the_cli_refuses_to_overwrite_a_folder_or_an_unknown_preset(tmp_path, capsys):
    """`lensrl model tiny --out` over a run's trained model wrote random weights beside its
    lensrl_run.yaml, and eval then graded them as that run (fresh-user review): refused unless
    --force, which replaces the whole folder. An unknown preset is one error line, not a traceback."""
    from lensrl.cli import main

    out = tmp_path / "hf"
    out.mkdir()
    (out / "lensrl_run.yaml").write_text("reward: {}\n")
    with pytest.raises(SystemExit) as e:
        main(["model", "tiny", "--preset", "1m", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not empty (a trained model of a lensrl run)" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["lensrl_run.yaml"]  # untouched
    main(["model", "tiny", "--preset", "1m", "--out", str(out), "--force"])
    assert (out / "model.safetensors").is_file() and not (out / "lensrl_run.yaml").exists()
    with pytest.raises(SystemExit) as e:
        main(["model", "tiny", "--preset", "7m", "--out", str(tmp_path / "new")])
    assert e.value.code == 2 and "'7m' is not a tiny preset; presets: " in capsys.readouterr().err
