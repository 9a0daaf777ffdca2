"""Shared pytest fixtures. Each section belongs to one part of lensrl; keep sections self-contained."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

# ----------------------------------------------------------------------------------------------
# models: tiny Qwen-VL folders and small test images
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_qwen25_dir(tmp_path_factory):
    """A random-init Qwen2.5-VL folder (smallest preset, seed 0), made once per session."""
    from lensrl.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), arch="qwen2_5_vl", preset="1m", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """A random-init Qwen3-VL folder (smallest preset, seed 0), made once per session."""
    from lensrl.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3_vl"), arch="qwen3_vl", preset="1m", seed=0)


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """A random-init Qwen3-VL-MoE folder (smallest preset: 3 sparse layers, 8 experts of width 48,
    top-2; seed 0), made once per session."""
    from lensrl.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3_vl_moe"), arch="qwen3_vl_moe", preset="1m", seed=0)


def make_test_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image: smooth gradients plus noise, so resizing has real work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-40, 41, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encode_image(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture
def make_image():
    """make_image(width, height, seed=0) -> PIL RGB image."""
    return make_test_image


@pytest.fixture
def make_image_bytes():
    """make_image_bytes(width, height, seed=0, format="PNG") -> encoded image bytes."""

    def make(width: int, height: int, seed: int = 0, format: str = "PNG") -> bytes:
        return encode_image(make_test_image(width, height, seed), format)

    return make
