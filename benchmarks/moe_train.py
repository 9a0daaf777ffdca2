"""Packed forward+backward of the Qwen3-VL-30B-A3B mixture-of-experts text stack, by experts kernel.

    python benchmarks/moe_train.py --out moe_train.json                # one H200, ~2-3 minutes
    python benchmarks/moe_train.py --tiny --out /tmp/moe_train.json    # CPU smoke test, < 1 minute

The real transformers `Qwen3VLMoeForConditionalGeneration`, built with the widths of
`lensrl.models.shapes.SHAPES["qwen3_vl_30b_a3b"]` (hidden 2048, 32 heads / 4 kv heads of 128, every
layer sparse: 128 experts, top-8, expert width 768) at `--layers` decoder layers (default 4) and a
one-block vision tower (unused: it is there because `compile_blocks` expects the whole model).
Random weights, bf16 on CUDA (fp32 on the CPU). Only the text model runs (`model.model.language_model`;
it has no LM head). Input: `--tokens` random token ids as sequences of `--seq-len`, packed into one
row by `lensrl.train.packing.pack_sequences` (text positions restart per sequence) and run through
lensrl's packed attention (`enable_packed_attention`: varlen FlashAttention on CUDA), as the
trainer runs them. Loss: mean of the final hidden states; backward to every parameter, no
activation checkpointing, no optimizer step. Variants, on the same weights and batch:

  grouped_mm  transformers' experts_implementation "grouped_mm" (torch grouped GEMM), eager modules
  loop        transformers' per-expert Python loop ("eager": the experts class's own forward)
  lensrl      what lensrl's trainer runs: the kernel `use_grouped_experts` picks (grouped_mm on an
              H200) + `compile_blocks` (torch.compile of every decoder layer; skipped on the CPU
              unless --compile-on-cpu)

Seconds are the median of `--iters` timed iterations (synchronize + perf_counter) after `--warmup`
ones; peak memory (CUDA) is over the timed iterations and includes weights and gradients. The
table ends with the speedups lensrl / grouped_mm and grouped_mm / loop, and at the published
setting (4 layers, 16,384 tokens) each variant against the published figures below.

FLOPs (per fwd+bwd, model FLOPs, no recomputation):
    6 * N_active * T  +  sum over sequences of 12 * layers * L_i^2 / 2 * heads * head_dim
N_active counted from the built text model: attention projections and q/k norms, router, layer
norms and final norm in full, expert weights times top_k / num_experts; the token embedding is
not counted (a lookup), and the text model has no LM head. T: tokens; L_i: sequence lengths.
TFLOP/s are reported with and without the attention term, and as a fraction of a bf16 8192^3
matmul measured in the same run (fp32 on the CPU).

Published baseline (the issue): transformers 5.17 on one H200, these widths at 4 layers, 16,384
tokens, bf16, fwd+bwd: library grouped_mm 0.176 s = 127 TFLOP/s active, its per-expert loop
0.793 s = 28 TFLOP/s. Those figures are 6 * N_active * T alone (no attention term): compare them
with `tflops_no_attn`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import measure_matmul_rate, sync  # noqa: E402  (benchmarks/, the script's own folder)

from lensrl.models.compile import compile_blocks, uncompile_blocks  # noqa: E402
from lensrl.models.load import build_random_model, experts_implementation, language_model  # noqa: E402
from lensrl.models.shapes import SHAPES, build_config  # noqa: E402
from lensrl.models.tiny import PRESETS, TINY_EXPERTS_PER_TOKEN, TINY_NUM_EXPERTS  # noqa: E402
from lensrl.models.tokenizer import tiny_special_token_ids  # noqa: E402
from lensrl.train.attention import enable_packed_attention, packed_attention_calls  # noqa: E402
from lensrl.train.packing import pack_sequences  # noqa: E402

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as lensrl's CLI
START = time.perf_counter()
BASELINE = {"grouped_mm": {"seconds": 0.176, "tflops": 127.0}, "loop": {"seconds": 0.793, "tflops": 28.0}}
LOOP_NAMES = ("eager",)  # transformers 5: the experts class's own forward is the per-expert loop


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="moe_train.json", help="JSON file for all figures")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny widths, 2 layers, 256 tokens")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation included)")
    p.add_argument("--variants", default="grouped_mm,loop,lensrl")
    p.add_argument("--compile-on-cpu", action="store_true", help="run the lensrl variant's compile on CPU")
    p.add_argument("--seed", type=int, default=0)
    if p.parse_known_args(argv)[0].tiny:  # smaller defaults; flags given still win
        p.set_defaults(layers=2, tokens=256, seq_len=64, iters=1, warmup=1)
    return p.parse_args(argv)


def build_model(args, device: torch.device):
    """The conditional-generation model at `--layers` decoder layers and a one-block vision tower."""
    shape = SHAPES["qwen3_vl_30b_a3b"]
    text, vision = dict(shape.text), dict(shape.vision)
    token_ids = tiny_special_token_ids()
    if args.tiny:  # lensrl.models.tiny's "5m" widths and expert counts
        t = PRESETS["5m"]
        text.update(hidden_size=t.hidden_size, num_attention_heads=t.num_attention_heads,
                    num_key_value_heads=t.num_key_value_heads,
                    head_dim=t.hidden_size // t.num_attention_heads,
                    num_experts=TINY_NUM_EXPERTS, num_experts_per_tok=TINY_EXPERTS_PER_TOKEN,
                    moe_intermediate_size=t.intermediate_size // TINY_NUM_EXPERTS,
                    vocab_size=(max(token_ids.values()) // 64 + 1) * 64)
        vision.update(hidden_size=t.vision_hidden_size, intermediate_size=t.vision_intermediate_size,
                      num_heads=t.vision_heads, num_position_embeddings=256)
    text["num_hidden_layers"] = args.layers
    vision.update(depth=1, deepstack_visual_indexes=[0])
    config = build_config(shape.arch, text, vision, token_ids, shape.tie_word_embeddings)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_random_model(config, dtype, device, seed=args.seed)
    enable_packed_attention(model)
    return model.train()


def build_batch(args, vocab_size: int, device: torch.device) -> tuple[dict, list[int]]:
    """One packed row (`pack_sequences`) of random text-only sequences; returns (inputs, lengths)."""
    full, rest = divmod(args.tokens, args.seq_len)
    lengths = [args.seq_len] * full + ([rest] if rest else [])
    gen = torch.Generator().manual_seed(args.seed)
    seqs = [
        SimpleNamespace(  # a text-only prompt as pack_sequences reads it: ids, (3, L) rope positions
            input_ids=torch.randint(0, vocab_size, (n,), generator=gen),
            position_ids=torch.arange(n).expand(3, n),
            pixel_values=None,
        )
        for n in lengths
    ]
    return pack_sequences(seqs, device), lengths


def count_flops(text_model: torch.nn.Module, lengths: list[int]) -> dict:
    cfg = text_model.config
    share = cfg.num_experts_per_tok / cfg.num_experts
    active = total = experts = 0
    for name, p in text_model.named_parameters():
        total += p.numel()
        if name.startswith("embed_tokens."):
            continue
        if ".mlp.experts." in name:
            experts += p.numel()
            active += p.numel() * share
        else:
            active += p.numel()
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    attn = sum(12 * cfg.num_hidden_layers * n * n / 2 * heads * head_dim for n in lengths)
    dense = 6 * active * sum(lengths)
    return {"params_total": total, "params_experts": experts, "params_active": int(active),
            "embedding_counted": False, "lm_head": "none (text model)",
            "flops_dense": dense, "flops_attention": attn, "flops": dense + attn}


def set_experts(model, name: str) -> str:
    """Switch the experts kernel; returns what the experts modules now dispatch to."""
    model.set_experts_implementation(name)
    used = {layer.mlp.experts.config._experts_implementation for layer in language_model(model).layers}
    if used != {name}:
        raise RuntimeError(f"asked transformers for experts_implementation {name!r}, the layers run {used}")
    return name


def loop_name() -> str:
    """The name of transformers' per-expert loop: a name transformers accepts that no registered
    kernel replaces (so the experts class's own forward, the loop, runs)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    for name in LOOP_NAMES:
        if name not in ALL_EXPERTS_FUNCTIONS:
            return name
    raise RuntimeError(f"no per-expert loop among {LOOP_NAMES}; registered: {sorted(ALL_EXPERTS_FUNCTIONS)}")


def time_fwd_bwd(model, inputs: dict, device: torch.device, layers: int, iters: int, warmup: int) -> dict:
    text_model = language_model(model)

    def step() -> float:
        hidden = text_model(**inputs, use_cache=False).last_hidden_state
        loss = hidden.float().mean()
        loss.backward()
        return loss.detach()

    model.zero_grad(set_to_none=True)
    calls = packed_attention_calls()
    warmup_times = []  # the first includes compilation (lensrl variant)
    for i in range(max(warmup, 1)):
        sync(device)
        t0 = time.perf_counter()
        loss = float(step()) if i == 0 else step()
        sync(device)
        warmup_times.append(time.perf_counter() - t0)
        if i == 0 and packed_attention_calls() - calls != layers:
            raise RuntimeError(f"packed attention ran {packed_attention_calls() - calls} times for {layers} layers")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds": statistics.median(times), "seconds_all": times, "warmup_seconds": warmup_times,
            "peak_memory_gb": peak, "loss": loss}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU: use --tiny for the CPU smoke test")
    import transformers

    results: dict = {"args": vars(args), "variants": {},
                     "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=2, default=str))

    rate = measure_matmul_rate(device, tiny=device.type != "cuda")  # bf16 8192^3 on CUDA, fp32 512^3 on the CPU
    results["matmul_tflops"] = rate / 1e12
    log(f"matmul rate ({'bf16' if device.type == 'cuda' else 'fp32'}): {rate / 1e12:.2f} TFLOP/s")
    torch.manual_seed(args.seed)
    model = build_model(args, device)
    text_model = language_model(model)
    inputs, lengths = build_batch(args, text_model.config.vocab_size, device)
    flops = count_flops(text_model, lengths)
    results["model"] = {**flops, "layers": args.layers, "tokens": sum(lengths), "sequences": len(lengths),
                        "seq_len": args.seq_len, "num_experts": text_model.config.num_experts,
                        "top_k": text_model.config.num_experts_per_tok}
    log(f"{args.layers} layers, {flops['params_total'] / 1e9:.3f} B text parameters, "
        f"{flops['params_active'] / 1e9:.4f} B active (embedding excluded); {sum(lengths)} tokens as "
        f"{len(lengths)} x {args.seq_len}; {flops['flops'] / 1e12:.3f} TFLOP per fwd+bwd")
    save()

    def run(variant: str) -> dict:
        if variant == "grouped_mm":
            info = {"experts_implementation": set_experts(model, "grouped_mm"), "compiled": False}
        elif variant == "loop":
            info = {"experts_implementation": set_experts(model, loop_name()), "compiled": False}
        elif variant == "lensrl":
            info = {"experts_implementation": set_experts(model, experts_implementation(device))}
            if device.type == "cpu" and not args.compile_on_cpu:
                return {**info, "skipped": "no torch.compile on the CPU (pass --compile-on-cpu)"}
            info["compiled_blocks"] = compile_blocks(model)
            info["compiled"] = True
        else:
            raise ValueError(f"unknown variant {variant!r}")
        try:
            r = time_fwd_bwd(model, inputs, device, args.layers, args.iters, args.warmup)
        finally:
            uncompile_blocks(model)  # the next variant runs eager whatever the order
        s = r["seconds"]
        return {**info, **r, "tokens_per_s": sum(lengths) / s, "tflops": flops["flops"] / s / 1e12,
                "tflops_no_attn": flops["flops_dense"] / s / 1e12, "fraction_of_matmul": flops["flops"] / s / rate}

    for variant in args.variants.split(","):
        log(f"--- {variant}")
        try:
            results["variants"][variant] = run(variant)
        except Exception as error:  # noqa: BLE001 (each variant reports on its own)
            traceback.print_exc()
            results["variants"][variant] = {"error": f"{type(error).__name__}: {error}"}
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"{variant}: {summary(results['variants'][variant])}")
        save()

    report(results)
    save()
    log(f"wrote {out}")
    return results


def summary(r: dict) -> str:
    if "seconds" not in r:
        return r.get("error") or f"skipped: {r.get('skipped')}"
    peak = "" if r["peak_memory_gb"] is None else f", peak {r['peak_memory_gb']:.1f} GB"
    return f"{r['seconds']:.4f} s, {r['tflops']:.2f} TFLOP/s, loss {r['loss']:.6f}{peak}"


def report(results: dict) -> None:
    v = results["variants"]
    print(f"\n{'variant':11s} {'experts':19s} {'s/fwd+bwd':>10} {'TFLOP/s':>8} {'no attn':>8} "
          f"{'of matmul':>9} {'peak GB':>8}")
    for name, r in v.items():
        if "seconds" not in r:
            print(f"{name:11s} {summary(r)}")
            continue
        peak = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        print(f"{name:11s} {r['experts_implementation'] + (' +compile' if r['compiled'] else ''):19s} "
              f"{r['seconds']:10.4f} {r['tflops']:8.2f} {r['tflops_no_attn']:8.2f} "
              f"{100 * r['fraction_of_matmul']:8.1f}% {peak:>8}")
    m = results["model"]
    seconds = {name: r["seconds"] for name, r in v.items() if "seconds" in r}
    pairs = [("lensrl / grouped_mm", "grouped_mm", "lensrl"), ("grouped_mm / loop", "loop", "grouped_mm")]
    if not results["args"]["tiny"] and (m["layers"], m["tokens"]) == (4, 16384):  # the published setting
        pairs += [(f"{name} vs published {base}", f"published {base}", name)
                  for name, base in (("grouped_mm", "grouped_mm"), ("loop", "loop"), ("lensrl", "grouped_mm"))]
        seconds.update({f"published {name}": b["seconds"] for name, b in BASELINE.items()})
    ratios = {}
    for label, slow, fast in pairs:
        if slow in seconds and fast in seconds:
            ratios[label] = seconds[slow] / seconds[fast]
            print(f"speedup {label}: {ratios[label]:.2f}x")
    results["speedups"] = ratios
    print(f"published (transformers 5.17, H200, 4 layers, 16384 tokens, no attention term): grouped_mm "
          f"0.176 s = 127 TFLOP/s, loop 0.793 s = 28 TFLOP/s\nthis run: {m['layers']} layers, "
          f"{m['tokens']} tokens; matmul {results['matmul_tflops']:.2f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
