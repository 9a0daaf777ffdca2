"""Qwen3-VL-MoE end to end on the CPU, with a tiny random `Qwen3VLMoeForConditionalGeneration`
(8 experts, top-2, every decoder layer sparse):

  * same numbers in any layout: packed, padded and one sequence at a time (log-probabilities and
    every gradient, experts and routers included), 2 gloo ranks (FSDP2) and 1, resumed and not;
  * the experts on torch's grouped GEMM (transformers' "grouped_mm"), never its Python loop;
  * the router's load-balancing loss and per-expert load from the training forward's own router
    logits (transformers' `output_router_logits` values), added to the loss with its coefficient;
  * compiled blocks with activation checkpointing;
  * `lensrl sft` and `lensrl grpo` steps that train the experts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import assert_same_steps, assert_same_weights, grpo_args, launch

from lensrl.config import GRPOConfig, SFTConfig, load_config
from lensrl.logging import read_metrics
from lensrl.models.load import active_parameters, load_policy
from lensrl.rollout.engine.moe import trainer_routing
from lensrl.train.router import RouterRecorder
from lensrl.train.sequences import forward_response_logprobs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_packing import _batch, _loss  # noqa: E402  (the mixed text / multi-image batch)

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
TOL = dict(rtol=1e-5, atol=1e-5)
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight")


def _expert_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith(EXPERTS)]


# ----------------------------------------------------------------------------------------------
# the forward: layouts, kernels, router


def test_packed_equals_one_at_a_time_and_padded_with_gradients(tiny_moe_dir, make_image_bytes):
    """Packed rows (per-sequence multimodal rope, deepstack on each sequence's image tokens,
    activation checkpointing) give the logprobs, entropy and gradients of one sequence at a time;
    the router sees the same tokens routed the same way in every layout."""
    reference, processor = load_policy(tiny_moe_dir)
    packed, _ = load_policy(tiny_moe_dir)
    packed.train()
    packed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference_router, packed_router = RouterRecorder(reference), RouterRecorder(packed)
    seqs = _batch(processor, make_image_bytes)
    pad = processor.pad_token_id
    width = max(s.response_length for s in seqs) + 3
    advantages = torch.linspace(-1.0, 1.5, len(seqs))
    num_tokens = sum(s.response_length for s in seqs)

    singles = []
    for i, s in enumerate(seqs):  # one sequence at a time (the definition), gradients accumulated
        with reference_router.capture():
            logp, entropy, mask = forward_response_logprobs(reference, [s], pad, 0.7, 16, with_entropy=True,
                                                            width=width)
        _loss(logp, entropy, mask, advantages[i : i + 1], num_tokens).backward()
        singles.append((logp.detach(), entropy.detach(), mask))
    single_logp, single_entropy, single_mask = (torch.cat(x) for x in zip(*singles))
    single_grads = {n: p.grad for n, p in reference.named_parameters()}
    single_counts = reference_router.counts.clone()
    reference_router.counts = None

    with torch.no_grad(), reference_router.capture() as padded_routed:  # the padded batch
        pad_logp, pad_entropy, _ = forward_response_logprobs(reference, seqs, pad, 0.7, 16, True, width)
    with packed_router.capture() as packed_routed:
        logp, entropy, mask = forward_response_logprobs(packed, seqs, pad, 0.7, 16, with_entropy=True, width=width,
                                                        packed=True)
    _loss(logp, entropy, mask, advantages, num_tokens).backward()

    assert torch.equal(mask, single_mask)
    for got, expected in ((logp, single_logp), (entropy, single_entropy), (logp, pad_logp), (entropy, pad_entropy)):
        torch.testing.assert_close(got, expected, **TOL)
    for name, param in packed.named_parameters():
        if single_grads[name] is None:
            assert param.grad is None or not param.grad.any(), name
        else:
            torch.testing.assert_close(param.grad, single_grads[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")
    experts = _expert_names(packed)
    assert len(experts) == 9 and all(packed.get_parameter(n).grad.abs().sum() > 0 for n in experts)
    # every real token routed once per layer, to the same experts: padding is left out of the padded batch
    total = sum(s.num_tokens for s in seqs)
    assert packed_routed.num_tokens == padded_routed.num_tokens == total
    assert float(single_counts.sum()) == 3 * 2 * total  # layers x top-k x tokens
    assert torch.equal(packed_router.counts, single_counts) and torch.equal(reference_router.counts, single_counts)
    torch.testing.assert_close(packed_routed.aux_loss, padded_routed.aux_loss, **TOL)


def test_router_loss_and_load_are_transformers_own(tiny_moe_dir, tiny_qwen3_dir, capsys):
    """The captured loss is what Qwen3-VL-MoE's forward computes with output_router_logits (padding
    masked), the counts are its routers' top-k choices; the loss term carries the coefficient and
    the micro-batch's share, with gradient to every router; outside a capture nothing is kept."""
    model, _ = load_policy(tiny_moe_dir)
    recorder = RouterRecorder(model, coef=0.5)
    assert RouterRecorder(model).coef == model.config.get_text_config().router_aux_loss_coef == 0.001
    input_ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 16:] = 0  # right padding
    with recorder.capture() as routed:
        model.model(input_ids=input_ids, attention_mask=attention_mask)
    hf = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    torch.testing.assert_close(routed.aux_loss, hf.aux_loss.float(), **TOL)
    assert routed.num_tokens == 40
    real = attention_mask.flatten().bool()
    expected = torch.stack([torch.bincount(torch.topk(torch.softmax(logits.float(), -1), 2).indices[real].flatten(),
                                           minlength=8) for logits in hf.router_logits]).double()  # (layers, experts)
    assert torch.equal(recorder.counts, expected)

    term, metrics = recorder.loss_term(routed, 0.25, "actor")
    assert metrics == {"actor/router_aux_loss": pytest.approx(0.25 * hf.aux_loss.item())}
    torch.testing.assert_close(term, 0.5 * 0.25 * routed.aux_loss)
    term.backward()
    assert all(router.weight.grad.abs().sum() > 0 for router in recorder.routers)

    checkpointed, _ = load_policy(tiny_moe_dir)  # the same gradient through recomputed layers
    checkpointed.train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    recomputed = RouterRecorder(checkpointed, coef=0.5)
    with recomputed.capture() as again:
        checkpointed.model(input_ids=input_ids, attention_mask=attention_mask)
    recomputed.loss_term(again, 0.25, "actor")[0].backward()
    assert torch.equal(recomputed.counts, expected)  # the recomputation in backward counted nothing
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(checkpointed.get_parameter(name).grad, param.grad, **TOL)

    ratio = expected.max(-1).values / expected.mean(-1)
    assert recorder.take_metrics() == {
        "router/max_load_ratio": pytest.approx(float(ratio.max())),
        "router/mean_max_load_ratio": pytest.approx(float(ratio.mean())),
        "router/unused_expert_frac": pytest.approx(float((expected == 0).double().mean())),
    }
    assert recorder.counts is None and recorder.take_metrics() == {}  # reset; a step without tokens: nothing
    with torch.no_grad():
        model.model(input_ids=input_ids)  # no capture open: no-grad passes and generation keep nothing
    assert recorder.counts is None

    logged_only = RouterRecorder(model, coef=0.0)
    with logged_only.capture() as routed:
        model.model(input_ids=input_ids)
    term, metrics = logged_only.loss_term(routed, 1.0, "train")
    assert term == 0.0 and not routed.aux_loss.requires_grad and metrics["train/router_aux_loss"] > 0
    capsys.readouterr()
    dense = RouterRecorder(load_policy(tiny_qwen3_dir)[0], coef=1.0)  # a dense model is just a model
    assert "model.router_aux_loss_coef=1.0 is ignored: the model has no experts" in " ".join(capsys.readouterr().err.split())
    with dense.capture() as routed:
        pass
    assert not dense.enabled and dense.coef == 0.0 and dense.loss_term(routed, 1.0, "actor") == (0.0, {})
    assert dense.take_metrics() == {}
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        RouterRecorder(model, coef=-1.0)
    model.config.get_text_config().router_aux_loss_coef = float("nan")  # nan > 0 is false: the loss would vanish
    with pytest.raises(ValueError, match="config.json is nan"):
        RouterRecorder(model)


@pytest.mark.parametrize("value", ["nan", "inf", "-0.5"])
def test_a_router_aux_coefficient_that_cannot_train_is_refused_before_loading(value):
    """nan dropped the load-balancing loss without a word, inf skipped every update, a negative
    value failed after the model loaded (fresh-user review): each is a config error now."""
    from lensrl.config import ConfigError, SFTConfig, load_config

    with pytest.raises(ConfigError, match=r"model.router_aux_loss_coef must be a finite number >= 0"):
        load_config(SFTConfig, None, [f"model.router_aux_loss_coef={value}", "data.train_files=[x.parquet]"])


def test_experts_run_torchs_grouped_gemm_not_a_python_loop(tiny_moe_dir):
    """Forward and backward of the experts are torch._grouped_mm calls (transformers' "grouped_mm"
    on a CPU with torch >= 2.9), equal to transformers' reference loop over the experts."""
    grouped, _ = load_policy(tiny_moe_dir)
    loop, _ = load_policy(tiny_moe_dir)
    loop.set_experts_implementation("eager")
    input_ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.profiler.profile() as profile:
        out = grouped.model(input_ids=input_ids).last_hidden_state
        out.pow(2).mean().backward()
    names = {event.name for event in profile.events()}
    assert "aten::_grouped_mm" in names and not any("grouped_mm_fallback" in n for n in names)
    expected = loop.model(input_ids=input_ids).last_hidden_state
    expected.pow(2).mean().backward()
    torch.testing.assert_close(out, expected, **TOL)
    for name in _expert_names(grouped):
        torch.testing.assert_close(grouped.get_parameter(name).grad, loop.get_parameter(name).grad, **TOL)


@pytest.mark.slow
def test_compiled_blocks_with_checkpointing_equal_eager(tiny_moe_dir, make_image_bytes):
    """`model.compile` on the MoE (CPU inductor, fp32, activation checkpointing): the packed
    forward + backward and the router capture equal eager. fp32 experts run eagerly inside the
    compiled layers (transformers would loop over the experts in Python there): the only graph
    breaks besides attention."""
    from torch._dynamo.utils import counters

    from lensrl.models.compile import compile_blocks, uncompile_blocks

    eager, processor = load_policy(tiny_moe_dir)
    compiled, _ = load_policy(tiny_moe_dir)
    for model in (eager, compiled):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compile_blocks(compiled)
    results = []
    counters.clear()
    for model in (eager, compiled):
        router = RouterRecorder(model, coef=0.5)
        seqs = _batch(processor, make_image_bytes, seed=4)
        with router.capture() as routed:
            logp, entropy, mask = forward_response_logprobs(model, seqs, processor.pad_token_id, 0.7, 16,
                                                            with_entropy=True, packed=True)
        loss = _loss(logp, entropy, mask, torch.linspace(-1.0, 1.5, len(seqs)), mask.sum())
        (loss + router.loss_term(routed, 1.0, "actor")[0]).backward()
        results.append((logp, entropy, routed.aux_loss, router.counts, {n: p.grad for n, p in model.named_parameters()}))
    (logp, entropy, aux, counts, grads), (c_logp, c_entropy, c_aux, c_counts, c_grads) = results
    torch.testing.assert_close(c_logp, logp, **TOL)
    torch.testing.assert_close(c_entropy, entropy, **TOL)
    torch.testing.assert_close(c_aux, aux, **TOL)
    assert torch.equal(c_counts, counts)
    for name, grad in grads.items():
        if grad is not None:
            torch.testing.assert_close(c_grads[name], grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    assert counters["stats"]["unique_graphs"] > 0
    breaks = [reason for reason in counters["graph_break"] if "disable" not in reason]
    assert not breaks, breaks  # not transformers' ContextVar collector, not the experts' Python loop
    uncompile_blocks(compiled)
    assert "forward" not in compiled.model.language_model.layers[0].mlp.experts.__dict__


def test_router_mismatch_reads_every_layer_of_compiled_blocks(tiny_moe_dir, make_image_bytes):
    """rollout/router_mismatch's forward (`trainer_routing`) on a model whose blocks are compiled and
    already ran a no-grad forward (the engine's prefill does): the routing of every MoE layer,
    equal to eager. It read 4 of the 12 layers of the 30B-A3B-12l shape's rollout copy on the GPU
    (transformers' collector is a ContextVar that the cached graphs do not see), and the step failed."""
    from lensrl.models.compile import compile_blocks

    eager, processor = load_policy(tiny_moe_dir)
    compiled, _ = load_policy(tiny_moe_dir)
    compile_blocks(compiled)
    seqs = _batch(processor, make_image_bytes, seed=4)
    with torch.no_grad():
        forward_response_logprobs(compiled, seqs, processor.pad_token_id, 1.0, packed=True)
        want, got = trainer_routing(eager, seqs), trainer_routing(compiled, seqs)
    assert [w.shape[1] for w in want] == [3] * len(seqs)  # the tiny MoE's 3 layers
    assert [g.shape for g in got] == [w.shape for w in want] and all(torch.equal(g, w) for g, w in zip(got, want))


def test_a_compiled_layer_runs_the_same_graph_with_the_router_capture_on_or_off(tiny_moe_dir, make_image_bytes):
    """Activation checkpointing recomputes a layer outside the router capture that its forward ran
    inside; the compiled layer must run the same graph both times, or the two save different tensors
    and the backward fails (a CheckpointError in the Qwen3-VL-MoE GRPO step on the H200, where the
    recorder's `if self.active` had been traced and guarded). Switching the capture compiles nothing new."""
    from torch._dynamo.utils import counters

    from lensrl.models.compile import compile_blocks

    torch._dynamo.reset()  # graphs compiled by earlier tests (the compiled function is shared per class) would hide it
    model, processor = load_policy(tiny_moe_dir)
    model.train()
    compile_blocks(model)
    router = RouterRecorder(model, coef=0.5)
    seqs = _batch(processor, make_image_bytes, seed=4)
    counters.clear()
    with router.capture() as routed:
        forward_response_logprobs(model, seqs, processor.pad_token_id, 1.0, packed=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0 and routed.num_tokens > 0
    forward_response_logprobs(model, seqs, processor.pad_token_id, 1.0, packed=True)  # the capture off
    assert counters["stats"]["unique_graphs"] == graphs


# ----------------------------------------------------------------------------------------------
# the trainers


def test_mfu_counts_the_experts_a_token_runs(tiny_moe_dir, tiny_qwen3_dir):
    """perf/mfu's N: each sparse layer's stacked experts count K / E of their weights (the tiny MoE
    routes top-2 of 8: a quarter); a dense model counts every parameter."""
    model, _ = load_policy(tiny_moe_dir)
    text = model.config.get_text_config()
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    assert experts > total // 4 and (text.num_experts, text.num_experts_per_tok) == (8, 2)
    assert active_parameters(model) == total - experts + experts // 4
    dense, _ = load_policy(tiny_qwen3_dir)
    assert active_parameters(dense) == sum(p.numel() for p in dense.parameters())


def test_grpo_with_the_engine_logs_router_mismatch_train_kl_and_tis(tiny_moe_dir, color_data, tmp_path):
    """A GRPO step of the MoE policy with the engine (fp32, CPU): the engine records the experts of
    each decode step and the step logs how often they differ from the model's own forward
    (rollout/router_mismatch: 0 where both compute alike), next to rollout/train_kl and TIS. Then
    the same comparison on a fresh batch sees a router changed after the rollout."""
    from trainer_helpers import grpo_overrides

    from lensrl.config import GRPOConfig
    from lensrl.data.datasets import process_rows
    from lensrl.rollout.engine.moe import trainer_routing  # noqa: F401  (the path the step takes)
    from lensrl.train.sequences import make_sequence
    from lensrl.trainers.grpo import GRPOTrainer

    overrides = grpo_overrides(tiny_moe_dir, color_data, tmp_path, "engine", "rollout.backend=engine",
                               "data.max_prompt_length=96", "trainer.total_steps=1",
                               "actor.importance_sampling_fix=true", "rollout.router_mismatch_seqs=4")
    trainer = GRPOTrainer(load_config(GRPOConfig, None, overrides))
    metrics = trainer.fit()
    assert metrics["rollout/router_mismatch"] == 0.0 and "timing_s/router_mismatch" in metrics
    assert 0.0 <= metrics["rollout/train_kl"] < 1e-6  # fp32: engine and trainer logprobs agree
    assert metrics["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)

    batch = trainer.sampler.next_batch()
    samples, prompts = process_rows(trainer.train_data, trainer.sampler, batch, list(range(len(batch))),
                                    trainer.processor, False)
    groups = trainer.rollout.generate(prompts, trainer.sampling_params(2))
    seqs = [make_sequence(p, c.token_ids) for p, group in zip(prompts, groups) for c in group]
    routed = [c.routed_experts for group in groups for c in group]
    same, decisions = trainer.routing_gap(seqs, routed, {})
    assert same == {"rollout/router_mismatch": 0.0} and decisions > 0
    with torch.no_grad():  # another router in the first MoE layer than the one the engine decoded with
        router = trainer.router.routers[0]
        router.weight.copy_(torch.roll(router.weight, 1, dims=0))
    changed, _ = trainer.routing_gap(seqs, routed, {})
    assert changed["rollout/router_mismatch"] > 0.5 / len(trainer.router.routers)  # that layer's, at least


def test_recipe_names_the_moe_model_and_is_valid(monkeypatch):
    from lensrl.config import GRPOConfig
    from lensrl.models.shapes import SHAPES

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # recipes name paths from the repository's root
    cfg = load_config(GRPOConfig, root / "configs" / "qwen3_vl_30b_a3b_geo3k_grpo.yaml")
    assert cfg.model.path.endswith("Qwen3-VL-30B-A3B-Instruct") and cfg.model.router_aux_loss_coef == 1e-3
    assert cfg.model.gradient_checkpointing and SHAPES["qwen3_vl_30b_a3b"].arch == "qwen3_vl_moe"
    text = (root / "configs" / "qwen3_vl_30b_a3b_geo3k_grpo.yaml").read_text()
    assert "torchrun --nnodes 2 --nproc-per-node 8" in text


def test_sft_trains_the_experts_and_routers_and_logs_the_router(tiny_moe_dir, color_data, tmp_path):
    """Two SFT steps (packed micro-batches, the config's load-balancing coefficient): every expert
    and router weight moves, the router's loss and load are logged."""
    from lensrl.trainers.sft import SFTTrainer

    overrides = [f"model.path={tiny_moe_dir}", f"data.train_files=[{color_data / 'train.parquet'}]",
                 "data.max_prompt_length=96", "rollout.backend=hf", "reward.num_workers=0", "trainer.total_steps=2",
                 "trainer.global_batch_size=8", "trainer.max_tokens_per_mbs=120", "optim.lr=1e-3",
                 "optim.warmup_ratio=0", "trainer.val_before_train=false", "trainer.test_freq=0",
                 "trainer.save_last=false", f"trainer.output_dir={tmp_path}", "trainer.run_name=sft",
                 "trainer.loggers=[jsonl]"]
    trainer = SFTTrainer(load_config(SFTConfig, None, overrides))
    assert trainer.router.coef == 0.001  # config.json's router_aux_loss_coef
    trainer.fit()
    records = read_metrics(tmp_path / "sft")
    assert len(records) == 2 and records[0]["train/grad_norm"] > 0
    for record in records:
        assert record["train/router_aux_loss"] >= 2.0  # >= top_k, equal only for perfectly even routing
        assert 1.0 <= record["router/max_load_ratio"] <= 8 / 2 and 0 <= record["router/unused_expert_frac"] < 1
    _assert_experts_trained(tiny_moe_dir, tmp_path / "sft" / "hf")


def _assert_experts_trained(start_dir: Path, trained_dir: Path) -> None:
    start, trained = load_file(start_dir / "model.safetensors"), load_file(trained_dir / "model.safetensors")
    names = [k for k in trained if k.endswith(EXPERTS)]
    assert len(names) == 9
    for name in names:  # each expert of each layer, and each router row
        delta = (trained[name] - start[name]).abs().flatten(1).amax(-1)
        assert bool((delta > 0).all()), name


@pytest.fixture(scope="module")
def grpo_runs(tiny_moe_dir, color_data, tmp_path_factory):
    """2 GRPO steps at 1 rank and at 2 gloo ranks (FSDP2 per decoder layer), a checkpoint after
    every step; no load-balancing term in the loss (it depends on how tokens are grouped into
    micro-batches, which differs between the layouts), the router still logged."""
    out = tmp_path_factory.mktemp("moe_grpo")
    extra = ["trainer.total_steps=2", "model.router_aux_loss_coef=0"]
    launch(1, "grpo", grpo_args(tiny_moe_dir, color_data, out, "one", *extra))
    launch(2, "grpo", grpo_args(tiny_moe_dir, color_data, out, "two", *extra))
    return out


@pytest.mark.slow
def test_grpo_two_ranks_equal_one_rank_and_train_the_experts(grpo_runs, tiny_moe_dir):
    one, two = read_metrics(grpo_runs / "one"), read_metrics(grpo_runs / "two")
    assert len(one) == 2 and one[0]["actor/grad_norm"] > 0  # a real learning signal
    assert_same_steps(one, two)
    for a, b in zip(one, two):  # the same tokens routed to the same experts, counted over both ranks
        for key in ("router/max_load_ratio", "router/mean_max_load_ratio", "router/unused_expert_frac"):
            assert b[key] == pytest.approx(a[key], rel=1e-9), key
        assert b["actor/router_aux_loss"] == pytest.approx(a["actor/router_aux_loss"], rel=1e-3)
    assert_same_weights(grpo_runs / "one" / "hf", grpo_runs / "two" / "hf")
    _assert_experts_trained(tiny_moe_dir, grpo_runs / "two" / "hf")
    assert len(list((grpo_runs / "two" / "checkpoints" / "step_2").glob("*.distcp"))) == 2  # a shard per rank


@pytest.mark.slow
def test_resume_from_the_two_rank_checkpoint_continues_the_run(grpo_runs, tiny_moe_dir, color_data):
    """The 2-rank run's step-1 checkpoint (DCP, experts sharded over the ranks) resumed at one rank:
    its step 2 and final weights are the uninterrupted run's."""
    ckpt = grpo_runs / "two" / "checkpoints" / "step_1"
    launch(1, "grpo", grpo_args(tiny_moe_dir, color_data, grpo_runs, "resumed", "trainer.total_steps=2",
                                "model.router_aux_loss_coef=0", f"trainer.resume={ckpt}"))
    resumed = read_metrics(grpo_runs / "resumed")
    assert [r["step"] for r in resumed] == [2]
    assert_same_steps(read_metrics(grpo_runs / "two")[1:], resumed)
    assert_same_weights(grpo_runs / "two" / "hf", grpo_runs / "resumed" / "hf")


def test_resuming_a_moe_checkpoint_with_a_dense_model_names_the_mismatch(grpo_runs, tiny_qwen3_dir, color_data):
    """A dense model.path for a MoE run's checkpoint: a CheckpointError naming the checkpoint, a
    weight missing from it and one it holds, not DCP's bare missing-key traceback (fresh-user review)."""
    from lensrl.train.checkpoint import CheckpointError
    from lensrl.trainers.grpo import GRPOTrainer

    ckpt = grpo_runs / "one" / "checkpoints" / "step_1"
    cfg = load_config(GRPOConfig, None, grpo_args(tiny_qwen3_dir, color_data, grpo_runs, "dense",
                                                  "trainer.total_steps=2", f"trainer.resume={ckpt}"))
    with pytest.raises(CheckpointError, match=r"step_1: it holds another model's weights: \d+ of this model's "
                                              r"weights are not in it \(e.g. .*mlp.down_proj.weight\); \d+ of its "
                                              r"weights are not in this model \(e.g. .*experts.*\)"):
        GRPOTrainer(cfg).fit()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_experts_run_grouped_gemm_in_every_setup(tiny_moe_dir, make_image_bytes):
    """The trainer's GPU setups: fp32 master weights under bf16 autocast (one GPU, unsharded),
    eager and compiled (there the fp32 experts run eagerly), and bf16 weights compiled (FSDP's bf16
    all-gather, the rollout copy): never transformers' Python loop over the experts; packed equals
    padded within bf16 rounding."""
    from lensrl.models.compile import compile_blocks

    def run(model) -> set[str]:
        model.train()
        seqs = _batch(processor, make_image_bytes)
        with torch.profiler.profile() as profile, torch.autocast("cuda", dtype=torch.bfloat16):
            padded, _, mask = forward_response_logprobs(model, seqs, processor.pad_token_id, with_entropy=True)
            packed, entropy, _ = forward_response_logprobs(model, seqs, processor.pad_token_id, with_entropy=True,
                                                           packed=True)
            (packed * mask).sum().backward()
        assert (packed - padded).abs()[mask].mean() < 2e-2
        assert torch.isfinite(entropy).all() and all(p.grad is None or torch.isfinite(p.grad).all()
                                                     for p in model.parameters())
        names = {event.name for event in profile.events()}
        assert not any("grouped_mm_fallback" in n for n in names), sorted(n for n in names if "grouped" in n)
        return names

    model, processor = load_policy(tiny_moe_dir, torch.float32, "cuda")
    assert model.config.get_text_config()._experts_implementation == "grouped_mm"
    assert "aten::_grouped_mm" in run(model)
    compile_blocks(model)
    assert "aten::_grouped_mm" in run(model)
    bf16, _ = load_policy(tiny_moe_dir, torch.bfloat16, "cuda")
    compile_blocks(bf16)
    run(bf16)
