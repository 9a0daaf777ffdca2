"""The `engine` rollout backend against the references: transformers `generate` (greedy tokens)
and the trainer's forward (per-token logprobs), on tiny models of both architectures."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lensrl.config import RolloutConfig
from lensrl.rollout.base import SamplingParams
from lensrl.rollout.engine import EngineRollout
from lensrl.rollout.engine.scheduler import Group, blocks_needed
from lensrl.rollout.hf import HFRollout, behaviour_logprobs
from lensrl.train.logprobs import mask_suppressed
from lensrl.train.sequences import collate, forward_response_logprobs, make_sequence
from tests.rollout.conftest import mixed_samples, sharpened_policy

GREEDY = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)


def make_engine(model, processor, **options) -> EngineRollout:
    return EngineRollout(model, processor, RolloutConfig(), **options)


def tokens(groups) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in groups]


def assert_same(reference, got, atol: float = 1e-4) -> None:
    assert [len(g) for g in got] == [len(g) for g in reference]
    for ref_group, group in zip(reference, got):
        for ref, completion in zip(ref_group, group):
            assert completion.prompt_index == ref.prompt_index
            assert completion.token_ids == ref.token_ids
            assert completion.finish_reason == ref.finish_reason
            assert completion.text == ref.text
            np.testing.assert_allclose(completion.logprobs, ref.logprobs, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def hf_greedy(policy):
    model, processor, prompts = policy
    return HFRollout(model, processor).generate(prompts, GREEDY)


def test_greedy_equals_transformers_generate(policy, hf_greedy):
    """Single- and multi-image and text-only prompts of very different lengths, n = 2."""
    model, processor, prompts = policy
    engine = make_engine(model, processor, block_size=8)
    assert_same(hf_greedy, engine.generate(prompts, GREEDY))
    assert engine.stats["prefill_rounds"] == 1 and engine.stats["prefill_tokens"] == sum(
        p.input_ids.shape[0] for p in prompts
    )  # each prompt prefilled once for its n samples


def test_greedy_equals_generate_with_prefill_split_into_calls(policy, hf_greedy):
    """A token budget below every prompt: one packed prefill call per prompt."""
    model, processor, prompts = policy
    engine = make_engine(model, processor, block_size=8, prefill_tokens=1)
    assert_same(hf_greedy, engine.generate(prompts, GREEDY))
    assert engine.stats["prefill_rounds"] == 1  # one scheduler round, split into len(prompts) calls


def test_greedy_equals_generate_with_compiled_blocks(qwen25):
    """model.compile on: the packed prefill runs the compiled vision blocks and decoder layers
    (no KV cache object; each layer's K/V goes straight into the pool) and still matches.
    (Compiled equals eager for both architectures: tests/models/test_compile.py.)"""
    from lensrl.models.compile import compile_blocks, uncompile_blocks

    model, processor, prompts = qwen25
    hf_greedy = HFRollout(model, processor).generate(prompts, GREEDY)
    compile_blocks(model)
    try:
        engine = make_engine(model, processor, block_size=8)
        assert_same(hf_greedy, engine.generate(prompts, GREEDY))
    finally:
        uncompile_blocks(model)


def test_prefill_is_packed_on_sdpa_and_padded_otherwise(policy, hf_greedy):
    """The engine switches an sdpa model to packed attention (prompts back to back in one prefill
    row); a model on another attention implementation keeps the padded prefill. Both equal generate."""
    from lensrl.rollout.engine.model_runner import _packs

    model, processor, prompts = policy
    make_engine(model, processor)
    assert _packs(model)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    engine = make_engine(eager, processor, block_size=8)
    assert not _packs(eager)
    assert_same(hf_greedy, engine.generate(prompts, GREEDY))


def test_greedy_equals_generate_with_more_sequences_than_rows_and_a_small_kv_pool(policy, hf_greedy):
    """Continuous batching: 10 sequences through 3 rows, a pool that holds about one group."""
    model, processor, prompts = policy
    block_size = 4
    groups = [Group(i, p, GREEDY.n, GREEDY.max_new_tokens, 0) for i, p in enumerate(prompts)]
    largest = max(
        prompt + GREEDY.n * own for prompt, own, _ in (blocks_needed(g, block_size) for g in groups)
    )
    engine = make_engine(model, processor, max_num_seqs=3, block_size=block_size, num_kv_blocks=largest + 2)
    assert_same(hf_greedy, engine.generate(prompts, GREEDY))
    assert engine.stats["prefill_rounds"] >= 3  # prompts waited for rows and blocks


def trainer_distributions(model, processor, seqs, temperature):
    """The trainer's full next-token log-distribution at every response position: list of (R_i, V)."""
    with torch.no_grad():
        inputs = collate(seqs, processor.pad_token_id, torch.device("cpu"))
        logits = model(**inputs, use_cache=False).logits.float() / temperature  # (B, T, V)
        logits = mask_suppressed(logits, torch.tensor(processor.suppress_token_ids))
    return [torch.log_softmax(logits[i, s.prompt_length - 1 : s.num_tokens - 1], -1) for i, s in enumerate(seqs)]


@pytest.mark.parametrize("top_p, top_k", [(1.0, -1), (0.9, 40)])
def test_logprobs_are_those_of_the_distribution_sampled(policy, top_p, top_k):
    """Plain temperature sampling: the engine's logprobs are the trainer's forward's. With top-p /
    top-k: those of the truncated, renormalised distribution the tokens were drawn from."""
    model, processor, prompts = policy
    params = SamplingParams(n=3, temperature=0.8, top_p=top_p, top_k=top_k, max_new_tokens=8, seed=0)
    groups = make_engine(model, processor, block_size=8).generate(prompts, params)
    seqs, rollout = [], []
    for prompt, group in zip(prompts, groups):
        for completion in group:
            assert len(completion.logprobs) == len(completion.token_ids) >= 1
            seqs.append(make_sequence(prompt, completion.token_ids))
            rollout.append(torch.tensor(completion.logprobs))
    with torch.no_grad():
        logp, _, mask = forward_response_logprobs(
            model, seqs, processor.pad_token_id, temperature=0.8, suppress_ids=processor.suppress_token_ids
        )
    full = trainer_distributions(model, processor, seqs, 0.8)
    for i, got in enumerate(rollout):
        tokens = seqs[i].input_ids[seqs[i].prompt_length :]
        expected = behaviour_logprobs(full[i], tokens, params)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        if top_p == 1.0:
            torch.testing.assert_close(logp[i, mask[i]], got, rtol=0, atol=1e-4)
        else:
            assert (got >= logp[i, mask[i]] - 1e-5).all()  # renormalised over fewer tokens
    if top_p < 1.0:
        assert any((got - logp[i, mask[i]]).abs().max() > 1e-3 for i, got in enumerate(rollout))


def test_a_seed_makes_sampling_reproducible(qwen25):
    model, processor, prompts = qwen25
    engine = make_engine(model, processor)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=7)
    first, again = engine.generate(prompts, params), engine.generate(prompts, params)
    other = engine.generate(prompts, dataclasses.replace(params, seed=8))
    assert_same(first, again, atol=0)
    assert tokens(other) != tokens(first)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_seeded_sample_draws_the_same_tokens_however_the_batch_is_split(qwen25, top_p):
    """What two ranks draw equals what one rank draws: each sample's stream is keyed by (seed, its
    position in the global batch, the token index), not by the call or the engine row it got.
    The whole batch in one call, in two calls (each with its global positions, as two ranks
    would, one of them interleaved) and through 3 engine rows: the same completions."""
    model, processor, prompts = qwen25
    params = SamplingParams(n=3, temperature=1.0, top_p=top_p, max_new_tokens=8, seed=11)
    whole = make_engine(model, processor).generate(prompts, params)
    first, second = [0, 2, 4], [1, 3]
    split = make_engine(model, processor).generate([prompts[i] for i in first], params, positions=first)
    split += make_engine(model, processor).generate([prompts[i] for i in second], params, positions=second)
    by_position = dict(zip(first + second, split))
    assert tokens(whole) == tokens([by_position[i] for i in range(len(prompts))])
    assert_same(whole, make_engine(model, processor, max_num_seqs=3).generate(prompts, params))
    assert len({tuple(c.token_ids) for g in whole for c in g}) > len(prompts)  # samples differ


def test_finish_reasons_stop_and_length_and_ignore_eos(qwen25):
    model, processor, prompts = qwen25
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=10)
    plain = make_engine(model, processor).generate(prompts, params)
    # Declare a token that the first greedy completion emits at step 4 an EOS token.
    stop = plain[0][0].token_ids[3]
    stopping = copy.copy(processor)
    stopping.eos_token_ids = [stop]
    reference = HFRollout(model, stopping).generate(prompts, params)
    got = make_engine(model, stopping).generate(prompts, params)
    assert_same(reference, got)
    first = got[0][0]
    assert (
        first.finish_reason == "stop"
        and first.token_ids == plain[0][0].token_ids[: first.token_ids.index(stop) + 1]
    )
    for group, before in zip(got, plain):
        completion = group[0]
        assert completion.finish_reason == ("stop" if stop in before[0].token_ids else "length")
    forced = make_engine(model, stopping).generate(prompts, dataclasses.replace(params, ignore_eos=True))
    assert tokens(forced) == tokens(plain)
    assert all(c.finish_reason == "length" and len(c.token_ids) == 10 for g in forced for c in g)


def test_per_prompt_length_limits(qwen25):
    model, processor, prompts = qwen25
    limits = [1, 3, 7, 2, 5]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=99, ignore_eos=True, seed=0)
    groups = make_engine(model, processor, max_num_seqs=4).generate(prompts, params, max_new_tokens=limits)
    assert [[len(c.token_ids) for c in g] for g in groups] == [[n, n] for n in limits]
    assert all(len(c.logprobs) == len(c.token_ids) for g in groups for c in g)


@pytest.mark.parametrize("copy_weights", [False, True], ids=["references", "copies"])
def test_sync_weights_makes_outputs_follow_the_new_weights(tiny_qwen25_dir, copy_weights):
    model, processor = sharpened_policy(tiny_qwen25_dir)
    prompts = [processor(s) for s in mixed_samples()[:3]]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    engine = make_engine(model, processor, copy_weights=copy_weights)
    before = engine.generate(prompts, params)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an "optimizer step": in place, as AdamW updates
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    # and one parameter replaced by a new tensor (e.g. a checkpoint loaded with assign=True)
    layer = model.model.language_model.layers[0].mlp.down_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 1.5)
    expected = HFRollout(model, processor).generate(prompts, params)
    assert tokens(expected) != tokens(before)
    if copy_weights:  # the decode path's own copies are stale until sync_weights
        assert tokens(engine.generate(prompts, params)) != tokens(expected)
    engine.sync_weights(model)
    assert engine.stats["sync_s"] >= 0
    assert_same(expected, engine.generate(prompts, params))


def test_a_lora_policy_is_served_with_its_adapters_merged(tiny_qwen25_dir):
    """A LoRA policy (peft layers, adapters far from zero) generates through its plain copy
    (RolloutCopy: W + (alpha / r) B A in the adapted weights, the policy's own tensors elsewhere):
    greedy tokens are transformers `generate`'s on the peft model, sampled log-probabilities the
    trainer's forward of the peft model, and after an in-place update of the adapters `sync` brings
    the engine along. The peft model itself is refused: decode would read its base weights."""
    from lensrl.config import LoraSettings
    from lensrl.train.fsdp import RolloutCopy
    from lensrl.train.lora import adapters_disabled, add_lora

    policy, processor = sharpened_policy(tiny_qwen25_dir)  # fresh: as setup_policy makes the copy, before any rollout
    prompts = [processor(s) for s in mixed_samples()]
    add_lora(policy, LoraSettings(rank=4, alpha=8))
    generator = torch.Generator().manual_seed(0)

    def update_adapters(name: str) -> None:  # an optimizer step, in place
        with torch.no_grad():
            for pname, p in policy.named_parameters():
                if name in pname:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.1)

    update_adapters("lora_B")  # B starts at 0: the base
    served = RolloutCopy(policy, torch.float32, torch.device("cpu"))
    lm, plain = policy.model.language_model, served.model.model.language_model
    assert plain.embed_tokens.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()  # the base is shared
    assert plain.layers[0].self_attn.q_proj.bias.data_ptr() == lm.layers[0].self_attn.q_proj.base_layer.bias.data_ptr()
    assert plain.layers[0].self_attn.q_proj.weight.data_ptr() != lm.layers[0].self_attn.q_proj.base_layer.weight.data_ptr()
    with pytest.raises(ValueError, match="merged copy"):
        make_engine(policy, processor)
    engine = make_engine(served.model, processor, block_size=8)
    expected = HFRollout(policy, processor).generate(prompts, GREEDY)
    assert_same(expected, engine.generate(prompts, GREEDY))
    with adapters_disabled(policy):
        assert tokens(HFRollout(policy, processor).generate(prompts, GREEDY)) != tokens(expected)  # adapters matter

    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=8, seed=0)
    groups = engine.generate(prompts, params)
    seqs = [make_sequence(p, c.token_ids) for p, g in zip(prompts, groups) for c in g]
    with torch.no_grad():
        logp, _, mask = forward_response_logprobs(policy, seqs, processor.pad_token_id, temperature=0.8,
                                                  suppress_ids=processor.suppress_token_ids)
    for i, c in enumerate(c for g in groups for c in g):
        torch.testing.assert_close(logp[i, mask[i]], torch.tensor(c.logprobs), rtol=0, atol=1e-4)

    update_adapters("lora_A")
    expected_after = HFRollout(policy, processor).generate(prompts, GREEDY)
    assert tokens(expected_after) != tokens(expected)
    served.sync(policy)
    engine.sync_weights(served.model)
    assert_same(expected_after, engine.generate(prompts, GREEDY))


def test_kv_memory_is_released_after_generate_unless_kept(qwen25):
    model, processor, prompts = qwen25
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=4)
    engine = make_engine(model, processor)
    engine.generate(prompts, params)
    assert engine.runner.kv is None
    for key in ("generate_s", "prefill_s", "decode_s", "wake_s", "sleep_s", "kv_bytes", "decode_tokens"):
        assert key in engine.stats
    keeping = make_engine(model, processor, release_kv=False)
    first = keeping.generate(prompts, params)
    pool = keeping.runner.kv
    assert pool is not None
    assert_same(first, keeping.generate(prompts, params), atol=0)
    assert keeping.runner.kv is pool  # reused, not reallocated
    keeping.sleep()
    assert keeping.runner.kv is None


def test_under_autocast_matmuls_run_in_bf16_close_to_the_trainer(qwen25):
    """fp32 master weights + bf16 autocast (the GPU trainer's default): the engine keeps bf16
    copies of the matmul weights and an fp32 residual stream, as the trainer's forward does."""
    model, processor, prompts = qwen25
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=0)
    engine = make_engine(model, processor)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        groups = engine.generate(prompts, params)
    assert engine.weights.matmul_dtype == torch.bfloat16 and engine.weights.residual_dtype == torch.float32
    assert engine.weights.owned_bytes() > 0
    seqs = [make_sequence(p, c.token_ids) for p, g in zip(prompts, groups) for c in g]
    rollout = [c.logprobs for g in groups for c in g]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _, mask = forward_response_logprobs(
            model, seqs, processor.pad_token_id, suppress_ids=processor.suppress_token_ids
        )
    gaps = torch.cat([(logp[i, mask[i]] - torch.tensor(r)).abs() for i, r in enumerate(rollout)])
    assert gaps.mean() < 5e-3, gaps


def test_the_padded_graph_path_emulated_on_cpu_equals_generate(policy, hf_greedy, monkeypatch):
    """On CUDA each step replays a graph captured for a bucket of rows >= the running count; the
    rows past it are padding. Emulate the replay on CPU (a "graph" that reruns the step for the
    whole bucket) so that the padding, the warm-up's state restore and row compaction are tested."""
    model, processor, prompts = policy
    engine = make_engine(model, processor, max_num_seqs=7, block_size=4)
    runner = engine.runner
    runner.use_cuda_graphs = True
    replays = []

    def record(bucket):
        return SimpleNamespace(replay=lambda: (replays.append(bucket), runner._step(bucket)))

    monkeypatch.setattr(runner, "_record", record)
    assert_same(hf_greedy, engine.generate(prompts, GREEDY))
    assert set(runner.buckets) == {1, 2, 3, 4, 6, 7} and len(set(replays)) >= 2
