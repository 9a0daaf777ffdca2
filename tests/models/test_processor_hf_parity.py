"""lensrl's Processor against transformers' own AutoProcessor: token for token, pixel for pixel.

transformers' Qwen-VL processor needs torchvision (its default image backend and the video
processor), so this file runs where torchvision is installed (the GPU machine) and skips elsewhere.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("torchvision", reason="transformers' Qwen-VL AutoProcessor needs torchvision")

from transformers import AutoProcessor  # noqa: E402

from lensrl.data.sample import ImageSource, Sample  # noqa: E402
from lensrl.models.processor import Processor  # noqa: E402
from lensrl.models.rope import mm_token_type_ids  # noqa: E402

# (width, height): square, wide, tall, tiny (upscaled to min_pixels), large (downscaled to
# max_pixels), an exact multiple of the patch grid (no resize), a prime-sized odd one.
IMAGE_SIZES = [(64, 64), (200, 90), (70, 260), (17, 23), (640, 480), (112, 224), (331, 197)]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def arch(request):
    return request.param


@pytest.fixture(scope="module", params=["tiny_bounds", "large_bounds"])
def model_dir(request, arch, tiny_qwen25_dir, tiny_qwen3_dir, tmp_path_factory):
    """The tiny folder, and a copy whose preprocessor_config.json allows ~100x larger images."""
    source = {"qwen2_5_vl": tiny_qwen25_dir, "qwen3_vl": tiny_qwen3_dir}[arch]
    if request.param == "tiny_bounds":
        return source
    folder = tmp_path_factory.mktemp(f"{arch}_large")
    shutil.copytree(source, folder, dirs_exist_ok=True)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["min_pixels"], config["max_pixels"] = 128 * 128, 640 * 640
    config["size"] = {"shortest_edge": 128 * 128, "longest_edge": 640 * 640}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def hf_processor(model_dir):
    processor = AutoProcessor.from_pretrained(model_dir)
    # the reference is the torchvision backend, which lensrl reproduces (the PIL backend resizes differently)
    assert getattr(processor.image_processor, "backend", "torchvision") == "torchvision"
    return processor


def hf_inputs(hf_processor, prompt_parts: list, pil_images: list):
    content = [{"type": "image"} if part is None else {"type": "text", "text": part} for part in prompt_parts]
    messages = [{"role": "user", "content": content}]
    text = hf_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return hf_processor(text=[text], images=pil_images or None, return_tensors="pt")


def assert_same(ours, theirs, image_token_id: int):
    torch.testing.assert_close(ours.input_ids, theirs["input_ids"][0], rtol=0, atol=0)
    torch.testing.assert_close(ours.image_grid_thw, theirs["image_grid_thw"], rtol=0, atol=0)
    # Resizing works on uint8 and must match exactly: one level off anywhere would show up as an error
    # of 1/255/std >= 0.015. The normalisation after it is float32 arithmetic in the same order as
    # transformers; 1e-6 leaves room only for a last-ulp difference should that order ever change.
    torch.testing.assert_close(ours.pixel_values, theirs["pixel_values"], rtol=0, atol=1e-6)
    if "mm_token_type_ids" in theirs:
        expected = theirs["mm_token_type_ids"][0].to(torch.int32)
        torch.testing.assert_close(
            mm_token_type_ids(ours.input_ids, image_token_id), expected, rtol=0, atol=0
        )


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=[f"{w}x{h}" for w, h in IMAGE_SIZES])
def test_single_image_matches(model_dir, hf_processor, make_image, size):
    image = make_image(*size, seed=sum(size))
    processor = Processor.from_pretrained(model_dir)
    ours = processor(Sample(prompt="Look at <image> and find x.", images=[ImageSource(image)]))
    theirs = hf_inputs(hf_processor, ["Look at ", None, " and find x."], [image])
    assert_same(ours, theirs, processor.image_token_id)


def test_several_images_match(model_dir, hf_processor, make_image):
    pil_images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(IMAGE_SIZES)]
    processor = Processor.from_pretrained(model_dir)
    prompt = "Compare: " + " vs ".join(["<image>"] * len(pil_images)) + ". Which is wider?"
    ours = processor(Sample(prompt=prompt, images=[ImageSource(image) for image in pil_images]))
    parts = ["Compare: "]
    for i in range(len(pil_images)):
        parts += [None] + ([" vs "] if i < len(pil_images) - 1 else [])
    parts.append(". Which is wider?")
    assert_same(ours, hf_inputs(hf_processor, parts, pil_images), processor.image_token_id)


def test_images_first_and_text_only_match(model_dir, hf_processor, make_image):
    processor = Processor.from_pretrained(model_dir)
    pil_images = [make_image(90, 60, seed=1), make_image(60, 90, seed=2)]
    ours = processor(Sample(prompt="Which is taller?", images=[ImageSource(image) for image in pil_images]))
    assert_same(
        ours, hf_inputs(hf_processor, [None, None, "Which is taller?"], pil_images), processor.image_token_id
    )

    ours = processor(Sample(prompt="Find x. \\frac{5}{2}"))
    theirs = hf_inputs(hf_processor, ["Find x. \\frac{5}{2}"], [])
    torch.testing.assert_close(ours.input_ids, theirs["input_ids"][0], rtol=0, atol=0)
    assert ours.pixel_values is None and "pixel_values" not in theirs
