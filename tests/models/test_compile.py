"""Compiled blocks and logprob head compute what the eager model computes (CPU inductor, fp32):
packed forward + backward with activation checkpointing, for both architectures; new packed
lengths do not recompile; cached generation still runs (eagerly) and is unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lensrl.models.compile import blocks, compile_blocks, compile_enabled, uncompile_blocks
from lensrl.models.load import load_policy
from lensrl.rollout.base import SamplingParams
from lensrl.rollout.hf import HFRollout
from lensrl.train.logprobs import compile_head
from lensrl.train.sequences import forward_response_logprobs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_packing import _batch, _loss  # noqa: E402  (the mixed text / multi-image batch)

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def compiled_head():
    compile_head()
    yield
    compile_head(False)


def _step(model, seqs, pad):
    logp, entropy, mask = forward_response_logprobs(model, seqs, pad, 0.7, 16, with_entropy=True, packed=True)
    advantages = torch.linspace(-1.0, 1.5, len(seqs))
    _loss(logp, entropy, mask, advantages, mask.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logp.detach(), entropy.detach(), grads


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("arch_fixture,checkpointing", [("tiny_qwen25_dir", True), ("tiny_qwen3_dir", False)])
def test_compiled_model_equals_eager_with_gradients(request, arch_fixture, checkpointing, make_image_bytes,
                                                    compiled_head):
    model_dir = request.getfixturevalue(arch_fixture)
    eager, processor = load_policy(model_dir)
    compiled, _ = load_policy(model_dir)
    for model in (eager, compiled):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert compile_blocks(compiled) == len(blocks(compiled)) > 2
    pad = processor.pad_token_id
    batches = [_batch(processor, make_image_bytes, seed=0), _batch(processor, make_image_bytes, seed=1)[1:]]
    graphs_after_first = None
    for i, seqs in enumerate(batches):  # the second batch packs to a different length
        compile_head(False)
        want_logp, want_entropy, want_grads = _step(eager, seqs, pad)
        compile_head(True)
        logp, entropy, grads = _step(compiled, seqs, pad)
        torch.testing.assert_close(logp, want_logp, **TOL)
        torch.testing.assert_close(entropy, want_entropy, **TOL)
        assert grads.keys() == want_grads.keys() and len(grads) > 20  # text and vision alike
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")
        if i == 0:
            graphs_after_first = _unique_graphs()
            assert graphs_after_first > 0, "nothing was compiled"
    assert _unique_graphs() == graphs_after_first, "a new packed length recompiled the blocks"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen attention in the graph needs CUDA")
@pytest.mark.parametrize("arch_fixture", ["tiny_qwen25_dir", "tiny_qwen3_dir"])
def test_compiled_blocks_keep_varlen_attention_in_one_graph_on_cuda(request, arch_fixture, make_image_bytes):
    """The trainer's GPU set-up (fp32 master weights, bf16 autocast, packed rows): every compiled
    vision block and decoder layer is one graph with its attention inside (no graph break, so no
    second guard check, graph entry and autograd node per block), a new packed length compiles
    nothing new, and log-probabilities and gradients equal the eager model's within bf16 noise."""
    from torch._dynamo.utils import counters

    model_dir = request.getfixturevalue(arch_fixture)
    eager, processor = load_policy(model_dir, torch.float32, "cuda")
    compiled, _ = load_policy(model_dir, torch.float32, "cuda")
    compile_blocks(compiled)
    pad = processor.pad_token_id
    torch._dynamo.reset()
    counters.clear()
    for seqs in (_batch(processor, make_image_bytes, seed=0), _batch(processor, make_image_bytes, seed=1)[1:]):
        results = []
        for model in (eager, compiled):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logp, _, mask = forward_response_logprobs(model, seqs, pad, 1.0, 16, packed=True)
                (logp * mask).sum().backward()
            results.append((logp.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                                    if p.grad is not None}))
            model.zero_grad(set_to_none=True)
        (want, want_grads), (got, grads) = results
        assert (got - want).abs()[mask].max() < 2e-2
        assert grads.keys() == want_grads.keys() and any(".visual." in n for n in grads)
        for name, grad in grads.items():
            scale = want_grads[name].abs().max().clamp_min(1e-6)
            assert (grad - want_grads[name]).abs().max() / scale < 5e-2, name
        assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
        assert _unique_graphs() == 2, "one graph per block class (vision block, decoder layer), no recompile"


def test_cached_generation_runs_the_blocks_eagerly_and_unchanged(tiny_qwen25_dir, make_image_bytes):
    from lensrl.data.sample import ImageSource, Sample

    model, processor = load_policy(tiny_qwen25_dir)
    prompts = [
        processor(Sample("<image>What is it?", [ImageSource(make_image_bytes(56, 84, 7), "g")])),
        processor(Sample("A longer text-only question about the angles of a triangle?")),
    ]
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=5, seed=0)
    want = HFRollout(model, processor).generate(prompts, params)
    compile_blocks(model)
    from torch._dynamo.utils import counters

    counters.clear()
    HFRollout(model, processor).generate(prompts[1:], params)  # text only: no vision block runs
    assert _unique_graphs() == 0, "cached generation compiled the decoder layers"  # transformers 5.24's `cache=`
    got = HFRollout(model, processor).generate(prompts, params)
    uncompile_blocks(model)
    assert not any(getattr(b, "_lensrl_compiled", False) or "forward" in vars(b) for b in blocks(model))
    for group_a, group_b in zip(want, got):
        for a, b in zip(group_a, group_b):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), **TOL)


def test_compile_setting():
    assert compile_enabled("never", "cuda") is False
    assert compile_enabled("always", "cpu") is True
    assert compile_enabled("auto", "cpu") is False  # CPU compiles slower than tiny models run
    with pytest.raises(ValueError, match="model.compile must be auto, always or never, got 'yes'"):
        compile_enabled("yes", "cpu")


def test_compile_seconds_counts_compiles_not_cached_calls():
    """`compile_seconds` (the GRPO trainer's timing_s/compile) grows when torch.compile traces a
    new function or shape class, and not when a compiled function runs again."""
    from lensrl.models.compile import compile_seconds

    before = compile_seconds()
    fn = torch.compile(lambda x: torch.sin(x) * x + 1, backend="eager", dynamic=True)
    fn(torch.randn(8))
    after_first = compile_seconds()
    assert after_first > before
    fn(torch.randn(12))  # dynamic shapes: the same graph, no new compile
    assert compile_seconds() == after_first
