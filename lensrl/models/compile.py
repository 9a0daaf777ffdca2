"""torch.compile of a Qwen-VL model's repeated blocks, for fused element-wise work.

The stock transformers blocks run RMSNorm, rotary embedding, the SiLU gate, residual adds and
the fp32/bf16 casts as separate kernels: on the H100 they took a third of a training step's GPU
time (benchmarks/RESULTS.md, issue 5) and keep the engine's vision tower at 16% MFU (issue 4).
`compile_blocks` compiles the forward of every text decoder layer and every vision block, as
torchtitan compiles its transformer blocks: inductor fuses each run of element-wise ops into one
Triton kernel (and the same for their backward), matrix multiplies stay cuBLAS.

    n = compile_blocks(model)     # in place; state-dict keys, FSDP units and hooks unchanged

What stays eager, by design:
  * attention that needs host-side work: where the caller gives the packed sequences' boundaries
    (the trainer's packed forward; the vision tower's cu_seqlens) on CUDA in bf16, FlashAttention's
    varlen kernel is traced into the block's graph (one graph per block); otherwise (boundaries
    read from the positions, the engine's prefill with its KV sink, CPU) the attention runs
    eagerly and the block compiles into two graphs, before and after it;
  * calls with a KV cache (`past_key_values`: transformers `generate`): the cache object is
    Python bookkeeping, so those calls take the block's original forward. The engine's prefill
    passes no cache (its K/V go to the pool through `attention.kv_sink`) and runs compiled.
  * the experts of a mixture-of-experts layer whose weights are not bf16 when it runs (an unsharded
    fp32 policy, under autocast or not): traced, transformers' grouped_mm takes its fallback for
    those, a Python loop over the experts (`_grouped_mm_fallback`); eager, it calls
    `torch._grouped_mm`, which has kernels for them. bf16 experts (FSDP's bf16 all-gather, the
    rollout copy) compile into the block's graph.

The blocks' forward is replaced on the instance (`block.forward`), not `block.__call__`, so
module hooks (FSDP2's all-gathers, activation checkpointing) run outside the compiled code.
All blocks of one class share one compiled function; shapes are dynamic (packed micro-batches
differ in length), so a new length does not recompile.
"""

from __future__ import annotations

import functools

import torch

from lensrl.models.load import model_blocks

_COMPILED: dict[object, object] = {}  # a block class's forward -> its compiled function (shared by its blocks)


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The vision blocks and text decoder layers of a Qwen2.5-VL / Qwen3-VL model."""
    vision, layers = model_blocks(model)
    return vision + layers


def compile_available(device: torch.device | str) -> bool:
    """Whether `torch.compile` can generate kernels for `device` here (Triton for CUDA; a C++
    compiler for CPU is assumed present only when asked for explicitly)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def compile_enabled(setting: str, device: torch.device | str) -> bool:
    """`model.compile`: "auto" compiles on CUDA when Triton is installed; always / never."""
    if setting == "auto":
        return compile_available(device)
    if setting in ("always", "never"):
        return setting == "always"
    raise ValueError(f"model.compile must be auto, always or never, got {setting!r}")


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile every block's forward in place (idempotent); returns how many blocks run compiled."""
    compiled = blocks(model)
    for block in compiled:
        if getattr(block, "_lensrl_compiled", False):
            continue
        # FSDP2 swaps the instance's class for a subclass; the code to compile is the model's own
        inner, checkpoints = _inner_forward(type(block))
        if inner not in _COMPILED:
            _COMPILED[inner] = torch.compile(inner, dynamic=True)
        block.forward = functools.partial(_dispatch, block, _COMPILED[inner], checkpoints)
        block._lensrl_compiled = True
        experts = getattr(getattr(block, "mlp", None), "experts", None)
        if experts is not None and hasattr(experts, "gate_up_proj"):
            experts.forward = functools.partial(_experts_dispatch, experts)
    return len(compiled)


def uncompile_blocks(model: torch.nn.Module) -> None:
    """Undo compile_blocks (the blocks' class forward again)."""
    for block in blocks(model):
        if getattr(block, "_lensrl_compiled", False):
            del block.forward
            block._lensrl_compiled = False
            experts = getattr(getattr(block, "mlp", None), "experts", None)
            if experts is not None and "forward" in experts.__dict__:
                del experts.forward


def _inner_forward(cls: type):
    """(the block's own forward, whether the class forward wraps it in activation checkpointing).
    transformers >= 5.2x checkpoints inside `forward` (GradientCheckpointingLayer wraps it, again
    for FSDP2's subclass); a checkpoint around compiled code must be taken outside it, so the
    compiled function is the unwrapped forward and `_dispatch` checkpoints it as transformers
    would. Older releases checkpoint in `__call__`, around our forward, and need nothing."""
    fn = cls.forward
    checkpoints = False
    while getattr(getattr(fn, "__code__", None), "co_name", "") == "forward_with_checkpointing":
        fn, checkpoints = fn.__wrapped__, True
    return fn, checkpoints


def _dispatch(block, compiled_forward, checkpoints: bool, *args, **kwargs):
    # cached generation: the class's own forward (transformers 5.2x passes the cache as `cache`,
    # earlier releases as `past_key_values`); compiled, every decode step recompiled per layer index
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return type(block).forward(block, *args, **kwargs)
    if checkpoints and block.gradient_checkpointing and block.training:
        return block._gradient_checkpointing_func(functools.partial(compiled_forward, block, **kwargs), *args)
    return compiled_forward(block, *args, **kwargs)


def _experts_dispatch(experts, *args, **kwargs):
    """The experts' own forward; under torch.compile with weights other than bf16, run eagerly
    (a graph break) so that transformers' grouped_mm calls torch's kernel, not its Python loop."""
    if torch.compiler.is_compiling() and experts.gate_up_proj.dtype != torch.bfloat16:
        return _eager_experts(experts, *args, **kwargs)
    return type(experts).forward(experts, *args, **kwargs)


@torch.compiler.disable
def _eager_experts(experts, *args, **kwargs):
    return type(experts).forward(experts, *args, **kwargs)


def compile_seconds() -> float:
    """Seconds this process has spent in torch.compile so far (dynamo tracing, AOTAutograd and
    inductor, cache hits included, a backward compiled at its first call not; from `torch._dynamo.utils.compile_times`); 0.0 before any
    compile. The GRPO trainer logs its growth per step as `timing_s/compile`: where a first step's
    time goes, and a later step that recompiles."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    return sum((float(v) for n, v in zip(names, values) if n == "_compile.compile_inner"), 0.0)
