"""Sample -> model inputs: chat template, expanded image tokens, pixels and M-RoPE positions.

One function (`Processor.__call__`) used by rollout, training and evaluation alike. It reproduces
transformers' Qwen2-VL/Qwen2.5-VL/Qwen3-VL processor (torchvision image backend) token for token
and pixel for pixel without torchvision:

    image (uint8, C,H,W) -> smart_resize to multiples of patch*merge within [min_pixels, max_pixels]
      -> bicubic resize with antialias (torch's uint8 kernel, as torchvision uses on CPU)
      -> (x - 255*mean) / (255*std) in float32 (rescale fused into normalize, as transformers does)
      -> patches (grid_h*grid_w, C*temporal_patch*patch*patch), merge-window order, each image
         repeated over the temporal patch

and the prompt is the folder's own chat template with each `<|image_pad|>` expanded to
grid_h*grid_w/merge² tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lensrl.data.sample import IMAGE_PLACEHOLDER, DataError, ImageSource, Sample, _decode, to_rgb
from lensrl.models.rope import mrope_positions

ASSISTANT_HEADER = "<|im_start|>assistant\n"

# Files that make a model folder's tokenizer and processor; copied by `save_pretrained`.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)


@dataclass
class ProcessedSample:
    input_ids: torch.Tensor  # (T,) long
    position_ids: torch.Tensor  # (3, T) long, the model's multimodal (t, h, w) rope positions
    rope_delta: int  # position of a token appended at index T is T + rope_delta (all 3 axes)
    pixel_values: torch.Tensor | None  # (num_patches, 3 * temporal_patch * patch * patch) float32
    image_grid_thw: torch.Tensor | None  # (num_images, 3) long
    prompt_length: int  # tokens up to and including the assistant header
    loss_mask: torch.Tensor | None  # (T,) bool, True on target tokens and the closing <|im_end|>


@dataclass(frozen=True)
class ImageSettings:
    """The Qwen2-VL image processor's settings (preprocessor_config.json)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImageSettings:
        """Read preprocessor_config.json the way transformers does: min/max_pixels override `size`."""
        default = cls()
        size = raw.get("size") or {}
        min_pixels = (
            raw.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or default.min_pixels
        )
        max_pixels = (
            raw.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or default.max_pixels
        )
        resample = raw.get("resample", 3)
        if resample != 3:
            raise ValueError(
                f"preprocessor_config.json: resample={resample}; lensrl supports only bicubic (3), "
                "which every Qwen-VL checkpoint uses"
            )
        return cls(
            patch_size=int(raw.get("patch_size", default.patch_size)),
            temporal_patch_size=int(raw.get("temporal_patch_size", default.temporal_patch_size)),
            merge_size=int(raw.get("merge_size", default.merge_size)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            image_mean=tuple(_per_channel(raw.get("image_mean", default.image_mean))),
            image_std=tuple(_per_channel(raw.get("image_std", default.image_std))),
            rescale_factor=float(raw.get("rescale_factor", default.rescale_factor)),
            do_resize=bool(raw.get("do_resize", True)),
            do_rescale=bool(raw.get("do_rescale", True)),
            do_normalize=bool(raw.get("do_normalize", True)),
        )


def _per_channel(value: Any) -> list[float]:
    return [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's resize target: sides divisible by `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible. Same arithmetic as transformers (Python `round`)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_bicubic(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's `resize(..., BICUBIC, antialias=True)` on a uint8 (..., C, H, W) tensor.

    On CPU torchvision hands uint8 straight to torch's uint8 kernel (rounding inside the kernel);
    elsewhere it resizes in float32, clamps to [0, 255], rounds and casts back. The two differ by a
    few levels on some pixels, so we follow the same branch.
    """
    if tuple(image.shape[-2:]) == (height, width):
        return image
    batch = image.reshape(-1, *image.shape[-3:])
    if image.device.type == "cpu":
        out = F.interpolate(batch, size=[height, width], mode="bicubic", align_corners=False, antialias=True)
    else:
        out = F.interpolate(
            batch.float(), size=[height, width], mode="bicubic", align_corners=False, antialias=True
        )
        out = out.clamp_(0, 255).round_().to(torch.uint8)
    return out.reshape(*image.shape[:-2], height, width)


class Processor:
    """Turns a `Sample` into model inputs for a Qwen2.5-VL / Qwen3-VL folder (see module doc)."""

    def __init__(
        self,
        tokenizer: Any,
        image: ImageSettings,
        chat_template: str,
        token_ids: dict[str, int],
        eos_token_ids: list[int],
        pad_token_id: int,
        arch: str,
        model_dir: Path | None = None,
    ):
        self.tokenizer = tokenizer
        self.image = image
        self.chat_template = chat_template
        self.image_token_id = token_ids["image"]
        self.vision_start_token_id = token_ids["vision_start"]
        self.vision_end_token_id = token_ids["vision_end"]
        self.im_end_token_id = token_ids["im_end"]
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.arch = arch
        self.model_dir = model_dir
        # Tokens a policy must never generate: a sampled <|image_pad|> would claim an image
        # feature in the training forward that does not exist. Rollouts mask them out and the
        # trainer's log-probabilities use the same masked distribution.
        self.suppress_token_ids = sorted({self.image_token_id, self.vision_start_token_id,
                                          self.vision_end_token_id, *token_ids.get("extra_suppress", [])})

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> Processor:
        """Read a model folder: tokenizer, preprocessor_config.json, chat template, config.json ids.

        `min_pixels` / `max_pixels` override the folder's preprocessor_config.json.
        """
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        config = _read_json(model_dir / "config.json", required=True)
        arch = config.get("model_type", "")
        raw_image = _read_json(model_dir / "preprocessor_config.json", required=True)
        image = ImageSettings.from_dict(raw_image)
        if min_pixels is not None:
            image = dataclasses.replace(image, min_pixels=min_pixels)
        if max_pixels is not None:
            image = dataclasses.replace(image, max_pixels=max_pixels)
        if image.min_pixels > image.max_pixels:
            raise ValueError(
                f"min_pixels ({image.min_pixels}) is larger than max_pixels ({image.max_pixels})"
            )
        vision = config.get("vision_config") or {}
        merge = vision.get("spatial_merge_size", image.merge_size)
        patch = vision.get("patch_size", image.patch_size)
        if (merge, patch) != (image.merge_size, image.patch_size):
            raise ValueError(
                f"{model_dir}: preprocessor_config.json (patch {image.patch_size}, merge "
                f"{image.merge_size}) disagrees with config.json's vision_config (patch {patch}, merge {merge})"
            )

        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        chat_template = _read_chat_template(model_dir) or tokenizer.chat_template
        if not chat_template:
            raise ValueError(
                f"{model_dir}: no chat template (tokenizer_config.json, chat_template.json or "
                "chat_template.jinja)"
            )

        def token_id(key: str, token: str) -> int:
            value = config.get(key, (config.get("text_config") or {}).get(key))
            if value is None:
                value = tokenizer.convert_tokens_to_ids(token)
            if value is None or value == tokenizer.unk_token_id:
                raise ValueError(f"{model_dir}: tokenizer has no {token} token and config.json no {key}")
            return int(value)

        token_ids = {
            "image": token_id("image_token_id", "<|image_pad|>"),
            "vision_start": token_id("vision_start_token_id", "<|vision_start|>"),
            "vision_end": token_id("vision_end_token_id", "<|vision_end|>"),
            "im_end": int(tokenizer.convert_tokens_to_ids("<|im_end|>")),
            "extra_suppress": [i for i in [tokenizer.convert_tokens_to_ids("<|video_pad|>")]
                               if i is not None and i != tokenizer.unk_token_id],
        }
        generation = _read_json(model_dir / "generation_config.json")
        eos_token_ids = [token_ids["im_end"]]
        for source in (generation, config, config.get("text_config") or {}):
            value = source.get("eos_token_id")
            for eos in value if isinstance(value, list) else [value]:
                if eos is not None and int(eos) not in eos_token_ids:
                    eos_token_ids.append(int(eos))
        pad = tokenizer.pad_token_id
        for candidate in (
            generation.get("pad_token_id"),
            config.get("pad_token_id"),
            tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        ):
            if pad is None and candidate is not None:
                pad = int(candidate)
        return cls(tokenizer, image, chat_template, token_ids, eos_token_ids, pad, arch, model_dir)

    # ------------------------------------------------------------------ sizes

    def image_size_after_resize(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) an image of `width` x `height` pixels is resized to."""
        if not self.image.do_resize:
            return height, width
        factor = self.image.patch_size * self.image.merge_size
        return smart_resize(height, width, factor, self.image.min_pixels, self.image.max_pixels)

    def num_image_tokens(self, width: int, height: int) -> int:
        """LLM tokens one image of `width` x `height` pixels becomes."""
        h, w = self.image_size_after_resize(width, height)
        return (h // self.image.patch_size) * (w // self.image.patch_size) // self.image.merge_size**2

    def prompt_length(self, sample: Sample) -> int:
        """Prompt tokens of `sample` (image tokens included), reading only the images' headers."""
        ids = self._prompt_ids(sample)
        sizes = [_image_size(source) for source in sample.images]
        extra = sum(self._checked_num_image_tokens(w, h, sample, i) - 1 for i, (w, h) in enumerate(sizes))
        return len(ids) + extra

    # ------------------------------------------------------------------ processing

    def __call__(self, sample: Sample, add_target: bool = False) -> ProcessedSample:
        """Token ids, pixels and rope positions of `sample`'s prompt (ending in the assistant header).

        add_target: append `sample.target` and <|im_end|>, marked by `loss_mask` (for SFT).
        Raises DataError naming the row for placeholder/image mismatches and bad images.
        """
        prompt_ids = self._prompt_ids(sample)
        if add_target and sample.target is None:
            raise DataError(f"{sample.where()}: no target text for SFT (sample.target is None)")
        images = sample.load_images()
        pixel_values, image_grid_thw = None, None
        if images:
            patches, grids = zip(*(self._image_patches(image, sample, i) for i, image in enumerate(images)))
            pixel_values = torch.cat(patches)  # (num_patches, C * tp * p * p)
            image_grid_thw = torch.tensor(grids, dtype=torch.long)  # (num_images, 3)
            prompt_ids = self._expand_image_tokens(prompt_ids, image_grid_thw)
        prompt_length = len(prompt_ids)
        ids, loss_mask = prompt_ids, None
        if add_target:
            # tokenised on its own, so the prompt/target boundary is exact (no merge across it)
            target_ids = self.tokenizer(sample.target, add_special_tokens=False)["input_ids"]
            ids = prompt_ids + target_ids + [self.im_end_token_id]
            loss_mask = torch.zeros(len(ids), dtype=torch.bool)
            loss_mask[prompt_length:] = True
        input_ids = torch.tensor(ids, dtype=torch.long)
        position_ids, rope_delta = mrope_positions(
            input_ids, image_grid_thw, self.image.merge_size, self.image_token_id, self.vision_start_token_id
        )
        return ProcessedSample(
            input_ids=input_ids,
            position_ids=position_ids,
            rope_delta=rope_delta,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            prompt_length=prompt_length,
            loss_mask=loss_mask,
        )

    @functools.cached_property
    def assistant_prefix(self) -> str:
        """What the chat template writes at the start of the assistant turn after its header, which
        the completion continues: "" for Qwen2.5-VL and Qwen3-VL Instruct, "<think>\\n" for the
        Qwen3-VL thinking variants. Rewards judge the format of prefix + completion."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=self.chat_template,
                                                  tokenize=False, add_generation_prompt=True)
        head, sep, tail = text.rpartition(ASSISTANT_HEADER)
        return tail if sep else ""

    def decode(self, token_ids: Any, skip_special_tokens: bool = True) -> str:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Copy the tokenizer and processor files into `out_dir` (an HF model folder), with this
        processor's min/max_pixels written to preprocessor_config.json."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.model_dir is None:
            raise ValueError("this Processor was not read from a folder; nothing to copy")
        for name in PROCESSOR_FILES:
            source = self.model_dir / name
            if source.is_file() and source.resolve() != (out_dir / name).resolve():
                shutil.copyfile(source, out_dir / name)
        preprocessor = _read_json(self.model_dir / "preprocessor_config.json", required=True)
        preprocessor["min_pixels"], preprocessor["max_pixels"] = self.image.min_pixels, self.image.max_pixels
        if isinstance(preprocessor.get("size"), dict):
            preprocessor["size"] = {
                "shortest_edge": self.image.min_pixels,
                "longest_edge": self.image.max_pixels,
            }
        (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")

    # ------------------------------------------------------------------ internals

    def _messages(self, sample: Sample) -> list[dict[str, Any]]:
        parts = sample.prompt.split(IMAGE_PLACEHOLDER)
        num_placeholders, num_images = len(parts) - 1, len(sample.images)
        if num_placeholders == 0:
            content = [{"type": "image"}] * num_images + [{"type": "text", "text": sample.prompt}]
        elif num_placeholders != num_images:
            raise DataError(
                f"{sample.where()}: the prompt has {num_placeholders} {IMAGE_PLACEHOLDER} "
                f"placeholder(s) but the row has {num_images} image(s); each image needs one "
                "placeholder, or none at all (images then go before the text)"
            )
        else:
            content = []
            for i, text in enumerate(parts):
                if i > 0:
                    content.append({"type": "image"})
                if text:
                    content.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": content}]
        if sample.system_prompt:
            messages.insert(0, {"role": "system", "content": sample.system_prompt})
        return messages

    def _prompt_ids(self, sample: Sample) -> list[int]:
        """Templated prompt ids with one <|image_pad|> per image (not yet expanded)."""
        text = self.tokenizer.apply_chat_template(
            self._messages(sample),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        num_pads = ids.count(self.image_token_id)
        if num_pads != len(sample.images):
            raise DataError(
                f"{sample.where()}: the templated prompt has {num_pads} image tokens for "
                f"{len(sample.images)} image(s); does the prompt text contain a literal <|image_pad|>?"
            )
        return ids

    def _expand_image_tokens(self, ids: list[int], image_grid_thw: torch.Tensor) -> list[int]:
        counts = (image_grid_thw.prod(-1) // self.image.merge_size**2).tolist()
        expanded, image_index = [], 0
        for token in ids:
            if token == self.image_token_id:
                expanded.extend([token] * counts[image_index])
                image_index += 1
            else:
                expanded.append(token)
        return expanded

    def _checked_num_image_tokens(self, width: int, height: int, sample: Sample, index: int) -> int:
        try:
            return self.num_image_tokens(width, height)
        except ValueError as e:
            raise DataError(f"{_image_origin(sample, index)}: {e}") from None

    def _image_patches(
        self, image: Image.Image, sample: Sample, index: int
    ) -> tuple[torch.Tensor, list[int]]:
        """One RGB image -> (grid_h * grid_w, C * tp * p * p) float32 patches and its [1, grid_h, grid_w]."""
        s = self.image
        try:
            height, width = self.image_size_after_resize(image.width, image.height)
        except ValueError as e:
            raise DataError(f"{_image_origin(sample, index)}: {e}") from None
        pixels = torch.from_numpy(np.asarray(to_rgb(image), dtype=np.uint8).copy())  # (H, W, C)
        pixels = pixels.permute(2, 0, 1).contiguous()  # (C, H, W) uint8
        pixels = resize_bicubic(pixels, height, width)
        x = pixels.to(torch.float32)
        if s.do_rescale and s.do_normalize:  # transformers fuses the rescale into mean/std
            mean = (torch.tensor(s.image_mean) * (1.0 / s.rescale_factor)).view(-1, 1, 1)
            std = (torch.tensor(s.image_std) * (1.0 / s.rescale_factor)).view(-1, 1, 1)
            x = x.sub(mean).div_(std)
        elif s.do_normalize:
            x = x.sub(torch.tensor(s.image_mean).view(-1, 1, 1)).div_(
                torch.tensor(s.image_std).view(-1, 1, 1)
            )
        elif s.do_rescale:
            x = x * s.rescale_factor
        channels, p, m, tp = x.shape[0], s.patch_size, s.merge_size, s.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        # (C, H, W) -> (gh/m, gw/m, m, m, C, p, p): merge windows row-major, patches inside row-major
        patches = x.reshape(channels, grid_h // m, m, p, grid_w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        # a still image fills every temporal slot of its patch: (..., C, tp, p, p)
        patches = patches.unsqueeze(5).expand(-1, -1, -1, -1, -1, tp, -1, -1)
        return patches.reshape(grid_h * grid_w, channels * tp * p * p), [1, grid_h, grid_w]


def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} not found (is {path.parent} a Qwen-VL model folder?)")
        return {}
    with open(path) as f:
        return json.load(f)


def _read_chat_template(model_dir: Path) -> str | None:
    """A chat template in its own file, as real Qwen folders ship it (it wins over tokenizer_config's)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    raw = _read_json(model_dir / "chat_template.json")
    return raw.get("chat_template")


def _image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels; as `ImageSource.load`
    will give them (an EXIF orientation that turns the image swaps the two)."""
    try:
        image = _decode(source.data, source.base_dir)  # lazy: PIL reads only the header here
        return image.size[::-1] if _turned(image) else image.size
    except DataError as e:
        raise DataError(f"{source.origin}: {e}") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise DataError(f"{source.origin}: cannot read image header ({type(e).__name__}: {e})") from None


def _turned(image) -> bool:
    """Whether the EXIF orientation turns the image by 90 or 270 degrees (width and height swap).
    A header whose EXIF cannot be read counts as not turned (decoding it later fails clearly)."""
    try:
        return image.getexif().get(0x0112) in (5, 6, 7, 8)
    except Exception:  # PIL raises many types for damaged files
        return False


def _image_origin(sample: Sample, index: int) -> str:
    origin = sample.images[index].origin if index < len(sample.images) else ""
    return origin or f"{sample.where()} image {index}"
