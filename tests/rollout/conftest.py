"""Fixtures for the rollout tests: tiny models of both architectures and a mixed prompt set."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lensrl.data.sample import ImageSource, Sample
from lensrl.models.load import load_policy


def image_bytes(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def mixed_samples() -> list[Sample]:
    """One image, two images, text only (long), text only (short), a larger image: very different
    prompt lengths, image counts and image shapes."""
    return [
        Sample("<image>What colour is the shape?", [ImageSource(image_bytes(56, 56, 1), "a")]),
        Sample(
            "Compare <image> and <image>: which is larger?",
            [ImageSource(image_bytes(112, 56, 2), "b0"), ImageSource(image_bytes(56, 84, 3), "b1")],
        ),
        Sample("No image here, just a much longer question about triangles and their angles. " * 4),
        Sample("Hi"),
        Sample("Describe <image> briefly.", [ImageSource(image_bytes(112, 112, 4), "c")]),
    ]


@pytest.fixture(autouse=True, scope="package")
def one_cpu_thread():
    """Tiny models gain nothing from a second thread, and an OpenMP barrier per matmul makes
    each one ~100x slower whenever another process is busy on the same cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sharpened_policy(folder):
    """A tiny model whose text weights are scaled up 6x: at init scale (std 0.02) it is almost
    uniform and greedy-decodes one token forever, which would hide position and attention bugs;
    sharpened, its outputs depend on the prompt, the images and every earlier token."""
    model, processor = load_policy(folder)
    with torch.no_grad():
        for param in model.model.language_model.parameters():
            if param.ndim == 2:
                param.mul_(6.0)
    return model, processor


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def policy(request, tiny_qwen25_dir, tiny_qwen3_dir):
    """(model, processor, prompts) for each architecture. Tests must not change the model."""
    model, processor = sharpened_policy(tiny_qwen25_dir if request.param == "qwen2_5_vl" else tiny_qwen3_dir)
    return model, processor, [processor(s) for s in mixed_samples()]


@pytest.fixture(scope="module")
def qwen25(tiny_qwen25_dir):
    """A Qwen2.5-VL (model, processor, prompts) for single-architecture tests."""
    model, processor = sharpened_policy(tiny_qwen25_dir)
    return model, processor, [processor(s) for s in mixed_samples()]
