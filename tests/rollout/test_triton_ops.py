"""The engine's Triton kernels on CPU, under Triton's interpreter (skipped without Triton).

The checks run in a fresh process (triton_interpreter_checks.py) because TRITON_INTERPRET must be
set before triton is first imported. On GPU the engine also checks the kernels against its torch
ops before using them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_match_torch_ops_and_the_engine_matches_generate(tiny_qwen25_dir):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(HERE / "triton_interpreter_checks.py"), str(tiny_qwen25_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=HERE.parents[1],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "engine on Triton kernels matches generate" in result.stdout


# The interpreter does not type-check like the compiler does: a kernel can pass the checks above
# and still fail to compile on a GPU (Triton 3.6 rejected the rope kernel for binding one name to
# a pointer in one branch and an int in the other). Triton's compiler runs without a GPU, so
# compile every kernel for an H100 (sm_90) here, for both dtypes and every constexpr branch.
def _compile_for_sm90(fn, types, consts):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    signature, constexprs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name], constexprs[(i,)] = "constexpr", consts[name]
        else:
            signature[name] = types[name]
    kernel = compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    assert "ptx" in kernel.asm


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_triton_kernel_compiles_for_sm90(dtype):
    from lensrl.rollout.engine import triton_ops as T

    P, i32 = "*" + dtype, "i32"
    low = dtype == "bf16"
    _compile_for_sm90(
        T._rms_norm_kernel,
        dict(X=P, DELTA=P, W=P, OUT=P, stride_x=i32, stride_d=i32, stride_o=i32, n_cols=i32, eps="fp32"),
        dict(HAS_DELTA=True, BLOCK=2048),
    )
    for qk_norm in (True, False):
        _compile_for_sm90(
            T._rope_cache_kernel,
            dict(QKV=P, stride_qkv=i32, QN=P, KN=P, eps="fp32", COS="*fp32", SIN="*fp32", stride_cos=i32,
                 POS="*i64", SLOT="*i64", Q_OUT=P, stride_qo=i32, K_CACHE=P, V_CACHE=P, stride_slot=i32),
            dict(NUM_HEADS=16, NUM_KV_HEADS=2, HALF=64, QK_NORM=qk_norm, NORM_ROUND=low, ROPE_ROUND=low),
        )  # fmt: skip
    _compile_for_sm90(
        T._silu_mul_kernel, dict(G=P, U=P, OUT=P, stride_g=i32, stride_u=i32, stride_o=i32, n_cols=i32), dict(BLOCK=1024)
    )
    strides = ("stride_qb", "stride_qh", "stride_cb", "stride_ct", "stride_ch", "stride_bt", "stride_ob", "stride_oh")
    _compile_for_sm90(
        T._paged_attention_kernel,
        dict(Q=P, K_CACHE=P, V_CACHE=P, BLOCK_TABLES="*i32", CONTEXT_LENS="*i32", OUT=P, scale="fp32",
             **dict.fromkeys(strides, i32)),
        dict(GROUP=8, GROUP_PAD=16, HEAD_DIM=128, BLOCK=16, IEEE=not low),
    )  # fmt: skip
    for greedy in (True, False):
        _compile_for_sm90(
            T._sample_kernel,
            dict(LOGITS=P, stride=i32, n_cols=i32, inv_temperature="fp32", KEYS="*i64", TOKENS="*i64", LOGP="*fp32"),
            dict(GREEDY=greedy, BLOCK=4096),
        )
