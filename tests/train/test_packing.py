"""Same numbers, any layout: packed micro-batches equal one-sequence-at-a-time and padded forwards
(logprobs, entropy, loss and every parameter's gradient), and the token-budget planner keeps its
promises (budget, balance, coverage, order)."""

from __future__ import annotations

import random

import pytest
import torch

from lensrl.data.sample import ImageSource, Sample
from lensrl.models.load import load_policy
from lensrl.rollout.base import SamplingParams
from lensrl.rollout.hf import HFRollout
from lensrl.train.attention import (
    TEXT_ATTENTION,
    VISION_ATTENTION,
    enable_packed_attention,
    segment_attention,
    segments_from_lengths,
    segments_from_positions,
)
from lensrl.train.packing import (
    micro_batched_response_logprobs,
    pack_sequences,
    packed_hidden_states,
    plan_micro_batches,
    restore_order,
)
from lensrl.train.sequences import forward_response_logprobs, make_sequence

TOL = dict(rtol=1e-5, atol=1e-5)

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")

# ----------------------------------------------------------------------------------------------
# planning


def _tokens(group, lengths):
    return sum(lengths[i] for i in group)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("multiple", [1, 2, 4])
def test_plan_covers_every_index_once_within_budget_and_balanced(seed, multiple):
    rng = random.Random(seed)
    lengths = [rng.randint(50, 300) + int(rng.paretovariate(1.2) * 60) for _ in range(rng.randint(1, 120))]
    budget = max(lengths) + rng.randint(0, 2000)
    plan = plan_micro_batches(lengths, budget, num_groups_multiple_of=multiple)
    assert sorted(i for g in plan for i in g) == list(range(len(lengths)))
    assert len(plan) % multiple == 0
    loads = [_tokens(g, lengths) for g in plan]
    assert max(loads) <= budget
    # no more groups than needed, up to the rounding: LPT never needs more than 2x the lower bound
    lower = -(-sum(lengths) // budget)
    assert len(plan) <= max(multiple, 2 * lower + multiple)
    # balanced: fullest and emptiest group differ by at most one (the longest) sequence
    if all(plan):
        assert max(loads) - min(loads) <= max(lengths)
    assert loads == sorted(loads, reverse=True)


def test_plan_sends_an_oversized_sequence_alone_with_a_warning():
    lengths = [100, 5000, 300, 200, 4100, 50]
    with pytest.warns(UserWarning, match="longer than the micro-batch token budget"):
        plan = plan_micro_batches(lengths, 1000)
    assert [1] in plan and [4] in plan
    for group in plan:
        assert len(group) == 1 or _tokens(group, lengths) <= 1000
    assert sorted(i for g in plan for i in g) == list(range(len(lengths)))


def test_plan_minimum_and_multiple_of_groups():
    assert plan_micro_batches([10, 10, 10], 100) == [[0, 1, 2]]
    plan = plan_micro_batches([10, 10, 10], 100, num_groups_multiple_of=4)
    assert len(plan) == 4 and sorted(len(g) for g in plan) == [0, 1, 1, 1]
    assert len(plan_micro_batches([10] * 8, 100, min_num_groups=3)) == 3
    assert plan_micro_batches([], 100) == [[]]


def test_restore_order_round_trip():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(37)]
    plan = plan_micro_batches(lengths, 120, num_groups_multiple_of=2)
    values = torch.randn(len(lengths), 3)
    chunks = [values[torch.tensor(g, dtype=torch.long)] for g in plan]
    torch.testing.assert_close(restore_order(chunks, plan), values, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# attention kernels


def test_segments_from_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    assert segments_from_positions(positions).lengths == (3, 2, 1, 4)
    assert segments_from_positions(torch.arange(7)[None]) is None


@pytest.mark.parametrize("causal", [True, False])
def test_segment_attention_backends_equal_attention_per_segment(causal):
    torch.manual_seed(0)
    lengths = [5, 1, 12, 7]
    query = torch.randn(1, 4, sum(lengths), 16, requires_grad=True)
    key = torch.randn(1, 2, sum(lengths), 16, requires_grad=True)  # grouped-query: 2 kv heads
    value = torch.randn(1, 2, sum(lengths), 16, requires_grad=True)
    segments = segments_from_lengths(lengths, "cpu")
    results = []
    for backend in ("mask", "loop", "reference"):
        if backend == "reference":
            outs, start = [], 0
            for n in lengths:
                q, k, v = (t[:, :, start : start + n] for t in (query, key, value))
                k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
                scores = (q @ k.transpose(-1, -2)) * 0.3
                if causal:
                    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
                outs.append((scores.softmax(-1) @ v).transpose(1, 2))
                start += n
            out = torch.cat(outs, dim=1)
        else:
            out = segment_attention(query, key, value, segments, causal, scale=0.3, backend=backend)
        grads = torch.autograd.grad(
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (query, key, value)
        )
        results.append((out.detach(), *grads))
    for other in results[:2]:
        for a, b in zip(other, results[2]):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen FlashAttention needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_backend_equals_mask_backend_on_cuda(causal):
    torch.manual_seed(0)
    lengths = [300, 1, 77, 1024, 129]
    shape = (1, 16, sum(lengths), 128)
    query = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    key = torch.randn(1, 2, shape[2], 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    value = torch.randn_like(key, requires_grad=True)
    segments = segments_from_lengths(lengths, "cuda")
    results = []
    for backend in ("varlen", "loop", "mask"):
        out = segment_attention(query, key, value, segments, causal, scale=128**-0.5, backend=backend)
        grads = torch.autograd.grad(
            (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum(),
            (query, key, value),
        )
        results.append([t.float() for t in (out, *grads)])
    for other in results[:2]:
        for a, b in zip(other, results[2]):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------
# the packed forward on tiny models


def _batch(processor, make_image_bytes, seed=0):
    """Text-only and multi-image samples of very different lengths, random responses."""
    samples = [
        Sample("<image>What colour is the shape?", [ImageSource(make_image_bytes(56, 56, 1), "a")]),
        Sample(
            "Compare <image> and <image>: which is larger?",
            [ImageSource(make_image_bytes(112, 56, 2), "b0"), ImageSource(make_image_bytes(56, 84, 3), "b1")],
        ),
        Sample("No image here, just a much longer question about triangles and angles " * 6),
        Sample("Short?"),
        Sample(
            "<image><image><image> three views",
            [ImageSource(make_image_bytes(84, 84, s), f"c{s}") for s in (4, 5, 6)],
        ),
    ]
    generator = torch.Generator().manual_seed(seed)
    vocab = processor.tokenizer.vocab_size
    responses = [90, 1, 12, 160, 33]
    return [
        make_sequence(processor(s), torch.randint(0, vocab, (n,), generator=generator))
        for s, n in zip(samples, responses)
    ]


def _loss(logp, entropy, mask, advantages, num_tokens):
    """A GRPO-like token-mean objective with an entropy bonus."""
    return -((logp * advantages[:, None] + 0.01 * entropy) * mask).sum() / num_tokens


@pytest.mark.parametrize("arch_fixture", ["tiny_qwen25_dir", "tiny_qwen3_dir"])
def test_packed_equals_one_at_a_time_and_padded_with_gradients(request, arch_fixture, make_image_bytes):
    model_dir = request.getfixturevalue(arch_fixture)
    reference, processor = load_policy(model_dir)
    packed, _ = load_policy(model_dir)
    packed.train()
    packed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seqs = _batch(processor, make_image_bytes)
    pad = processor.pad_token_id
    width = max(s.response_length for s in seqs) + 3
    advantages = torch.linspace(-1.0, 1.5, len(seqs))
    num_tokens = sum(s.response_length for s in seqs)

    # one sequence at a time (the definition), gradients accumulated
    singles = []
    for i, s in enumerate(seqs):
        logp, entropy, mask = forward_response_logprobs(
            reference, [s], pad, 0.7, 16, with_entropy=True, width=width
        )
        _loss(logp, entropy, mask, advantages[i : i + 1], num_tokens).backward()
        singles.append((logp.detach(), entropy.detach(), mask))
    single_logp, single_entropy, single_mask = (torch.cat(x) for x in zip(*singles))
    single_grads = {n: p.grad for n, p in reference.named_parameters()}

    with torch.no_grad():  # the padded batch forward
        pad_logp, pad_entropy, pad_mask = forward_response_logprobs(
            reference, seqs, pad, 0.7, 16, True, width
        )

    logp, entropy, mask = forward_response_logprobs(packed, seqs, pad, 0.7, 16, with_entropy=True, width=width, packed=True)
    assert packed.config.text_config._attn_implementation == TEXT_ATTENTION
    assert packed.config.vision_config._attn_implementation == VISION_ATTENTION
    loss = _loss(logp, entropy, mask, advantages, num_tokens)
    loss.backward()

    assert logp.shape == (len(seqs), width) and torch.equal(mask, single_mask) and torch.equal(mask, pad_mask)
    torch.testing.assert_close(logp, single_logp, **TOL)
    torch.testing.assert_close(entropy, single_entropy, **TOL)
    torch.testing.assert_close(logp, pad_logp, **TOL)
    torch.testing.assert_close(entropy, pad_entropy, **TOL)
    torch.testing.assert_close(
        loss.detach(), _loss(single_logp, single_entropy, single_mask, advantages, num_tokens), **TOL
    )
    checked = 0
    for name, param in packed.named_parameters():
        expected = single_grads[name]
        if expected is None:
            assert param.grad is None or not param.grad.any(), name
            continue
        torch.testing.assert_close(param.grad, expected, **TOL, msg=lambda m, name=name: f"{name}: {m}")
        checked += 1
    assert checked > 20  # text and vision parameters alike


@pytest.mark.parametrize("arch_fixture", ["tiny_qwen25_dir", "tiny_qwen3_dir"])
def test_packed_positions_are_each_sequences_own(request, arch_fixture, make_image_bytes):
    """The packed row carries each sequence's own rope positions; transformers' own sdpa packing
    (a block-causal mask built from the text positions) gives the same states as ours."""
    model_dir = request.getfixturevalue(arch_fixture)
    plain, processor = load_policy(model_dir)
    seqs = _batch(processor, make_image_bytes, seed=1)
    inputs = pack_sequences(seqs, "cpu")
    offsets = torch.tensor([0] + [s.num_tokens for s in seqs]).cumsum(0)
    for s, start in zip(seqs, offsets.tolist()):
        torch.testing.assert_close(
            inputs["position_ids"][1:, 0, start : start + s.num_tokens], s.position_ids
        )
        assert inputs["position_ids"][0, 0, start : start + s.num_tokens].tolist() == list(
            range(s.num_tokens)
        )
    with torch.no_grad():
        native = packed_hidden_states(plain, seqs)
        enable_packed_attention(plain)
        ours = packed_hidden_states(plain, seqs)
    torch.testing.assert_close(ours, native, **TOL)


def test_micro_batched_logprobs_restore_the_original_order(tiny_qwen3_dir, make_image_bytes):
    model, processor = load_policy(tiny_qwen3_dir)
    seqs = _batch(processor, make_image_bytes, seed=2)
    with torch.no_grad():
        expected, _, _ = forward_response_logprobs(model, seqs, processor.pad_token_id)
        budget = max(s.num_tokens for s in seqs)  # forces several micro-batches
        got = micro_batched_response_logprobs(model, seqs, budget)
    torch.testing.assert_close(got, expected, **TOL)


def test_enabled_model_computes_unpacked_batches_and_generation_as_before(tiny_qwen25_dir, make_image_bytes):
    reference, processor = load_policy(tiny_qwen25_dir)
    switched, _ = load_policy(tiny_qwen25_dir)
    enable_packed_attention(switched)
    seqs = _batch(processor, make_image_bytes, seed=3)
    with torch.no_grad():
        expected = forward_response_logprobs(reference, seqs, processor.pad_token_id)[0]
        got = forward_response_logprobs(switched, seqs, processor.pad_token_id)[0]
    torch.testing.assert_close(got, expected, **TOL)
    # generation (left-padded prefill, then cached decoding) goes through transformers' sdpa path
    prompts = [
        processor(Sample("<image>What is it?", [ImageSource(make_image_bytes(56, 84, 7), "g")])),
        processor(Sample("A longer text-only question about the angles of a triangle?")),
    ]
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=6, seed=0)
    results = [HFRollout(m, processor).generate(prompts, params) for m in (reference, switched)]
    for group_a, group_b in zip(*results):
        for a, b in zip(group_a, group_b):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 varlen path runs on CUDA")
@pytest.mark.parametrize("arch_fixture", ["tiny_qwen25_dir", "tiny_qwen3_dir"])
def test_packed_equals_padded_under_bf16_autocast_on_cuda(request, arch_fixture, make_image_bytes):
    """The trainer's GPU setup: fp32 master weights, bf16 autocast, varlen attention (text and vision)."""
    model, processor = load_policy(request.getfixturevalue(arch_fixture), torch.float32, "cuda")
    seqs = _batch(processor, make_image_bytes)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        padded, _, mask = forward_response_logprobs(model, seqs, processor.pad_token_id, with_entropy=True)
        packed, entropy, _ = forward_response_logprobs(model, seqs, processor.pad_token_id, with_entropy=True, packed=True)
        (packed * mask).sum().backward()
    assert (packed - padded).abs()[mask].mean() < 2e-2
    assert torch.isfinite(entropy).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
