"""Tiny random-init Qwen-VL models for tests and the CPU demo.

`make_tiny_model(dir)` writes a complete Hugging Face folder: a real
`Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration` or
`Qwen3VLMoeForConditionalGeneration` with random weights (safetensors), the tiny tokenizer,
generation_config.json and preprocessor_config.json. It loads with plain
`AutoModelForImageTextToText.from_pretrained(dir)` and `AutoTokenizer`, so everything lensrl does
with a real checkpoint can be exercised in seconds on a CPU.

Images are kept small (56..112 px for Qwen2.5-VL, 64..128 px for Qwen3-VL: 4 to 16 image tokens).
The MoE model is the Qwen3-VL preset with each decoder MLP replaced by `TINY_NUM_EXPERTS` experts of
an eighth of the dense width, `TINY_EXPERTS_PER_TOKEN` per token (as Qwen3-VL-30B-A3B: every layer
sparse, top-k weights renormalised, untied head only in the real one): the dense preset's size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from lensrl.models.shapes import build_config, model_class, write_model_files
from lensrl.models.tokenizer import special_token_ids, train_tokenizer


@dataclass(frozen=True)
class TinyPreset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int  # head_dim 32 or 64 (Qwen's rope sections need a multiple of 32)
    num_key_value_heads: int
    intermediate_size: int
    vision_hidden_size: int
    vision_depth: int
    vision_heads: int
    vision_intermediate_size: int


PRESETS: dict[str, TinyPreset] = {
    "1m": TinyPreset(128, 3, 4, 2, 384, 64, 1, 2, 128),
    "5m": TinyPreset(256, 4, 8, 2, 768, 128, 2, 4, 384),
    "20m": TinyPreset(512, 6, 16, 4, 1280, 192, 2, 3, 512),
    "50m": TinyPreset(768, 8, 12, 4, 1792, 256, 2, 4, 1024),
}

# Pixel bounds per architecture: an image side between 2 and 4 merged patches.
TINY_PIXELS = {"qwen2_5_vl": (56 * 56, 112 * 112), "qwen3_vl": (64 * 64, 128 * 128),
               "qwen3_vl_moe": (64 * 64, 128 * 128)}
TINY_NUM_EXPERTS = 8
TINY_EXPERTS_PER_TOKEN = 2


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def tiny_config(arch: str, preset: str, token_ids: dict[str, int], vocab_size: int) -> PretrainedConfig:
    """The config of a tiny preset; `vocab_size` is rounded up to a multiple of 64."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    text = dict(
        vocab_size=_round_up(vocab_size, 64),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        max_position_embeddings=32768,
    )
    vision = dict(
        depth=p.vision_depth,
        hidden_size=p.vision_hidden_size,
        intermediate_size=p.vision_intermediate_size,
        num_heads=p.vision_heads,
    )
    last = p.vision_depth - 1
    if arch == "qwen2_5_vl":
        # 56-px windows (2x2 merged patches): a 112-px image has 4 windows, so the windowed path runs;
        # the last block attends over the whole image, as blocks 7/15/23/31 do in the real model.
        vision.update(window_size=56, fullatt_block_indexes=[last])
    else:
        text["head_dim"] = p.hidden_size // p.num_attention_heads
        # A 16x16 grid of learned position embeddings (interpolated to each image's grid).
        vision.update(num_position_embeddings=256, deepstack_visual_indexes=list(range(p.vision_depth)))
    if arch == "qwen3_vl_moe":
        text.update(num_experts=TINY_NUM_EXPERTS, num_experts_per_tok=TINY_EXPERTS_PER_TOKEN,
                    moe_intermediate_size=p.intermediate_size // TINY_NUM_EXPERTS)
    return build_config(arch, text, vision, token_ids, tie_word_embeddings=True)


def count_parameters(config: PretrainedConfig) -> int:
    """Number of parameters of a model built from `config` (on the meta device: no memory, no init)."""
    arch = config.model_type
    with torch.device("meta"):
        model = model_class(arch)(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def make_tiny_model(out_dir: str | Path, arch: str = "qwen2_5_vl", preset: str = "5m", seed: int = 0) -> Path:
    """Write a random-init tiny Qwen-VL model folder to `out_dir` and return its path.

    Same weights and files for the same (arch, preset, seed).
    """
    out_dir = Path(out_dir)
    train_tokenizer(out_dir, template=arch)  # each architecture's own chat-template conventions
    token_ids = special_token_ids(out_dir)
    config = tiny_config(arch, preset, token_ids, vocab_size=max(token_ids.values()) + 1)
    torch.manual_seed(seed)
    model = model_class(arch)(config)  # transformers' own init: normal(0, 0.02), norms at 1
    model.save_pretrained(out_dir, safe_serialization=True)
    min_pixels, max_pixels = TINY_PIXELS[arch]
    write_model_files(out_dir, config, arch, min_pixels, max_pixels)
    return out_dir


if __name__ == "__main__":  # python -m lensrl.models.tiny: print the presets' sizes
    from lensrl.models.tokenizer import tiny_special_token_ids

    ids = tiny_special_token_ids()
    for arch in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        for name in PRESETS:
            start = time.perf_counter()
            n = count_parameters(tiny_config(arch, name, ids, max(ids.values()) + 1))
            print(f"{arch:12s} {name:4s} {n / 1e6:7.2f}M params ({time.perf_counter() - start:.2f}s)")
