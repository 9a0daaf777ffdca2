"""The `hf` rollout backend (transformers `generate`) samples the distribution the trainer computes,
whatever the model folder's generation_config.json asks for, and reports the log-probability of
the distribution each token was drawn from."""

from __future__ import annotations

import json
import shutil

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
    """First-token frequencies over 3000 draws against the trainer's softmax: within 5 binomial
    standard errors for every token, and for the total mass of the unlikely tokens (the folder's
    min_p would never draw those; a repetition penalty or a banned bigram moves the prompt's own)."""
    model, processor = penalising_folder
    prompt = processor(mixed_samples()[2])  # a long text prompt: many tokens a penalty would hit
    params = SamplingParams(n=DRAWS, temperature=1.0, max_new_tokens=1, seed=3)
    if backend == "hf":
        rollout = HFRollout(model, processor, batch_size=DRAWS)
    else:
        rollout = EngineRollout(model, processor, RolloutConfig(), max_num_seqs=DRAWS)
    (group,) = rollout.generate([prompt], params)
    observed = torch.bincount(torch.tensor([c.token_ids[0] for c in group]), minlength=model.config.get_text_config().vocab_size)
    observed = observed.float() / DRAWS
    seq = make_sequence(prompt, [group[0].token_ids[0]])
    expected = trainer_distributions(model, processor, [seq], 1.0)[0][0].exp()  # (V,)
    bound = 5 * torch.sqrt(expected * (1 - expected) / DRAWS) + 2e-3
    worst = int(((observed - expected).abs() - bound).argmax())
    assert ((observed - expected).abs() <= bound).all(), (worst, observed[worst].item(), expected[worst].item())
    tail = expected < 0.2 * expected.max()  # what min_p=0.2 would cut
    tail_bound = 5 * torch.sqrt(expected[tail].sum() * (1 - expected[tail].sum()) / DRAWS)
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
