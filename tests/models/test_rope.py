"""lensrl's M-RoPE positions against the model's own `get_rope_index`."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from lensrl.models.rope import mm_token_type_ids, mrope_positions


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def model(request, tiny_qwen25_dir, tiny_qwen3_dir):
    folder = {"qwen2_5_vl": tiny_qwen25_dir, "qwen3_vl": tiny_qwen3_dir}[request.param]
    return AutoModelForImageTextToText.from_pretrained(folder).eval()


def model_rope_index(model, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None):
    """The model's own positions for one sequence, whatever `get_rope_index` looks like.

    transformers 5.x finds images by `mm_token_type_ids` (0 text, 1 image) and requires it;
    4.x found them by the vision-start token and had no such argument.
    """
    rope_index = model.model.get_rope_index
    kwargs = {"image_grid_thw": image_grid_thw}
    if "mm_token_type_ids" in inspect.signature(rope_index).parameters:
        kwargs["mm_token_type_ids"] = mm_token_type_ids(input_ids[None], model.config.image_token_id)
    positions, deltas = rope_index(input_ids[None], **kwargs)
    return positions[:, 0], int(deltas.flatten()[0])  # (3, T), int


def build_ids(config, layout: list) -> torch.Tensor:
    """Token ids from a layout of text lengths (int) and image grids ((t, h, w) tuples)."""
    merge = config.vision_config.spatial_merge_size
    ids = []
    for item in layout:
        if isinstance(item, int):
            ids += [(7 * i + 3) % 200 for i in range(item)]  # arbitrary ordinary tokens
        else:
            t, h, w = item
            ids += [config.vision_start_token_id] + [config.image_token_id] * (t * h * w // merge**2)
            ids += [config.vision_end_token_id]
    return torch.tensor(ids)


LAYOUTS = {
    "text_only": [17],
    "single_image": [5, (1, 4, 6), 9],
    "multi_image": [3, (1, 8, 4), 2, (1, 2, 2), 6, (1, 6, 6), 4],
    "image_first_and_last": [(1, 4, 4), 3, (1, 10, 2)],
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_matches_model_get_rope_index(model, layout):
    config = model.config
    input_ids = build_ids(config, layout)
    grids = [item for item in layout if not isinstance(item, int)]
    image_grid_thw = torch.tensor(grids) if grids else None
    positions, delta = mrope_positions(
        input_ids,
        image_grid_thw,
        config.vision_config.spatial_merge_size,
        config.image_token_id,
        config.vision_start_token_id,
    )
    expected = model_rope_index(model, input_ids, image_grid_thw)
    if image_grid_thw is None:  # text only: plain arange on all three axes
        torch.testing.assert_close(positions, torch.arange(len(input_ids)).expand(3, -1), rtol=0, atol=0)
    assert positions.dtype == torch.long and positions.shape == (3, len(input_ids))
    torch.testing.assert_close(positions, expected[0], rtol=0, atol=0)
    assert delta == expected[1]


def test_delta_continues_positions(tiny_qwen25_dir):
    config = AutoConfig.from_pretrained(tiny_qwen25_dir)
    prompt = build_ids(config, [4, (1, 6, 8), 3])
    grid = torch.tensor([[1, 6, 8]])
    args = (2, config.image_token_id, config.vision_start_token_id)
    positions, delta = mrope_positions(prompt, grid, *args)
    longer = torch.cat([prompt, torch.tensor([11, 12, 13])])
    longer_positions, longer_delta = mrope_positions(longer, grid, *args)
    assert longer_delta == delta
    torch.testing.assert_close(longer_positions[:, : len(prompt)], positions, rtol=0, atol=0)
    for index in range(len(prompt), len(longer)):
        assert longer_positions[:, index].tolist() == [index + delta] * 3
    # the image is 3 x 4 merged tokens: it spans max(3, 4) positions instead of 12
    assert delta == 4 - 12


def test_rejects_inconsistent_inputs(tiny_qwen25_dir):
    config = AutoConfig.from_pretrained(tiny_qwen25_dir)
    args = (2, config.image_token_id, config.vision_start_token_id)
    ids = build_ids(config, [2, (1, 4, 4), 2])
    with pytest.raises(ValueError, match="1 runs of image tokens but image_grid_thw has 2"):
        mrope_positions(ids, torch.tensor([[1, 4, 4], [1, 4, 4]]), *args)
    with pytest.raises(ValueError, match="needs 16"):
        mrope_positions(ids, torch.tensor([[1, 8, 8]]), *args)
    with pytest.raises(ValueError, match="vision start"):
        mrope_positions(torch.cat([ids[:2], ids[3:]]), torch.tensor([[1, 4, 4]]), *args)
