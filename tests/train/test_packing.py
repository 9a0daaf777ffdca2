"""Same numbers, any layout: packed micro-batches equal one-sequence-at-a-time and padded forwards
(logprobs, entropy, loss and every parameter's gradient), and the token-budget planner keeps its
promises (budget, balance, coverage, order)."""

from __future__ import annotations

import dataclasses
import math
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
def test_every_text_attention_call_is_given_the_packed_boundaries(request, arch_fixture, make_image_bytes,
                                                                 monkeypatch):
    """The trainer's packed forward hands each decoder layer's attention the sequences' boundaries
    (`lensrl_cu_seqlens`, `lensrl_max_seqlen`) through transformers' keyword plumbing, and the vision
    tower its own (`cu_seq_lens_q`): what lets a compiled layer run varlen attention in its graph."""
    from lensrl.train import attention

    model_dir = request.getfixturevalue(arch_fixture)
    model, processor = load_policy(model_dir)
    seqs = _batch(processor, make_image_bytes, seed=4)
    seen = {"text": [], "vision": []}
    given_segments = attention._given_segments

    def recorded(query, key, attention_mask, causal, kwargs):
        given = given_segments(query, key, attention_mask, causal, kwargs)
        seen["vision" if "cu_seq_lens_q" in kwargs else "text"].append(given)
        return given

    monkeypatch.setattr(attention, "_given_segments", recorded)
    with torch.no_grad():
        packed_hidden_states(model, seqs)
    lengths = [s.num_tokens for s in seqs]
    assert len(seen["text"]) == model.config.get_text_config().num_hidden_layers
    assert len(seen["vision"]) == model.config.vision_config.depth
    for cu, longest in seen["text"]:
        assert cu.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()] and longest == max(lengths)
    for cu, longest in seen["vision"]:
        assert cu is not None and longest == int((cu[1:] - cu[:-1]).max())


def test_a_packed_forward_whose_attention_gets_no_boundaries_is_refused(tiny_qwen25_dir, make_image_bytes,
                                                                       monkeypatch):
    """If the text attention is handed neither the given boundaries nor the positions (a
    transformers release that stops forwarding them), it would attend across the packed
    sequences: the packed forward refuses instead of returning those states."""
    from transformers import AttentionInterface

    from lensrl.train import attention

    model, processor = load_policy(tiny_qwen25_dir)
    seqs = _batch(processor, make_image_bytes, seed=5)[2:4]  # two text-only sequences

    def stripped(module, query, key, value, attention_mask, **kwargs):
        for name in (*attention.TEXT_SEGMENTS, "position_ids"):
            kwargs.pop(name, None)
        return attention.packed_attention_forward(module, query, key, value, attention_mask, **kwargs)

    enable_packed_attention(model)
    monkeypatch.setattr(attention, "register", lambda: None)  # keeps the stripping function registered
    AttentionInterface.register(TEXT_ATTENTION, stripped)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="the packed forward ran without packed attention"):
            packed_hidden_states(model, seqs)
    finally:
        AttentionInterface.register(TEXT_ATTENTION, attention.packed_attention_forward)


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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA run of the same (pinned, non-blocking inputs)"))])
@pytest.mark.parametrize("arch_fixture", ["tiny_qwen25_dir", "tiny_qwen3_dir"])
def test_a_groups_shared_image_runs_the_vision_tower_once_with_the_same_results(request, arch_fixture, device,
                                                                                make_image_bytes):
    """A GRPO group's n sequences hold their prompt's image tensor: the packed training forward
    passes it once and expands the vision tower's output (Qwen3-VL: deepstack features too), so the
    tower computes 2 distinct prompts' 3 images, not 6 sequences' 9; log-probabilities, entropies
    and every gradient equal those of the same sequences holding copies of the images."""
    packed = True
    model_dir = request.getfixturevalue(arch_fixture)
    processor = load_policy(model_dir)[1]
    prompts = [processor(Sample("<image>What colour is the shape?", [ImageSource(make_image_bytes(56, 84, 1), "a")])),
               processor(Sample("Compare <image> and <image>", [ImageSource(make_image_bytes(84, 56, 2), "b0"),
                                                                ImageSource(make_image_bytes(56, 56, 3), "b1")])),
               processor(Sample("No image in this one"))]
    generator = torch.Generator().manual_seed(0)
    shared = [make_sequence(p, torch.randint(0, processor.tokenizer.vocab_size, (n,), generator=generator))
              for p in prompts for n in (5, 9, 2)]
    copies = [dataclasses.replace(s, pixel_values=None if s.pixel_values is None else s.pixel_values.clone())
              for s in shared]
    advantages = torch.linspace(-1.0, 1.5, len(shared))
    num_tokens = sum(s.response_length for s in shared)
    results = []
    for seqs in (shared, copies):
        model, _ = load_policy(model_dir, torch.float32, device)
        patches = []
        model.model.visual.register_forward_pre_hook(lambda m, args, kwargs, patches=patches: patches.append(args[0].shape[0]),
                                                     with_kwargs=True)
        logp, entropy, mask = forward_response_logprobs(model, seqs, processor.pad_token_id, 0.7, 16,
                                                        with_entropy=True, packed=packed)
        _loss(logp, entropy, mask, advantages.to(device), num_tokens).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), entropy.detach(), grads, sum(patches)))
    (logp, entropy, grads, seen), (logp_c, entropy_c, grads_c, seen_c) = results
    tol = TOL if device == "cpu" else dict(rtol=1e-4, atol=1e-4)  # CUDA fp32 kernels sum in their own order
    one_each = sum(s.pixel_values.shape[0] for s in shared if s.pixel_values is not None)
    assert seen_c == one_each and seen == sum(p.pixel_values.shape[0] for p in prompts[:2]) == one_each // 3
    torch.testing.assert_close(logp, logp_c, **tol)
    torch.testing.assert_close(entropy, entropy_c, **tol)
    assert grads.keys() == grads_c.keys() and any(".visual." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_c[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_the_padded_forward_keeps_an_image_per_sequence(tiny_qwen25_dir, make_image_bytes):
    """use_dynamic_bsz=false is the plain reference path (the CPU demo's): no sharing, so its
    numbers do not depend on which sequences hold the same tensor."""
    model, processor = load_policy(tiny_qwen25_dir)
    prompt = processor(Sample("<image>What colour is the shape?", [ImageSource(make_image_bytes(56, 84, 1), "a")]))
    seqs = [make_sequence(prompt, torch.tensor([5, 6, 7])) for _ in range(3)]
    patches = []
    model.model.visual.register_forward_pre_hook(lambda m, args, kwargs: patches.append(args[0].shape[0]),
                                                 with_kwargs=True)
    forward_response_logprobs(model, seqs, processor.pad_token_id, 1.0, 16, packed=False)
    assert sum(patches) == 3 * prompt.pixel_values.shape[0]


def test_a_unit_is_planned_into_one_micro_batch_and_halves_of_the_budget_bound_its_pieces():
    rng = random.Random(0)
    lengths, units = [], []
    for group in range(16):  # 16 prompts x 8 samples of ~570 tokens, as a GRPO step on 448-px images
        for _ in range(8):
            lengths.append(rng.randint(300, 600))
            units.append(group)
    lengths += [50, 60]  # two text-only sequences, each its own
    units += [None, None]
    plain = plan_micro_batches(lengths, 16384)
    plan = plan_micro_batches(lengths, 16384, units=units)
    assert sorted(i for g in plan for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 16384 for g in plan)
    where = {i: k for k, g in enumerate(plan) for i in g}
    assert all(len({where[i] for i in range(8 * u, 8 * u + 8)}) == 1 for u in range(16))  # each group whole
    assert len({where[i] for i in range(0, 8)} | {where[i] for i in range(8, 16)}) <= 2
    assert len(plan) <= len(plain) + 1
    # the same units under a quarter of the budget: a group (~3.6k tokens) is cut into consecutive
    # pieces of at most 2,048 tokens, each of which stays whole
    small = plan_micro_batches(lengths, 4096, units=units)
    assert sorted(i for g in small for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 4096 for g in small)
    where = {i: k for k, g in enumerate(small) for i in g}
    for u in range(16):
        members = range(8 * u, 8 * u + 8)
        pieces = len({where[i] for i in members})
        assert 1 <= pieces <= math.ceil(sum(lengths[i] for i in members) / 2048) + 1
    # without units the plan is what it always was
    assert plan_micro_batches(lengths, 16384, units=None) == plain
    with pytest.raises(ValueError, match="units has 3 entries"):
        plan_micro_batches([1, 2], 10, units=[0, 0, 0])
