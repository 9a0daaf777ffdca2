"""lensrl's GRPO step against TRL's `GRPOTrainer` on the same workload, in one invocation (issue 17).

    python benchmarks/vs_trl.py --out runs/bench/vs_trl                   # one H200: both sides, the ratio
    python benchmarks/vs_trl.py --out DIR --skip-lensrl --steps 3         # TRL only
    python benchmarks/vs_trl.py --tiny --out /tmp/vs_trl                  # CPU smoke test (a few minutes)

TRL and its needs travel as wheels (`.whl_trl/`: trl 1.16.0, datasets 5.2.0, multiprocess 0.70.19,
dill 0.4.1; the GPU image has accelerate, psutil, pyarrow, xxhash, fsspec and torchvision). On the
device machine, carrying `.whl` (lensrl's needs) and `.whl_trl`:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl_trl/*.whl \
        && export PYTHONPATH=/tmp/site && python3 benchmarks/vs_trl.py --out $OUT/vs_trl

Workload, both sides: the Qwen2.5-VL-3B shape (`--shape`) with random weights, 16 prompts x 8
samples x 256 new tokens a step (`--prompts --n --new-tokens`), rendered geometry problems
(448x448 images, 256 image tokens, "Find x."), sampling at temperature 1, fp32 master weights
with bf16 compute, gradient checkpointing, AdamW lr 1e-6 (weight decay 0.01, clip 1.0, constant
schedule), no KL, clip 0.2/0.28, token-mean (DAPO) loss, one optimizer step over all 128
completions, a reward of random floats (so advantages are non-zero; `random_reward` below).

- lensrl: `benchmarks/grpo_fsdp.py`'s case `3b-gc` (its COMMON overrides: the engine backend,
  FSDP2 on one rank, packed micro-batches of 16,384 tokens), or `--lensrl-case 3b-gcv` (only the
  vision blocks recompute, the decoder keeps its activations: 115 GB on one H200 and a 1.4x faster
  step; TRL's side keeps full checkpointing), run by its `run_case` as
  `torchrun --nproc-per-node 1 -m lensrl grpo ...`; step time and split (gen / old logprob /
  update / weight sync) are the means of `timing_s/*` in metrics.jsonl over the steps after the first.
- TRL: `GRPOTrainer` in a subprocess of this script, on its default generation path
  (transformers `generate`, no vLLM, no continuous batching), the model passed as an object (the
  same random init, `lensrl.models.load.load_policy`) with the folder's `AutoProcessor`;
  per_device_train_batch_size `--trl-batch` (16) x gradient_accumulation_steps (8) = 128
  completions an optimizer step, generated in one `generate` call of 128 rows. Step time is
  between consecutive `on_step_end` callbacks (the first step is warm-up); generation is the time
  spent in `_generate_and_score_completions` (of which `generate` itself), training the rest.

What differs, by each framework's design (not fixable by a setting):
- Length: TRL's completions are forced to `--new-tokens` (`generation_kwargs={"min_new_tokens":
  ...}`, EOS masked until then). lensrl's GRPO config has no such option (`ignore_eos` exists only
  in the engine's SamplingParams), so its completions may end at EOS; a random-weight model's
  next-token distribution is near uniform over 151,936 ids, 2 of them EOS, so few do. Both mean
  response lengths are printed and tokens/s counts the tokens each side actually had.
- TRL generates with the fp32 training weights under bf16 autocast (each matmul casts its
  weights every decode step), puts each prompt in 8 rows (image preprocessing, the vision tower
  and prefill run 128 times, not 16) and pads to the longest row; lensrl prefills each prompt
  once and decodes from a bf16 copy with its own engine (CUDA graphs, paged KV cache), and
  compiles its decoder layers for training (`model.compile=auto`).
- TRL runs transformers' SDPA attention (its Qwen2.5-VL vision tower loops over windows) and
  trains on padded micro-batches of `--trl-batch` rows; lensrl trains packed (varlen
  FlashAttention) micro-batches under FSDP2 on one rank.
- Both skip the separate old-logprob pass when exactly on-policy (one epoch, one mini-batch), so
  neither computes one here.
- `--tiny`: a 5M-parameter tiny model, 4 prompts x 2 samples x 8 tokens, 2 steps, fp32 on the CPU
  (lensrl with its hf backend and gloo). Where torchvision is missing, TRL gets the same
  Qwen2.5-VL processor without its video half (transformers' video processor needs torchvision).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def random_reward(completion: str, sample: dict, **kwargs) -> float:
    """lensrl's reward (`reward.function=benchmarks/vs_trl.py:random_reward`): uniform noise."""
    return random.SystemRandom().random()


def trl_reward(completions: list, **kwargs) -> list[float]:
    """TRL's reward function: the same noise."""
    rng = random.SystemRandom()
    return [rng.random() for _ in completions]


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.mean(values), 4) if values else None


# ----------------------------------------------------------------------------------------------
# lensrl: the real command, through grpo_fsdp.run_case
# ----------------------------------------------------------------------------------------------


def run_lensrl(args, data: Path, out: Path, model: str) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from grpo_fsdp import run_case

    case = "tiny" if args.tiny else args.lensrl_case
    extra = [f"model.path={model}", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.new_tokens}",
             f"reward.function={Path(__file__).resolve()}:random_reward"]
    if args.tiny:
        extra += ["trainer.device=cpu", "reward.num_workers=1"]
    result = run_case(case, 1, data, out, args.prompts, args.steps, extra, args.timeout)
    keep = {k: result[k] for k in ("rc", "wall_s", "command", "error", "peak_mem_gb", "loss") if k in result}
    metrics_file = out / f"{case}_n1" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    timed = records[1:] or records  # the first step holds warm-up and CUDA graph capture

    def m(*keys):  # the first of these keys the run logged (names as lensrl writes them, then older ones)
        for key in keys:
            if any(key in r for r in timed):
                return mean(r.get(key) for r in timed)
        return None

    keep.update(steps=len(records), timed_steps=len(timed), step_s=m("timing_s/step"), gen_s=m("timing_s/gen"),
                old_logprob_s=m("timing_s/old_log_prob", "timing_s/old_logprob"),
                update_s=m("timing_s/update_actor", "timing_s/update"),
                weight_sync_s=m("timing_s/update_weights", "timing_s/weight_sync"),
                response_length=m("response_length/mean"), prompt_length=m("prompt_length/mean"),
                tokens_per_s=m("perf/throughput"), reward=[r.get("critic/score/mean") for r in records],
                split={k[len("timing_s/"):]: m(k) for k in sorted(timed[-1]) if k.startswith("timing_s/")
                       and "/slowest/" not in k} if timed else {})
    return keep


# ----------------------------------------------------------------------------------------------
# TRL: GRPOTrainer in its own process (--trl-worker), results to OUT/trl.json
# ----------------------------------------------------------------------------------------------


def trl_processor(folder: Path):
    """The folder's processor as TRL loads it; without torchvision (the CPU smoke test), the same
    Qwen2.5-VL processor less its video processor."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder, padding_side="left", truncation_side="left")
    except ImportError:
        from transformers import AutoTokenizer, ProcessorMixin, Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        class ImageOnlyProcessor(Qwen2_5_VLProcessor):
            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
                self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
                self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
                ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left", truncation_side="left")
        images = Qwen2VLImageProcessorPil.from_pretrained(folder)
        return ImageOnlyProcessor(images, tokenizer, tokenizer.chat_template)


def trl_worker(args, data: Path, out: Path, model_path: str, folder: Path) -> None:
    import io

    import datasets
    import pyarrow.parquet as pq
    import torch
    import trl
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lensrl.models.load import load_policy

    cuda = torch.cuda.is_available() and not args.tiny
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = pq.read_table(data / "train.parquet").to_pylist()
    dataset = datasets.Dataset.from_dict({  # TRL's conversational VLM layout: a prompt and an image column
        "prompt": [[{"role": "user", "content": r["problem"].replace("<image>", "")}] for r in rows],
        "image": [Image.open(io.BytesIO(r["images"][0]["bytes"])).convert("RGB") for r in rows]})
    model, _ = load_policy(model_path, torch.float32, "cuda" if cuda else "cpu")
    total = args.prompts * args.n
    batch = min(args.trl_batch, total)
    while total % batch:
        batch -= 1
    config = GRPOConfig(
        output_dir=str(out / "trl_run"), max_steps=args.steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=total // batch, num_generations=args.n, max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0, learning_rate=1e-6,
        lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0, beta=0.0, epsilon=0.2,
        epsilon_high=0.28, loss_type="dapo", bf16=cuda, use_cpu=not cuda, gradient_checkpointing=True,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, seed=1)
    times: dict[str, list[float]] = {"begin": [], "end": []}
    per_step: dict[int, dict[str, float]] = {}
    logged: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync()
            times["begin"].append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            sync()
            times["end"].append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            logged.append(dict(logs or {}))

    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=config, train_dataset=dataset,
                          processing_class=trl_processor(folder), callbacks=[Clock()])

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            result = fn(*a, **kw)
            sync()
            entry = per_step.setdefault(trainer.state.global_step, {})
            entry[name] = entry.get(name, 0.0) + time.perf_counter() - start
            if name == "gen_score":  # the whole step's batch: its tokens and lengths
                prompt, completion = result["prompt_mask"].sum(1).float(), result["completion_mask"].sum(1).float()
                entry["tokens"] = entry.get("tokens", 0.0) + float(prompt.sum() + completion.sum())
                entry["completion_len"] = float(completion.mean())
                entry["prompt_len"] = float(prompt.mean())
            return result
        return wrapper

    trainer._generate_and_score_completions = timed("gen_score", trainer._generate_and_score_completions)
    trainer._generate_single_turn = timed("generate", trainer._generate_single_turn)
    trainer.train()
    ends, begins = times["end"], times["begin"]
    steps = []
    for k in range(len(ends)):
        s = per_step.get(k, {})
        wall = ends[k] - ends[k - 1] if k else None
        inner = ends[k] - begins[k]
        steps.append({"step": k + 1, "wall_s": wall, "inner_s": inner, "gen_s": s.get("gen_score"),
                      "generate_s": s.get("generate"), "train_s": inner - s.get("gen_score", 0.0),
                      "tokens": s.get("tokens"), "completion_len": s.get("completion_len"),
                      "prompt_len": s.get("prompt_len")})
    timed_steps = steps[1:] or steps
    step_s = mean(s["wall_s"] or s["inner_s"] for s in timed_steps)
    result = {"rc": 0, "trl_version": trl.__version__, "per_device_train_batch_size": batch,
              "gradient_accumulation_steps": total // batch, "steps": len(steps), "timed_steps": len(timed_steps),
              "step_s": step_s, "inner_step_s": mean(s["inner_s"] for s in timed_steps),
              "gen_s": mean(s["gen_s"] for s in timed_steps), "generate_s": mean(s["generate_s"] for s in timed_steps),
              "train_s": mean(s["train_s"] for s in timed_steps),
              "response_length": mean(s["completion_len"] for s in timed_steps),
              "prompt_length": mean(s["prompt_len"] for s in timed_steps),
              "tokens_per_s": mean(s["tokens"] / (s["wall_s"] or s["inner_s"]) for s in timed_steps if s["tokens"]),
              "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "loss": [entry.get("loss") for entry in logged if "loss" in entry],
              "reward": [entry.get("reward") for entry in logged if "reward" in entry],
              "logged_step_time": [entry.get("step_time") for entry in logged if "step_time" in entry],  # TRL's own
              "per_step": steps}
    (out / "trl.json").write_text(json.dumps(result, indent=2))


def run_trl(args, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", "--out", str(out), "--steps", str(args.steps),
           "--prompts", str(args.prompts), "--n", str(args.n), "--new-tokens", str(args.new_tokens), "--shape",
           args.shape, "--trl-batch", str(args.trl_batch)] + (["--tiny"] if args.tiny else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    (out / "trl.json").unlink(missing_ok=True)
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else str(e.stdout or "")
    (out / "trl.log").write_text(log)
    result = json.loads((out / "trl.json").read_text()) if (out / "trl.json").exists() else {}
    result.update(rc=rc, wall_s=round(time.time() - start, 1), command=" ".join(cmd))
    if rc != 0:
        oom = "out of memory" in log.lower() or "OutOfMemoryError" in log
        errors = [line for line in log.splitlines() if "Error" in line]
        result["error"] = "OOM" if oom else (errors[-1][:300] if errors else "see trl.log")
    return result


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps a side (the first is warm-up)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--shape", default="qwen2_5_vl_3b")
    parser.add_argument("--trl-batch", type=int, default=16, help="TRL's per_device_train_batch_size")
    parser.add_argument("--timeout", type=float, default=480, help="seconds a side")
    parser.add_argument("--lensrl-case", default="3b-gc",
                        help="grpo_fsdp.py's case for lensrl's side: 3b-gc (checkpointing as TRL's), 3b-gcv (only the "
                             "vision blocks recompute, which a 141 GB GPU has room for) or 3b-gcv-24k (3b-gcv with "
                             "24,576-token micro-batches, 124 GB peak: the fastest on one H200)")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-lensrl", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny model")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from lensrl.models.shapes import shape_dir

    if args.tiny:
        args.prompts, args.n, args.new_tokens, args.steps = 4, 2, 8, 2
    data = out / "geo"
    model, folder = args.shape, None
    if args.tiny:
        model = folder = out / "tiny_model"
    if args.trl_worker:
        return trl_worker(args, data, out, str(model), folder or shape_dir(args.shape))
    if not (data / "train.parquet").exists():
        from lensrl.data.synth import make_synth

        make_synth("geo", 256, 0, data, image_size=448, n_test=8)
    if args.tiny and not (folder / "config.json").exists():
        from lensrl.models.tiny import make_tiny_model

        make_tiny_model(folder, preset="5m")
    results: dict = {"workload": {"shape": "tiny-5m" if args.tiny else args.shape, "prompts": args.prompts,
                                  "n": args.n, "new_tokens": args.new_tokens, "steps": args.steps}}

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=2))

    for side, skip, run in (("lensrl", args.skip_lensrl, lambda: run_lensrl(args, data, out, str(model))),
                            ("trl", args.skip_trl, lambda: run_trl(args, out))):
        if skip:
            continue
        try:
            results[side] = run()
        except Exception as e:  # a side that cannot even start is reported, and the other still runs
            results[side] = {"rc": -1, "error": f"{type(e).__name__}: {e}"}
        print(side, json.dumps({k: v for k, v in results[side].items() if k not in ("per_step", "command")}),
              flush=True)
        save()
    lens, trl_ = results.get("lensrl", {}), results.get("trl", {})
    if lens.get("step_s") and trl_.get("step_s"):
        results["ratio_trl_over_lensrl"] = round(trl_["step_s"] / lens["step_s"], 3)
        save()

    def f(r, key, fmt="{:.2f}"):
        return fmt.format(r[key]) if r.get(key) is not None else "-"

    print(f"\n{'side':<7} {'rc':>3} {'step s':>7} {'gen':>7} {'old logp':>8} {'update':>7} {'sync':>6} "
          f"{'resp len':>8} {'prompt len':>10} {'tok/s':>8} {'peak GB':>8}")
    for name, r in (("lensrl", lens), ("trl", trl_)):
        if r:
            update = "train_s" if name == "trl" else "update_s"
            print(f"{name:<7} {r.get('rc', '-'):>3} {f(r, 'step_s'):>7} {f(r, 'gen_s'):>7} {f(r, 'old_logprob_s'):>8} "
                  f"{f(r, update):>7} {f(r, 'weight_sync_s', '{:.3f}'):>6} {f(r, 'response_length', '{:.1f}'):>8} "
                  f"{f(r, 'prompt_length', '{:.1f}'):>10} {f(r, 'tokens_per_s', '{:.0f}'):>8} "
                  f"{f(r, 'peak_mem_gb', '{:.1f}'):>8}  {r.get('error', '')}")
    if trl_.get("generate_s") is not None:
        print(f"trl: generate() {trl_['generate_s']:.2f} s of gen {trl_['gen_s']:.2f} s; begin-to-end step "
              f"{trl_['inner_step_s']:.2f} s; micro-batch {trl_['per_device_train_batch_size']} x "
              f"{trl_['gradient_accumulation_steps']} accumulation; trl {trl_['trl_version']}")
    if lens.get("split"):
        print("lensrl split: " + ", ".join(f"{k} {v:.3f}" for k, v in lens["split"].items() if v is not None))
    if "ratio_trl_over_lensrl" in results:
        print(f"ratio TRL step / lensrl step: {results['ratio_trl_over_lensrl']:.2f}x")
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
