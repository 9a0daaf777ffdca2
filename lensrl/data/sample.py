"""The unit of data: one dataset row, ready to be prompted.

Images stay encoded (`ImageSource`) until a batch needs them, so host memory is bounded by the
batch, not by the dataset.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps

IMAGE_PLACEHOLDER = "<image>"


class DataError(ValueError):
    """Bad input data: the message names the file, row, key or value and what was expected."""


@dataclass(frozen=True)
class ImageSource:
    """An encoded image and where it came from (for error messages).

    `data` is raw bytes, a file path, a base64 string, a `{bytes, path}` struct, or a PIL image.
    """

    data: Any = field(repr=False)
    origin: str = ""  # e.g. "train.parquet row 17 column 'images'[0]"
    base_dir: str | None = None  # relative paths are resolved against this folder

    def load(self) -> Image.Image:
        """Decode to an RGB PIL image, or raise DataError naming `origin`.

        As transformers does it: the EXIF orientation applied (`load_image`'s exif_transpose),
        then `to_rgb` (the Qwen-VL image processors' convert_to_rgb: transparency on white)."""
        try:
            image = _decode(self.data, self.base_dir)
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
        except DataError as e:
            raise DataError(f"{self.origin}: {e}") from None
        except Exception as e:  # PIL raises many types for corrupt data
            raise DataError(f"{self.origin}: cannot decode image ({type(e).__name__}: {e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency (an alpha band or a palette's transparent index) onto
    white, as transformers' `convert_to_rgb` does; a plain `convert("RGB")` drops the alpha and a
    black drawing on a transparent background becomes a black square."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _decode(data: Any, base_dir: str | None) -> Image.Image:
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, dict):
        raw = data.get("bytes")
        if raw:
            return _decode(raw, base_dir)
        path = data.get("path")
        if path:
            return _decode(path, base_dir)
        raise DataError(f"image struct has neither 'bytes' nor 'path' (keys: {sorted(data)})")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(data)))
    if isinstance(data, str):
        if data.startswith("data:image"):
            data = data.split(",", 1)[1]
        candidate = data if os.path.isabs(data) or base_dir is None else os.path.join(base_dir, data)
        if len(data) < 4096 and os.path.exists(candidate):
            return Image.open(candidate)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise DataError(f"string is neither an existing file path nor base64 image data: {data[:80]!r}") from None
        return Image.open(io.BytesIO(raw))
    raise DataError(f"unsupported image value of type {type(data).__name__}; expected bytes, "
                    "{bytes, path} struct, base64 string or file path")


@dataclass
class Sample:
    """One prompt with its images and ground truth.

    `prompt` is the user's text; each `<image>` in it marks where the next image goes (no
    placeholder: the images go before the text). `target` is the assistant text SFT trains on.
    `answer` is what rewards and evaluation compare against (a letter for multiple choice).
    """

    prompt: str
    images: list[ImageSource] = field(default_factory=list)
    answer: str = ""
    choices: list[str] | None = None
    system_prompt: str | None = None
    target: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # source file, row index, id, ...

    def load_images(self) -> list[Image.Image]:
        return [image.load() for image in self.images]

    def where(self) -> str:
        """'train.parquet row 17 (id q17)'-style location of this sample, from whatever its meta holds."""
        meta = self.meta or {}
        source = next((meta[k] for k in ("file", "source", "path", "split") if meta.get(k) is not None), None)
        row = next((meta[k] for k in ("row", "index", "row_index", "idx") if meta.get(k) is not None), None)
        parts = [str(source) if source is not None else None, f"row {row}" if row is not None else None]
        if meta.get("id") is not None:
            parts.append(f"(id {meta['id']})")
        text = " ".join(p for p in parts if p)
        return text or ", ".join(f"{k}={v!r}" for k, v in meta.items()) or "sample (no meta)"
