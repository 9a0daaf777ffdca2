"""Triton kernels for the decode path: the same four functions as `ops.py`, fused.

A decode step of a 3B model is ~40 elementwise ops per layer in plain PyTorch; inside a CUDA
graph each still costs a few microseconds, as much as the matmuls themselves at batch 256. These
kernels cut a layer to ~10 launches, and the paged attention kernel reads each sequence's cached
tokens once (no gather). Numerics mirror `ops.py` (fp32 math, rounding where torch rounds).

Tests run them on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# RMSNorm (+ residual add)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    X, DELTA, W, OUT, stride_x, stride_d, stride_o, n_cols, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(DELTA + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + d).to(X.dtype.element_ty)
        tl.store(X + row * stride_x + cols, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    y = (x * tl.rsqrt(var + eps)).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (w * y).to(OUT.dtype.element_ty), mask=mask)


def rms_norm(x, weight, eps, out_dtype, delta=None):
    batch, n_cols = x.shape
    out = torch.empty((batch, n_cols), dtype=out_dtype, device=x.device)
    d = delta if delta is not None else x
    _rms_norm_kernel[(batch,)](
        x,
        d,
        weight,
        out,
        x.stride(0),
        d.stride(0),
        out.stride(0),
        n_cols,
        eps,
        HAS_DELTA=delta is not None,
        BLOCK=triton.next_power_of_2(n_cols),
        num_warps=8,
    )
    return out


# ---------------------------------------------------------------------------------------------
# q/k norm + rotary embedding + KV cache write
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rope_cache_kernel(
    QKV,
    stride_qkv,
    QN,
    KN,
    eps,
    COS,
    SIN,
    stride_cos,
    POS,
    SLOT,
    Q_OUT,
    stride_qo,
    K_CACHE,
    V_CACHE,
    stride_slot,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    QK_NORM: tl.constexpr,
    NORM_ROUND: tl.constexpr,
    ROPE_ROUND: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)  # 0..NH-1: a query head; NH..NH+KVH-1: a key head (and its value head)
    j = tl.arange(0, HALF)
    base = QKV + row * stride_qkv + head * (2 * HALF)
    x1 = tl.load(base + j).to(tl.float32)
    x2 = tl.load(base + HALF + j).to(tl.float32)
    in_ty = QKV.dtype.element_ty
    out_ty = Q_OUT.dtype.element_ty
    if QK_NORM:
        var = (tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF)
        r = tl.rsqrt(var + eps)
        y1 = (x1 * r).to(in_ty).to(tl.float32)
        y2 = (x2 * r).to(in_ty).to(tl.float32)
        if head < NUM_HEADS:
            w1 = tl.load(QN + j).to(tl.float32)
            w2 = tl.load(QN + HALF + j).to(tl.float32)
        else:
            w1 = tl.load(KN + j).to(tl.float32)
            w2 = tl.load(KN + HALF + j).to(tl.float32)
        x1 = w1 * y1
        x2 = w2 * y2
        if NORM_ROUND:
            x1 = x1.to(out_ty).to(tl.float32)
            x2 = x2.to(out_ty).to(tl.float32)
    pos = tl.load(POS + row)
    c = tl.load(COS + pos * stride_cos + j).to(tl.float32)
    s = tl.load(SIN + pos * stride_cos + j).to(tl.float32)
    a1 = x1 * c
    b1 = x2 * s
    a2 = x2 * c
    b2 = x1 * s
    if ROPE_ROUND:  # low-precision rope, as torch computes bf16 * bf16 products and sums
        a1 = a1.to(out_ty).to(tl.float32)
        b1 = b1.to(out_ty).to(tl.float32)
        a2 = a2.to(out_ty).to(tl.float32)
        b2 = b2.to(out_ty).to(tl.float32)
    o1 = a1 - b1
    o2 = a2 + b2
    if head < NUM_HEADS:
        dst = Q_OUT + row * stride_qo + head * (2 * HALF)
        tl.store(dst + j, o1.to(out_ty))
        tl.store(dst + HALF + j, o2.to(out_ty))
    else:
        kv_head = head - NUM_HEADS
        slot = tl.load(SLOT + row)
        # not `dst`: Triton 3.6 rejects a name bound to a pointer in one branch, an int in the other
        off = slot * stride_slot + kv_head * (2 * HALF)
        tl.store(K_CACHE + off + j, o1.to(K_CACHE.dtype.element_ty))
        tl.store(K_CACHE + off + HALF + j, o2.to(K_CACHE.dtype.element_ty))
        v_src = QKV + row * stride_qkv + (NUM_HEADS + NUM_KV_HEADS + kv_head) * (2 * HALF)
        v_ty = V_CACHE.dtype.element_ty
        tl.store(V_CACHE + off + j, tl.load(v_src + j).to(v_ty))
        tl.store(V_CACHE + off + HALF + j, tl.load(v_src + HALF + j).to(v_ty))


def rope_and_cache(
    qkv,
    q_norm,
    k_norm,
    eps,
    cos_table,
    sin_table,
    positions,
    k_cache,
    v_cache,
    slots,
    num_heads,
    num_kv_heads,
):
    batch = qkv.shape[0]
    half = cos_table.shape[-1]
    q_out = torch.empty((batch, num_heads, 2 * half), dtype=qkv.dtype, device=qkv.device)
    qk_norm = q_norm is not None
    norm_dtype = torch.promote_types(q_norm.dtype, qkv.dtype) if qk_norm else qkv.dtype
    rope_dtype = torch.promote_types(norm_dtype, cos_table.dtype)
    low = (torch.bfloat16, torch.float16)
    assert qkv.stride(1) == 1 and cos_table.is_contiguous() and sin_table.is_contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    _rope_cache_kernel[(batch, num_heads + num_kv_heads)](
        qkv,
        qkv.stride(0),
        q_norm if qk_norm else qkv,
        k_norm if qk_norm else qkv,
        eps,
        cos_table,
        sin_table,
        cos_table.stride(0),
        positions,
        slots,
        q_out,
        q_out.stride(0),
        k_cache,
        v_cache,
        num_kv_heads * 2 * half,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        QK_NORM=qk_norm,
        NORM_ROUND=norm_dtype in low,
        ROPE_ROUND=rope_dtype in low,
        num_warps=1,
    )
    return q_out


# ---------------------------------------------------------------------------------------------
# SiLU(gate) * up
# ---------------------------------------------------------------------------------------------


@triton.jit
def _silu_mul_kernel(G, U, OUT, stride_g, stride_u, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    out_ty = OUT.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(out_ty).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (act * u).to(out_ty), mask=mask)


def silu_mul(gate, up):
    batch, n_cols = gate.shape
    out = torch.empty((batch, n_cols), dtype=gate.dtype, device=gate.device)
    block = 1024
    _silu_mul_kernel[(batch, triton.cdiv(n_cols, block))](
        gate, up, out, gate.stride(0), up.stride(0), out.stride(0), n_cols, BLOCK=block, num_warps=4
    )
    return out


# ---------------------------------------------------------------------------------------------
# Paged decode attention
# ---------------------------------------------------------------------------------------------


@triton.jit
def _paged_attention_kernel(
    Q,
    K_CACHE,
    V_CACHE,
    BLOCK_TABLES,
    CONTEXT_LENS,
    OUT,
    scale,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_bt,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    IEEE: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    context = tl.load(CONTEXT_LENS + row)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, BLOCK)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    q = tl.load(
        Q + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_mask[:, None], other=0.0
    )
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for i in range(0, tl.cdiv(context, BLOCK)):
        block = tl.load(BLOCK_TABLES + row * stride_bt + i).to(tl.int64)
        offsets = block * stride_cb + t[:, None] * stride_ct + kv_head * stride_ch + d[None, :]
        t_mask = (i * BLOCK + t) < context
        k = tl.load(K_CACHE + offsets, mask=t_mask[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(t_mask[None, :], s * scale, float("-inf"))  # (GROUP_PAD, BLOCK)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V_CACHE + offsets, mask=t_mask[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        OUT + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=g_mask[:, None],
    )


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    assert block_size >= 16 and block_size & (block_size - 1) == 0, (
        "Triton attention needs a power-of-2 block >= 16"
    )
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    out = torch.empty_like(q)
    _paged_attention_kernel[(batch, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK=block_size,
        IEEE=q.dtype == torch.float32,
        num_warps=4,
        num_stages=2,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Sampling: temperature, Gumbel-max draw and the token's log-probability in one pass
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sample_kernel(
    LOGITS, stride, n_cols, inv_temperature, KEYS, TOKENS, LOGP, GREEDY: tl.constexpr, BLOCK: tl.constexpr
):
    """One row per program. Reads the row once: a running log-sum-exp per lane, and the argmax of
    x / T + Gumbel noise (a draw from softmax(x / T)), or of x / T when greedy. The noise of a row
    is Philox keyed by KEYS[row] (the row's own stream, whatever the batch)."""
    row = tl.program_id(0)
    seed = tl.load(KEYS + row)
    lanes = tl.arange(0, BLOCK)
    base = LOGITS + row.to(tl.int64) * stride
    neg_inf = float("-inf")
    m = tl.full([BLOCK], neg_inf, tl.float32)  # running max per lane
    s = tl.zeros([BLOCK], tl.float32)  # running sum of exp(x - m) per lane
    best = tl.full([BLOCK], neg_inf, tl.float32)
    best_idx = tl.full([BLOCK], -1, tl.int32)  # -1: lane never held a candidate
    best_x = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        idx = start + lanes
        x = tl.load(base + idx, mask=idx < n_cols, other=neg_inf).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, x)
        finite = m_new > neg_inf
        s = tl.where(finite, s * tl.exp(m - m_new) + tl.exp(x - m_new), 0.0)
        m = m_new
        if GREEDY:
            score = x
        else:
            u = tl.rand(seed, idx)
            score = x - tl.log(-tl.log(u))
        better = score > best  # strict: the first index wins a tie, as torch.argmax
        best = tl.where(better, score, best)
        best_idx = tl.where(better, idx, best_idx)
        best_x = tl.where(better, x, best_x)
    m_all = tl.max(m, axis=0)
    log_z = m_all + tl.log(tl.sum(tl.where(m > neg_inf, s * tl.exp(m - m_all), 0.0), axis=0))
    top = tl.max(best, axis=0)
    token = tl.min(tl.where(best == top, best_idx, n_cols), axis=0)
    x_token = tl.max(tl.where(best_idx == token, best_x, neg_inf), axis=0)
    tl.store(TOKENS + row, token.to(tl.int64))
    tl.store(LOGP + row, x_token - log_z)


def sample(logits, temperature, keys):
    """tokens (B,) long and log_softmax(logits / T) of them (B,) float32; temperature <= 0 greedy.
    keys: (B,) int64 on the logits' device, each row's random stream (`sampler.draw_keys`).
    Suppressed ids must already be -inf in `logits`."""
    batch, n_cols = logits.shape
    tokens = torch.empty(batch, dtype=torch.long, device=logits.device)
    logp = torch.empty(batch, dtype=torch.float32, device=logits.device)
    greedy = temperature <= 0
    inv_temperature = 1.0 if greedy else 1.0 / temperature
    _sample_kernel[(batch,)](
        logits,
        logits.stride(0),
        n_cols,
        inv_temperature,
        keys,
        tokens,
        logp,
        GREEDY=greedy,
        BLOCK=min(4096, triton.next_power_of_2(n_cols)),
        num_warps=8,
    )
    return tokens, logp
