"""Qwen-VL multimodal rotary positions (M-RoPE), as a pure function of the token ids.

Qwen2.5-VL and Qwen3-VL give every token three positions (t, h, w). Text tokens get the same
running index on all three axes. An image's tokens (its grid of merged patches, row-major) start
at the running index `s`: token (i, j) gets (s, s + i, s + j); after the image the running index
continues at `s + max(grid_h, grid_w) / merge`. The model computes this itself from `input_ids`
and `image_grid_thw` (`get_rope_index`); lensrl computes it here, once per sample, so packed
batches, the rollout engine and training all use the same positions without the model.

    positions, delta = mrope_positions(input_ids, image_grid_thw, 2, image_token_id, vision_start_id)
    # a token appended at index T >= len(input_ids) has position T + delta on all three axes

Feeding the model: `position_ids` of shape (3, B, T) (each sequence's positions along dim 1).
transformers 5.x also accepts (4, B, T), whose row 0 holds plain text positions (restarting at 0
for each packed sequence) from which it builds the attention mask when none is given.
"""

from __future__ import annotations

import torch


def mrope_positions(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    spatial_merge_size: int,
    image_token_id: int,
    vision_start_token_id: int,
) -> tuple[torch.Tensor, int]:
    """(t, h, w) rope positions of one sequence and its rope delta.

    input_ids: (T,) with each image expanded to grid_t * grid_h * grid_w / merge² image tokens,
    each image's run preceded by `vision_start_token_id`. image_grid_thw: (num_images, 3) patch
    grids in order of appearance (None: text only). Returns positions (3, T) long and
    delta = max(position) + 1 - T, the offset of every later (text) token.
    Images only (no video): equal to the model's own `get_rope_index` for images.
    """
    assert input_ids.ndim == 1, f"expected one sequence (T,), got shape {tuple(input_ids.shape)}"
    num_tokens = input_ids.shape[0]
    device = input_ids.device
    runs = _image_runs(input_ids, image_token_id)
    grids = [] if image_grid_thw is None else [tuple(g) for g in image_grid_thw.tolist()]
    if len(runs) != len(grids):
        raise ValueError(
            f"input_ids hold {len(runs)} runs of image tokens but image_grid_thw has {len(grids)} images"
        )

    segments = []  # (3, n) position blocks in sequence order
    cursor = 0  # next token index to place
    position = 0  # next text position
    for (start, end), (grid_t, grid_h, grid_w) in zip(runs, grids):
        llm_t, llm_h, llm_w = grid_t, grid_h // spatial_merge_size, grid_w // spatial_merge_size
        if end - start != llm_t * llm_h * llm_w:
            raise ValueError(
                f"image at token {start} has {end - start} image tokens but its grid "
                f"{[grid_t, grid_h, grid_w]} needs {llm_t * llm_h * llm_w}"
            )
        if start == 0 or int(input_ids[start - 1]) != vision_start_token_id:
            raise ValueError(f"image tokens at index {start} are not preceded by the vision start token")
        segments.append(torch.arange(start - cursor, device=device).expand(3, -1) + position)
        position += start - cursor
        t_index = torch.arange(llm_t, device=device).view(-1, 1, 1).expand(-1, llm_h, llm_w)
        h_index = torch.arange(llm_h, device=device).view(1, -1, 1).expand(llm_t, -1, llm_w)
        w_index = torch.arange(llm_w, device=device).view(1, 1, -1).expand(llm_t, llm_h, -1)
        segments.append(torch.stack([t_index, h_index, w_index]).reshape(3, -1) + position)
        position += max(llm_h, llm_w)
        cursor = end
    segments.append(torch.arange(num_tokens - cursor, device=device).expand(3, -1) + position)
    positions = torch.cat(segments, dim=1).long()  # (3, T)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta


def _image_runs(input_ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of image tokens: one image each, as transformers groups them."""
    is_image = (input_ids == image_token_id).to(torch.int8)
    change = torch.diff(is_image, prepend=is_image.new_zeros(1), append=is_image.new_zeros(1))
    starts = torch.nonzero(change == 1).flatten().tolist()
    ends = torch.nonzero(change == -1).flatten().tolist()
    return list(zip(starts, ends))


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Per-token modality (0 text, 1 image), same shape as `input_ids`.

    transformers 5.x builds multimodal positions inside `forward`/`generate` only when it is given
    this (`mm_token_type_ids=...`); without it and without `position_ids` it falls back to 1D text
    positions, silently. lensrl passes `position_ids`; this is for calls into HF's own code paths.
    """
    return (input_ids == image_token_id).to(torch.int32)
