"""The engine's sampler: draws follow transformers' temperature / top-k / top-p rules, and the
reported log-probability is that of the distribution drawn from (the trainer's full softmax for
plain temperature sampling; the renormalised survivors under top-k / top-p)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lensrl.rollout.engine.sampler import sample

LOGITS = torch.tensor([2.0, 1.6, 1.1, 0.7, 0.2, -0.4, -1.0, 3.0])
SUPPRESS = torch.tensor([7])  # the most likely token, suppressed: must never appear
DRAWS = 200_000


def transformers_distribution(logits, temperature, top_p, top_k):
    """What `generate(do_sample=True)` draws from: suppression, then its warpers in order."""
    scores = logits.clone()[None]
    scores[:, SUPPRESS] = float("-inf")
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)[0]


@pytest.mark.parametrize(
    "temperature,top_p,top_k",
    [(1.0, 1.0, -1), (0.7, 1.0, -1), (1.3, 1.0, 3), (1.0, 0.8, -1), (0.9, 0.7, 4), (2.0, 0.95, 5)],
)
def test_token_frequencies_match_the_filtered_softmax(temperature, top_p, top_k):
    generator = torch.Generator().manual_seed(0)
    tokens, logp = sample(LOGITS.expand(DRAWS, -1), temperature, top_p, top_k, generator, SUPPRESS)
    expected = transformers_distribution(LOGITS, temperature, top_p, top_k)
    observed = torch.bincount(tokens, minlength=LOGITS.numel()).double() / DRAWS
    # Each frequency is a binomial mean: within 5 standard errors (plus float slack) of its p.
    tolerance = 5 * torch.sqrt(expected.double() * (1 - expected.double()) / DRAWS) + 1e-4
    assert torch.all((observed - expected.double()).abs() <= tolerance), (observed, expected)
    assert observed[expected == 0].sum() == 0  # filtered and suppressed tokens never drawn
    # logprob: of the distribution drawn from; with no filter log_softmax(logits / T) over the
    # full vocabulary with suppressed ids masked, the trainer's
    torch.testing.assert_close(logp, expected.log()[tokens])
    if top_p >= 1.0 and top_k <= 0:
        masked = (LOGITS / temperature).index_fill(0, SUPPRESS, torch.finfo(torch.float32).min)
        torch.testing.assert_close(logp, torch.log_softmax(masked, -1)[tokens])


def test_greedy_takes_the_argmax_and_reports_temperature_one_logprobs():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(1))
    tokens, logp = sample(logits, 0.0)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1))
    tokens, _ = sample(logits, 0.0, suppress=tokens[:1])
    assert not (tokens == tokens[0]).all() or logits.shape[0] == 1


def test_a_seeded_generator_makes_draws_reproducible():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(2))
    draws = [sample(logits, 1.0, 0.9, 20, torch.Generator().manual_seed(seed))[0] for seed in (5, 5, 6)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
