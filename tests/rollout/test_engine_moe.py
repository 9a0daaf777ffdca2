"""The engine on a mixture-of-experts policy (tiny Qwen3-VL-MoE: 3 sparse layers, 8 experts, top-2)
against the references: transformers `generate` (greedy tokens), the trainer's forward
(logprobs, routing), and the experts maths against a plain loop over experts."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lensrl.config import RolloutConfig
from lensrl.models.load import load_policy
from lensrl.rollout.base import SamplingParams
from lensrl.rollout.engine import EngineRollout, moe
from lensrl.rollout.engine.scheduler import Group, blocks_needed
from lensrl.rollout.hf import HFRollout
from lensrl.train.sequences import forward_response_logprobs, make_sequence
from tests.rollout.conftest import mixed_samples

GREEDY = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)


def sharpened_moe(folder):
    """As conftest.sharpened_policy, the experts' stacked (E, ., .) tensors included: at init scale
    the experts would barely move the residual stream and routing bugs could hide."""
    model, processor = load_policy(folder)
    with torch.no_grad():
        for param in model.model.language_model.parameters():
            if param.ndim >= 2:
                param.mul_(6.0)
    return model, processor


@pytest.fixture(scope="module")
def moe_policy(tiny_moe_dir):
    """(model, processor, prompts). Tests must not change the model."""
    model, processor = sharpened_moe(tiny_moe_dir)
    return model, processor, [processor(s) for s in mixed_samples()]


@pytest.fixture(scope="module")
def hf_greedy(moe_policy):
    model, processor, prompts = moe_policy
    return HFRollout(model, processor).generate(prompts, GREEDY)


def make_engine(model, processor, **options) -> EngineRollout:
    return EngineRollout(model, processor, RolloutConfig(), **options)


def tokens(groups) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in groups]


def assert_same(reference, got, atol: float = 1e-4) -> None:
    assert tokens(got) == tokens(reference)
    for ref_group, group in zip(reference, got):
        for ref, completion in zip(ref_group, group):
            assert completion.finish_reason == ref.finish_reason
            np.testing.assert_allclose(completion.logprobs, ref.logprobs, rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------
# the experts maths


def loop_experts(hidden, weights, experts, gate_up, down):
    """The readable reference: every token, every chosen expert, one at a time."""
    out = torch.zeros_like(hidden, dtype=gate_up.dtype)
    inner = gate_up.shape[1] // 2
    for b in range(hidden.shape[0]):
        for slot in range(experts.shape[1]):
            e = int(experts[b, slot])
            gate_up_out = gate_up[e] @ hidden[b].to(gate_up.dtype)
            y = down[e] @ (torch.nn.functional.silu(gate_up_out[:inner]) * gate_up_out[inner:])
            out[b] += y * weights[b, slot]
    return out.to(hidden.dtype)


def test_grouped_and_gathered_experts_equal_the_loop_and_transformers_block(moe_policy, monkeypatch):
    """Both implementations against a loop over (token, slot) and against the model's own sparse
    block (router + experts) on the same hidden states; experts nobody chose are empty groups."""
    model, _, _ = moe_policy
    block = model.model.language_model.layers[0].mlp
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    hidden = torch.randn(5, gate_up.shape[2], generator=torch.Generator().manual_seed(0))
    weights, experts = moe.route(hidden, block.gate.weight.detach(), 2)
    assert experts.unique().numel() < gate_up.shape[0]  # some expert unused
    reference = loop_experts(hidden, weights, experts, gate_up, down)
    with torch.no_grad():
        theirs = block(hidden[None])[0]  # (B, H): transformers' router and experts forward
    for implementation in (moe.grouped_experts, moe.gathered_experts):
        got = implementation(hidden, weights, experts, gate_up, down)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(moe, "GATHER_BYTES", 1)  # one (token, slot) pair per chunk
    torch.testing.assert_close(moe.gathered_experts(hidden, weights, experts, gate_up, down), reference)
    moe.check_grouped(gate_up, down, top_k=2)  # the engine's self-check passes where grouped_mm runs


def test_group_by_expert_orders_slots_stably_with_offsets():
    experts = torch.tensor([[3, 0], [0, 3], [2, 0]])  # slots 0..5; expert 1 unused
    order, where, offsets = moe.group_by_expert(experts, 4)
    assert order.tolist() == [1, 2, 5, 4, 0, 3]  # expert 0: slots 1, 2, 5; expert 2: 4; expert 3: 0, 3
    assert offsets.tolist() == [3, 3, 4, 6] and offsets.dtype == torch.int32
    assert torch.equal(order[where], torch.arange(6))


def test_decode_weights_hold_the_experts_by_reference(moe_policy):
    """The decode path reads the model's own router and expert tensors: no copies (the fused
    qkv is the only engine-owned tensor in fp32); under bf16 autocast the router is copied to
    bf16, the experts stay the fp32 parameters (transformers' grouped experts run in them too)."""
    model, processor, prompts = moe_policy
    engine = make_engine(model, processor)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))
    shape, weights = engine.shape, engine.weights
    assert (
        shape.num_experts,
        shape.num_experts_per_tok,
        shape.moe_intermediate_size,
        shape.num_moe_layers,
    ) == (8, 2, 48, 3)
    for layer, module in zip(weights.layers, model.model.language_model.layers):
        assert layer.is_moe and layer.down_weight is None
        assert layer.experts_gate_up.data_ptr() == module.mlp.experts.gate_up_proj.data_ptr()
        assert layer.experts_down.data_ptr() == module.mlp.experts.down_proj.data_ptr()
        assert layer.router_weight.data_ptr() == module.mlp.gate.weight.data_ptr()
    assert weights.owned_bytes() == weights.layers[0].qkv_weight.numel() * 4 * len(
        weights.layers
    )  # fused qkv only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))
    layer = engine.weights.layers[0]
    assert layer.router_weight.dtype == torch.bfloat16 and layer.experts_gate_up.dtype == torch.float32
    assert (
        layer.experts_gate_up.data_ptr()
        == model.model.language_model.layers[0].mlp.experts.gate_up_proj.data_ptr()
    )


# ---------------------------------------------------------------------------------------------
# generation against transformers


def test_greedy_with_dense_and_sparse_layers_mixed(tiny_moe_dir):
    """mlp_only_layers (as decoder_sparse_step > 1 would): the dense layer keeps the dense MLP
    path, the others route; and the routing capture counts only the sparse layers."""
    from transformers import AutoConfig, Qwen3VLMoeForConditionalGeneration

    from lensrl.models.processor import Processor

    config = AutoConfig.from_pretrained(tiny_moe_dir)
    config.text_config.mlp_only_layers = [1]
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.model.language_model.parameters():
            if param.ndim >= 2:
                param.mul_(6.0)
    processor = Processor.from_pretrained(tiny_moe_dir)
    prompts = [processor(s) for s in mixed_samples()[:3]]
    engine = make_engine(model, processor, capture_routing=True)
    got = engine.generate(prompts, GREEDY)
    assert_same(HFRollout(model, processor).generate(prompts, GREEDY), got)
    assert [layer.is_moe for layer in engine.weights.layers] == [True, False, True]
    assert engine.shape.num_moe_layers == 2 and engine.routed_experts[0][0].shape == (9, 2, 2)


def _emulate_graphs(engine, monkeypatch):
    """As test_engine.py's CPU emulation of graph replay: each step runs a whole bucket of rows,
    padding rows included (they route too; their experts are ignored)."""
    runner = engine.runner
    runner.use_cuda_graphs = True
    monkeypatch.setattr(
        runner, "_record", lambda bucket: SimpleNamespace(replay=lambda: runner._step(bucket))
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(block_size=8),
        dict(block_size=8, use_grouped_mm=True),  # torch's CPU grouped_mm kernel: the CUDA code path
        dict(block_size=4, max_num_seqs=3, small_pool=True),  # continuous batching, prompts wait
        dict(block_size=4, max_num_seqs=7, graphs=True, use_grouped_mm=True, capture_routing=True),
        dict(block_size=8, eager_attention=True),  # padded prefill through transformers' KV cache
    ],
    ids=["gathered", "grouped_mm", "3-rows-small-pool", "graph-buckets", "padded-prefill"],
)
def test_greedy_equals_transformers_generate(moe_policy, hf_greedy, monkeypatch, options):
    """Five prompts (one, two and no images; 2 to ~100 tokens), n = 2 sharing each prompt's KV."""
    model, processor, prompts = moe_policy
    options = dict(options)
    if options.pop("small_pool", False):
        groups = [Group(i, p, GREEDY.n, GREEDY.max_new_tokens, 0) for i, p in enumerate(prompts)]
        largest = max(
            p + GREEDY.n * own for p, own, _ in (blocks_needed(g, options["block_size"]) for g in groups)
        )
        options["num_kv_blocks"] = largest + 2
    graphs = options.pop("graphs", False)
    if options.pop("eager_attention", False):
        model = copy.deepcopy(model)
        model.set_attn_implementation("eager")
    engine = make_engine(model, processor, **options)
    if graphs:
        _emulate_graphs(engine, monkeypatch)
    got = engine.generate(prompts, GREEDY)
    assert_same(hf_greedy, got)
    assert engine.stats["experts_kernel"] == ("grouped_mm" if options.get("use_grouped_mm") else "gathered")
    if options.get("max_num_seqs") == 3:
        assert engine.stats["prefill_rounds"] >= 3  # prompts waited for rows and blocks
    else:
        assert engine.stats["prefill_tokens"] == sum(p.input_ids.shape[0] for p in prompts)  # once per group
    if options.get("capture_routing"):  # padding rows and row compaction keep each row's routing
        seqs = [make_sequence(p, c.token_ids) for p, g in zip(prompts, got) for c in g]
        routed = [r for g in engine.routed_experts for r in g]
        assert [r.shape for r in routed] == [(s.response_length - 1, 3, 2) for s in seqs]
        assert moe.router_mismatch(routed, moe.trainer_routing(model, seqs)) == 0.0


def test_logprobs_equal_the_trainers_forward(moe_policy):
    """Sampled (temperature 0.8, n = 3): each token's logprob equals the trainer's forward's within
    1e-4 (fp32), with either experts implementation."""
    model, processor, prompts = moe_policy
    params = SamplingParams(n=3, temperature=0.8, max_new_tokens=8, seed=0)
    for use_grouped_mm in (False, True):
        groups = make_engine(model, processor, use_grouped_mm=use_grouped_mm).generate(prompts, params)
        seqs = [make_sequence(p, c.token_ids) for p, g in zip(prompts, groups) for c in g]
        rollout = [c.logprobs for g in groups for c in g]
        with torch.no_grad():
            logp, _, mask = forward_response_logprobs(
                model,
                seqs,
                processor.pad_token_id,
                temperature=0.8,
                suppress_ids=processor.suppress_token_ids,
            )
        for i, got in enumerate(rollout):
            torch.testing.assert_close(torch.tensor(got), logp[i, mask[i]], rtol=0, atol=1e-4)


@pytest.mark.parametrize("copy_weights", [False, True], ids=["references", "copies"])
def test_in_place_expert_updates_reach_the_engine_without_a_sync(tiny_moe_dir, copy_weights):
    """An optimizer step on the experts (in place) changes the next generation with no
    sync_weights and no copy; an engine that owns copies (copy_weights) sees it after sync
    (before, only its prefill, which runs the model itself, does)."""
    model, processor = sharpened_moe(tiny_moe_dir)
    prompts = [processor(s) for s in mixed_samples()[:3]]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    engine = make_engine(model, processor, copy_weights=copy_weights)
    before = engine.generate(prompts, params)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            experts = layer.mlp.experts
            experts.gate_up_proj.add_(torch.randn(experts.gate_up_proj.shape, generator=generator) * 0.3)
            experts.down_proj.mul_(-1.0)
    expected = HFRollout(model, processor).generate(prompts, params)
    assert tokens(expected) != tokens(before)
    got = engine.generate(prompts, params)
    if copy_weights:
        assert tokens(got) != tokens(expected)  # decode's copies stale until sync_weights
        engine.sync_weights(model)
        got = engine.generate(prompts, params)
    assert_same(expected, got)


# ---------------------------------------------------------------------------------------------
# routing consistency


def test_router_mismatch_is_zero_in_fp32_and_small_in_bf16(moe_policy):
    """The experts decode picks vs those of the trainer's packed forward for the same tokens.
    fp32: identical. bf16 (bf16 parameters, and fp32 masters under bf16 autocast): near-ties
    flip a few decisions; the rate is printed (-s) and bounded loosely."""
    model, processor, prompts = moe_policy
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=0)
    rates = {}
    for name, policy, autocast in [
        ("fp32", model, False),
        ("bf16", copy.deepcopy(model).to(torch.bfloat16), False),
        ("fp32+autocast-bf16", model, True),
    ]:
        engine = make_engine(policy, processor, capture_routing=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            groups = engine.generate(prompts, params)
            seqs = [make_sequence(p, c.token_ids) for p, g in zip(prompts, groups) for c in g]
            trainer = moe.trainer_routing(policy, seqs)
        routed = [r for g in engine.routed_experts for r in g]
        assert [r.shape for r in routed] == [t.shape for t in trainer]
        assert sum(len(r) for r in routed) > 100
        rates[name] = moe.router_mismatch(routed, trainer)
    print(f"\nrollout/router_mismatch on the tiny MoE (3 layers, top-2 of 8): {rates}")
    assert rates["fp32"] == 0.0
    assert rates["bf16"] < 0.05 and rates["fp32+autocast-bf16"] < 0.05


def test_router_mismatch_counts_differing_expert_sets():
    engine = [np.array([[[1, 2], [3, 4]], [[0, 1], [5, 6]]])]  # (N=2 tokens, L=2 layers, K=2)
    trainer = [torch.tensor([[[2, 1], [3, 4]], [[0, 2], [5, 6]]])]  # order within top-k ignored
    assert moe.router_mismatch(engine, trainer) == 0.25
    assert moe.router_mismatch([], []) == 0.0


def test_routing_capture_is_off_by_default(moe_policy):
    model, processor, prompts = moe_policy
    engine = make_engine(model, processor)
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=3))
    assert engine.routed_experts is None and engine.runner.routed is None


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without it): graphs around grouped_mm


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_with_grouped_mm_experts(tiny_moe_dir):
    """fp32: the gathered experts (grouped_mm has no native fp32 kernel) in captured graphs equal
    generate. bf16: grouped_mm (SM90/SM100) inside the captured graphs replays exactly what the
    same step computes eagerly, the logprobs stay close to the trainer's, routing is reported."""
    model, processor = sharpened_moe(tiny_moe_dir)
    model = model.cuda()
    prompts = [processor(s) for s in mixed_samples()]
    reference = HFRollout(model, processor).generate(prompts, GREEDY)
    engine = make_engine(model, processor, max_num_seqs=6, block_size=16)
    assert_same(reference, engine.generate(prompts, GREEDY))
    assert engine.stats["cuda_graphs"] and engine.stats["experts_kernel"] == "gathered"

    policy = copy.deepcopy(model).to(torch.bfloat16)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=24, seed=0)
    graphs = make_engine(policy, processor, capture_routing=True)
    groups = graphs.generate(prompts, params)
    if torch.cuda.get_device_capability()[0] in (9, 10):
        assert graphs.stats["experts_kernel"] == "grouped_mm" and graphs.stats["num_captures"] > 0
    eager = make_engine(policy, processor, use_cuda_graphs=False, capture_routing=True)
    assert_same(groups, eager.generate(prompts, params), atol=0)
    seqs = [make_sequence(p, c.token_ids) for p, g in zip(prompts, groups) for c in g]
    with torch.no_grad():
        logp, _, mask = forward_response_logprobs(
            policy, seqs, processor.pad_token_id, suppress_ids=processor.suppress_token_ids
        )
    rollout = [c.logprobs for g in groups for c in g]
    gaps = torch.cat([(logp[i, mask[i]].cpu() - torch.tensor(r)).abs() for i, r in enumerate(rollout)])
    assert gaps.mean() < 1e-2, (gaps.mean(), gaps.max())
    mismatch = moe.router_mismatch(
        [r for g in graphs.routed_experts for r in g], moe.trainer_routing(policy, seqs)
    )
    print(f"\nbf16 on CUDA: rollout/router_mismatch {mismatch:.4f}, mean |logprob gap| {gaps.mean():.2e}")
    assert mismatch < 0.05
