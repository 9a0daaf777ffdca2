"""lensrl's Processor: templating, image tokens, pixels, SFT masks, and positions the model agrees with."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from lensrl.data.sample import DataError, ImageSource, Sample
from lensrl.models.processor import Processor, smart_resize
from lensrl.models.rope import mm_token_type_ids


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def model_dir(request, tiny_qwen25_dir, tiny_qwen3_dir):
    return {"qwen2_5_vl": tiny_qwen25_dir, "qwen3_vl": tiny_qwen3_dir}[request.param]


@pytest.fixture(scope="module")
def processor(model_dir):
    return Processor.from_pretrained(model_dir)


def ids_of(processor: Processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def images(make_image_bytes, *sizes) -> list[ImageSource]:
    return [
        ImageSource(make_image_bytes(w, h, seed=i), origin=f"test image {i}")
        for i, (w, h) in enumerate(sizes)
    ]


def test_image_token_counts_match_the_published_models(tiny_qwen25_dir, tiny_qwen3_dir):
    # 448x448: 32x32 patches of 14 px -> 256 tokens (Qwen2.5-VL); 28x28 of 16 px -> 196 (Qwen3-VL)
    assert Processor.from_pretrained(tiny_qwen25_dir, max_pixels=4194304).num_image_tokens(448, 448) == 256
    assert Processor.from_pretrained(tiny_qwen3_dir, max_pixels=4194304).num_image_tokens(448, 448) == 196
    # the tiny folders' own bounds keep images at a handful of tokens
    assert Processor.from_pretrained(tiny_qwen25_dir).num_image_tokens(448, 448) == 16


def test_min_and_max_pixels_are_honoured(model_dir, processor):
    factor = processor.image.patch_size * processor.image.merge_size
    for width, height in [(10, 10), (20, 300), (448, 448), (1000, 90), (3000, 2000)]:
        h, w = processor.image_size_after_resize(width, height)
        assert h % factor == 0 and w % factor == 0
        assert processor.image.min_pixels <= h * w <= processor.image.max_pixels
    big = Processor.from_pretrained(
        model_dir, min_pixels=100 * factor * factor, max_pixels=400 * factor * factor
    )
    assert big.image_size_after_resize(50, 50) == (10 * factor, 10 * factor)  # upscaled to min_pixels
    assert big.image_size_after_resize(5000, 5000) == (20 * factor, 20 * factor)  # downscaled to max_pixels
    assert big.image_size_after_resize(14 * factor, 15 * factor) == (15 * factor, 14 * factor)  # (h, w)
    with pytest.raises(ValueError, match="min_pixels"):
        Processor.from_pretrained(model_dir, min_pixels=10**6, max_pixels=10**5)


def test_smart_resize_rounds_like_python():
    # Qwen's smart_resize uses Python's round (half to even): 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2
    assert smart_resize(42, 70, 28, 0, 10**9) == (56, 56)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500, 28, 0, 10**9)


def test_placeholder_marks_where_the_image_goes(processor, make_image_bytes):
    sample = Sample(prompt="Look at <image> then find x.", images=images(make_image_bytes, (100, 80)))
    out = processor(sample)
    n = processor.num_image_tokens(100, 80)
    ids = out.input_ids.tolist()
    start = ids.index(processor.vision_start_token_id)
    assert ids[start - len(ids_of(processor, "Look at ")) : start] == ids_of(processor, "Look at ")
    assert ids[start + 1 : start + 1 + n] == [processor.image_token_id] * n
    assert ids[start + 1 + n] == processor.vision_end_token_id
    after = ids_of(processor, " then find x.")
    assert ids[start + 2 + n : start + 2 + n + len(after)] == after
    grid = out.image_grid_thw[0].tolist()
    assert (
        grid[0] == 1 and grid[1] * grid[2] == out.pixel_values.shape[0] == n * processor.image.merge_size**2
    )
    s = processor.image
    assert out.pixel_values.shape[1] == 3 * s.temporal_patch_size * s.patch_size**2
    assert out.pixel_values.dtype == torch.float32
    text = processor.decode(out.input_ids, skip_special_tokens=False)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if processor.arch == "qwen2_5_vl" else ""
    assert text.startswith(system + "<|im_start|>user\nLook at ")  # Qwen3-VL's template adds no system prompt
    assert text.endswith("then find x.<|im_end|>\n<|im_start|>assistant\n")
    plain_system = "system\nYou are a helpful assistant.\n" if system else ""
    assert processor.decode(out.input_ids) == plain_system + "user\nLook at  then find x.\nassistant\n"


def test_no_placeholder_puts_images_first(processor, make_image_bytes):
    sample = Sample(prompt="Which is larger?", images=images(make_image_bytes, (60, 60), (120, 70)))
    out = processor(sample)
    text = processor.decode(out.input_ids, skip_special_tokens=False)
    user = text.split("<|im_start|>user\n")[1]
    assert user.startswith("<|vision_start|><|image_pad|>")
    assert user.count("<|vision_start|>") == 2
    assert user.split("<|vision_end|>")[2] == "Which is larger?<|im_end|>\n<|im_start|>assistant\n"


def test_several_images_and_system_prompt(processor, make_image_bytes):
    sizes = [(60, 60), (130, 56), (56, 130)]
    sample = Sample(
        prompt="A <image> B <image> C <image> D",
        images=images(make_image_bytes, *sizes),
        system_prompt="Be brief.",
    )
    out = processor(sample)
    assert out.image_grid_thw.shape == (3, 3)
    assert out.pixel_values.shape[0] == int(out.image_grid_thw.prod(-1).sum())
    counts = [processor.num_image_tokens(w, h) for w, h in sizes]
    assert int((out.input_ids == processor.image_token_id).sum()) == sum(counts)
    assert [int(g.prod()) // processor.image.merge_size**2 for g in out.image_grid_thw] == counts
    text = processor.decode(out.input_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert out.prompt_length == len(out.input_ids) == processor.prompt_length(sample)
    assert out.loss_mask is None


def test_placeholder_count_mismatch_names_the_row(processor, make_image_bytes):
    sample = Sample(
        prompt="<image> and <image>?",
        images=images(make_image_bytes, (60, 60)),
        meta={"file": "train.parquet", "row": 7},
    )
    with pytest.raises(DataError, match=r"train\.parquet row 7.*2 <image> placeholder\(s\).*1 image"):
        processor(sample)
    with pytest.raises(DataError, match=r"train\.parquet row 7"):
        processor.prompt_length(sample)


def test_prompt_length_reads_only_headers(processor, make_image, tmp_path):
    path = tmp_path / "wide.png"
    make_image(200, 90).save(path)
    sample = Sample(prompt="<image> Find x.", images=[ImageSource(str(path), origin="wide.png")])
    assert processor.prompt_length(sample) == processor(sample).prompt_length
    # a truncated file still has a readable header: prompt_length works, full processing fails cleanly
    (tmp_path / "broken.png").write_bytes(path.read_bytes()[:200])
    broken = Sample(
        prompt="<image> Find x.", images=[ImageSource(str(tmp_path / "broken.png"), origin="broken.png")]
    )
    assert processor.prompt_length(broken) == processor.prompt_length(sample)
    with pytest.raises(DataError, match="broken.png"):
        processor(broken)


def test_sft_loss_mask_covers_target_and_im_end(processor, make_image_bytes):
    target = "<think> 3 + 4 = 7 </think> \\boxed{7}"
    sample = Sample(prompt="<image> Find x.", images=images(make_image_bytes, (70, 70)), target=target)
    prompt_only = processor(sample)
    out = processor(sample, add_target=True)
    target_ids = ids_of(processor, target) + [processor.im_end_token_id]
    assert out.input_ids[out.loss_mask].tolist() == target_ids
    assert out.prompt_length == prompt_only.prompt_length == len(out.input_ids) - len(target_ids)
    assert not out.loss_mask[: out.prompt_length].any() and out.loss_mask[out.prompt_length :].all()
    header = ids_of(processor, "<|im_start|>assistant\n")
    assert out.input_ids[out.prompt_length - len(header) : out.prompt_length].tolist() == header
    torch.testing.assert_close(
        out.position_ids[:, : out.prompt_length], prompt_only.position_ids, rtol=0, atol=0
    )
    assert out.rope_delta == prompt_only.rope_delta
    assert processor.decode(out.input_ids[out.loss_mask]) == target
    with pytest.raises(DataError, match="target"):
        processor(Sample(prompt="Find x.", meta={"file": "sft.parquet", "row": 2}), add_target=True)


def test_forward_with_our_positions_equals_model_positions(model_dir, processor, make_image_bytes):
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    sample = Sample(
        prompt="Compare <image> with <image>.",
        images=images(make_image_bytes, (90, 60), (56, 120)),
        target="\\boxed{A}",
    )
    out = processor(sample, add_target=True)
    input_ids = out.input_ids[None]  # (1, T)
    assert not torch.equal(out.position_ids[0], torch.arange(input_ids.shape[1]))  # images do move positions
    common = dict(input_ids=input_ids, pixel_values=out.pixel_values, image_grid_thw=out.image_grid_thw)
    with torch.no_grad():
        ours = model(**common, position_ids=out.position_ids[:, None]).logits  # (3, 1, T) positions
        theirs = model(
            **common, mm_token_type_ids=mm_token_type_ids(input_ids, processor.image_token_id)
        ).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # same positions -> bit-identical forward


def test_save_pretrained_completes_a_model_folder(model_dir, make_image_bytes, tmp_path):
    processor = Processor.from_pretrained(model_dir, max_pixels=64 * 64 * 3)
    out_dir = tmp_path / "hf"
    processor.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (out_dir / name).is_file(), name
    assert json.loads((out_dir / "preprocessor_config.json").read_text())["max_pixels"] == 64 * 64 * 3
    (out_dir / "config.json").write_text((model_dir / "config.json").read_text())  # the model writes this
    reloaded = Processor.from_pretrained(out_dir)
    sample = Sample(prompt="<image> Find x.", images=images(make_image_bytes, (200, 150)))
    a, b = processor(sample), reloaded(sample)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)


def test_real_folder_layout_chat_template_file_wins(model_dir, make_image_bytes, tmp_path):
    """Real Qwen folders ship chat_template.json next to tokenizer_config.json; it takes precedence."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for path in model_dir.iterdir():
        if path.suffix == ".json":
            (folder / path.name).write_text(path.read_text())
    template = Processor.from_pretrained(model_dir).chat_template.replace(
        "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\nCustom.{% endif %}"
    )
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    processor = Processor.from_pretrained(folder)
    text = processor.decode(processor(Sample(prompt="Hi")).input_ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\nCustom.")
    assert processor.eos_token_ids[:2] == [processor.im_end_token_id, processor.tokenizer.pad_token_id]


def _encoded(image, fmt: str = "PNG", **kwargs) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _drawings():
    """(mode name, encoded bytes): a 56x84 drawing in every PIL mode users meet; the transparent
    ones are black ink on a transparent background (a common way to save a diagram)."""
    import numpy as np
    from PIL import Image, ImageDraw

    size = (56, 84)  # a multiple of 28 each way: no resize, so pixels compare exactly
    rgba = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle([10, 10, 40, 60], outline=(0, 0, 0, 255), width=3)
    ImageDraw.Draw(rgba).ellipse([20, 30, 50, 70], fill=(200, 30, 30, 128))  # half transparent
    palette = rgba.convert("RGB").convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    gradient = np.linspace(0, 60000, size[0] * size[1], dtype=np.uint16).reshape(size[1], size[0])
    cmyk = Image.new("CMYK", size, (0, 200, 200, 0))
    ImageDraw.Draw(cmyk).rectangle([5, 5, 30, 40], fill=(255, 0, 0, 40))
    return [
        ("RGBA", _encoded(rgba)),
        ("LA", _encoded(rgba.convert("LA"))),
        ("P with a transparent index", _encoded(palette, transparency=palette.info["transparency"])),
        ("L", _encoded(rgba.convert("L"))),
        ("I;16", _encoded(Image.fromarray(gradient))),  # uint16 arrays open as I;16
        ("CMYK", _encoded(cmyk, "JPEG", quality=95)),
    ]


@pytest.mark.parametrize("mode, data", _drawings(), ids=[m for m, _ in _drawings()])
def test_every_image_mode_gives_transformers_pixels(processor, mode, data):
    """lensrl's pixel_values equal transformers' Qwen2VLImageProcessorPil's on the same file: a
    transparent background becomes white (a plain convert('RGB') made it black)."""
    import io

    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    s = processor.image
    reference = Qwen2VLImageProcessorPil(min_pixels=s.min_pixels, max_pixels=s.max_pixels, patch_size=s.patch_size,
                                         merge_size=s.merge_size, temporal_patch_size=s.temporal_patch_size,
                                         image_mean=s.image_mean, image_std=s.image_std)
    expected = reference(images=[Image.open(io.BytesIO(data))], return_tensors="pt")
    got = processor(Sample("<image>What is drawn?", [ImageSource(data, origin=mode)]))
    assert torch.equal(got.image_grid_thw, expected["image_grid_thw"])
    torch.testing.assert_close(got.pixel_values, expected["pixel_values"], rtol=0, atol=1e-5)
    if mode in ("RGBA", "LA", "P with a transparent index"):  # the background is white, not black
        assert ImageSource(data).load().getpixel((1, 1)) == (255, 255, 255)


def test_an_exif_rotated_photo_is_turned_as_transformers_loads_it(processor, tmp_path):
    """A JPEG stored sideways with EXIF orientation 6: turned upright (transformers' load_image
    applies exif_transpose), and the prompt's image-token count follows the turned size."""
    from PIL import Image
    from transformers.image_utils import load_image

    image = Image.new("RGB", (84, 56), (255, 255, 255))
    image.paste((0, 0, 255), (0, 0, 20, 56))  # a blue band on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "sideways.jpg"
    image.save(path, format="JPEG", exif=exif, quality=95)
    loaded = ImageSource(str(path)).load()
    assert loaded.size == (56, 84) == load_image(str(path)).size
    sample = Sample("<image>Which way?", [ImageSource(str(path))])
    got = processor(sample)
    assert processor.prompt_length(sample) == got.input_ids.shape[0]
    assert got.image_grid_thw.tolist() == [[1, 6, 4]]  # 84 / 14 rows, 56 / 14 columns


def test_each_architectures_tiny_folder_follows_its_own_template(tiny_qwen25_dir, tiny_qwen3_dir):
    """Qwen2.5-VL's template adds a default system prompt; Qwen3-VL releases add none."""
    sample = Sample("Hello?")
    qwen25, qwen3 = Processor.from_pretrained(tiny_qwen25_dir), Processor.from_pretrained(tiny_qwen3_dir)
    assert qwen25.decode(qwen25(sample).input_ids, skip_special_tokens=False).startswith("<|im_start|>system\n")
    text = qwen3.decode(qwen3(sample).input_ids, skip_special_tokens=False)
    assert text == "<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n"
    assert qwen25.assistant_prefix == qwen3.assistant_prefix == ""


def test_a_thinking_template_opens_the_answer_and_the_format_reward_sees_it(tiny_qwen3_dir, tmp_path):
    """A Qwen3-VL thinking template ends the prompt with "<think>\\n": the completion starts inside
    the thought, and the default format pattern must judge prefix + completion (the completion
    alone scored a well-formed answer 0 and pushed the policy to write a second <think>)."""
    import shutil

    from lensrl.config import RewardConfig
    from lensrl.models.tokenizer import QWEN3_THINKING_CHAT_TEMPLATE
    from lensrl.rewards import score_completion

    folder = tmp_path / "thinking"
    shutil.copytree(tiny_qwen3_dir, folder)
    (folder / "chat_template.jinja").write_text(QWEN3_THINKING_CHAT_TEMPLATE)
    processor = Processor.from_pretrained(folder)
    assert processor.assistant_prefix == "<think>\n"
    assert processor.decode(processor(Sample("2+1?")).input_ids, skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n<think>\n")
    completion = "one plus two is three</think> \\boxed{3}"
    cfg = RewardConfig()
    assert score_completion(completion, {"answer": "3", "assistant_prefix": processor.assistant_prefix}, cfg) == (
        1.0, {"accuracy": 1.0, "format": 1.0})
    assert score_completion(completion, {"answer": "3"}, cfg)[1]["format"] == 0.0  # judged alone: not well formed
