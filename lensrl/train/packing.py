"""Token-budget micro-batches and the packed policy forward.

Sequences (prompt + response, no padding) are grouped into micro-batches of at most
`max_tokens` tokens, balanced so the micro-batches carry similar token counts
(`plan_micro_batches`). Each micro-batch runs as one packed row:

    input_ids     (1, T)      the sequences back to back
    position_ids  (4, 1, T)   row 0: 0..L_i-1 per sequence (transformers' packing signal),
                              rows 1-3: each sequence's own multimodal rope positions
    pixel_values  the micro-batch's distinct images: the vision tower runs once, and an image
                  that several sequences hold (a GRPO group's n samples of one prompt, which the
                  plan keeps together) runs once, its output expanded to each (`shared_images`)

so every sequence sees exactly the positions it sees alone, and attention stays inside each
sequence (`lensrl.train.attention`: varlen FlashAttention on CUDA, a block-diagonal mask on CPU).
Qwen3-VL's deepstack features land on the image tokens of the packed row as they would on each
sequence alone. Log-probabilities of the response tokens come from the chunked head
(`token_logprobs`), so the (tokens, vocab) logits never exist at once.

`forward_response_logprobs(..., packed=True)` runs a micro-batch this way, with the same (B, R)
outputs as the padded forward. In a trainer, per mini-batch `rows`:

    plan = plan_micro_batches([seqs[i].num_tokens for i in rows], max_tokens_per_mbs,
                              units=image_units([seqs[i] for i in rows]))  # a group's image: once
    for group in plan:                          # each group: positions into `rows`
        micro = [rows[j] for j in group]
        logp, entropy, mask = forward_response_logprobs(policy, [seqs[i] for i in micro], ..., packed=True)
        ...loss on batch[...][micro]...; loss.backward()

With several ranks, every rank must run the same number of micro-batches: all-reduce the max of
len(plan) and pass it as `min_num_groups` (an empty group then needs a dummy forward).
"""

from __future__ import annotations

import heapq
import logging
import math
import warnings

import torch

from lensrl.train.attention import (
    TEXT_ATTENTION,
    enable_packed_attention,
    packed_attention_calls,
    text_segments,
)
from lensrl.train.sequences import (
    Sequence,
    forward_response_logprobs,
    image_inputs,
    image_units,
    language_model_forward,
    to_device,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# micro-batch planning (pure Python)


def plan_micro_batches(
    lengths: list[int], max_tokens: int, num_groups_multiple_of: int = 1, min_num_groups: int = 1,
    units: list | None = None,
) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most `max_tokens` tokens each.

    Every index appears exactly once. The groups are balanced: longest-first, each item goes to the
    group with the fewest tokens, so the spread between the fullest and the emptiest group is at
    most the longest item that shares groups. A sequence longer than `max_tokens` gets a group of
    its own (with a warning). The number of groups is the smallest that fits, at least
    `min_num_groups` and a multiple of `num_groups_multiple_of` (ranks must run the same number of
    micro-batches); groups are empty only when there are fewer sequences than that. Groups come
    fullest first, each with its indices in ascending order.

    `units` (one hashable per index, or None for "alone"): indices with the same unit are kept in
    one micro-batch where it fits, as items of their summed length: a GRPO group's n sequences
    share their prompt's image, which a packed forward then runs through the vision tower once
    (`image_inputs(share=True)`). A unit over half the budget is cut into the fewest consecutive
    pieces of at most half the budget each, so the items stay small enough to balance.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if num_groups_multiple_of < 1 or min_num_groups < 0:
        raise ValueError("num_groups_multiple_of must be >= 1 and min_num_groups >= 0")
    lengths = [int(n) for n in lengths]
    if units is not None and len(units) != len(lengths):
        raise ValueError(f"units has {len(units)} entries for {len(lengths)} sequences")
    oversized = [i for i, n in enumerate(lengths) if n > max_tokens]
    if oversized:
        message = (
            f"{len(oversized)} sequence(s) longer than the micro-batch token budget ({max_tokens}) "
            f"run alone: lengths {sorted((lengths[i] for i in oversized), reverse=True)[:8]}"
        )
        warnings.warn(message, stacklevel=2)  # once: a logger.warning beside it printed it twice
    items = _items([i for i in range(len(lengths)) if lengths[i] <= max_tokens], lengths, units, max_tokens // 2)
    items.sort(key=lambda item: (-item[0], item[1][0]))
    step = num_groups_multiple_of

    def round_up(k: int) -> int:
        return max(step, math.ceil(k / step) * step)

    num_groups = round_up(
        max(len(oversized) + math.ceil(sum(size for size, _ in items) / max_tokens), min_num_groups)
    )
    while True:
        groups = _longest_first(items, num_groups - len(oversized), max_tokens)
        if groups is not None:
            break
        num_groups = round_up(num_groups + 1)
    groups = [[i] for i in oversized] + groups
    groups = [sorted(g) for g in groups]
    groups.sort(key=lambda g: (-sum(lengths[i] for i in g), g[0] if g else len(lengths)))
    return groups


def _items(indices: list[int], lengths: list[int], units: list | None, piece: int) -> list[tuple[int, list[int]]]:
    """(tokens, indices) items to place: one per index, or with `units` one per unit (cut into
    consecutive pieces of at most `piece` tokens where it is longer)."""
    if units is None:
        return [(lengths[i], [i]) for i in indices]
    members: dict = {}
    for i in indices:
        members.setdefault(("alone", i) if units[i] is None else ("unit", units[i]), []).append(i)
    items = []
    for group in members.values():
        current, tokens = [], 0
        for i in group:
            if current and tokens + lengths[i] > piece:
                items.append((tokens, current))
                current, tokens = [], 0
            current.append(i)
            tokens += lengths[i]
        items.append((tokens, current))
    return items


def _longest_first(items: list[tuple[int, list[int]]], num_groups: int, max_tokens: int) -> list[list[int]] | None:
    """Greedy LPT: each item (longest first) into the emptiest of `num_groups` groups; None if one overflows."""
    if num_groups <= 0:
        return [] if not items else None
    heap = [(0, g) for g in range(num_groups)]  # (tokens, group)
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    for size, indices in items:
        tokens, g = heapq.heappop(heap)
        if tokens + size > max_tokens:
            return None
        groups[g].extend(indices)
        heapq.heappush(heap, (tokens + size, g))
    return groups


def restore_order(chunks: list[torch.Tensor], plan: list[list[int]]) -> torch.Tensor:
    """Rows of per-group results (chunk k holds rows for plan[k], in that order) in original order."""
    order = [i for group in plan for i in group]
    stacked = torch.cat([c for c, g in zip(chunks, plan) if g])  # (N, ...)
    assert stacked.shape[0] == len(order), "chunks do not match the plan"
    out = torch.empty_like(stacked)
    out[torch.tensor(order, device=stacked.device)] = stacked
    return out


# --------------------------------------------------------------------------------------------
# the packed forward


def pack_sequences(seqs: list, device: torch.device | str, share_images: bool = False) -> dict[str, torch.Tensor]:
    """Model inputs for one packed row holding `seqs` back to back (see module doc). `seqs`:
    `Sequence`s, or prompts (`ProcessedSample`s: the engine's packed prefill). `share_images`: an
    image several sequences hold is passed once (`image_inputs`; run with `language_model_forward`)."""
    input_ids = torch.cat([s.input_ids for s in seqs]).unsqueeze(0)  # (1, T)
    text = torch.cat([torch.arange(s.input_ids.shape[0], dtype=torch.long) for s in seqs])  # (T,)
    mrope = torch.cat([s.position_ids for s in seqs], dim=1)  # (3, T)
    position_ids = torch.cat([text.unsqueeze(0), mrope]).unsqueeze(1)  # (4, 1, T)
    inputs = {"input_ids": input_ids, "position_ids": position_ids, **image_inputs(seqs, share=share_images)}
    return {k: v if k == "image_index" else to_device(v, device) for k, v in inputs.items()}


def packed_hidden_states(
    model: torch.nn.Module, seqs: list[Sequence], device: torch.device | None = None
) -> torch.Tensor:
    """Final hidden states (T, H) of `seqs` packed into one row (no attention across them).
    Switches the model to packed attention on first use (`enable_packed_attention`)."""
    enable_packed_attention(model)
    calls_before = packed_attention_calls()
    device = device if device is not None else next(model.parameters()).device
    inputs = pack_sequences(seqs, device, share_images=True)  # a GRPO group's image runs the vision tower once
    inputs.update(text_segments([s.num_tokens for s in seqs], device))  # the boundaries, as given (no host sync)
    hidden = language_model_forward(model, inputs).last_hidden_state[0]  # (T, H)
    if len(seqs) > 1 and model.config.get_text_config()._attn_implementation == TEXT_ATTENTION:
        # Attention that silently spans sequences would be wrong, not slow: make sure it was packed.
        if packed_attention_calls() == calls_before:
            raise RuntimeError(
                "the packed forward ran without packed attention: this transformers version does not pass "
                "the text positions (row 0 of 4-row position_ids) down to the attention function"
            )
    return hidden


def micro_batched_response_logprobs(
    model: torch.nn.Module,
    seqs: list[Sequence],
    max_tokens: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    width: int | None = None,
    suppress_ids: list[int] | None = None,
) -> torch.Tensor:
    """Response log-probabilities of many sequences, packed in token-budget micro-batches, on the
    host in the original order: (B, R). Meant for the no-grad passes (old / reference logprobs)."""
    plan = plan_micro_batches([s.num_tokens for s in seqs], max_tokens, units=image_units(seqs))
    width = width if width is not None else max(s.response_length for s in seqs)
    chunks = []
    for group in plan:
        if group:
            logp, _, _ = forward_response_logprobs(
                model, [seqs[i] for i in group], 0, temperature, chunk_size, width=width,
                suppress_ids=suppress_ids, packed=True,
            )
            chunks.append(logp.cpu())
        else:
            chunks.append(torch.zeros(0, width))
    return restore_order(chunks, plan)
