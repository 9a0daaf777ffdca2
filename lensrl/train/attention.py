"""Attention that never crosses the boundaries of packed sequences.

transformers marks packed sequences through the positions alone: a Qwen-VL text model given
`position_ids` of shape (4, B, T) reads row 0 as text positions, and wherever they do not go up by
one a new sequence starts (`masking_utils.find_packed_sequence_indices`). With `sdpa` it then
builds a dense (T, T) block-causal mask, which costs O(T²) memory and makes every query attend to
(masked) keys of every other sequence. This module registers one attention function with
transformers' `AttentionInterface` that reads the same signal and runs each sequence on its own:

    CUDA, bf16/fp16     torch.nn.attention.varlen.varlen_attn (FlashAttention with cu_seqlens)
    CUDA, other dtypes  one SDPA call per sequence (flash / efficient kernels, no mask)
    CPU                 one SDPA call with a block-diagonal boolean mask

Calls that carry no packing (padded batches, generation with a cache, single sequences) go
straight to transformers' own `sdpa_attention_forward`, so a model switched to it computes
exactly what it computed before. The vision tower gets the same function under a name containing
"flash", which makes transformers hand it the per-image/per-window `cu_seqlens` (one varlen call
per block instead of one SDPA call per image window).

Where the boundaries come from, and what torch.compile sees:
  * the vision tower: transformers passes `cu_seq_lens_q` and its longest length `max_length_q`;
  * the text model: a caller that packs (the trainer's `packed_hidden_states`) passes
    `lensrl_cu_seqlens` (N + 1,) int32 and `lensrl_max_seqlen` (int) to the model's forward;
    transformers hands every decoder layer's attention its extra keyword arguments. Without them
    (the engine's prefill, a user's own packed call) the boundaries are read from the text
    positions on the host, once per forward.
Given boundaries on CUDA in bf16/fp16 run `varlen_attn` straight from the compiled decoder
layer or vision block (one graph per block, no host synchronisation); everything else runs in
`_eager_attention`, which torch.compile leaves out of its graphs (a graph break).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref

import torch
import torch.nn.functional as F

from lensrl.train.sequences import to_device

logger = logging.getLogger(__name__)

TEXT_ATTENTION = "lensrl_packed"  # text decoder: packing read from the text position ids
VISION_ATTENTION = "lensrl_flash_varlen"  # "flash" in the name: transformers passes cu_seqlens

_SEGMENT_CACHE_SIZE = 16

# Number of packed text-attention calls so far: lets a caller check that transformers really
# handed the packed positions down to attention (`packed_attention_calls`).
_counters = {"packed_text_calls": 0}


def packed_attention_calls() -> int:
    """How many times the text attention has run on a packed row in this process."""
    return _counters["packed_text_calls"]


class Segments:
    """Boundaries of the sequences packed into one row: `cu_seqlens` (N + 1,) int32 on the row's
    device and the longest length; the host list of lengths is read (one sync) only if needed."""

    def __init__(self, cu_seqlens: torch.Tensor, max_length: int, lengths: tuple[int, ...] | None = None):
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        self.max_length = int(max_length)
        self._lengths = lengths
        self._masks: dict[bool, torch.Tensor] = {}  # causal -> (T, T) block-diagonal mask, built once

    def block_mask(self, causal: bool, device: torch.device) -> torch.Tensor:
        """(T, T) bool: True where query and key are in the same segment (and key <= query if causal)."""
        if causal not in self._masks:
            lengths = torch.tensor(self.lengths, device=device)
            segment_ids = torch.repeat_interleave(
                torch.arange(len(self.lengths), device=device), lengths
            )  # (T,)
            mask = segment_ids[:, None] == segment_ids[None, :]
            if causal:
                mask = mask.tril()
            self._masks[causal] = mask
        return self._masks[causal]

    @property
    def lengths(self) -> tuple[int, ...]:
        if self._lengths is None:
            self._lengths = tuple((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist())
        return self._lengths


def segments_from_lengths(lengths: list[int] | tuple[int, ...], device: torch.device | str) -> Segments:
    lengths = tuple(int(n) for n in lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return Segments(to_device(cu, device), max(lengths, default=0), lengths)


def segments_from_positions(text_positions: torch.Tensor) -> Segments | None:
    """Packed sequences of one row of text positions (1, T) or (T,), by transformers' rule (a new
    sequence wherever the position does not follow the previous one); None if there is only one."""
    positions = text_positions.reshape(-1)
    first = positions[:1] - 1
    starts = torch.nonzero(torch.diff(positions, prepend=first) != 1).flatten().tolist()  # host sync
    if not starts or starts == [0]:
        return None
    bounds = [0, *[s for s in starts if s > 0], positions.shape[0]]
    return segments_from_lengths([b - a for a, b in zip(bounds[:-1], bounds[1:])], positions.device)


# Every layer of one forward (and its recomputation under activation checkpointing) gets the same
# text-position / cu_seqlens tensor object, so its segments are worked out once per forward.
_segment_cache: dict[int, tuple[weakref.ref, Segments | None]] = {}


def _cached_segments(tensor: torch.Tensor, make) -> Segments | None:
    key = id(tensor)
    hit = _segment_cache.get(key)
    if hit is not None and hit[0]() is tensor:
        return hit[1]
    segments = make(tensor)
    if len(_segment_cache) >= _SEGMENT_CACHE_SIZE:  # drop dead entries, else the oldest
        dead = [k for k, (ref, _) in _segment_cache.items() if ref() is None]
        for stale in dead or [next(iter(_segment_cache))]:
            del _segment_cache[stale]
    _segment_cache[key] = (weakref.ref(tensor), segments)
    return segments


# --------------------------------------------------------------------------------------------
# the kernels


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: Segments,
    causal: bool,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention within each segment of one packed row.

    query (1, Hq, T, D), key/value (1, Hkv, T, D) with Hq a multiple of Hkv -> (1, T, Hq, D).
    backend: "auto" (varlen on CUDA bf16/fp16, else "loop" on CUDA and "mask" on CPU), "varlen",
    "loop" (one SDPA call per segment) or "mask" (one SDPA call with a block-diagonal mask).
    """
    assert query.shape[0] == 1, f"one packed row expected, got batch {query.shape[0]}"
    dtype = query.dtype
    if query.is_cuda and torch.is_autocast_enabled("cuda"):  # q/k come out of rope in fp32
        dtype = torch.get_autocast_dtype("cuda")
    if backend == "auto":
        if query.is_cuda and dtype in (torch.float16, torch.bfloat16) and _varlen_usable():
            backend = "varlen"
        else:
            backend = "loop" if query.is_cuda else "mask"
    if backend == "varlen":
        try:
            return _varlen(query.to(dtype), key.to(dtype), value.to(dtype), segments, causal, scale)
        except (RuntimeError, TypeError, ValueError) as error:  # e.g. a GPU without FlashAttention
            _disable_varlen(error)
            backend = "loop"
    if backend == "loop":
        return _loop(query, key, value, segments, causal, scale)
    if backend == "mask":
        return _masked(query, key, value, segments, causal, scale)
    raise ValueError(f"unknown backend {backend!r}")


def _repeat_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def _masked(query, key, value, segments: Segments, causal: bool, scale):
    assert sum(segments.lengths) == query.shape[2], "segments do not cover the row"
    groups = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(
        query,
        _repeat_kv(key, groups, 1),
        _repeat_kv(value, groups, 1),
        attn_mask=segments.block_mask(causal, query.device),
        scale=scale,
    )  # (1, Hq, T, D)
    return out.transpose(1, 2).contiguous()


def _loop(query, key, value, segments: Segments, causal: bool, scale):
    assert sum(segments.lengths) == query.shape[2], "segments do not cover the row"
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups, 1), _repeat_kv(value, groups, 1)
    outs, start = [], 0
    for length in segments.lengths:
        end = start + length
        outs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                is_causal=causal,
                scale=scale,
            )
        )
        start = end
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


# Resolved once, eagerly (`register`), so that compiled code reads constants: whether torch has
# varlen attention, and which keywords its signature takes (is_causal on 2.9/2.10, window_size
# later; scale and enable_gqa arrived later).
_varlen_state: dict[str, object] = {"usable": None}


def _varlen_usable() -> bool:
    if _varlen_state["usable"] is None:
        try:
            from torch.nn.attention.varlen import varlen_attn

            params = set(inspect.signature(varlen_attn).parameters)
            _varlen_state.update(is_causal="is_causal" in params, scale="scale" in params,
                                 enable_gqa="enable_gqa" in params)
            _varlen_state["usable"] = True
        except ImportError:
            _varlen_state["usable"] = False
    return bool(_varlen_state["usable"])


def _disable_varlen(error: Exception) -> None:
    logger.warning("torch varlen attention failed (%s); using one SDPA call per sequence instead", error)
    _varlen_state["usable"] = False


def _varlen(query, key, value, segments: Segments, causal: bool, scale):
    if not _varlen_usable():  # called as backend="varlen" directly
        raise RuntimeError("torch.nn.attention.varlen is not available in this torch build")
    return varlen_attention(query, key, value, segments.cu_seqlens, segments.max_length, causal, scale)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_length,
    causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """FlashAttention over the packed sequences of one row (`torch.nn.attention.varlen.varlen_attn`).

    query (1, Hq, T, D), key/value (1, Hkv, T, D) on CUDA in bf16/fp16; cu_seqlens (N + 1,) int32
    sequence starts and T; max_length: the longest sequence (int, or a SymInt under
    torch.compile) -> (1, T, Hq, D). Traceable: no host synchronisation, so a compiled block keeps
    its attention in its graph. Needs `_varlen_usable()` resolved beforehand (`register`)."""
    from torch.nn.attention.varlen import varlen_attn

    head_dim = query.shape[-1]
    q = query[0].transpose(0, 1)  # (T, Hq, D)
    k = key[0].transpose(0, 1)  # (T, Hkv, D)
    v = value[0].transpose(0, 1)
    kwargs = {}
    if _varlen_state["is_causal"]:
        kwargs["is_causal"] = causal
    else:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    if scale is not None:  # without `scale` the kernel uses 1/sqrt(D)
        if _varlen_state["scale"]:
            kwargs["scale"] = scale
        elif abs(scale - head_dim**-0.5) > 1e-12:
            q = q * (scale * head_dim**0.5)
    if k.shape[1] != q.shape[1]:
        if _varlen_state["enable_gqa"]:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_length, max_length,
                      **kwargs)  # (T, Hq, D)
    return out.unsqueeze(0)


# --------------------------------------------------------------------------------------------
# the transformers hooks

_kv_sink: list = [None]  # fn(module, key, value) while a kv_sink context is active


@contextlib.contextmanager
def kv_sink(fn):
    """While active, every attention call through this module first hands `fn(module, key,
    value)` its post-rope keys and values (B, Hkv, T, D). The engine's prefill uses it to write a
    cacheless forward's K/V straight into its paged pool (no DynamicCache, no second copy, and
    the blocks stay compiled)."""
    previous, _kv_sink[0] = _kv_sink[0], fn
    try:
        yield
    finally:
        _kv_sink[0] = previous


TEXT_SEGMENTS = ("lensrl_cu_seqlens", "lensrl_max_seqlen")  # the model-forward keywords of a packed text row


def text_segments(lengths: list[int], device: torch.device | str) -> dict:
    """The keyword arguments that tell the text attention where the packed sequences of `lengths`
    (tokens each, back to back in one row) start: pass them to the model's forward with the packed
    row. cu_seqlens (N + 1,) int32 on `device`, the longest length an int. Nothing is read back
    from the GPU, and compiled decoder layers keep their attention in the graph."""
    segments = segments_from_lengths(lengths, device)
    return {TEXT_SEGMENTS[0]: segments.cu_seqlens, TEXT_SEGMENTS[1]: segments.max_length}


def _given_segments(query, key, attention_mask, causal: bool, kwargs: dict):
    """(cu_seqlens, longest length) that the call's keywords give for a packed row, or (None, None)."""
    if attention_mask is not None or query.shape[0] != 1:
        return None, None
    if kwargs.get("cu_seq_lens_q") is not None:  # the vision tower: images / windows
        return kwargs["cu_seq_lens_q"], kwargs.get("max_length_q")
    if kwargs.get(TEXT_SEGMENTS[0]) is not None and causal and query.shape[2] == key.shape[2]:
        return kwargs[TEXT_SEGMENTS[0]], kwargs.get(TEXT_SEGMENTS[1])
    return None, None


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: segment attention for packed rows, sdpa otherwise.

    Rows whose boundaries the call's keywords give (module doc), on CUDA in bf16/fp16 (the dtype
    of `value`, which no rope has promoted), with no KV sink active, run `varlen_attention` here,
    traceable by torch.compile; every other call runs `_eager_attention`."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    cu_seqlens, max_length = _given_segments(query, key, attention_mask, causal, kwargs)
    if (
        cu_seqlens is not None
        and max_length is not None
        and not dropout
        and query.is_cuda
        and value.dtype in (torch.bfloat16, torch.float16)
        and _varlen_state["usable"] is True
        and not _kv_sink_active()
    ):
        if not torch.compiler.is_compiling() and "cu_seq_lens_q" not in kwargs:  # eager: counted per call
            _counters["packed_text_calls"] += 1
        dtype = value.dtype  # q and k come out of rope in fp32 under autocast
        return varlen_attention(query.to(dtype), key.to(dtype), value, cu_seqlens, max_length, causal, scaling), None
    return _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, causal,
                            cu_seqlens, max_length, **kwargs)


def _kv_sink_active() -> bool:
    """Whether a kv_sink is active; for compiled code, a constant of the trace (the engine's
    prefill, the only sink, passes no text boundaries and takes the eager path anyway)."""
    if torch.compiler.is_compiling():
        return False
    return _kv_sink[0] is not None


@torch.compiler.disable  # host-side segment bookkeeping: compiled blocks call it eagerly
def _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, causal: bool,
                     cu_seqlens, max_length, **kwargs) -> tuple[torch.Tensor, None]:
    """packed_attention_forward's other calls; `causal`, `cu_seqlens`, `max_length` as it worked them out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _kv_sink[0] is not None:
        _kv_sink[0](module, key, value)
    segments = None
    if cu_seqlens is not None:  # boundaries given: vision cu_seqlens, or the text's from the caller
        segments = _cached_segments(
            cu_seqlens,
            lambda cu: Segments(cu, max_length if max_length is not None else int((cu[1:] - cu[:-1]).max())),
        )
        _counters["packed_text_calls"] += "cu_seq_lens_q" not in kwargs
    elif (
        attention_mask is None
        and causal
        and query.shape[0] == 1
        and query.shape[2] > 1
        and query.shape[2] == key.shape[2]
        and kwargs.get("position_ids") is not None
    ):
        segments = _cached_segments(kwargs["position_ids"], segments_from_positions)
        _counters["packed_text_calls"] += segments is not None
    if segments is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    if dropout:
        raise ValueError("packed attention has no dropout (Qwen-VL trains with attention_dropout=0)")
    return segment_attention(query, key, value, segments, causal, scaling), None


def _packed_mask(*args, **kwargs):
    """The mask function paired with TEXT_ATTENTION: no mask for an unpadded, uncached causal row
    (packed or not: the attention function reads the packing from the positions), sdpa's otherwise.

    Keyword-generic because transformers releases call mask functions with either
    (q_length, q_offset, kv_length, kv_offset) or (cache_position, kv_length, kv_offset).
    """
    from transformers.masking_utils import sdpa_mask

    if not args and kwargs.get("attention_mask") is None:
        kv_length, kv_offset = kwargs.get("kv_length"), kwargs.get("kv_offset", 0)
        if "q_length" in kwargs:
            q_length, q_offset = kwargs["q_length"], kwargs.get("q_offset", 0)
        elif "cache_position" in kwargs:
            cache_position = kwargs["cache_position"]
            q_length = cache_position.shape[0]
            q_offset = int(cache_position[0]) if q_length else 0
        else:
            q_length, q_offset = None, None
        offsets = (q_offset, kv_offset)
        if q_length == kv_length and all(isinstance(o, int) and o == 0 for o in offsets):
            return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register TEXT_ATTENTION and VISION_ATTENTION with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    _varlen_usable()  # resolved here, outside any compiled code
    AttentionInterface.register(TEXT_ATTENTION, packed_attention_forward)
    AttentionInterface.register(VISION_ATTENTION, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(TEXT_ATTENTION, _packed_mask)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VISION_ATTENTION, sdpa_mask)


def enable_packed_attention(model: torch.nn.Module, vision: bool = True) -> None:
    """Switch a Qwen-VL model's text decoder (and vision tower) from sdpa to packed attention.

    Idempotent. Unpacked calls compute what sdpa computed; implementations other than sdpa
    (eager, flash_attention_2) are left alone, since transformers packs correctly with them too.
    """
    register()
    config = model.config
    text = getattr(config, "text_config", config)
    if "sliding_attention" in (getattr(text, "layer_types", None) or []):
        raise ValueError("packed attention does not support sliding-window layers (use_sliding_window)")
    if text._attn_implementation == "sdpa":
        text._attn_implementation = TEXT_ATTENTION
    vision_config = getattr(config, "vision_config", None)
    if vision and vision_config is not None and vision_config._attn_implementation == "sdpa":
        vision_config._attn_implementation = VISION_ATTENTION
    layers = getattr(getattr(model, "model", model), "language_model", None)
    first = next(iter(getattr(layers, "layers", [])), None)
    if first is not None and not getattr(first, "_lensrl_counts_segments", False):
        first.register_forward_pre_hook(_count_text_segments, with_kwargs=True)
        first._lensrl_counts_segments = True


def _count_text_segments(module, args, kwargs):
    """The first decoder layer's pre-hook (eager, outside compiled code). Attention counts its own
    packed calls, except inside a compiled layer, where a counter would be a guard that changes on
    every call: there a forward whose layer was given text boundaries (`text_segments`) counts
    once. The keywords reach the attention by the same transformers code, compiled or not, which
    the uncompiled runs check call by call."""
    if getattr(module, "_lensrl_compiled", False) and kwargs.get(TEXT_SEGMENTS[0]) is not None:
        _counters["packed_text_calls"] += 1
