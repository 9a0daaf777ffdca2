"""lensrl's own generation engine (the `engine` rollout backend).

engine.py        EngineRollout: generate loop, sync_weights, sleep/wake, timings
scheduler.py     prompt groups, samples, rows: prefill once per group, continuous batching
kv_cache.py      the paged KV pool, its free list and its memory budget
model_runner.py  prefill through transformers, decode through its own path, CUDA graphs
weights.py       the decode path's references to (or copies of) the policy's weights
moe.py           mixture of experts: router, experts as grouped GEMMs, routing vs the trainer's
ops.py           decode ops in plain PyTorch (CPU and fallback)
triton_ops.py    the same ops as Triton kernels (CUDA)
sampler.py       temperature / top-k / top-p sampling and the trainer's logprobs
"""

from lensrl.rollout.engine.engine import EngineOptions, EngineRollout

__all__ = ["EngineOptions", "EngineRollout"]
