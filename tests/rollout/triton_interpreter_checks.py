"""Checks of the engine's Triton kernels on CPU, run by test_triton_ops.py in a fresh process:
TRITON_INTERPRET=1 must be set before anything imports triton (transformers does, early).

    TRITON_INTERPRET=1 python tests/rollout/triton_interpreter_checks.py TINY_QWEN25_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lensrl.config import RolloutConfig  # noqa: E402
from lensrl.rollout.base import SamplingParams  # noqa: E402
from lensrl.rollout.engine import EngineRollout, triton_ops  # noqa: E402
from lensrl.rollout.engine.ops import check_ops  # noqa: E402
from lensrl.rollout.engine.weights import TextShape  # noqa: E402
from lensrl.rollout.hf import HFRollout  # noqa: E402
from lensrl.train.sequences import forward_response_logprobs, make_sequence  # noqa: E402
from tests.rollout.conftest import mixed_samples, sharpened_policy  # noqa: E402


def patch_interpreter() -> None:
    """The interpreter makes a loop bound of a loaded scalar with int(array of shape (1,)), which
    numpy 2 refuses; convert through reshape instead (interpreter only)."""
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def check_kernels() -> None:
    """Each kernel against its torch op. The interpreter truncates (not rounds) float32 -> bf16 and
    miscomputes bf16 dots, so bf16 is checked loosely and attention in float32 only."""
    for qk_norm in (False, True):
        for matmul, residual in (
            (torch.float32, torch.float32),
            (torch.bfloat16, torch.bfloat16),
            (torch.bfloat16, torch.float32),
        ):
            shape = TextShape(64, 4, 2, 32, 96, 2, 100, 1e-6, "silu", qk_norm)
            weights = SimpleNamespace(matmul_dtype=matmul, residual_dtype=residual)
            fp32 = matmul == torch.float32
            draws = 1024 if fp32 and qk_norm else 16  # the interpreter is slow: one real statistical check
            check_ops(triton_ops, shape, weights, torch.device("cpu"), attention=fp32, sampler_draws=draws)
    print("kernels match the torch ops")


def check_engine(model_dir: str) -> None:
    """The whole engine on the Triton kernels (float32) against transformers' greedy generate."""
    model, processor = sharpened_policy(model_dir)
    prompts = [processor(s) for s in mixed_samples()[:3]]
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=5)
    reference = HFRollout(model, processor).generate(prompts, params)
    engine = EngineRollout(model, processor, RolloutConfig(), use_triton=True, block_size=16)
    got = engine.generate(prompts, params)
    assert engine.stats["kernels"] == "triton"
    for ref_group, group in zip(reference, got):
        for ref, completion in zip(ref_group, group):
            assert completion.token_ids == ref.token_ids, (completion.token_ids, ref.token_ids)
            np.testing.assert_allclose(completion.logprobs, ref.logprobs, rtol=0, atol=1e-4)
    sampled = engine.generate(prompts, SamplingParams(n=2, temperature=0.8, max_new_tokens=5, seed=0))
    seqs = [make_sequence(p, c.token_ids) for p, g in zip(prompts, sampled) for c in g]
    with torch.no_grad():
        logp, _, mask = forward_response_logprobs(
            model, seqs, processor.pad_token_id, temperature=0.8, suppress_ids=processor.suppress_token_ids
        )
    for i, completion in enumerate(c for g in sampled for c in g):
        np.testing.assert_allclose(logp[i, mask[i]].numpy(), completion.logprobs, rtol=0, atol=1e-4)
    print("engine on Triton kernels matches generate")


if __name__ == "__main__":
    torch.set_num_threads(1)
    patch_interpreter()
    check_kernels()
    check_engine(sys.argv[1])
