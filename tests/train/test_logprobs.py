"""One truth for logprobs: the rollout's per-token logprobs equal the trainer's forward, and the
chunked logprob/entropy pass equals the plain one, gradients included."""

from __future__ import annotations

import pytest
import torch

from lensrl.data.sample import ImageSource, Sample
from lensrl.models.load import load_policy
from lensrl.rollout.base import SamplingParams
from lensrl.rollout.hf import HFRollout
from lensrl.train.logprobs import token_logprobs
from lensrl.train.sequences import forward_response_logprobs, make_sequence


def _samples(make_image_bytes):
    return [
        Sample("<image>What colour is the shape?", [ImageSource(make_image_bytes(56, 56, 1), "a")]),
        Sample("Compare <image> and <image>: which is larger?",
               [ImageSource(make_image_bytes(112, 56, 2), "b0"), ImageSource(make_image_bytes(56, 84, 3), "b1")]),
        Sample("No image here, just a much longer question about triangles and angles " * 3),
    ]


@pytest.mark.parametrize("arch_fixture", ["tiny_qwen25_dir", "tiny_qwen3_dir"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_rollout_logprobs_equal_trainer_logprobs(request, arch_fixture, temperature, make_image_bytes):
    model, processor = load_policy(request.getfixturevalue(arch_fixture))
    prompts = [processor(s) for s in _samples(make_image_bytes)]
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=8, seed=0)
    groups = HFRollout(model, processor).generate(prompts, params)
    assert [len(g) for g in groups] == [2, 2, 2]
    seqs, rollout = [], []
    for prompt, group in zip(prompts, groups):
        for completion in group:
            assert len(completion.logprobs) == len(completion.token_ids) >= 1
            assert completion.finish_reason in ("stop", "length")
            seqs.append(make_sequence(prompt, completion.token_ids))
            rollout.append(torch.tensor(completion.logprobs))
    with torch.no_grad():
        logp, _, mask = forward_response_logprobs(model, seqs, processor.pad_token_id,
                                                  temperature=temperature if temperature > 0 else 1.0,
                                                  suppress_ids=processor.suppress_token_ids)
    for i, expected in enumerate(rollout):
        got = logp[i, mask[i]]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_chunked_logprobs_and_entropy_equal_unchunked_with_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1000, bias=False)
    hidden = torch.randn(37, 32, requires_grad=True)
    targets = torch.randint(0, 1000, (37,))
    results = []
    for chunk in (5, 1024):
        hidden.grad, head.weight.grad = None, None
        logp, entropy = token_logprobs(hidden, head, targets, temperature=0.8, chunk_size=chunk, with_entropy=True)
        (logp.sum() * 0.3 + entropy.sum() * 0.1).backward()
        results.append((logp.detach(), entropy.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    # Reference: the full logits at once.
    logits = head(hidden.detach()).float() / 0.8
    log_softmax = torch.log_softmax(logits, -1)
    torch.testing.assert_close(results[0][0], log_softmax.gather(-1, targets[:, None]).squeeze(-1))
    torch.testing.assert_close(results[0][1], -(log_softmax.exp() * log_softmax).sum(-1))
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_vision_placeholder_tokens_are_never_sampled(tiny_qwen25_dir, make_image_bytes):
    """A sampled <|image_pad|> would claim an image feature that does not exist in training."""
    model, processor = load_policy(tiny_qwen25_dir)
    with torch.no_grad():  # make <|image_pad|> by far the most likely next token everywhere
        model.lm_head.weight[processor.image_token_id] *= 200
    prompts = [processor(s) for s in _samples(make_image_bytes)]
    groups = HFRollout(model, processor).generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=8,
                                                                          seed=0))
    generated = {t for group in groups for c in group for t in c.token_ids}
    assert generated and not generated & set(processor.suppress_token_ids)
    # and the trainer scores these completions on the same (masked) distribution
    seqs = [make_sequence(p, c.token_ids) for p, group in zip(prompts, groups) for c in group]
    with torch.no_grad():
        logp, _, mask = forward_response_logprobs(model, seqs, processor.pad_token_id,
                                                  suppress_ids=processor.suppress_token_ids)
    rollout = torch.cat([torch.tensor(c.logprobs) for group in groups for c in group])
    torch.testing.assert_close(logp[mask], rollout, rtol=0, atol=1e-4)


def test_entropy_as_a_metric_carries_no_gradient(tiny_qwen25_dir):
    """With entropy_coeff 0 the entropy is only logged: no autograd graph, the same values."""
    from lensrl.models.load import load_policy
    from lensrl.train.sequences import forward_response_logprobs, make_sequence

    model, processor = load_policy(tiny_qwen25_dir)
    from lensrl.data.sample import Sample

    seqs = [make_sequence(processor(Sample(f"What is {i} plus {i}?")), [5, 6, 7, 8]) for i in range(3)]
    outs = {grad: forward_response_logprobs(model, seqs, processor.pad_token_id, with_entropy=True, entropy_grad=grad)
            for grad in (True, False)}
    assert outs[True][1].requires_grad and not outs[False][1].requires_grad
    assert outs[False][0].requires_grad  # the log-probabilities still train
    torch.testing.assert_close(outs[False][1], outs[True][1].detach())
