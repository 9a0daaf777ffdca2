"""Model configurations: the architectures lensrl supports and the real Qwen-VL shapes.

Three architectures: Qwen2.5-VL and Qwen3-VL (dense) and Qwen3-VL-MoE, whose decoder layers
route each token to `num_experts_per_tok` of `num_experts` experts (transformers stores a
layer's experts stacked: `mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj`
(E, H, I), router `mlp.gate`). Qwen3-VL-MoE shares everything else with Qwen3-VL: vision tower,
deepstack, multimodal rope, tokenizer and chat template (`is_qwen3`).

Benchmarks need the real architectures (performance depends on shapes, not weights) without a
download. `shape_config("qwen2_5_vl_3b")` is the published config of Qwen2.5-VL-3B-Instruct as a
transformers config object; `shape_dir("qwen2_5_vl_3b")` is a model folder without weights
(config, tiny tokenizer, image processor settings) that `load_policy` and `Processor` accept.

The tiny tokenizer covers only the first ~1k ids of the real vocabulary, so a shape's special
token ids point at the tiny tokenizer's: prompts the processor builds then mean the same thing to
the model, and the embedding matrix keeps its real size.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from lensrl.models.tokenizer import special_token_ids, tiny_special_token_ids, train_tokenizer

# model_type -> transformers class name (config.json "architectures")
ARCHITECTURES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def model_class(arch: str) -> type:
    """The transformers `*ForConditionalGeneration` class of a supported model_type."""
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    return getattr(transformers, ARCHITECTURES[arch])


def config_class(arch: str) -> type:
    """The transformers config class of a supported model_type."""
    import transformers

    return {"qwen2_5_vl": transformers.Qwen2_5_VLConfig, "qwen3_vl": transformers.Qwen3VLConfig,
            "qwen3_vl_moe": transformers.Qwen3VLMoeConfig}[arch]


def is_qwen3(arch: str) -> bool:
    """Whether `arch` is of the Qwen3-VL family (dense or MoE): 16-px patches, deepstack,
    interleaved M-RoPE, Qwen3's chat template and image normalisation."""
    return arch in ("qwen3_vl", "qwen3_vl_moe")


def is_moe(config: PretrainedConfig) -> bool:
    """Whether a model config has routed experts (Qwen3-VL-MoE)."""
    return getattr(config.get_text_config(), "num_experts", 0) > 0


def mrope_section(arch: str, head_dim: int) -> list[int]:
    """Qwen's (t, h, w) split of the rotary frequencies, scaled from the 128-dim heads it was made for."""
    if head_dim % 32:
        raise ValueError(f"head_dim must be a multiple of 32 for Qwen's rope sections, got {head_dim}")
    base = [16, 24, 24] if arch == "qwen2_5_vl" else [24, 20, 20]
    return [s * head_dim // 128 for s in base]


def vision_patch_size(arch: str) -> int:
    """Pixels per side of one vision patch."""
    return 14 if arch == "qwen2_5_vl" else 16


def build_config(
    arch: str,
    text: dict[str, Any],
    vision: dict[str, Any],
    token_ids: dict[str, int],
    tie_word_embeddings: bool,
) -> PretrainedConfig:
    """A Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE config from text and vision dims and the tokenizer's
    special ids.

    `text` needs vocab_size, hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads and may set rope_theta, max_position_embeddings and
    (Qwen3-VL only; Qwen2.5-VL heads are hidden_size / num_attention_heads) head_dim. Qwen3-VL-MoE
    also needs num_experts, num_experts_per_tok and moe_intermediate_size (every layer sparse
    unless `text` says otherwise). `vision` holds the vision tower's own fields.
    """
    text = dict(text)
    head_dim = text.pop("head_dim", text["hidden_size"] // text["num_attention_heads"])
    rope_theta = text.pop("rope_theta", 1e6 if arch == "qwen2_5_vl" else 5e6)
    rope = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section(arch, head_dim)}
    ids = {
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
    }
    text_config = {
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "tie_word_embeddings": tie_word_embeddings,
        **ids,
    }
    vision_config = {
        "patch_size": vision_patch_size(arch),
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
        "out_hidden_size": text["hidden_size"],
        "initializer_range": 0.02,
    }
    if arch == "qwen2_5_vl":
        text_config.update(max_position_embeddings=128000, use_sliding_window=False, sliding_window=32768)
        text_config["max_window_layers"] = text["num_hidden_layers"]
        vision_config.update(hidden_act="silu", tokens_per_second=2)
    else:
        text_config.update(max_position_embeddings=262144, attention_bias=False, head_dim=head_dim)
        rope["mrope_interleaved"] = True
        vision_config.update(hidden_act="gelu_pytorch_tanh")
    if arch == "qwen3_vl_moe":  # as Qwen3-VL-30B-A3B: every layer sparse, top-k weights renormalised
        text_config.update(decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001)
    text_config.update(text)
    text_config["rope_parameters"] = rope
    vision_config.update(vision)
    return config_class(arch)(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
        architectures=[ARCHITECTURES[arch]],
        **ids,
    )


def preprocessor_config(arch: str, min_pixels: int, max_pixels: int) -> dict[str, Any]:
    """preprocessor_config.json of the Qwen2-VL image processor, as Qwen's folders write it."""
    qwen3 = is_qwen3(arch)
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor" if qwen3 else "Qwen2_5_VLProcessor",
        "do_resize": True,
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.5, 0.5, 0.5] if qwen3 else OPENAI_CLIP_MEAN,
        "image_std": [0.5, 0.5, 0.5] if qwen3 else OPENAI_CLIP_STD,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": vision_patch_size(arch),
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def write_model_files(
    out_dir: str | Path, config: PretrainedConfig, arch: str, min_pixels: int, max_pixels: int
) -> None:
    """Everything of a model folder except the weights: config, generation and processor settings.

    The tokenizer must already be in `out_dir` (`config` holds its ids).
    """
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    config.save_pretrained(out_dir)
    _spell_as_published(out_dir / "config.json")
    ids = special_token_ids(out_dir)  # not config.eos_token_id: some transformers 5.x drop it from the config
    GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],  # as Qwen's folders list them
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    ).save_pretrained(out_dir)
    processor = preprocessor_config(arch, min_pixels, max_pixels)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    if is_qwen3(arch):  # Qwen3-VL folders carry their own video processor settings
        video = {
            k: v
            for k, v in processor.items()
            if k not in ("image_processor_type", "min_pixels", "max_pixels")
        }
        video["video_processor_type"] = "Qwen3VLVideoProcessor"
        (out_dir / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")


def _spell_as_published(config_path: Path) -> None:
    """config.json with the expert count under Qwen's own key, `num_experts` (transformers writes its
    alias `num_local_experts`; it reads both): a tiny folder is spelt as the real checkpoint is."""
    config = json.loads(config_path.read_text())
    text = config.get("text_config") or {}
    if "num_local_experts" in text:
        text["num_experts"] = text.pop("num_local_experts")
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------
# Real shapes (published config.json files; see reference/model_shapes.md)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    arch: str
    text: dict[str, Any]
    vision: dict[str, Any]
    tie_word_embeddings: bool
    min_pixels: int
    max_pixels: int
    notes: str = field(default="", compare=False)


_QWEN2_5_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)
_QWEN3_VISION = dict(
    depth=24,
    hidden_size=1024,
    intermediate_size=4096,
    num_heads=16,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[5, 11, 17],
)
# Qwen3-VL-30B-A3B's tower is wider and deeper than the dense 2B/4B/8B's: the published
# config.json's vision_config (equal to transformers' Qwen3VLMoeVisionConfig defaults except
# out_hidden_size, which is the text width here).
_QWEN3_MOE_VISION = dict(
    depth=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24],
)

SHAPES: dict[str, Shape] = {
    "qwen2_5_vl_3b": Shape(
        "qwen2_5_vl",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            rope_theta=1e6,
        ),
        _QWEN2_5_VISION,
        tie_word_embeddings=True,
        min_pixels=3136,
        max_pixels=12845056,
        notes="Qwen2.5-VL-3B-Instruct, about 3.75B parameters",
    ),
    "qwen2_5_vl_7b": Shape(
        "qwen2_5_vl",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rope_theta=1e6,
        ),
        _QWEN2_5_VISION,
        tie_word_embeddings=False,
        min_pixels=3136,
        max_pixels=12845056,
        notes="Qwen2.5-VL-7B-Instruct",
    ),
    "qwen3_vl_2b": Shape(
        "qwen3_vl",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            rope_theta=5e6,
        ),
        _QWEN3_VISION,
        tie_word_embeddings=True,
        min_pixels=65536,
        max_pixels=16777216,
        notes="Qwen3-VL-2B-Instruct",
    ),
    "qwen3_vl_4b": Shape(
        "qwen3_vl",
        dict(
            vocab_size=151936,
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rope_theta=5e6,
        ),
        _QWEN3_VISION,
        tie_word_embeddings=True,
        min_pixels=65536,
        max_pixels=16777216,
        notes="Qwen3-VL-4B-Instruct",
    ),
    "qwen3_vl_30b_a3b": Shape(
        "qwen3_vl_moe",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,  # config.json's dense width; every layer is sparse, so unused
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            rope_theta=5e6,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
        ),
        _QWEN3_MOE_VISION,
        tie_word_embeddings=False,
        min_pixels=65536,
        max_pixels=16777216,
        notes="Qwen3-VL-30B-A3B-Instruct, about 31.1B parameters; 3.9B active per token (0.54B of them vision)",
    ),
}
# Benchmark-only: the 30B-A3B widths at a quarter of its depth (12 of 48 decoder layers, about 8.4B
# parameters): its fp32 master weights, gradients and AdamW state (16 bytes a parameter) fit two
# 141 GB GPUs beside each rank's bf16 rollout copy, which the full depth's 500 GB do not.
SHAPES["qwen3_vl_30b_a3b_12l"] = replace(
    SHAPES["qwen3_vl_30b_a3b"], text={**SHAPES["qwen3_vl_30b_a3b"].text, "num_hidden_layers": 12},
    notes="Qwen3-VL-30B-A3B widths at 12 of its 48 decoder layers (benchmarks only)",
)
# ... and at 4 of its 48 layers (about 3.65B parameters, 58 GB at 16 bytes a parameter): its GRPO step
# fits one 141 GB GPU with the rollout copy and KV cache beside it.
SHAPES["qwen3_vl_30b_a3b_4l"] = replace(
    SHAPES["qwen3_vl_30b_a3b"], text={**SHAPES["qwen3_vl_30b_a3b"].text, "num_hidden_layers": 4},
    notes="Qwen3-VL-30B-A3B widths at 4 of its 48 decoder layers (benchmarks only)",
)


def _unknown_shape(name: str) -> ValueError:
    return ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}")


def shape_config(name: str, token_ids: dict[str, int] | None = None) -> PretrainedConfig:
    """The transformers config of a named real shape.

    `token_ids` maps Qwen's special tokens to ids; default: the tiny tokenizer's ids (see module doc).
    """
    if name not in SHAPES:
        raise _unknown_shape(name)
    shape = SHAPES[name]
    if token_ids is None:
        token_ids = tiny_special_token_ids()
    return build_config(shape.arch, shape.text, shape.vision, token_ids, shape.tie_word_embeddings)


def default_cache_dir() -> Path:
    return Path(os.environ.get("LENSRL_CACHE_DIR", Path.home() / ".cache" / "lensrl"))


def shape_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """A weightless model folder for a named shape (config, tiny tokenizer, processor settings).

    Created once under `cache_dir` (default `$LENSRL_CACHE_DIR` or ~/.cache/lensrl) and reused;
    `Processor.from_pretrained(shape_dir(name))` gives the processor matching `shape_config(name)`.
    """
    if name not in SHAPES:
        raise _unknown_shape(name)
    shape = SHAPES[name]
    folder = Path(cache_dir or default_cache_dir()) / "shapes" / name
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        train_tokenizer(staging, template=shape.arch)
        config = build_config(
            shape.arch, shape.text, shape.vision, special_token_ids(staging), shape.tie_word_embeddings
        )
        write_model_files(staging, config, shape.arch, shape.min_pixels, shape.max_pixels)
        try:
            staging.rename(folder)  # atomic: concurrent ranks see a complete folder or none
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
