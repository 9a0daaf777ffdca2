"""With rollout.seed, the number of ranks does not change what GRPO samples, at any
rollout.batch_size: the prompts each rank gets (`distributed.share`, blocks of mini-batches), sent
through the backend `build_rollout` makes from the recipe's settings with their global positions
(as `GRPOTrainer.collect` does), give the same completions as one rank. The demo recipe's
batch_size=256 once made 1 and 2 ranks sample differently from step 1 with the hf backend."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lensrl.config import GRPOConfig, RolloutConfig
from lensrl.train.distributed import share
from lensrl.trainers.common import build_rollout
from lensrl.trainers.grpo import GRPOTrainer
from tests.rollout.conftest import mixed_samples, sharpened_policy

PROMPTS, MINI_BATCH = 16, 4  # prompts per step; prompts per mini-batch (each rank gets a slice of each)


@pytest.fixture(scope="module")
def policy(tiny_qwen25_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only adds barriers
    model, processor = sharpened_policy(tiny_qwen25_dir)
    samples = mixed_samples()
    yield model, processor, [processor(samples[i % len(samples)]) for i in range(PROMPTS)]
    torch.set_num_threads(threads)


def step_samples(model, processor, prompts, backend: str, num_ranks: int, step: int = 3):
    """{global sample id: tokens} of one step's rollout, each simulated rank generating its share."""
    rollout_cfg = RolloutConfig(backend=backend, n=8, max_new_tokens=6, batch_size=256, seed=5)  # the demo's n, batch
    params = GRPOTrainer.sampling_params(SimpleNamespace(cfg=GRPOConfig(rollout=rollout_cfg)), step)
    drawn = {}
    for rank in range(num_ranks):
        positions = share(PROMPTS, num_ranks, rank, MINI_BATCH)
        rollout = build_rollout(rollout_cfg, model, processor, torch.device("cpu"))
        groups = rollout.generate([prompts[p] for p in positions], params, positions=positions)
        for p, group in zip(positions, groups):
            drawn.update({p * params.n + j: c.token_ids for j, c in enumerate(group)})
    return drawn


@pytest.mark.parametrize("backend", ["hf", "engine"])
def test_one_two_and_four_ranks_sample_the_same(policy, backend):
    model, processor, prompts = policy
    one = step_samples(model, processor, prompts, backend, 1)
    assert sorted(one) == list(range(PROMPTS * 8))
    assert len({tuple(tokens) for tokens in one.values()}) > PROMPTS  # real sampling, not one answer
    assert step_samples(model, processor, prompts, backend, 2) == one
    assert step_samples(model, processor, prompts, backend, 4) == one
    assert step_samples(model, processor, prompts, backend, 1, step=4) != one  # each step draws anew
