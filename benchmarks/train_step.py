"""Training-step throughput: transformers' padded forward+backward vs lensrl's packed path.

    python benchmarks/train_step.py --out runs/bench/train_step.json      # one H100 80 GB, ~5 min
    python benchmarks/train_step.py --tiny --out /tmp/train_step.json     # CPU smoke test, ~1 min

A GRPO-like batch on the Qwen2.5-VL-3B shape with random weights: 64 sequences, each one
448x448 image (256 tokens) + ~50 prompt tokens + a long-tailed response of 100-1000 tokens.
Measured in one run:

  padded   right-padded micro-batches of 8 in batch order (the trainer's layout), transformers'
           sdpa attention with a padding mask, gradient checkpointing, lensrl's chunked head
  packed   token-budget micro-batches (`plan_micro_batches`), one packed row each, varlen
           attention in text decoder and vision tower (`lensrl.train.packing`), with gradient
           checkpointing everywhere, and with it on the vision tower only (smaller budget)
  logprob  the no-grad logprob pass, padded and packed (and their mean |delta logp|)
  profile  the top kernels of one packed micro-batch forward+backward
  compile  the packed sections again with lensrl's `model.compile` (every decoder layer and
           vision block compiled, and the logprob head; lensrl.models.compile), and their profile
  head     peak memory of the logprob head alone, chunked vs full logits, over tokens and vocab

Every section is in try/except and writes the JSON as it finishes; --skip-<section> leaves one out.

Parameters are bf16 and only forward+backward is timed (no optimizer step): fp32 master weights
+ AdamW for 3.75 B parameters need ~60 GB. MFU counts model FLOPs: 6 x matrix parameters x the
tokens they touch (decoder: all tokens; LM head: response tokens; vision tower: patches; merger:
merged patches) plus attention (causal pairs in the decoder, windows / whole images in the vision
tower), over the bf16 matmul rate measured in the same run. Recomputation under gradient
checkpointing is not counted as useful work.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lensrl.data.sample import ImageSource, Sample
from lensrl.models.compile import compile_blocks
from lensrl.models.load import load_policy
from lensrl.train.attention import enable_packed_attention
from lensrl.train.logprobs import compile_head, token_logprobs
from lensrl.train.packing import (
    micro_batched_response_logprobs,
    plan_micro_batches,
)
from lensrl.train.sequences import Sequence, forward_response_logprobs, make_sequence

# as lensrl's CLI does (lensrl/cli.py): packed micro-batches of changing length fragment the
# default CUDA caching allocator
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
START = time.perf_counter()
WORDS = (
    "find the measure of angle ABC in the triangle shown given that AB equals BC and the exterior angle "
    "at C is 110 degrees what is the area of the shaded region if the radius of the circle is 6 and the "
    "chord subtends a right angle at the centre answer with a number only"
).split()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# setup


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="train_step.json", help="JSON file for all figures")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU, few short sequences (smoke test)")
    p.add_argument("--shape", default="qwen2_5_vl_3b")
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--prompt-tokens", type=int, default=50, help="text tokens per prompt (template included)")
    p.add_argument("--min-response", type=int, default=100)
    p.add_argument("--max-response", type=int, default=1000)
    p.add_argument("--padded-micro-batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16384, help="packed budget with full checkpointing")
    p.add_argument(
        "--nogc-max-tokens", type=int, default=6144, help="packed budget, decoder not checkpointed"
    )
    p.add_argument(
        "--compiled-nogc-max-tokens", type=int, default=16384,
        help="packed budget, decoder not checkpointed, compiled (fused kernels keep fewer activations)",
    )
    p.add_argument("--logprob-max-tokens", type=int, default=32768, help="packed budget of the no-grad pass")
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the logprob head")
    p.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-eager", action="store_true", help="packed sections only with model.compile")
    for name in ("padded", "packed", "nogc", "logprob", "profile", "compile", "head"):
        p.add_argument(f"--skip-{name}", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.num_seqs = min(args.num_seqs, 10)
        args.image_size, args.prompt_tokens = 84, 30
        args.min_response, args.max_response = 4, 60
        args.padded_micro_batch = 4
        args.max_tokens, args.nogc_max_tokens, args.logprob_max_tokens = 400, 200, 800
        args.compiled_nogc_max_tokens = 200
        args.chunk_size, args.steps, args.warmup = 64, 1, 2
    return args


def build_model(args):
    if args.tiny:
        from lensrl.models.tiny import make_tiny_model

        folder = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", arch="qwen2_5_vl", preset="1m")
        model, processor = load_policy(folder, torch.float32, "cpu")
    else:
        model, processor = load_policy(args.shape, torch.bfloat16, "cuda")
    return model, processor


def build_batch(processor, vocab_size: int, args) -> list[Sequence]:
    """`num_seqs` prompts (one random image + ~prompt_tokens text) with long-tailed responses."""
    from PIL import Image

    rng = np.random.default_rng(args.seed)
    seqs = []
    vocab_low = max(processor.image_token_id, processor.vision_end_token_id, *processor.eos_token_ids) + 1
    for i in range(args.num_seqs):
        pixels = rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
        image = ImageSource(Image.fromarray(pixels), f"random image {i}")
        words = list(rng.permutation(WORDS))
        # trim on the text alone (cheap), +2 for the vision start/end tokens around the image
        while words and processor(Sample(" ".join(words))).input_ids.shape[0] + 2 > args.prompt_tokens:
            words = words[:-1]
        prompt = processor(Sample("<image>" + " ".join(words), [image]))
        # long-tailed: log-normal around 2.5x the minimum, clipped to [min, max]
        length = int(
            np.clip(
                np.exp(rng.normal(math.log(2.5 * args.min_response), 0.65)),
                args.min_response,
                args.max_response,
            )
        )
        response = torch.from_numpy(
            rng.integers(vocab_low, min(vocab_low + 20000, vocab_size), length)
        ).long()
        seqs.append(make_sequence(prompt, response))
    return seqs


def _image_tokens(prompt) -> int:
    return 0 if prompt.image_grid_thw is None else int(prompt.image_grid_thw.prod(-1).sum()) // 4


def measure_matmul_rate(device: torch.device, tiny: bool) -> float:
    """Dense matmul FLOP/s in the compute dtype (bf16 on GPU), best of a few timed runs."""
    n = 512 if tiny else 8192
    dtype = torch.float32 if tiny else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------
# FLOPs


def count_flops(model, seqs: list[Sequence]) -> dict[str, float]:
    """Forward FLOPs of the useful work on `seqs` by part (a training step is 3x)."""
    text_cfg, vision_cfg = model.config.text_config, model.config.vision_config
    decoder = model.model.language_model
    text_matrix = sum(p.numel() for p in decoder.layers.parameters() if p.ndim >= 2)
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    q_width = text_cfg.num_attention_heads * head_dim
    tokens = sum(s.num_tokens for s in seqs)
    responses = sum(s.response_length for s in seqs)
    causal_pairs = sum(s.num_tokens * (s.num_tokens + 1) // 2 for s in seqs)

    visual = model.model.visual
    per_patch = sum(p.numel() for p in visual.blocks.parameters() if p.ndim >= 2)
    per_patch += sum(p.numel() for p in visual.patch_embed.parameters() if p.ndim >= 2)
    per_merged = sum(
        p.numel()
        for name, m in visual.named_children()
        if "merger" in name
        for p in m.parameters()
        if p.ndim >= 2
    )
    merge = vision_cfg.spatial_merge_size
    grids = [g.tolist() for s in seqs if s.image_grid_thw is not None for g in s.image_grid_thw]
    patches = sum(t * h * w for t, h, w in grids)
    full_blocks = set(getattr(vision_cfg, "fullatt_block_indexes", None) or range(vision_cfg.depth))
    window = getattr(vision_cfg, "window_size", 0) // merge // vision_cfg.patch_size
    vision_pairs = 0
    for t, h, w in grids:
        full = (t * h * w) ** 2
        windowed = full
        if window:
            rows = _splits(h // merge, window)
            cols = _splits(w // merge, window)
            windowed = t * sum((r * c * merge * merge) ** 2 for r in rows for c in cols)
        vision_pairs += len(full_blocks) * full + (vision_cfg.depth - len(full_blocks)) * windowed
    flops = {
        "decoder_matmul": 2 * text_matrix * tokens,
        "lm_head": 2 * model.lm_head.weight.numel() * responses,
        "decoder_attention": 4 * q_width * causal_pairs * text_cfg.num_hidden_layers,
        "vision_matmul": 2 * per_patch * patches + 2 * per_merged * patches // merge**2,
        "vision_attention": 4 * vision_cfg.hidden_size * vision_pairs,
    }
    flops["total_forward"] = sum(flops.values())
    return {k: float(v) for k, v in flops.items()}


def _splits(n: int, size: int) -> list[int]:
    return [min(size, n - start) for start in range(0, n, size)]


# --------------------------------------------------------------------------------------------
# measurements


def set_checkpointing(model, decoder: bool, vision: bool) -> None:
    model.train()
    if not (decoder or vision):
        model.gradient_checkpointing_disable()
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.model.language_model.layers:
        layer.gradient_checkpointing = decoder
    for block in model.model.visual.blocks:
        block.gradient_checkpointing = vision


def train_step(model, seqs, plan, forward, pad_token_id, chunk_size) -> None:
    """Forward + backward of every micro-batch with a GRPO-like token-mean loss (no optimizer step)."""
    model.zero_grad(set_to_none=True)
    num_tokens = sum(s.response_length for s in seqs)
    for group in plan:
        if not group:
            continue
        micro = [seqs[i] for i in group]
        logp, entropy, mask = forward(model, micro, pad_token_id, 1.0, chunk_size, with_entropy=True)
        advantages = torch.linspace(-1, 1, len(micro), device=logp.device)[:, None]
        loss = -((logp * advantages + 1e-3 * entropy) * mask).sum() / num_tokens
        loss.backward()


def timed(device, fn, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    reset_memory(device)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"seconds": float(np.mean(times)), "seconds_all": times, "peak_memory_gb": peak_gb(device)}


def summarize(result: dict, tokens: int, flops: float, rate: float) -> dict:
    result["tokens_per_s"] = tokens / result["seconds"]
    result["tflops"] = flops / result["seconds"] / 1e12
    result["mfu"] = flops / result["seconds"] / rate
    return result


def padded_plan(n: int, micro_batch: int) -> list[list[int]]:
    return [list(range(i, min(i + micro_batch, n))) for i in range(0, n, micro_batch)]


def plan_stats(plan, seqs, padded: bool) -> dict:
    loads = [sum(seqs[i].num_tokens for i in g) for g in plan if g]
    stats = {"num_micro_batches": len(loads), "max_tokens": max(loads), "min_tokens": min(loads)}
    if padded:
        stats["padded_tokens"] = sum(len(g) * max(seqs[i].num_tokens for i in g) for g in plan if g)
    return stats


def head_memory(device, hidden_size: int, vocab_sizes, token_counts, chunk_size: int, dtype) -> list[dict]:
    """Peak memory of the logprob head alone over (tokens, vocab): chunked vs full logits."""
    rows = []
    for vocab in vocab_sizes:
        head = torch.nn.Linear(hidden_size, vocab, bias=False, device=device, dtype=dtype)
        for num in token_counts:
            hidden = torch.randn(num, hidden_size, device=device, dtype=dtype)
            targets = torch.randint(0, vocab, (num,), device=device)
            row = {"vocab": vocab, "tokens": num}
            for mode in ("chunked", "full"):
                reset_memory(device)
                base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                try:
                    with torch.no_grad():
                        if mode == "chunked":
                            token_logprobs(hidden, head, targets, 1.0, chunk_size, with_entropy=True)
                        else:
                            logits = F.linear(hidden, head.weight).float()  # (N, V)
                            log_probs = logits.log_softmax(-1)
                            log_probs.gather(-1, targets[:, None])
                            -(log_probs.exp() * log_probs).sum(-1)
                            del logits, log_probs
                    sync(device)
                    peak = peak_gb(device)
                    row[f"{mode}_extra_gb"] = None if peak is None else peak - base / 2**30
                except torch.OutOfMemoryError:
                    row[f"{mode}_extra_gb"] = "OOM"
            rows.append(row)
            del hidden, targets
        del head
    return rows


def profile_table(device, fn, rows: int = 20) -> str:
    """The top kernels of one call of `fn` by device time (CPU time on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    averages = prof.key_averages()
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ()
    for key in (*keys, "self_cpu_time_total"):
        try:
            return averages.table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError, RuntimeError):
            continue
    return averages.table(row_limit=rows)


# --------------------------------------------------------------------------------------------
# main


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU: use --tiny for the CPU smoke test")
    results: dict = {
        "args": vars(args),
        "env": {"torch": torch.__version__, "python": platform.python_version()},
        "sections": {},
        "notes": [
            "bf16 parameters, forward+backward only (no optimizer step): fp32 master + AdamW does not fit",
            "MFU = useful model FLOPs / time / measured bf16 matmul rate; checkpoint recompute not counted",
        ],
    }
    import transformers

    results["env"]["transformers"] = transformers.__version__
    if device.type == "cuda":
        results["env"]["device"] = torch.cuda.get_device_name(device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=2, default=str))

    def section(name: str):
        @contextlib.contextmanager
        def run():
            log(f"--- {name}")
            t0 = time.perf_counter()
            try:
                yield
            except Exception as error:  # keep going: every section reports on its own
                results["sections"][name] = {"error": f"{type(error).__name__}: {error}"}
                log(f"{name} FAILED: {type(error).__name__}: {error}")
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                reset_memory(device)
                log(f"{name} took {time.perf_counter() - t0:.1f}s")
                save()

        return run()

    with section("matmul"):
        rate = measure_matmul_rate(device, args.tiny)
        results["matmul_tflops"] = rate / 1e12
        log(f"measured matmul rate: {rate / 1e12:.1f} TFLOP/s")
    rate = results.get("matmul_tflops", 989.0) * 1e12

    log("building model and batch")
    torch.manual_seed(args.seed)
    model, processor = build_model(args)
    seqs = build_batch(processor, model.config.text_config.vocab_size, args)
    pad = processor.pad_token_id
    tokens = sum(s.num_tokens for s in seqs)
    lengths = [s.num_tokens for s in seqs]
    responses = [s.response_length for s in seqs]
    flops = count_flops(model, seqs)
    train_flops, fwd_flops = 3 * flops["total_forward"], flops["total_forward"]
    results["batch"] = {
        "num_seqs": len(seqs),
        "tokens": tokens,
        "response_tokens": sum(responses),
        "prompt_tokens_mean": float(np.mean([s.prompt_length for s in seqs])),
        "prompt_text_tokens_mean": float(np.mean([s.prompt_length - _image_tokens(s) for s in seqs])),
        "response_mean": float(np.mean(responses)),
        "response_p50": float(np.median(responses)),
        "response_max": max(responses),
        "seq_max": max(lengths),
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_flops": flops,
        "train_step_flops": train_flops,
    }
    log(
        f"batch: {len(seqs)} seqs, {tokens} tokens (responses mean {np.mean(responses):.0f}, max "
        f"{max(responses)}), {train_flops / 1e12:.0f} TFLOP per training step"
    )
    save()

    def padded_forward(model, micro, pad_id, temperature, chunk, with_entropy=False):
        return forward_response_logprobs(model, micro, pad_id, temperature, chunk, with_entropy)

    def packed_forward(model, micro, pad_id, temperature, chunk, with_entropy=False):
        return forward_response_logprobs(model, micro, pad_id, temperature, chunk, with_entropy, packed=True)

    table = []  # (name, result)

    if not args.skip_padded:
        with section("padded_train"):
            plan = padded_plan(len(seqs), args.padded_micro_batch)
            set_checkpointing(model, True, True)
            r = timed(
                device,
                lambda: train_step(model, seqs, plan, padded_forward, pad, args.chunk_size),
                args.steps,
                args.warmup,
            )
            r.update(plan_stats(plan, seqs, padded=True))
            results["sections"]["padded_train"] = summarize(r, tokens, train_flops, rate)
            table.append((f"padded train (mb {args.padded_micro_batch}, sdpa, ckpt)", r))
            log(_row(table[-1]))
        model.zero_grad(set_to_none=True)

    if not args.skip_logprob and not args.skip_padded:
        with section("padded_logprob"):
            plan = padded_plan(len(seqs), args.padded_micro_batch)
            model.eval()

            def padded_logprob():
                with torch.no_grad():
                    for group in plan:
                        forward_response_logprobs(model, [seqs[i] for i in group], pad, 1.0, args.chunk_size)

            r = summarize(timed(device, padded_logprob, args.steps, args.warmup), tokens, fwd_flops, rate)
            results["sections"]["padded_logprob"] = r
            table.append((f"padded logprob (mb {args.padded_micro_batch}, no grad)", r))
            log(_row(table[-1]))

    enable_packed_attention(model)

    def packed_train_sections(suffix: str = "", note: str = "", nogc_budget: int = args.nogc_max_tokens) -> None:
        variants = []
        if not args.skip_packed:
            variants.append(("packed_train", "packed train ({} tok, ckpt)", args.max_tokens, True))
        if not args.skip_nogc:
            variants.append(
                ("packed_train_nockpt", "packed train ({} tok, ckpt vision only)", nogc_budget, False)
            )
        for key, label, budget, decoder_ckpt in variants:
            key = key + suffix
            with section(key):
                set_checkpointing(model, decoder_ckpt, True)
                for attempt in range(2):  # on OOM, once more with half the budget
                    out_of_memory = False
                    try:
                        plan = plan_micro_batches(lengths, budget)
                        r = timed(
                            device,
                            lambda plan=plan: train_step(model, seqs, plan, packed_forward, pad, args.chunk_size),
                            args.steps,
                            args.warmup,
                        )
                        break
                    except torch.OutOfMemoryError:
                        if attempt:
                            raise
                        out_of_memory = True
                    if out_of_memory:  # outside the handler, so the failed step's tensors are gone
                        model.zero_grad(set_to_none=True)
                        reset_memory(device)
                        log(f"{key}: out of memory at {budget} tokens per micro-batch, retrying with {budget // 2}")
                        budget //= 2
                r.update(plan_stats(plan, seqs, padded=False), budget=budget, decoder_checkpointing=decoder_ckpt)
                results["sections"][key] = summarize(r, tokens, train_flops, rate)
                table.append((label.format(budget) + note, r))
                log(_row(table[-1]))
            model.zero_grad(set_to_none=True)

    def packed_logprob_section(suffix: str = "", note: str = "") -> None:
        with section("packed_logprob" + suffix):
            model.eval()

            def packed_logprob():
                with torch.no_grad():
                    return micro_batched_response_logprobs(
                        model, seqs, args.logprob_max_tokens, 1.0, args.chunk_size
                    )

            r = summarize(timed(device, packed_logprob, args.steps, args.warmup), tokens, fwd_flops, rate)
            r["budget"] = args.logprob_max_tokens
            # the same numbers as the padded pass (bf16 on GPU: mean |delta| of order 1e-2)
            with torch.no_grad():
                packed = packed_logprob()
                padded = torch.cat(
                    [
                        forward_response_logprobs(
                            model, [seqs[i] for i in g], pad, 1.0, args.chunk_size, width=packed.shape[1]
                        )[0].cpu()
                        for g in padded_plan(len(seqs), args.padded_micro_batch)
                    ]
                )
            mask = torch.arange(packed.shape[1]) < torch.tensor(responses)[:, None]
            r["mean_abs_diff_vs_padded"] = float((packed - padded).abs()[mask].mean())
            results["sections"]["packed_logprob" + suffix] = r
            table.append((f"packed logprob ({args.logprob_max_tokens} tok, no grad)" + note, r))
            log(_row(table[-1]) + f"  mean |dlogp| vs padded {r['mean_abs_diff_vs_padded']:.2e}")

    if not args.skip_eager:
        packed_train_sections()
        if not args.skip_logprob:
            packed_logprob_section()

    best_packed = max(
        (
            results["sections"][k]
            for k in ("packed_train_nockpt", "packed_train")
            if "budget" in results["sections"].get(k, {})
        ),
        key=lambda r: r["tokens_per_s"],
        default=None,
    )
    decoder_ckpt = best_packed is None or best_packed["decoder_checkpointing"]
    budget = best_packed["budget"] if best_packed else args.max_tokens

    def profile_section(key: str) -> None:
        with section(key):
            plan = plan_micro_batches(lengths, budget)
            set_checkpointing(model, decoder_ckpt, True)
            first = [plan[0]]
            train_step(model, seqs, first, packed_forward, pad, args.chunk_size)  # warm
            text = profile_table(
                device, lambda: train_step(model, seqs, first, packed_forward, pad, args.chunk_size)
            )
            results["sections"][key] = {
                "budget": budget,
                "decoder_checkpointing": decoder_ckpt,
                "micro_batch_tokens": sum(lengths[i] for i in plan[0]),
                "table": text,
            }
            print(text, flush=True)
        model.zero_grad(set_to_none=True)

    if not args.skip_profile:
        profile_section("profile")

    if not args.skip_compile:  # lensrl's model.compile: compiled blocks and logprob head
        with section("compile"):
            results["num_compiled_blocks"] = compile_blocks(model)
            compile_head()
        packed_train_sections("_compiled", " + compile", args.compiled_nogc_max_tokens)
        if not args.skip_logprob:
            packed_logprob_section("_compiled", " + compile")
        if not args.skip_profile:
            profile_section("profile_compiled")

    if not args.skip_head:
        with section("head_memory"):
            hidden_size = model.config.text_config.hidden_size
            vocab = model.lm_head.weight.shape[0]
            dtype = model.lm_head.weight.dtype
            if device.type == "cuda":
                model.to("meta")  # free the GPU for the sweep (last section)
            counts = [64, 256] if args.tiny else [2048, 8192, 32768]
            vocabs = [vocab, 2 * vocab] if args.tiny else [vocab // 2, vocab, 2 * vocab]
            rows = head_memory(device, hidden_size, vocabs, counts, args.chunk_size, dtype)
            results["sections"]["head_memory"] = {"chunk_size": args.chunk_size, "rows": rows}
            for row in rows:
                log(
                    f"head memory V={row['vocab']:>6} N={row['tokens']:>6}: chunked {_gb(row['chunked_extra_gb'])}"
                    f"  full logits {_gb(row['full_extra_gb'])}"
                )

    print_table(results, table)
    save()
    log(f"wrote {out}")
    return results


def _gb(value) -> str:
    return value if isinstance(value, str) else ("n/a" if value is None else f"{value:6.2f} GB")


def _row(entry) -> str:
    name, r = entry
    peak = r.get("peak_memory_gb")
    return (
        f"{name:44s} {r['tokens_per_s']:9.0f} {100 * r['mfu']:6.1f}% {r['seconds']:7.2f}s "
        f"{'n/a' if peak is None else f'{peak:6.1f}':>7}"
    )


def print_table(results: dict, table) -> None:
    print(flush=True)
    print(f"{'':44s} {'tokens/s':>9} {'MFU':>7} {'s/step':>8} {'peak GB':>7}")
    for entry in table:
        print(_row(entry))
    s = results["sections"]
    base = s.get("padded_train", {}).get("tokens_per_s")
    trains = [
        s[k]
        for k in ("packed_train", "packed_train_nockpt", "packed_train_compiled", "packed_train_nockpt_compiled")
        if "tokens_per_s" in s.get(k, {})
    ]
    if base and trains:
        best = max(trains, key=lambda r: r["tokens_per_s"])
        results["speedup_packed_vs_padded"] = best["tokens_per_s"] / base
        results["best_packed_mfu"] = best["mfu"]
        print(
            f"packed vs padded training: {best['tokens_per_s'] / base:.2f}x, best packed MFU "
            f"{100 * best['mfu']:.1f}% (targets: >= 4x, >= 45%)"
        )
    logprobs = [s[k] for k in ("packed_logprob", "packed_logprob_compiled") if "tokens_per_s" in s.get(k, {})]
    if "tokens_per_s" in s.get("padded_logprob", {}) and logprobs:
        ratio = max(r["tokens_per_s"] for r in logprobs) / s["padded_logprob"]["tokens_per_s"]
        results["speedup_logprob_packed_vs_padded"] = ratio
        print(f"packed vs padded logprob pass: {ratio:.2f}x")
    print(
        f"matmul rate {results.get('matmul_tflops', float('nan')):.2f} TFLOP/s; "
        f"batch {results['batch']['tokens']} tokens",
        flush=True,
    )


if __name__ == "__main__":
    main()
