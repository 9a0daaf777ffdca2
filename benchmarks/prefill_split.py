"""Where the engine's prefill time goes: vision tower vs text model vs the rest (issue 4).

    python benchmarks/prefill_split.py                 # one H100, ~1 minute
    python benchmarks/prefill_split.py --compile --prefill-tokens 16384 32768
    python benchmarks/prefill_split.py --tiny          # CPU smoke run

The rollout benchmark's workload (Qwen2.5-VL-3B shape, random weights, bf16, 256 prompts of one
448x448 image + ~50 text tokens). Times, warm, with CUDA synchronisation:
  prefill   the engine's prefill of all prompts (generate with max_new_tokens=1)
  vision    the vision tower alone on the same images, in the same chunks
  text      the text model alone on the same packed rows, image features given as embeddings
  glue      the vision tower's index bookkeeping alone (rope position ids, attention and window
            cu_seqlens, window index: transformers computes them per image, in Python)
--compile runs lensrl's model.compile first (as the trainers do on CUDA); --prefill-tokens
repeats the engine's prefill at other token budgets per prefill call.
and the FLOPs each would need, as a fraction of the bf16 peak (989 TFLOPS dense on an H100).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rollout import make_prompts  # noqa: E402

from lensrl.config import RolloutConfig  # noqa: E402
from lensrl.models.load import load_policy  # noqa: E402
from lensrl.rollout.base import SamplingParams  # noqa: E402
from lensrl.rollout.engine import EngineRollout  # noqa: E402

PEAK = 989e12


def timed(fn, device, repeats: int = 2) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="lensrl.models.compile first")
    parser.add_argument("--prefill-tokens", type=int, nargs="*", default=[], help="more prefill budgets")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        from lensrl.models.tiny import make_tiny_model

        folder = make_tiny_model("/tmp/prefill_split_tiny", preset="5m")
        model, processor = load_policy(folder, dtype=dtype, device=device)
        args.prompts, side = 8, 112
    else:
        model, processor = load_policy("qwen2_5_vl_3b", dtype=dtype, device=device)
        side = 448
    prompts = make_prompts(processor, args.prompts, side, 50)
    if args.compile:
        from lensrl.models.compile import compile_blocks

        compile_blocks(model)
    engine = EngineRollout(model, processor, RolloutConfig(gpu_memory_utilization=0.5))
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=1, seed=0)
    with torch.no_grad():
        prefill = timed(lambda: engine.generate(prompts, params), device)
        for budget in args.prefill_tokens:
            other = EngineRollout(model, processor, RolloutConfig(gpu_memory_utilization=0.5), prefill_tokens=budget)
            print(f"prefill at {budget} tokens per call: {timed(lambda other=other: other.generate(prompts, params), device):.3f} s",
                  flush=True)
            del other
        visual = model.model.visual
        budget = engine.prefill_tokens
        chunks, chunk, size = [], [], 0
        for p in prompts:  # the engine's packed chunks: prompts back to back up to the token budget
            if chunk and size + p.input_ids.shape[0] > budget:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(p)
            size += p.input_ids.shape[0]
        chunks.append(chunk)
        pixel_chunks = [(torch.cat([p.pixel_values for p in c]).to(device, dtype),
                         torch.cat([p.image_grid_thw for p in c]).to(device)) for c in chunks]
        vision = timed(lambda: [visual(px, grid_thw=g) for px, g in pixel_chunks], device)
        glue = timed(lambda: [_vision_glue(visual, g) for _, g in pixel_chunks], device)
        lm = model.model.language_model
        embeds = [lm.embed_tokens(torch.cat([p.input_ids for p in c]).unsqueeze(0).to(device)) for c in chunks]
        positions = []
        for c in chunks:
            text = torch.cat([torch.arange(p.input_ids.shape[0]) for p in c])
            mrope = torch.cat([p.position_ids for p in c], dim=1)
            positions.append(torch.cat([text.unsqueeze(0), mrope]).unsqueeze(1).to(device))
        text_s = timed(lambda: [lm(inputs_embeds=e, position_ids=pos, use_cache=False)
                                for e, pos in zip(embeds, positions)], device)
    tokens = sum(p.input_ids.shape[0] for p in prompts)
    patches = sum(int(p.image_grid_thw.prod()) for p in prompts)
    vision_params = sum(t.numel() for t in visual.parameters())
    text_params = sum(t.numel() for n, t in lm.named_parameters() if "embed_tokens" not in n)
    vision_flops, text_flops = 2 * vision_params * patches, 2 * text_params * tokens
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; {len(prompts)} prompts, "
          f"{tokens} prompt tokens, {patches} image patches, {len(chunks)} prefill calls")
    print(f"prefill (engine, all)      {prefill:7.3f} s")
    print(f"vision tower alone         {vision:7.3f} s   {vision_flops / 1e12:7.1f} TFLOP  "
          f"MFU {vision_flops / vision / PEAK:.2f}")
    print(f"  of which index glue      {glue:7.3f} s")
    print(f"text model alone           {text_s:7.3f} s   {text_flops / 1e12:7.1f} TFLOP  "
          f"MFU {text_flops / text_s / PEAK:.2f}")
    print(f"rest (KV writes, head)     {prefill - vision - text_s:7.3f} s")


def _vision_glue(visual, grid_thw):
    """The index bookkeeping of a Qwen2.5-VL vision forward (transformers' own helpers)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    config = visual.config
    m.get_vision_position_ids(grid_thw, visual.spatial_merge_size, kwargs={})
    m.get_vision_attention_seqlens(grid_thw, config, kwargs={})
    _, cu_window = m.get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                             window_size=visual.window_size, patch_size=visual.patch_size,
                                             kwargs={})
    m.get_max_seqlen(cu_window, config, kwargs={}, kwarg_name="max_window_seqlen")


if __name__ == "__main__":
    main()
