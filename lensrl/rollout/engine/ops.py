"""The decode path's fused operations, in plain PyTorch (CPU, and the fallback on GPU).

`triton_ops.py` has the same four functions as Triton kernels; the model runner picks one set.
Each follows the trainer's transformers forward op for op, dtypes included, so the decode path
computes what the training forward computes:

  * rms_norm:   weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype), optionally after the
                residual add x += delta (in x's dtype, as `residual + hidden_states` is)
  * rope_and_cache: split the fused q/k/v projection, q/k RMSNorm (Qwen3-VL), rotary embedding
                (q * cos + rotate_half(q) * sin, cos in the residual dtype as transformers makes it),
                write k and v into the paged cache, return q
  * silu_mul:   act(gate) * up
  * paged_attention: one query token per sequence against its cached keys/values (GQA)

`check_ops` runs another implementation of these functions (plus its fused sampler) against
them; the engine uses Triton's only after it passes on the device and dtype at hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lensrl.rollout.engine.sampler import draw_keys, sample


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
    delta: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm of x (B, H) -> (B, H) in out_dtype. With `delta`, first x += delta in place."""
    if delta is not None:
        x.add_(delta)  # the residual add, rounded to x's dtype as the trainer's `residual + h` is
    return _hf_rms_norm(x, weight, eps).to(out_dtype)


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_and_cache(
    qkv: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """qkv (B, (NH + 2 KVH) * D) -> rotated q (B, NH, D) in qkv's dtype; k, v written at `slots`.

    cos_table/sin_table: (max_position, D / 2) in the residual dtype; positions (B,) long;
    k_cache/v_cache: (num_blocks, block_size, KVH, D); slots (B,) long flat token indices.
    """
    batch = qkv.shape[0]
    head_dim = cos_table.shape[-1] * 2
    q = qkv[:, : num_heads * head_dim].view(batch, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
        batch, num_kv_heads, head_dim
    )
    v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(batch, num_kv_heads, head_dim)
    if q_norm is not None:
        q = _hf_rms_norm(q, q_norm, eps)
        k = _hf_rms_norm(k, k_norm, eps)
    cos = cos_table[positions].repeat(1, 2).unsqueeze(1)  # (B, 1, D)
    sin = sin_table[positions].repeat(1, 2).unsqueeze(1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))
    return q.to(qkv.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over each sequence's first context_lens cached tokens.

    q (B, NH, D); caches (num_blocks, block_size, KVH, D); block_tables (B, max_blocks) int;
    context_lens (B,) int. Returns (B, NH, D) in q's dtype. Gathers every row's whole block
    table and runs torch's own SDPA (the trainer's kernel, so low-precision rounding matches),
    with each KV head's query group as the query axis; simple and graph-friendly, but slower
    than the Triton kernel.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_tokens = block_tables.shape[1] * k_cache.shape[1]
    tables = block_tables.long()
    k = k_cache[tables].reshape(batch, max_tokens, num_kv_heads, head_dim).transpose(1, 2)  # (B, KVH, L, D)
    v = v_cache[tables].reshape(batch, max_tokens, num_kv_heads, head_dim).transpose(1, 2)
    valid = torch.arange(max_tokens, device=q.device)[None, :] < context_lens[:, None]  # (B, L)
    out = F.scaled_dot_product_attention(
        q.view(batch, num_kv_heads, group, head_dim), k, v, attn_mask=valid[:, None, None, :], scale=scale
    )  # (B, KVH, G, D)
    return out.reshape(batch, num_heads, head_dim)


# ---------------------------------------------------------------------------------------------
# Checking another implementation (the Triton kernels) against these
# ---------------------------------------------------------------------------------------------


def check_ops(
    candidate,
    shape,
    weights,
    device: torch.device,
    seed: int = 0,
    attention: bool = True,
    sampler_draws: int = 4096,
) -> None:
    """Run each of `candidate`'s ops against the torch ops on random inputs in the engine's dtypes;
    raise AssertionError on a mismatch. attention=False skips the attention kernel (Triton's CPU
    interpreter computes bf16 dots wrongly)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    mm, res = weights.matmul_dtype, weights.residual_dtype
    nh, kvh, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    batch, block_size, num_blocks = 5, 16, 12

    def rand(*size, dtype=mm):
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32).to(dtype)

    tol = dict(atol=3e-2, rtol=3e-2) if mm != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    x, delta, w = (
        rand(batch, shape.hidden_size, dtype=res),
        rand(batch, shape.hidden_size),
        rand(shape.hidden_size, dtype=res),
    )
    x2 = x.clone()
    torch.testing.assert_close(
        candidate.rms_norm(x, w, 1e-6, mm, delta), rms_norm(x2, w, 1e-6, mm, delta), **tol
    )
    torch.testing.assert_close(x, x2, **tol)
    gate, up = rand(batch, 300), rand(batch, 300)
    torch.testing.assert_close(candidate.silu_mul(gate, up), silu_mul(gate, up), **tol)
    qkv = rand(batch, (nh + 2 * kvh) * d)
    norms = (rand(d, dtype=res), rand(d, dtype=res)) if shape.qk_norm else (None, None)
    cos, sin = rand(64, d // 2, dtype=res), rand(64, d // 2, dtype=res)
    positions = torch.randint(0, 64, (batch,), generator=gen, device=device)
    slots = torch.randperm(num_blocks * block_size, generator=gen, device=device)[:batch]
    caches = [torch.zeros(num_blocks, block_size, kvh, d, dtype=mm, device=device) for _ in range(4)]
    q1 = candidate.rope_and_cache(
        qkv, *norms, 1e-6, cos, sin, positions, caches[0], caches[1], slots, nh, kvh
    )
    q2 = rope_and_cache(qkv, *norms, 1e-6, cos, sin, positions, caches[2], caches[3], slots, nh, kvh)
    torch.testing.assert_close(q1, q2, **tol)
    torch.testing.assert_close(caches[0], caches[2], **tol)
    torch.testing.assert_close(caches[1], caches[3], **tol)
    if not attention:
        return
    k_cache, v_cache = rand(num_blocks, block_size, kvh, d), rand(num_blocks, block_size, kvh, d)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen, device=device)[:4] for _ in range(batch)])
    context = torch.tensor([1, 16, 17, 40, 64], dtype=torch.int32, device=device)
    q = rand(batch, nh, d)
    tables = tables.to(torch.int32)
    out1 = candidate.paged_attention(q, k_cache, v_cache, tables, context, d**-0.5)
    out2 = paged_attention(q, k_cache, v_cache, tables, context, d**-0.5)
    torch.testing.assert_close(out1, out2, **tol)
    check_sampler(candidate.sample, device, mm, gen, sampler_draws)


def check_sampler(
    kernel, device: torch.device, dtype: torch.dtype, gen: torch.Generator, draws: int = 4096
) -> None:
    """The sampling kernel against `sample`: greedy tokens and logprobs exactly (fp32 math), and
    draw frequencies of a fixed 8-way distribution within 5 binomial standard errors."""
    logits = (torch.randn(6, 1000, generator=gen, device=device) * 3).to(dtype)
    logits[0, 5] = float("-inf")  # a suppressed id
    for temperature in (0.0, 0.7):
        keys = torch.arange(1234, 1240, device=device)
        tokens, logp = kernel(logits.clone(), temperature, keys)
        logp_all = torch.log_softmax(logits.float() / (temperature or 1.0), -1)
        torch.testing.assert_close(logp, logp_all.gather(-1, tokens[:, None])[:, 0], atol=1e-4, rtol=1e-5)
        if temperature == 0.0:
            assert torch.equal(tokens, sample(logits, 0.0)[0]), "greedy tokens differ"
    probs = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02], device=device)
    keys = draw_keys(99, range(draws), [0] * draws).to(device)
    tokens, _ = kernel(probs.log().to(dtype).expand(draws, -1).contiguous(), 1.0, keys)
    observed = torch.bincount(tokens, minlength=8).float() / draws
    expected = torch.softmax(probs.log().to(dtype).float(), -1)
    bound = 5 * torch.sqrt(expected * (1 - expected) / draws) + 1e-3
    assert torch.all((observed - expected).abs() <= bound), (observed, expected)
