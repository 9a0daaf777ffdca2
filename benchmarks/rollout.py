"""Rollout throughput: transformers `generate` vs lensrl's engine, on real Qwen-VL shapes.

    python benchmarks/rollout.py --out rollout.json                  # one H100 80GB, ~4 minutes
    python benchmarks/rollout.py --tiny --out /tmp/rollout_tiny.json  # CPU smoke run, ~1-2 minutes

Random weights (speed depends on shapes, not weights), bf16, prompts of one 448x448 image and
~50 text tokens, ignore_eos so every completion has the asked length. Sections (each can be
skipped with --skip NAME; a failing section is reported and the others still run; the JSON is
rewritten after every section):

  bandwidth  device-to-device copy rate: the roofline's denominator
  hf         transformers generate via HFRollout (sampling), 1 and 1+K new tokens, extrapolated
  engine     the engine on the same workload: tokens/s, ratio to generate, roofline fraction
  engine_compiled  the same with `model.compile` (compiled vision blocks / decoder layers); the
             sections below then run compiled, as the trainers do on CUDA
  sharing    64 prompts x n=8 (prefix sharing) vs 512 prompts x n=1, per generated token
  long_tail  EOS-like stops (geometric lengths, a few at the maximum) through continuous batching,
             vs the fixed-length run
  sync       weight sync (bf16 params: references; fp32 masters: one bf16 copy), KV sleep/wake,
             and the logprob gap under autocast
  logprobs   engine vs trainer per-token logprob |delta| in bf16
  qwen3      the Qwen3-VL-2B shape: HF generate (skip with --skip qwen3_hf) and the engine
  moe        the Qwen3-VL-30B-A3B shape (128 experts, top-8; 61 GB of bf16 weights): HF generate
             (transformers' grouped_mm experts) and the engine (grouped GEMM experts), the decode
             roofline counting only the experts each step reads, and `rollout/router_mismatch`:
             how often the engine's top-k experts differ from the trainer's in bf16
  demo       (--tiny only) the CPU demo's rollout: HFRollout vs engine

`--only moe` (any comma-separated list) runs those sections and the bandwidth alone.

Roofline: bytes one decode step must read (the text model's weights + every running sequence's
KV cache) over the measured copy bandwidth. The reference's figure (~66k tokens/s at 256
prompts) counts all weights including the vision tower; both are reported.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step: the matmul rate, the FLOP count

from lensrl.config import RolloutConfig  # noqa: E402
from lensrl.data.sample import ImageSource, Sample  # noqa: E402
from lensrl.models.load import load_policy  # noqa: E402
from lensrl.rollout.base import SamplingParams  # noqa: E402
from lensrl.rollout.engine import EngineRollout  # noqa: E402
from lensrl.rollout.hf import HFRollout  # noqa: E402
from lensrl.train.sequences import forward_response_logprobs, make_sequence  # noqa: E402

ANCHOR_HF_TOKENS_PER_S = 1743.0  # reference/anchors.md: HF generate, 256 prompts, same H100
ANCHOR_ROOFLINE_TOKENS_PER_S = 66_000.0
WORDS = (
    "triangle angle side length circle radius area point line segment parallel perpendicular "
    "square chord tangent arc degree measure find the value of x given that and is equal to "
    "what in figure below shown right isosceles polygon diagonal height base"
).split()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# workload
# ---------------------------------------------------------------------------------------------


def make_prompts(processor, count: int, image_side: int, text_tokens: int, seed: int = 0) -> list:
    """`count` distinct prompts: one image_side x image_side image and ~text_tokens of text each."""
    rng = random.Random(seed)
    images = [
        Image.fromarray(
            np.random.default_rng(i).integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)
        )
        for i in range(8)
    ]
    num_words = max(1, int(text_tokens * 0.7))
    prompts = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(num_words))
        sample = Sample(f"<image>{text}?", [ImageSource(images[i % len(images)], f"image {i % len(images)}")])
        prompts.append(processor(sample))
    return prompts


def total_tokens(groups) -> int:
    return sum(len(c.token_ids) for g in groups for c in g)


def decode_weight_bytes(engine: EngineRollout) -> int:
    """Bytes of weights one decode step reads: the text layers, final norm and LM head."""
    w = engine.weights
    tensors = [w.final_norm, w.lm_head]
    for layer in w.layers:
        tensors += [t for t in vars(layer).values() if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def all_weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------


def bench_bandwidth(device: torch.device, tiny: bool) -> dict:
    """The device's copy rate (the decode roofline's denominator) and its dense matmul rate (bf16
    8192^3 on CUDA: the prefill limit's), both measured here, on this device."""
    from train_step import measure_matmul_rate

    size = (64 if tiny else 2048) * 2**20
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    iters = 5 if tiny else 20
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    elapsed = time.perf_counter() - start
    return {
        "bytes_per_s": 2 * size * iters / elapsed,
        "buffer_bytes": size,
        "matmul_flops_per_s": measure_matmul_rate(device, tiny),
        "note": "copy rate counts the bytes read and written",
    }


def physical_limit(model, prompts, run: dict, roof: dict, matmul_rate: float) -> dict:
    """End-to-end tokens/s if prefill ran at the measured matmul rate (the vision tower and the text
    model's forward FLOPs over every prompt, `train_step.count_flops`) and decode at the bandwidth
    roofline (`roofline`: weights and KV read once a step), one after the other; and the run's
    fraction of it (issue 17's target: >= 0.70)."""
    from train_step import count_flops

    prefill_flops = count_flops(model, [make_sequence(p, []) for p in prompts])["total_forward"]
    prefill_s = prefill_flops / matmul_rate
    decode_s = run["decode_tokens"] / roof["roofline_tokens_per_s"]
    limit = run["tokens"] / (prefill_s + decode_s)
    return {"prefill_flops": prefill_flops, "prefill_limit_s": prefill_s, "decode_limit_s": decode_s,
            "limit_tokens_per_s": limit, "fraction": run["tokens_per_s"] / limit,
            "prefill_fraction": prefill_s / max(run["prefill_s"], 1e-9),
            "decode_fraction": decode_s / max(run["decode_s"], 1e-9)}


def bench_hf(model, processor, prompts, args) -> dict:
    """Short HF generate runs: 1 new token (prefill) and 1 + K, extrapolated to the full length."""
    rollout = HFRollout(model, processor, batch_size=len(prompts))
    rollout.generate(
        prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=1, ignore_eos=True)
    )  # warm-up
    times = {}
    for new in (1, 1 + args.hf_tokens):
        sync(args.device)
        start = time.perf_counter()
        rollout.generate(
            prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=new, ignore_eos=True, seed=0)
        )
        sync(args.device)
        times[new] = time.perf_counter() - start
        log(f"  hf generate: {len(prompts)} prompts x {new} new tokens: {times[new]:.2f} s")
    per_step = (times[1 + args.hf_tokens] - times[1]) / args.hf_tokens
    e2e = times[1] + (args.new_tokens - 1) * per_step
    tokens = len(prompts) * args.new_tokens
    return {
        "prefill_s": times[1],
        "decode_step_s": per_step,
        "extrapolated_generate_s": e2e,
        "tokens_per_s": tokens / e2e,
        "decode_tokens_per_s": len(prompts) / per_step,
        "measured_new_tokens": 1 + args.hf_tokens,
        "note": f"measured with 1 and {1 + args.hf_tokens} new tokens, extrapolated to {args.new_tokens}",
    }


def run_engine(engine: EngineRollout, prompts, params: SamplingParams, limits=None) -> dict:
    sync(engine.device)
    start = time.perf_counter()
    groups = engine.generate(prompts, params, max_new_tokens=limits)
    sync(engine.device)
    wall = time.perf_counter() - start
    stats = dict(engine.stats)
    tokens = total_tokens(groups)
    decode_s = max(stats["decode_s"], 1e-9)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "decode_tokens_per_s": stats["decode_tokens"] / decode_s,
        "mean_batch": stats["decode_tokens"] / max(stats["decode_steps"], 1),
        **stats,
    }


def roofline(engine: EngineRollout, model, run: dict, bandwidth: float) -> dict:
    """Decode tokens/s if every step only read its weights and KV at the measured copy rate."""
    steps = max(run["decode_steps"], 1)
    kv_per_step = run["kv_token_reads"] / steps * engine.runner.layout.bytes_per_token
    batch = run["mean_batch"]
    text_bytes = decode_weight_bytes(engine)
    ours = batch / ((text_bytes + kv_per_step) / bandwidth)
    anchor_style = batch / ((all_weight_bytes(model) + kv_per_step) / bandwidth)
    return {
        "decode_weight_bytes": text_bytes,
        "kv_bytes_per_step": kv_per_step,
        "roofline_tokens_per_s": ours,
        "fraction": run["decode_tokens_per_s"] / ours,
        "roofline_all_weights_tokens_per_s": anchor_style,
        "fraction_all_weights": run["decode_tokens_per_s"] / anchor_style,
    }


def bench_engine(model, processor, prompts, args, results, anchor_hf: float | None = None) -> dict:
    engine = make_engine(model, processor, args)
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=True, seed=0)
    cold = run_engine(engine, prompts, params)
    log(f"  engine cold run (kernel compile, graph capture): {cold['wall_s']:.2f} s")
    warm = run_engine(engine, prompts, params)
    log(
        f"  engine warm run: {warm['wall_s']:.2f} s, {warm['tokens_per_s']:.0f} tokens/s end to end, "
        f"{warm['decode_tokens_per_s']:.0f} tokens/s decoding, kernels={warm['kernels']}"
    )
    out = {"cold": cold, "warm": warm}
    bandwidth = results.get("bandwidth", {}).get("bytes_per_s")
    if bandwidth:
        out["roofline"] = roofline(engine, model, warm, bandwidth)
        rate = results["bandwidth"].get("matmul_flops_per_s")
        if rate:
            out["physical_limit"] = lim = physical_limit(model, prompts, warm, out["roofline"], rate)
            log(f"  physical limit (prefill at {rate / 1e12:.3g} TFLOP/s, decode at the copy rate): "
                f"{lim['limit_tokens_per_s']:.0f} tokens/s; this run {lim['fraction']:.2f} of it "
                f"(prefill {lim['prefill_fraction']:.2f}, decode {lim['decode_fraction']:.2f})")
    hf = results.get("hf")
    if hf and "tokens_per_s" in hf:
        out["speedup_vs_hf"] = warm["tokens_per_s"] / hf["tokens_per_s"]
        out["decode_speedup_vs_hf"] = warm["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
        out["hf_source"] = "measured"
    elif anchor_hf:
        out["speedup_vs_hf"] = warm["tokens_per_s"] / anchor_hf
        out["hf_source"] = f"anchor {anchor_hf:.0f} tokens/s end to end (HF not measured in this run)"
    return out


def bench_engine_compiled(model, processor, prompts, args, results, anchor_hf: float | None = None) -> dict:
    """The engine again with `model.compile` on (lensrl.models.compile: vision blocks and decoder
    layers compiled; prefill writes K/V straight into the pool). The sections after this one run
    compiled too, as the trainers do on CUDA by default."""
    from lensrl.models.compile import compile_blocks

    out = {"compiled_blocks": compile_blocks(model)}
    out.update(bench_engine(model, processor, prompts, args, results, anchor_hf))
    eager = results.get("engine", {}).get("warm", {})
    if "tokens_per_s" in eager:
        out["speedup_vs_eager_engine"] = out["warm"]["tokens_per_s"] / eager["tokens_per_s"]
    return out


def bench_sharing(model, processor, prompts, args) -> dict:
    engine = make_engine(model, processor, args, max_num_seqs=max(args.max_num_seqs, args.share_prompts * 8))
    new = args.new_tokens
    shared_prompts = prompts[: args.share_prompts]
    distinct_prompts = prompts[: args.share_prompts * 8]
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=new, ignore_eos=True, seed=0)
    run_engine(
        engine, shared_prompts, SamplingParams(n=8, temperature=1.0, max_new_tokens=4, ignore_eos=True)
    )
    shared = run_engine(engine, shared_prompts, params)
    log(f"  {len(shared_prompts)} prompts x n=8: {shared['wall_s']:.2f} s")
    distinct = run_engine(
        engine,
        distinct_prompts,
        SamplingParams(n=1, temperature=1.0, max_new_tokens=new, ignore_eos=True, seed=0),
    )
    log(f"  {len(distinct_prompts)} prompts x n=1: {distinct['wall_s']:.2f} s")
    per_token = {
        name: {
            "s_per_token": run["wall_s"] / run["tokens"],
            "decode_s_per_token": run["decode_s"] / run["decode_tokens"],
            "prefill_s": run["prefill_s"],
            "tokens": run["tokens"],
        }
        for name, run in (("n8", shared), ("n1", distinct))
    }
    return {
        **per_token,
        "n8_over_n1_time_per_token": per_token["n8"]["s_per_token"] / per_token["n1"]["s_per_token"],
        "n8_over_n1_decode_time_per_token": (
            per_token["n8"]["decode_s_per_token"] / per_token["n1"]["decode_s_per_token"]
        ),
    }


def bench_long_tail(model, processor, prompts, args, results) -> dict:
    """Lengths set by a stop criterion, as EOS sets them: every 1 in new_tokens/4 token ids stops a
    sequence, so with near-uniform random-weight logits lengths are geometric (mean ~new_tokens/4;
    most short, a few reach new_tokens). tail_prompts x n=8 sequences through tail_rows rows, with
    the engine's default prefill-ahead policy (large, rare prefill rounds) and with the earlier
    one (lookahead rows // 4, a prefill once rows // 8 samples are wanted: small, frequent rounds)."""
    out = _long_tail_run(model, processor, prompts, args, results)
    rows = args.tail_rows
    out["small_rounds"] = _long_tail_run(model, processor, prompts, args, results,
                                         lookahead=rows // 4, prefill_min_rows=rows // 8)
    # the drain bound: once no sample waits, the batch thins as rows finish; with every row
    # refilled at once, decode tokens/s relative to a full batch is the mean batch / rows
    out["mean_batch_fraction"] = out["mean_batch"] / rows
    return out


def _long_tail_run(model, processor, prompts, args, results, **options) -> dict:
    stopping = copy.copy(processor)
    stride = max(2, args.new_tokens // 4)
    stopping.eos_token_ids = list(range(stride // 2, model.lm_head.weight.shape[0], stride))
    tail_prompts = [prompts[i % len(prompts)] for i in range(args.tail_prompts)]
    engine = make_engine(model, stopping, args, max_num_seqs=args.tail_rows, **options)
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    sync(args.device)
    start = time.perf_counter()
    groups = engine.generate(tail_prompts, params)
    sync(args.device)
    wall = time.perf_counter() - start
    stats = dict(engine.stats)
    lengths = [len(c.token_ids) for g in groups for c in g]
    run = {
        "lookahead": engine.lookahead,
        "prefill_min_rows": engine.prefill_min_rows,
        "wall_s": wall,
        "tokens": sum(lengths),
        "tokens_per_s": sum(lengths) / wall,
        "decode_tokens_per_s": stats["decode_tokens"] / max(stats["decode_s"], 1e-9),
        "decode_ms_per_step": 1e3 * stats["decode_s"] / max(stats["decode_steps"], 1),
        "mean_batch": stats["decode_tokens"] / max(stats["decode_steps"], 1),
        **stats,
    }
    log(
        f"  {len(lengths)} sequences, mean length {np.mean(lengths):.1f}, lookahead {engine.lookahead}, "
        f"min rows {engine.prefill_min_rows}: {wall:.2f} s, {run['prefill_rounds']} prefill rounds "
        f"({run['prefill_s']:.2f} s), {run['decode_tokens_per_s']:.0f} decode tokens/s, mean batch "
        f"{run['mean_batch']:.0f}"
    )
    out = {
        "sequences": len(lengths),
        "rows": args.tail_rows,
        "mean_length": float(np.mean(lengths)),
        "median_length": float(np.median(lengths)),
        "share_at_max_length": sum(x == args.new_tokens for x in lengths) / len(lengths),
        "stop_reasons": {r: sum(c.finish_reason == r for g in groups for c in g) for r in ("stop", "length")},
        **run,
    }
    # against the fixed-length run of the same model state (compiled when the engine was)
    fixed = (results.get("engine_compiled") or {}).get("warm") or (results.get("engine") or {}).get("warm")
    if fixed:
        out["decode_fraction_of_fixed"] = run["decode_tokens_per_s"] / fixed["decode_tokens_per_s"]
        out["e2e_fraction_of_fixed"] = run["tokens_per_s"] / fixed["tokens_per_s"]
        out["decode_step_time_ratio"] = run["decode_ms_per_step"] / (
            1e3 * fixed["decode_s"] / max(fixed["decode_steps"], 1))
    return out


def bench_sync(model, processor, prompts, args) -> dict:
    out = {}
    engine = make_engine(model, processor, args)
    small = SamplingParams(n=1, temperature=1.0, max_new_tokens=4, ignore_eos=True, seed=0)
    engine.generate(prompts[:2], small)
    out["bf16_params"] = {
        "sync_s": median_sync(engine, model),
        "owned_bytes": engine.weights.owned_bytes(),
        "note": "engine holds references; only the fused qkv copy is refreshed",
    }
    log(f"  sync, bf16 trainer params: {out['bf16_params']['sync_s'] * 1e3:.1f} ms")
    # KV release / reacquire at the main workload's pool size: the first call allocates it from
    # the device, the second gets the allocator's cached segment back (as in a training loop)
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=True, seed=0)
    out["kv"] = {}
    for name in ("first", "steady"):
        engine.generate(prompts[: args.prompts], params)
        out["kv"][name] = {k: engine.stats[k] for k in ("wake_s", "sleep_s", "kv_bytes", "num_captures")}
    out["kv"]["wake_s"], out["kv"]["sleep_s"] = out["kv"]["steady"]["wake_s"], out["kv"]["steady"]["sleep_s"]
    log(
        f"  KV pool {out['kv']['steady']['kv_bytes'] / 2**30:.2f} GiB: wake {out['kv']['first']['wake_s'] * 1e3:.1f}"
        f" ms first, {out['kv']['wake_s'] * 1e3:.1f} ms steady; sleep {out['kv']['sleep_s'] * 1e3:.2f} ms; "
        f"graphs recaptured in the steady call: {out['kv']['steady']['num_captures']}"
    )
    del engine
    gc.collect()
    # fp32 master weights under bf16 autocast: the engine keeps a bf16 copy of every matmul weight
    master = copy.deepcopy(model).float()
    engine = make_engine(master, processor, args)
    with torch.autocast(args.device.type, dtype=torch.bfloat16):
        groups = engine.generate(
            prompts[: args.gap_prompts],
            SamplingParams(n=2, temperature=1.0, max_new_tokens=args.gap_tokens, seed=0),
        )
    out["fp32_masters"] = {
        "sync_s": median_sync(engine, master),
        "owned_bytes": engine.weights.owned_bytes(),
        "note": "one on-device copy of every matmul weight into the engine's bf16 buffers",
    }
    log(
        f"  sync, fp32 masters -> bf16: {out['fp32_masters']['sync_s'] * 1e3:.1f} ms "
        f"({out['fp32_masters']['owned_bytes'] / 2**30:.2f} GiB)"
    )
    with torch.autocast(args.device.type, dtype=torch.bfloat16):
        out["fp32_masters"]["logprob_gap"] = logprob_gap(
            master, processor, prompts[: args.gap_prompts], groups
        )
    del engine, master
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def median_sync(engine: EngineRollout, model, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        engine.sync_weights(model)
        times.append(engine.stats["sync_s"])
    return statistics.median(times)


def logprob_gap(model, processor, prompts, groups, temperature: float = 1.0, micro_batch: int = 8) -> dict:
    """Engine vs trainer per-token |delta logp|, and, as the floor bf16 sets, the trainer against
    itself in another layout (padded micro-batches vs one packed row: different kernels and
    shapes, the same math)."""
    seqs, rollout = [], []
    for prompt, group in zip(prompts, groups):
        for completion in group:
            seqs.append(make_sequence(prompt, completion.token_ids))
            rollout.append(torch.tensor(completion.logprobs))
    gaps, self_gaps = [], []
    suppress = getattr(processor, "suppress_token_ids", None)
    with torch.no_grad():
        for start in range(0, len(seqs), micro_batch):
            micro = seqs[start : start + micro_batch]
            logp, _, mask = forward_response_logprobs(
                model, micro, processor.pad_token_id, temperature=temperature, suppress_ids=suppress
            )
            packed, _, _ = forward_response_logprobs(
                model, micro, processor.pad_token_id, temperature=temperature, suppress_ids=suppress,
                width=logp.shape[1], packed=True,
            )
            for i in range(logp.shape[0]):
                gaps.append((logp[i, mask[i]].float().cpu() - rollout[start + i]).abs())
                self_gaps.append((logp[i, mask[i]].float() - packed[i, mask[i]].float()).abs().cpu())
    gaps, self_gaps = torch.cat(gaps), torch.cat(self_gaps)
    return {"mean_abs": float(gaps.mean()), "max_abs": float(gaps.max()), "tokens": int(gaps.numel()),
            "trainer_padded_vs_packed_mean_abs": float(self_gaps.mean()),
            "trainer_padded_vs_packed_max_abs": float(self_gaps.max())}


def bench_logprobs(model, processor, prompts, args) -> dict:
    engine = make_engine(model, processor, args)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=args.gap_tokens, seed=0)
    groups = engine.generate(prompts[: args.gap_prompts], params)
    return logprob_gap(model, processor, prompts[: args.gap_prompts], groups)


def bench_qwen3(args, results) -> dict:
    model, processor = load_model(args, "qwen3_vl")
    prompts = make_prompts(processor, args.prompts, args.image_side, args.text_tokens)
    out = {"prompt_tokens": int(np.mean([p.input_ids.shape[0] for p in prompts]))}
    if not {"hf", "qwen3_hf"} & args.skip:
        out["hf"] = bench_hf(model, processor, prompts, args)
    if "engine_compiled" not in args.skip:
        from lensrl.models.compile import compile_blocks

        out["compiled_blocks"] = compile_blocks(model)
    out.update(bench_engine(model, processor, prompts, args, {**results, "hf": out.get("hf")}))
    out["logprobs"] = bench_logprobs(model, processor, prompts, args)
    del model
    return out


def expert_bytes(engine: EngineRollout) -> tuple[int, int]:
    """(bytes of one expert's three matrices in one layer, MoE layers): the stacked expert tensors
    the engine reads by reference."""
    layers = [layer for layer in engine.weights.layers if layer.experts_gate_up is not None]
    if not layers:
        return 0, 0
    one = layers[0]
    per_expert = (one.experts_gate_up[0].numel() + one.experts_down[0].numel()) * one.experts_down.element_size()
    return per_expert, len(layers)


def experts_read_per_step(routed: list[list[np.ndarray]], num_experts: int) -> float:
    """Mean over decode steps and MoE layers of the distinct experts one decode step reads.

    routed: the engine's `routed_experts` (per prompt, per sample: (R - 1, L, K) ids). Every
    sequence of the fixed-length workload starts decoding at once (one prefill, then all rows
    step together), so row j of every sequence belongs to decode step j."""
    seqs = [r for group in routed for r in group]
    steps = min(r.shape[0] for r in seqs)
    stacked = np.stack([r[:steps] for r in seqs])  # (S, steps, L, K)
    hit = np.zeros((steps, stacked.shape[2], num_experts), dtype=bool)
    for j in range(steps):
        for layer in range(stacked.shape[2]):
            hit[j, layer, np.unique(stacked[:, j, layer])] = True
    return float(hit.sum(-1).mean())


def bench_moe(args, results) -> dict:
    """The 30B-A3B shape: HF generate vs the engine end to end, the roofline of decode with the
    experts it actually reads, and the engine-vs-trainer routing mismatch in the run's dtype."""
    from lensrl.rollout.engine.moe import router_mismatch, trainer_routing

    model, processor = load_model(args, "qwen3_vl_moe")
    prompts = make_prompts(processor, args.prompts, args.image_side, args.text_tokens)
    text = model.config.get_text_config()
    out = {
        "prompt_tokens": int(np.mean([p.input_ids.shape[0] for p in prompts])),
        "parameters": sum(p.numel() for p in model.parameters()),
        "experts": [text.num_experts, text.num_experts_per_tok],
        "experts_implementation": getattr(text, "_experts_implementation", None),
    }
    if not {"hf", "moe_hf"} & args.skip:
        out["hf"] = bench_hf(model, processor, prompts, args)
    out.update(bench_engine(model, processor, prompts, args, {**results, "hf": out.get("hf")}))
    # the experts each decode step reads, from a run that records its routing
    engine = make_engine(model, processor, args, capture_routing=True)
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=True, seed=0)
    engine.generate(prompts, params)
    per_expert, moe_layers = expert_bytes(engine)
    read = experts_read_per_step(engine.routed_experts, text.num_experts)
    bandwidth = results.get("bandwidth", {}).get("bytes_per_s")
    warm = out["warm"]
    if bandwidth:
        dense = out["roofline"]["decode_weight_bytes"] - per_expert * text.num_experts * moe_layers
        active = dense + per_expert * read * moe_layers
        per_step = (active + out["roofline"]["kv_bytes_per_step"]) / bandwidth
        out["roofline_active"] = {
            "experts_read_per_layer_step": read,
            "active_decode_bytes": active,
            "roofline_tokens_per_s": warm["mean_batch"] / per_step,
            "fraction": warm["decode_tokens_per_s"] / (warm["mean_batch"] / per_step),
        }
        log(f"  decode reads {read:.1f} of {text.num_experts} experts a layer a step: roofline "
            f"{out['roofline_active']['roofline_tokens_per_s']:.0f} tokens/s, engine at "
            f"{out['roofline_active']['fraction']:.2f} of it")
    # routing: engine decode vs the trainer's packed forward on the same tokens, same dtype
    few = prompts[: args.gap_prompts]
    groups = engine.generate(few, SamplingParams(n=2, temperature=1.0, max_new_tokens=args.gap_tokens, seed=0))
    seqs = [make_sequence(p, c.token_ids) for p, group in zip(few, groups) for c in group]
    routed = [r for group in engine.routed_experts for r in group]
    trainer = []
    for start in range(0, len(seqs), 8):
        trainer += trainer_routing(model, seqs[start : start + 8])
    out["router_mismatch"] = router_mismatch(routed, trainer)
    log(f"  rollout/router_mismatch (engine vs trainer top-{text.num_experts_per_tok}, {args.dtype}): "
        f"{out['router_mismatch']:.4f}")
    del engine, model
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def bench_demo(args) -> dict:
    """The CPU demo's rollout (5m preset, 16 prompts x n=8, 8 new tokens): HFRollout vs engine."""
    from lensrl.models.tiny import make_tiny_model

    folder = make_tiny_model(Path(args.workdir) / "demo_model", arch="qwen2_5_vl", preset="5m", seed=1)
    model, processor = load_policy(folder)
    prompts = make_prompts(processor, 16, 56, 60)
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=8, seed=0)
    out = {}
    for name, backend in (
        ("hf", HFRollout(model, processor, batch_size=256)),
        ("engine", EngineRollout(model, processor, RolloutConfig())),
    ):
        backend.generate(prompts[:2], params)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            backend.generate(prompts, params)
            times.append(time.perf_counter() - start)
        out[f"{name}_s"] = statistics.median(times)
        log(f"  demo rollout, {name}: {out[f'{name}_s']:.3f} s")
    out["engine_speedup"] = out["hf_s"] / out["engine_s"]
    return out


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def make_engine(model, processor, args, **overrides) -> EngineRollout:
    options = {"max_num_seqs": args.max_num_seqs, **overrides}
    return EngineRollout(
        model, processor, RolloutConfig(gpu_memory_utilization=args.gpu_memory_utilization), **options
    )


def load_model(args, arch: str):
    if args.tiny:
        from lensrl.models.tiny import make_tiny_model

        folder = make_tiny_model(Path(args.workdir) / arch, arch=arch, preset="5m", seed=0)
        return load_policy(folder, dtype=args.dtype, device=args.device)
    shape = {"qwen2_5_vl": "qwen2_5_vl_3b", "qwen3_vl": "qwen3_vl_2b", "qwen3_vl_moe": "qwen3_vl_30b_a3b"}[arch]
    return load_policy(shape, dtype=args.dtype, device=args.device)


SECTIONS = ["setup", "bandwidth", "hf", "engine", "engine_compiled", "sharing", "long_tail", "logprobs", "sync",
            "qwen3", "moe", "demo"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for every figure")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny models with small sizes")
    p.add_argument(
        "--skip", default="", help="comma-separated sections to skip (hf, sharing, long_tail, ...)"
    )
    p.add_argument("--only", default="", help="comma-separated sections to run alone (with bandwidth), e.g. moe")
    p.add_argument("--skip-hf", action="store_true", help="same as --skip hf: use the anchor HF figure")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument(
        "--hf-tokens", type=int, default=32, help="HF generate decode steps measured (extrapolated)"
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="engine rows for the main run")
    p.add_argument(
        "--share-prompts", type=int, default=64, help="prompts of the n=8 run (x8 for the n=1 run)"
    )
    p.add_argument("--tail-prompts", type=int, default=256, help="long-tail prompts (x n=8 sequences)")
    p.add_argument("--tail-rows", type=int, default=256)
    p.add_argument("--gap-prompts", type=int, default=32)
    p.add_argument("--gap-tokens", type=int, default=128)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = p.parse_args()
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()} | ({"hf"} if args.skip_hf else set())
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if only - set(SECTIONS):
        p.error(f"--only: unknown sections {sorted(only - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
    if only:
        # hf: the HF run of each section that runs; setup: the Qwen2.5-VL model the dense sections need
        keep = {"bandwidth", "hf"} | ({"setup"} if only - {"qwen3", "moe"} else set())
        args.skip |= set(SECTIONS) - only - keep
    if args.tiny:
        args.device = torch.device("cpu")
        args.dtype = torch.float32
        args.image_side, args.text_tokens = 112, 50
        for name, value in (
            ("prompts", 16),
            ("new_tokens", 16),
            ("hf_tokens", 4),
            ("max_num_seqs", 16),
            ("share_prompts", 4),
            ("tail_prompts", 8),
            ("tail_rows", 16),
            ("gap_prompts", 4),
            ("gap_tokens", 8),
        ):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: use --tiny for a CPU smoke run")
        args.device = torch.device("cuda")
        args.dtype = torch.bfloat16
        args.image_side, args.text_tokens = 448, 50
    return args


def main() -> None:
    args = parse_args()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "config": {
            k: (str(v) if isinstance(v, (torch.device, torch.dtype, set)) else v)
            for k, v in vars(args).items()
        }
    }
    if args.device.type == "cuda":
        results["config"]["gpu"] = torch.cuda.get_device_name(args.device)
    results["config"]["torch"] = torch.__version__
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        state: dict = {}

        def section(name: str, fn) -> None:
            if name in args.skip:
                log(f"== {name}: skipped")
                results[name] = {"skipped": True}
                return
            log(f"== {name}")
            start = time.perf_counter()
            try:
                results[name] = fn()
                results[name]["section_s"] = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 (report and go on with the other sections)
                traceback.print_exc()
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()
            log(f"   {name} done in {time.perf_counter() - start:.1f} s")
            out_path.write_text(json.dumps(results, indent=2, default=str))

        def setup():
            state["model"], state["processor"] = load_model(args, "qwen2_5_vl")
            count = max(args.prompts, args.share_prompts * 8)
            state["prompts"] = make_prompts(state["processor"], count, args.image_side, args.text_tokens)
            lengths = [p.input_ids.shape[0] for p in state["prompts"]]
            return {
                "prompt_tokens_mean": float(np.mean(lengths)),
                "prompts_made": count,
                "parameters": sum(p.numel() for p in state["model"].parameters()),
            }

        section("setup", setup)
        section("bandwidth", lambda: bench_bandwidth(args.device, args.tiny))
        if "model" in state:
            dense_sections(state, args, results, section)
        elif "setup" not in args.skip:
            log("setup failed; the Qwen2.5-VL sections cannot run")
        section("qwen3", lambda: bench_qwen3(args, results))
        section("moe", lambda: bench_moe(args, results))
        if args.tiny:
            section("demo", lambda: bench_demo(args))
    out_path.write_text(json.dumps(results, indent=2, default=str))
    print_table(results, args)
    log(f"all figures: {out_path}")


def dense_sections(state: dict, args, results: dict, section) -> None:
    """The Qwen2.5-VL-3B sections, on the model `setup` loaded (dropped at the end)."""
    processor, prompts = state["processor"], state["prompts"]
    main_prompts = prompts[: args.prompts]
    if "hf" in args.skip and not args.tiny:
        log(f"   (using the anchor figure {ANCHOR_HF_TOKENS_PER_S:.0f} tokens/s for HF generate)")
    section("hf", lambda: bench_hf(state["model"], processor, main_prompts, args))
    anchor = (
        ANCHOR_HF_TOKENS_PER_S
        if not args.tiny and args.prompts == 256 and args.new_tokens == 256
        else None
    )
    section(
        "engine", lambda: bench_engine(state["model"], processor, main_prompts, args, results, anchor)
    )
    section(
        "engine_compiled",
        lambda: bench_engine_compiled(state["model"], processor, main_prompts, args, results, anchor),
    )
    section("sharing", lambda: bench_sharing(state["model"], processor, prompts, args))
    section("long_tail", lambda: bench_long_tail(state["model"], processor, main_prompts, args, results))
    section("logprobs", lambda: bench_logprobs(state["model"], processor, prompts, args))
    section("sync", lambda: bench_sync(state["model"], processor, prompts, args))
    state.pop("model")  # make room for the next shape
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()


def print_table(results: dict, args) -> None:
    def get(*keys):
        node = results
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    def fmt(value, spec):
        return (
            "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
        )

    rows = [
        (
            "HF generate tokens/s (e2e)",
            fmt(get("hf", "tokens_per_s"), ".0f"),
            "anchor 1743" if not args.tiny else "",
        ),
        ("engine tokens/s (e2e, warm)", fmt(get("engine", "warm", "tokens_per_s"), ".0f"), ""),
        ("engine decode tokens/s", fmt(get("engine", "warm", "decode_tokens_per_s"), ".0f"), ""),
        ("engine / HF (e2e)", fmt(get("engine", "speedup_vs_hf"), ".1f"), ">= 20x"),
        ("engine + compile tokens/s (e2e, warm)", fmt(get("engine_compiled", "warm", "tokens_per_s"), ".0f"), ""),
        ("engine + compile / HF (e2e)", fmt(get("engine_compiled", "speedup_vs_hf"), ".1f"), ">= 20x"),
        (
            "engine + compile prefill s / decode s",
            f"{fmt(get('engine_compiled', 'warm', 'prefill_s'), '.2f')} / "
            f"{fmt(get('engine_compiled', 'warm', 'decode_s'), '.2f')}",
            "",
        ),
        ("engine / HF (decode)", fmt(get("engine", "decode_speedup_vs_hf"), ".1f"), ""),
        (
            "roofline fraction (text weights + KV)",
            fmt(get("engine", "roofline", "fraction"), ".2f"),
            ">= 0.50",
        ),
        (
            "end to end, fraction of the physical limit (eager / compiled)",
            f"{fmt(get('engine', 'physical_limit', 'fraction'), '.2f')} / "
            f"{fmt(get('engine_compiled', 'physical_limit', 'fraction'), '.2f')}",
            ">= 0.70",
        ),
        (
            "roofline fraction (all weights + KV)",
            fmt(get("engine", "roofline", "fraction_all_weights"), ".2f"),
            "anchor ~66k",
        ),
        (
            "prefill s / decode s (warm)",
            f"{fmt(get('engine', 'warm', 'prefill_s'), '.2f')} / "
            f"{fmt(get('engine', 'warm', 'decode_s'), '.2f')}",
            "",
        ),
        ("n=8 / n=1 time per token (e2e)", fmt(get("sharing", "n8_over_n1_time_per_token"), ".2f"), "<= 1.0"),
        (
            "n=8 / n=1 time per token (decode)",
            fmt(get("sharing", "n8_over_n1_decode_time_per_token"), ".2f"),
            "",
        ),
        (
            "long tail / fixed decode tokens/s",
            fmt(get("long_tail", "decode_fraction_of_fixed"), ".2f"),
            ">= 0.80",
        ),
        (
            "long tail / fixed e2e (default / small rounds)",
            f"{fmt(get('long_tail', 'e2e_fraction_of_fixed'), '.2f')} / "
            f"{fmt(get('long_tail', 'small_rounds', 'e2e_fraction_of_fixed'), '.2f')}",
            "",
        ),
        (
            "long tail mean batch / rows (drain bound)",
            fmt(get("long_tail", "mean_batch_fraction"), ".2f"),
            "",
        ),
        ("weight sync, bf16 params (s)", fmt(get("sync", "bf16_params", "sync_s"), ".4f"), "< 0.2"),
        ("weight sync, fp32 masters (s)", fmt(get("sync", "fp32_masters", "sync_s"), ".4f"), "< 0.2"),
        (
            "KV wake / sleep (s)",
            f"{fmt(get('sync', 'kv', 'wake_s'), '.4f')} / {fmt(get('sync', 'kv', 'sleep_s'), '.4f')}",
            "",
        ),
        (
            "logprob |d| mean / max (bf16 on GPU)",
            f"{fmt(get('logprobs', 'mean_abs'), '.2e')} / {fmt(get('logprobs', 'max_abs'), '.2e')}",
            "mean <= 1e-2",
        ),
        (
            "trainer vs itself (padded / packed) |d| mean",
            fmt(get("logprobs", "trainer_padded_vs_packed_mean_abs"), ".2e"),
            "bf16 floor",
        ),
        (
            "logprob |d| mean, fp32 masters+autocast",
            fmt(get("sync", "fp32_masters", "logprob_gap", "mean_abs"), ".2e"),
            "",
        ),
        ("Qwen3-VL HF generate tokens/s (e2e)", fmt(get("qwen3", "hf", "tokens_per_s"), ".0f"), ""),
        ("Qwen3-VL engine tokens/s (e2e)", fmt(get("qwen3", "warm", "tokens_per_s"), ".0f"), ""),
        (
            "Qwen3-VL engine / HF (e2e / decode)",
            f"{fmt(get('qwen3', 'speedup_vs_hf'), '.1f')} / {fmt(get('qwen3', 'decode_speedup_vs_hf'), '.1f')}",
            "",
        ),
        (
            "Qwen3-VL decode tokens/s / roofline",
            f"{fmt(get('qwen3', 'warm', 'decode_tokens_per_s'), '.0f')} / "
            f"{fmt(get('qwen3', 'roofline', 'fraction'), '.2f')}",
            "",
        ),
        ("Qwen3-VL logprob |d| mean", fmt(get("qwen3", "logprobs", "mean_abs"), ".2e"), ""),
        ("Qwen3-VL-MoE HF generate tokens/s (e2e)", fmt(get("moe", "hf", "tokens_per_s"), ".0f"), ""),
        (
            "Qwen3-VL-MoE engine tokens/s (e2e) / x HF",
            f"{fmt(get('moe', 'warm', 'tokens_per_s'), '.0f')} / {fmt(get('moe', 'speedup_vs_hf'), '.1f')}",
            "",
        ),
        (
            "Qwen3-VL-MoE decode tokens/s / active roofline",
            f"{fmt(get('moe', 'warm', 'decode_tokens_per_s'), '.0f')} / "
            f"{fmt(get('moe', 'roofline_active', 'fraction'), '.2f')}",
            "experts read only",
        ),
        ("Qwen3-VL-MoE rollout/router_mismatch", fmt(get("moe", "router_mismatch"), ".4f"), ""),
        (
            "kernels / CUDA graphs",
            f"{get('engine', 'warm', 'kernels')} / {get('engine', 'warm', 'cuda_graphs')}",
            "",
        ),
    ]
    if args.only:  # the rows of the sections that ran
        rows = [row for row in rows if set(row[1]) - set("-/ ")]
    if args.tiny:
        rows.append(
            ("demo rollout: engine speedup over HF", fmt(get("demo", "engine_speedup"), ".2f"), ">= 1")
        )
    errors = [name for name, value in results.items() if isinstance(value, dict) and "error" in value]
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 34))
    title = "rollout benchmark" + (" (tiny, CPU)" if args.tiny else f" ({results['config'].get('gpu', '')})")
    print(title)
    print("-" * (width + 34))
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>18}  {target}")
    if get("hf", "note"):
        print(f"HF: {get('hf', 'note')}")
    elif get("engine", "hf_source"):
        print(f"HF: {get('engine', 'hf_source')}")
    if errors:
        print(f"sections that failed: {', '.join(errors)} (see the log above and the JSON)")
    print("=" * (width + 34), flush=True)


if __name__ == "__main__":
    main()
