"""Training sequences (prompt + response) and the policy forward that scores their responses.

A `Sequence` is what the trainer computes log-probabilities over: the processed prompt (tokens,
images, multimodal rope positions) followed by response tokens, whose rope positions continue
the prompt's exactly as they did during generation.
"""

from __future__ import annotations

from contextlib import contextmanager
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


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`. From host memory to a CUDA device the copy goes through pinned memory
    and does not block the host: a copy from pageable memory waits for every kernel already queued,
    so each of a micro-batch's inputs would drain the GPU's queue (the update's profile showed 103
    such copies in one step). PyTorch's pinned-memory cache keeps the staging block alive until the
    copy has run."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
    inputs.update(image_inputs(seqs))  # the padded path is the plain one: an image per sequence
    return {k: to_device(v, device) for k, v in inputs.items()}


def image_inputs(items, share: bool = False) -> dict[str, torch.Tensor]:
    """`pixel_values` and `image_grid_thw` of every image of `items` (Sequences or prompts) in
    order, for one model call; empty when none has an image.

    `share`: items holding the same image tensor (a GRPO group's n sequences all hold their
    prompt's) pass its patches once: `pixel_values` holds each distinct image once, while
    `image_grid_thw` still lists every item's images, and `image_index` (rows of image_grid_thw,)
    gives each image's row among the distinct ones. Run the model under `shared_images` (`language_model_forward`
    does), so the vision tower computes each distinct image once and its output is expanded to every
    item (gradients summed back), exactly what the repeated images would give."""
    with_images = [s for s in items if s.pixel_values is not None]
    if not with_images:
        return {}
    grid = torch.cat([s.image_grid_thw for s in with_images])
    if not share:
        return {"pixel_values": torch.cat([s.pixel_values for s in with_images]), "image_grid_thw": grid}
    first: dict[int, int] = {}  # id of a distinct item's pixel_values -> its first image's row among the distinct
    distinct, index, rows = [], [], 0
    for s in with_images:
        if id(s.pixel_values) not in first:
            first[id(s.pixel_values)], rows = rows, rows + s.image_grid_thw.shape[0]
            distinct.append(s)
        index.extend(range(first[id(s.pixel_values)], first[id(s.pixel_values)] + s.image_grid_thw.shape[0]))
    inputs = {"pixel_values": torch.cat([s.pixel_values for s in distinct]), "image_grid_thw": grid}
    if len(distinct) < len(with_images):
        inputs["image_index"] = torch.tensor(index)
    return inputs


def image_units(seqs) -> list[int | None]:
    """One entry per sequence for `plan_micro_batches(units=...)`: sequences holding the same image
    tensor (a GRPO group's) get the same unit, so they are planned into one micro-batch and
    `image_inputs(share=True)` passes their image once; None for a sequence without an image."""
    return [None if s.pixel_values is None else id(s.pixel_values) for s in seqs]


@contextmanager
def shared_images(model: torch.nn.Module, image_index: torch.Tensor | None, image_grid_thw: torch.Tensor | None):
    """While active, `model`'s vision tower is given the distinct images of an `image_inputs(...,
    share=True)` call and returns what it would for every item: its grid_thw argument is replaced
    by the distinct images' grids, and each tensor of its output whose rows are the distinct images'
    patches (e.g. the patch-level hidden states) or merged tokens (the image embeddings, Qwen3-VL's
    deepstack features) is expanded with index_select (autograd sums the copies' gradients). Nothing
    changes when `image_index` is None. RuntimeError for an output tensor of another row count (a
    vision tower whose outputs this does not know)."""
    if image_index is None:
        yield
        return
    visual = model.model.visual
    merge = visual.spatial_merge_size ** 2
    first = {}
    for row, image in enumerate(image_index.tolist()):
        first.setdefault(image, row)
    distinct_grid = image_grid_thw[[first[i] for i in range(len(first))]]
    patches = distinct_grid.prod(-1)  # (distinct,)

    def rows_of(sizes: torch.Tensor) -> torch.Tensor:
        starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        return torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in image_index.tolist()])

    index = {int(patches.sum()): rows_of(patches), int(patches.sum()) // merge: rows_of(patches // merge)}

    def expand(value):
        if isinstance(value, torch.Tensor):
            if value.ndim == 0 or value.shape[0] not in index:
                raise RuntimeError(f"shared_images: the vision tower returned a tensor of shape {tuple(value.shape)}, "
                                   f"neither {max(index)} patch rows nor {min(index)} merged rows of its "
                                   f"{len(patches)} distinct images; this transformers version's vision outputs "
                                   "are not known to lensrl")
            return value.index_select(0, to_device(index[value.shape[0]], value.device))
        if isinstance(value, (list, tuple)) and not hasattr(value, "keys"):
            return type(value)(expand(v) for v in value)
        return value

    def before(module, args, kwargs):
        if "grid_thw" in kwargs:
            kwargs = {**kwargs, "grid_thw": to_device(distinct_grid, kwargs["grid_thw"].device)}
        else:
            args = (args[0], to_device(distinct_grid, args[1].device), *args[2:])
        return args, kwargs

    def after(module, args, kwargs, output):
        if isinstance(output, torch.Tensor) or (isinstance(output, (list, tuple)) and not hasattr(output, "keys")):
            return expand(output)
        for key in list(output.keys()):  # a ModelOutput
            if output[key] is not None:
                output[key] = expand(output[key])
        return output

    handles = [visual.register_forward_pre_hook(before, with_kwargs=True),
               visual.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def language_model_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    """`model.model(**inputs, use_cache=False)`, under `shared_images` when `inputs` (from
    `image_inputs(..., share=True)`) has an `image_index`."""
    inputs = dict(inputs)
    index = inputs.pop("image_index", None)
    with shared_images(model, index, inputs.get("image_grid_thw")):
        return model.model(**inputs, use_cache=False)


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
        rows = to_device(torch.cat([torch.arange(start + s.prompt_length - 1, start + s.num_tokens - 1)
                                    for start, s in zip(starts, seqs)]), device)
        targets = to_device(torch.cat([s.input_ids[s.prompt_length :] for s in seqs]), device)
        return token_logprobs(hidden[rows], model.lm_head, targets, temperature, chunk_size, with_entropy,
                              suppress_ids, entropy_grad)

    logp_flat, ent_flat = run_as_forward(model, body)
    lengths = torch.tensor([s.response_length for s in seqs])
    max_response = width if width is not None else int(lengths.max())
    if int(lengths.max()) > max_response:
        raise ValueError(f"width {max_response} is shorter than the longest response ({int(lengths.max())})")
    mask = to_device(torch.arange(max_response) < lengths[:, None], device)  # (B, R)
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
