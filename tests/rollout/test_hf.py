"""The `hf` rollout backend (transformers `generate`) samples the distribution the trainer computes,
whatever the model folder's generation_config.json asks for, reports the log-probability of the
distribution each token was drawn from, and with a seed draws the same samples however the batch is
grouped into calls or split over ranks."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from lensrl.config import RolloutConfig
from lensrl.models.load import load_policy
from lensrl.rollout.base import SamplingParams
from lensrl.rollout.engine import EngineRollout
from lensrl.rollout.hf import HFRollout, behaviour_logprobs
from lensrl.train.sequences import make_sequence
from tests.rollout.conftest import mixed_samples
from tests.rollout.test_engine import trainer_distributions

DRAWS = 3000


@pytest.fixture(scope="module")
def penalising_folder(tiny_qwen25_dir, tmp_path_factory):
    """The tiny model with a generation config that changes sampling, as released checkpoints do
    (Qwen2.5-VL-Instruct ships repetition_penalty 1.05), made stronger so a test sees it."""
    folder = tmp_path_factory.mktemp("penalising") / "model"
    shutil.copytree(tiny_qwen25_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(repetition_penalty=1.3, no_repeat_ngram_size=2, min_p=0.2, top_k=5, temperature=0.3)
    (folder / "generation_config.json").write_text(json.dumps(config))
    model, processor = load_policy(folder)
    with torch.no_grad():  # sharpen the random model so the prompt's tokens matter
        for param in model.model.language_model.parameters():
            if param.ndim == 2:
                param.mul_(6.0)
    assert model.generation_config.repetition_penalty == 1.3
    return model, processor


@pytest.mark.parametrize("backend", ["hf", "engine"])
def test_sampled_tokens_follow_the_trainers_distribution_whatever_the_folder_says(penalising_folder, backend):
    """First-token frequencies over 3000 draws (1000 through `generate`, whose prefill repeats the
    prompt per draw) against the trainer's softmax: within 5 binomial standard errors for every
    token, and for the total mass of the unlikely tokens (the folder's min_p would never draw those;
    a repetition penalty or a banned bigram moves the prompt's own)."""
    model, processor = penalising_folder
    prompt = processor(mixed_samples()[2])  # a long text prompt: many tokens a penalty would hit
    draws = DRAWS if backend == "engine" else DRAWS // 3
    params = SamplingParams(n=draws, temperature=1.0, max_new_tokens=1, seed=3)
    if backend == "hf":
        rollout = HFRollout(model, processor, batch_size=draws)
    else:
        rollout = EngineRollout(model, processor, RolloutConfig(), max_num_seqs=draws)
    (group,) = rollout.generate([prompt], params)
    observed = torch.bincount(torch.tensor([c.token_ids[0] for c in group]), minlength=model.config.get_text_config().vocab_size)
    observed = observed.float() / draws
    seq = make_sequence(prompt, [group[0].token_ids[0]])
    expected = trainer_distributions(model, processor, [seq], 1.0)[0][0].exp()  # (V,)
    bound = 5 * torch.sqrt(expected * (1 - expected) / draws) + 2e-3
    worst = int(((observed - expected).abs() - bound).argmax())
    assert ((observed - expected).abs() <= bound).all(), (worst, observed[worst].item(), expected[worst].item())
    tail = expected < 0.2 * expected.max()  # what min_p=0.2 would cut
    tail_bound = 5 * torch.sqrt(expected[tail].sum() * (1 - expected[tail].sum()) / draws)
    assert expected[tail].sum() > 0.2 and (observed[tail].sum() - expected[tail].sum()).abs() <= tail_bound


@pytest.mark.parametrize("top_p, top_k", [(1.0, -1), (0.8, 20)])
def test_logprobs_are_those_of_the_distribution_sampled(penalising_folder, top_p, top_k):
    model, processor = penalising_folder
    prompts = [processor(s) for s in mixed_samples()[:3]]
    params = SamplingParams(n=2, temperature=0.7, top_p=top_p, top_k=top_k, max_new_tokens=5, seed=1)
    groups = HFRollout(model, processor).generate(prompts, params)
    seqs = [make_sequence(p, c.token_ids) for p, g in zip(prompts, groups) for c in g]
    full = trainer_distributions(model, processor, seqs, 0.7)
    completions = [c for g in groups for c in g]
    for seq, dist, completion in zip(seqs, full, completions):
        tokens = seq.input_ids[seq.prompt_length :]
        torch.testing.assert_close(torch.tensor(completion.logprobs), behaviour_logprobs(dist, tokens, params),
                                   rtol=0, atol=1e-4)


def tokens(groups) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in groups]


@pytest.mark.parametrize("top_p, top_k", [(1.0, -1), (0.9, 20)])
def test_a_seeded_sample_draws_the_same_tokens_whatever_the_batch_size_or_the_split(qwen25, top_p, top_k):
    """rollout.seed makes the draws a function of (seed, global position, sample, token index):
    one prompt per generate call, two per call, all in one call, and the batch split over two
    "ranks" (interleaved, each call given its global positions) sample the same completions with
    the same log-probabilities; the engine (the same keyed sampler, on CPU) draws them too."""
    model, processor, prompts = qwen25
    params = SamplingParams(n=3, temperature=1.0, top_p=top_p, top_k=top_k, max_new_tokens=8, seed=11)
    whole = HFRollout(model, processor, batch_size=64).generate(prompts, params)
    for batch_size in (1, 6):  # 1 prompt (6 // 3 = 2 prompts) per call
        groups = HFRollout(model, processor, batch_size=batch_size).generate(prompts, params)
        assert tokens(groups) == tokens(whole), batch_size
        for group, ref in zip(groups, whole):
            for c, r in zip(group, ref):
                np.testing.assert_allclose(c.logprobs, r.logprobs, rtol=0, atol=1e-5)
    first, second = [0, 2, 4], [3, 1]  # two ranks' shares, one of them out of order
    split = {}
    for share in (first, second):
        rollout = HFRollout(model, processor, batch_size=6)
        split.update(zip(share, rollout.generate([prompts[i] for i in share], params, positions=share)))
    assert tokens(whole) == tokens([split[i] for i in range(len(prompts))])
    assert len({tuple(c.token_ids) for g in whole for c in g}) > len(prompts)  # samples differ
    engine = EngineRollout(model, processor, RolloutConfig()).generate(prompts, params)
    assert tokens(engine) == tokens(whole)


def test_the_seed_and_the_position_choose_the_draws(qwen25):
    """Another seed, or the same prompt at another global position, draws other tokens; without a
    seed each call draws a fresh one."""
    model, processor, prompts = qwen25
    rollout = HFRollout(model, processor)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=5)
    base = tokens(rollout.generate(prompts[:2], params))
    assert base == tokens(rollout.generate(prompts[:2], params))
    assert base != tokens(rollout.generate(prompts[:2], dataclasses.replace(params, seed=6)))
    assert base != tokens(rollout.generate(prompts[:2], params, positions=[2, 3]))
    unseeded = dataclasses.replace(params, seed=None)
    assert tokens(rollout.generate(prompts[:2], unseeded)) != tokens(rollout.generate(prompts[:2], unseeded))
