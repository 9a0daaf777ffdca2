"""Training sequences (prompt + response) and the policy forward that scores their responses.

A `Sequence` is what the trainer computes log-probabilities over: the processed prompt (tokens,
images, multimodal rope positions) followed by response tokens, whose rope positions continue
the prompt's exactly as they did during generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lensrl.models.processor import ProcessedSample
from lensrl.train.logprobs import token_logprobs


@dataclass
class Sequence:
    input_ids: torch.Tensor  # (T,) prompt then response
    position_ids: torch.Tensor  # (3, T)
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    prompt_length: int  # response tokens are input_ids[prompt_length:]

    @property
    def response_length(self) -> int:
        return self.input_ids.shape[0] - self.prompt_length

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


def make_sequence(prompt: ProcessedSample, response_ids: list[int] | torch.Tensor) -> Sequence:
    """Append `response_ids` to a processed prompt, continuing its rope positions."""
    response = torch.as_tensor(response_ids, dtype=torch.long)
    length = prompt.input_ids.shape[0]
    start = length + prompt.rope_delta
    response_pos = torch.arange(start, start + response.shape[0], dtype=torch.long).expand(3, -1)
    return Sequence(
        input_ids=torch.cat([prompt.input_ids, response]),
        position_ids=torch.cat([prompt.position_ids, response_pos], dim=1),
        pixel_values=prompt.pixel_values,
        image_grid_thw=prompt.image_grid_thw,
        prompt_length=length,
    )


def sft_sequence(sample: ProcessedSample) -> Sequence:
    """A processed SFT sample (prompt + target) as a Sequence whose 'response' is the target."""
    return Sequence(sample.input_ids, sample.position_ids, sample.pixel_values, sample.image_grid_thw,
                    sample.prompt_length)


def collate(seqs: list[Sequence], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded model inputs for a list of sequences."""
    max_len = max(s.num_tokens for s in seqs)
    batch = len(seqs)
    input_ids = torch.full((batch, max_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, max_len), dtype=torch.long)
    position_ids = torch.ones((3, batch, max_len), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : s.num_tokens] = s.input_ids
        attention_mask[i, : s.num_tokens] = 1
        position_ids[:, i, : s.num_tokens] = s.position_ids
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    inputs.update(image_inputs(seqs))
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def image_inputs(items) -> dict[str, torch.Tensor]:
    """`pixel_values` and `image_grid_thw` of every image of `items` (Sequences or prompts) in
    order, for one model call; empty when none has an image."""
    with_images = [s for s in items if s.pixel_values is not None]
    if not with_images:
        return {}
    return {"pixel_values": torch.cat([s.pixel_values for s in with_images]),
            "image_grid_thw": torch.cat([s.image_grid_thw for s in with_images])}


def forward_response_logprobs(
    model: torch.nn.Module,
    seqs: list[Sequence],
    pad_token_id: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    width: int | None = None,
    suppress_ids: list[int] | None = None,
    packed: bool = False,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probabilities (and entropy) of each sequence's response tokens, right-padded.
    `entropy_grad=False`: the entropy carries no gradient (a metric only).

    `packed`: one packed row with attention kept inside each sequence (lensrl.train.packing);
    otherwise a right-padded batch. Both give the same numbers. Returns logp (B, R), entropy
    (B, R) or None, and mask (B, R), with R = `width` or the longest response.
    """
    device = compute_device(model)

    def body() -> tuple[torch.Tensor, torch.Tensor | None]:
        # The state at position t predicts token t + 1: response token j of a sequence is predicted
        # by the state at (its start) + prompt_length + j - 1.
        if packed:
            from lensrl.train.packing import packed_hidden_states

            hidden = packed_hidden_states(model, seqs, device)  # (T_total, H)
            starts = torch.tensor([0] + [s.num_tokens for s in seqs[:-1]]).cumsum(0).tolist()
        else:
            hidden = model.model(**collate(seqs, pad_token_id, device), use_cache=False).last_hidden_state  # (B, T, H)
            starts = [i * hidden.shape[1] for i in range(len(seqs))]
            hidden = hidden.flatten(0, 1)  # (B * T, H)
        rows = torch.cat([torch.arange(start + s.prompt_length - 1, start + s.num_tokens - 1)
                          for start, s in zip(starts, seqs)]).to(device)
        targets = torch.cat([s.input_ids[s.prompt_length :] for s in seqs]).to(device)
        return token_logprobs(hidden[rows], model.lm_head, targets, temperature, chunk_size, with_entropy,
                              suppress_ids, entropy_grad)

    logp_flat, ent_flat = run_as_forward(model, body)
    lengths = torch.tensor([s.response_length for s in seqs])
    max_response = width if width is not None else int(lengths.max())
    if int(lengths.max()) > max_response:
        raise ValueError(f"width {max_response} is shorter than the longest response ({int(lengths.max())})")
    mask = (torch.arange(max_response) < lengths[:, None]).to(device)  # (B, R)
    logp = torch.zeros(len(seqs), max_response, dtype=torch.float32, device=device).masked_scatter(mask, logp_flat)
    entropy = None
    if ent_flat is not None:
        entropy = torch.zeros_like(logp).masked_scatter(mask, ent_flat)
    return logp, entropy, mask


def compute_device(model: torch.nn.Module) -> torch.device:
    """Where `model` computes: its parameters' device, or for FSDP-sharded parameters (possibly
    offloaded to the host) the device of their mesh."""
    param = next(model.parameters())
    mesh = getattr(param, "device_mesh", None)
    if mesh is not None and mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return param.device


def run_as_forward(model: torch.nn.Module, fn):
    """`fn()` run as `model`'s forward call, so hooks on the module wrap it. For an FSDP-sharded
    model this gathers the root's parameters (embeddings, final norm, head) around code that
    reads them outside the model's own forward (the chunked head), and reduce-scatters their
    gradients in backward. A plain model just runs `fn()`."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return fn()
    had_own = "forward" in model.__dict__
    previous = model.__dict__.get("forward")
    model.forward = lambda _: fn()
    try:
        # one (empty) argument: FSDP's root pre-forward moves the inputs to the device and cannot
        # take a call with none
        return model(torch.empty(0))
    finally:
        if had_own:
            model.forward = previous
        else:
            del model.forward
