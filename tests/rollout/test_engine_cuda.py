"""The engine on a GPU: Triton kernels, CUDA graphs and bf16 (skipped without CUDA).

python -m pytest tests/rollout/test_engine_cuda.py -q     # on the GPU machine, ~30 s
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lensrl.config import RolloutConfig
from lensrl.rollout.base import SamplingParams
from lensrl.rollout.engine import EngineRollout
from lensrl.rollout.hf import HFRollout
from lensrl.train.sequences import forward_response_logprobs, make_sequence
from tests.rollout.conftest import mixed_samples, sharpened_policy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def cuda_policy(request, tiny_qwen25_dir, tiny_qwen3_dir):
    model, processor = sharpened_policy(tiny_qwen25_dir if request.param == "qwen2_5_vl" else tiny_qwen3_dir)
    return model.cuda(), processor, [processor(s) for s in mixed_samples()]


def test_fp32_greedy_on_triton_kernels_and_cuda_graphs_equals_generate(cuda_policy):
    model, processor, prompts = cuda_policy
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=12)
    reference = HFRollout(model, processor).generate(prompts, params)
    engine = EngineRollout(model, processor, RolloutConfig(), max_num_seqs=6, block_size=16)
    got = engine.generate(prompts, params)
    assert engine.stats["kernels"] == "triton" and engine.stats["cuda_graphs"]
    for ref_group, group in zip(reference, got):
        for ref, completion in zip(ref_group, group):
            assert completion.token_ids == ref.token_ids
            np.testing.assert_allclose(completion.logprobs, ref.logprobs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-params", "fp32-masters-autocast"])
def test_bf16_logprobs_are_close_to_the_trainers(cuda_policy, autocast):
    model, processor, prompts = cuda_policy
    policy = model if autocast else _bf16_copy(model)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=24, seed=0)
    engine = EngineRollout(policy, processor, RolloutConfig())
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        groups = engine.generate(prompts, params)
        seqs = [make_sequence(p, c.token_ids) for p, g in zip(prompts, groups) for c in g]
        with torch.no_grad():
            logp, _, mask = forward_response_logprobs(
                policy, seqs, processor.pad_token_id, suppress_ids=processor.suppress_token_ids
            )
    rollout = [c.logprobs for g in groups for c in g]
    gaps = torch.cat([(logp[i, mask[i]].cpu() - torch.tensor(r)).abs() for i, r in enumerate(rollout)])
    assert engine.weights.matmul_dtype == torch.bfloat16
    assert gaps.mean() < 1e-2, (gaps.mean(), gaps.max())


def test_sync_weights_on_cuda_follows_in_place_updates(cuda_policy):
    model, processor, prompts = cuda_policy
    policy = _bf16_copy(model)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    engine = EngineRollout(policy, processor, RolloutConfig())
    engine.generate(prompts, params)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.sync_weights(policy)
    expected = HFRollout(policy, processor).generate(prompts, params)
    got = engine.generate(prompts, params)
    same = np.mean([c.token_ids[0] == r.token_ids[0] for g, e in zip(got, expected) for c, r in zip(g, e)])
    assert same >= 0.8  # bf16: first tokens agree (later ones may part on near-ties)


def _bf16_copy(model):
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)
