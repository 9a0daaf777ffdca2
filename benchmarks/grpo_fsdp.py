"""Full GRPO steps under FSDP2 on real model shapes: memory report (issue 6) and scaling (issue 7).

    python benchmarks/grpo_fsdp.py --out runs/bench/grpo_fsdp                 # one GPU: the memory report
    python benchmarks/grpo_fsdp.py --nproc 1 2 --cases 3b --out DIR           # scaling, same per-GPU batch
    python benchmarks/grpo_fsdp.py --tiny --out /tmp/grpo_fsdp                # CPU smoke test (gloo)

Each case is the real command a user runs, `torchrun --nproc-per-node N -m lensrl grpo ...` with
`trainer.fsdp.enable=always`, on random weights of a real shape and rendered geometry problems
(448x448 images, 256 image tokens each), the engine rollout backend, a fixed number of steps.
Every case runs in its own process group; one that fails (OOM) is recorded as such and the
next one runs. From each run's metrics.jsonl (steps after the first, which includes warm-up and
CUDA graph capture) it prints: peak GPU memory, step time and its split (generation / old
logprob / update / weight sync), tokens/s per GPU, MFU and the time to first step (from the
command's start to the first step's record in metrics.jsonl: model build, compilation, graph
capture and the step itself; `--runs 2` runs each case again, reusing the compile caches).

Cases (--cases):
  3b        Qwen2.5-VL-3B shape, fp32 master weights, bf16 compute (FSDP mixed precision)
  3b-gc     the same with gradient checkpointing
  3b-gcv    3b-gc with model.gradient_checkpointing_scope=vision: the decoder keeps its activations
  3b-gcv-8k 3b-gcv with 8,192-token micro-batches (half the activation memory)
  3b-gcv-24k  3b-gcv with 24,576-token micro-batches (4 a step instead of 6)
  3b-gcv-nofsdp  3b-gcv without FSDP (trainer.fsdp.enable=never): fp32 parameters, bf16 autocast
  3b-gcv-step 3b-gcv with trainer.fsdp.reduce_grads=per_step and reshard_after_forward=false
  3b-gc-step  3b-gc with trainer.fsdp.reduce_grads=per_step and reshard_after_forward=false
  3b-gc-kl  3b-gc with algorithm.use_kl_loss=true: the reference in bf16 (ref.dtype=auto)
  3b-gc-kl-fp32ref  the same with the reference in fp32, as the policy's master weights (the old behaviour)
  7b-fp32   Qwen2.5-VL-7B shape, fp32 master weights, gradient checkpointing (does it fit?)
  7b-offload  fp32 master weights with parameters, gradients and AdamW state in host memory
  moe-12l   the Qwen3-VL-30B-A3B widths at 12 of its 48 layers (8.64B parameters), fp32 master weights,
            gradient checkpointing: the MoE shape's GRPO step where it fits (two 141 GB GPUs)
  3b-lora   the 3B with LoRA (rank 64, bf16 frozen base, fp32 adapters, KL to the base): beside 3b-gc
  7b-lora   the 7B with LoRA, the same settings: does a 7B LoRA GRPO step fit one H200, and how fast
  moe-4l    the same widths at 4 layers (3.65B parameters): the MoE GRPO step on one 141 GB GPU
  q3-4b     Qwen3-VL-4B shape, fp32 master weights, gradient checkpointing (the largest published
            Qwen-VL dense model whose 16 bytes a parameter, 71 GB, leave room on one 141 GB GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMON = [
    "rollout.backend=engine", "rollout.n=8", "rollout.max_new_tokens=256", "rollout.temperature=1.0",
    "rollout.gpu_memory_utilization=0.3", "trainer.rollout_batch_size={prompts}", "actor.mini_batch_size={prompts}",
    "actor.max_tokens_per_mbs=16384", "actor.optim.lr=1e-6", "reward.num_workers=4", "data.max_prompt_length=512",
    "trainer.total_steps={steps}", "trainer.test_freq=0", "trainer.val_before_train=false", "trainer.save_hf=false",
    "trainer.save_last=false", "trainer.save_freq=0", "trainer.loggers=[jsonl]", "trainer.fsdp.enable=always",
]

CASES = {
    "3b": ["model.path=qwen2_5_vl_3b"],
    "3b-gc": ["model.path=qwen2_5_vl_3b", "model.gradient_checkpointing=true"],
    "3b-gcv": ["model.path=qwen2_5_vl_3b", "model.gradient_checkpointing=true", "model.gradient_checkpointing_scope=vision"],
    # 3b-gcv with each FSDP unit gathered once per step and its gradients reduced once (one rank:
    # FSDP's per-micro-batch copies and casts move nothing)
    "3b-gcv-step": ["model.path=qwen2_5_vl_3b", "model.gradient_checkpointing=true",
                    "model.gradient_checkpointing_scope=vision", "trainer.fsdp.reduce_grads=per_step",
                    "trainer.fsdp.reshard_after_forward=false"],
    # 3b-gcv without FSDP (one rank only): fp32 parameters under bf16 autocast, no per-unit copies
    "3b-gcv-nofsdp": ["model.path=qwen2_5_vl_3b", "model.gradient_checkpointing=true",
                      "model.gradient_checkpointing_scope=vision", "trainer.fsdp.enable=never"],
    # 3b-gcv with 24,576-token micro-batches: 4 instead of 6 per step (fewer host calls per token)
    "3b-gcv-24k": ["model.path=qwen2_5_vl_3b", "model.gradient_checkpointing=true",
                   "model.gradient_checkpointing_scope=vision", "actor.max_tokens_per_mbs=24576"],
    "3b-gcv-8k": ["model.path=qwen2_5_vl_3b", "model.gradient_checkpointing=true",
                  "model.gradient_checkpointing_scope=vision", "actor.max_tokens_per_mbs=8192"],
    # each FSDP unit gathered and its gradients reduced once per optimizer step, not per micro-batch
    "3b-gc-step": ["model.path=qwen2_5_vl_3b", "model.gradient_checkpointing=true", "trainer.fsdp.reduce_grads=per_step",
                   "trainer.fsdp.reshard_after_forward=false"],
    # with a KL term: the frozen reference in bf16 (ref.dtype=auto on GPU), or in fp32 as it was before
    "3b-gc-kl": ["model.path=qwen2_5_vl_3b", "model.gradient_checkpointing=true", "algorithm.use_kl_loss=true"],
    "3b-gc-kl-fp32ref": ["model.path=qwen2_5_vl_3b", "model.gradient_checkpointing=true", "algorithm.use_kl_loss=true",
                         "ref.dtype=float32"],
    "7b-fp32": ["model.path=qwen2_5_vl_7b", "model.gradient_checkpointing=true"],
    "7b-offload": ["model.path=qwen2_5_vl_7b", "model.gradient_checkpointing=true", "trainer.fsdp.offload_params=true"],
    "moe-12l": ["model.path=qwen3_vl_30b_a3b_12l", "model.gradient_checkpointing=true"],
    "moe-4l": ["model.path=qwen3_vl_30b_a3b_4l", "model.gradient_checkpointing=true"],
    # LoRA (issue 19): rank-64 adapters on the language model, the frozen base in bf16, KL to the base
    "3b-lora": ["model.path=qwen2_5_vl_3b", "model.gradient_checkpointing=true", "model.lora.rank=64",
                "model.lora.alpha=64", "model.dtype=bfloat16", "actor.optim.lr=1e-5", "algorithm.use_kl_loss=true"],
    "7b-lora": ["model.path=qwen2_5_vl_7b", "model.gradient_checkpointing=true", "model.lora.rank=64",
                "model.lora.alpha=64", "model.dtype=bfloat16", "actor.optim.lr=1e-5", "algorithm.use_kl_loss=true"],
    "q3-4b": ["model.path=qwen3_vl_4b", "model.gradient_checkpointing=true"],
    "tiny": ["rollout.backend=hf", "rollout.max_new_tokens=16"],
}


def _live_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that are not zombies (Linux /proc)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def _wait_group_gone(pgid: int, limit_s: float = 60.0) -> None:
    """Kill what is left of a timed-out case's process group and wait until none of it runs, so the
    next case does not start beside a dying rank that still holds GPU memory (an OOM in session 10)."""
    deadline = time.time() + limit_s
    while time.time() < deadline and _live_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, 9)
        time.sleep(0.5)


def run_case(name: str, nproc: int, data: Path, out: Path, prompts: int, steps: int, extra: list[str],
             timeout: float, run_name: str | None = None) -> dict:
    run_name = run_name or f"{name}_n{nproc}"
    overrides = [o.format(prompts=prompts * nproc, steps=steps) for o in COMMON] + CASES[name] + extra + [
        f"data.train_files=[{data / 'train.parquet'}]", f"trainer.output_dir={out}", f"trainer.run_name={run_name}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "lensrl",
           "grpo", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0"}
    metrics_file = out / run_name / "metrics.jsonl"
    log_file = out / f"{run_name}.log"
    metrics_file.unlink(missing_ok=True)  # a stale file from an earlier run in the same folder is not this run's first step
    start = time.time()
    first_step_s = None  # command start -> the first step's record in metrics.jsonl (model build, compile, graphs)
    with open(log_file, "w") as log_out:
        proc = subprocess.Popen(cmd, stdout=log_out, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                                start_new_session=True)  # its own process group: a timeout kills the ranks too
        while proc.poll() is None:
            if first_step_s is None and metrics_file.exists() and metrics_file.stat().st_size > 0:
                first_step_s = round(time.time() - start, 1)
            if time.time() - start > timeout:
                os.killpg(proc.pid, 9)
                break
            time.sleep(0.2)
        rc = proc.wait()
        rc = 124 if rc in (-9, 137) and time.time() - start > timeout else rc
        if rc == 124:  # a killed rank frees its GPU memory only once it is gone
            _wait_group_gone(proc.pid)
    log = log_file.read_text()
    result = {"case": name, "nproc": nproc, "rc": rc, "wall_s": round(time.time() - start, 1),
              "time_to_first_step_s": first_step_s, "run": run_name, "command": " ".join(cmd)}
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    if rc != 0:
        oom = "out of memory" in log.lower() or "OutOfMemoryError" in log
        errors = [line for line in log.splitlines() if "Error" in line and "ChildFailedError" not in line]
        result["error"] = "OOM" if oom else (errors[-1][:300] if errors else "see log")
    result["steps"] = len(records)
    profiled = {int(x) for o in extra if o.startswith("trainer.profile_steps=")
                for x in o.split("=", 1)[1].strip("[]").split(",") if x.strip()}
    timed = [r for r in records[1:] if r["step"] not in profiled] or records  # no warm-up, no profiler
    if timed:
        def mean(key):
            values = [r[key] for r in timed if key in r]
            return round(statistics.mean(values), 4) if values else None

        result.update({
            "peak_mem_gb": max(r.get("perf/max_memory_allocated_gb", 0.0) for r in records),
            "step_s": mean("timing_s/step"), "gen_s": mean("timing_s/gen"), "old_logprob_s": mean("timing_s/old_log_prob"),
            "update_s": mean("timing_s/update_actor"), "weight_sync_s": mean("timing_s/update_weights"),
            "tokens_per_s_per_gpu": mean("perf/throughput_per_gpu"), "mfu": mean("perf/mfu/actor"),
            "loss": [r.get("actor/loss") for r in records], "reward": [r.get("critic/score/mean") for r in records],
            "response_length": mean("response_length/mean"), "ref_s": mean("timing_s/ref"),
            # every phase of the step, this rank's (rank 0) and the slowest rank's
            "split": {k[len("timing_s/"):]: mean(k) for k in sorted(timed[-1]) if k.startswith("timing_s/")},
            # where the time to the first step went: the trainer's set-up phases and step 1's own phases
            "first_step_split": {k[len("timing_s/"):]: round(v, 2) for k, v in sorted(records[0].items())
                                 if k.startswith("timing_s/") and "slowest" not in k},
        })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="+", default=["3b", "3b-gc", "7b-fp32"])
    parser.add_argument("--nproc", nargs="+", type=int, default=[1])
    parser.add_argument("--prompts", type=int, default=16, help="prompts per GPU per step (x rollout.n=8)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=420)
    parser.add_argument("--runs", type=int, default=1,
                        help="run each case this many times (the second reuses the compile caches: time to first step)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny model")
    parser.add_argument("extra", nargs="*", help="more key=value overrides for every case")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from lensrl.data.synth import make_synth

    data = out / "geo"
    if not (data / "train.parquet").exists():
        make_synth("geo", 256, 0, data, image_size=448, n_test=8)
    extra = list(args.extra)
    cases = args.cases
    if args.tiny:
        from lensrl.models.tiny import make_tiny_model

        model = make_tiny_model(out / "tiny_model", preset="1m")
        cases, extra = ["tiny"], [f"model.path={model}", "trainer.device=cpu", *extra]
        args.prompts, args.steps = 2, 2
    results = []
    for case in cases:
        for nproc in args.nproc:
            for k in range(args.runs):
                run_name = f"{case}_n{nproc}" + (f"_r{k + 1}" if args.runs > 1 else "")
                result = run_case(case, nproc, data, out, args.prompts, args.steps, extra, args.timeout, run_name)
                results.append(result)
                print(json.dumps(result), flush=True)
                (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'case':<11} {'N':>2} {'rc':>3} {'peak GB':>8} {'step s':>7} {'gen':>6} {'logp':>6} {'update':>7} "
          f"{'sync':>6} {'tok/s/GPU':>10} {'MFU':>6} {'1st step':>8}")
    for r in results:
        def f(key, fmt="{:.2f}", r=r):
            return fmt.format(r[key]) if r.get(key) is not None else "-"

        print(f"{r['case']:<11} {r['nproc']:>2} {r['rc']:>3} {f('peak_mem_gb', '{:.1f}'):>8} {f('step_s'):>7} "
              f"{f('gen_s'):>6} {f('old_logprob_s'):>6} {f('update_s'):>7} {f('weight_sync_s', '{:.3f}'):>6} "
              f"{f('tokens_per_s_per_gpu', '{:.0f}'):>10} {f('mfu', '{:.3f}'):>6} "
              f"{f('time_to_first_step_s', '{:.0f}s'):>8}  {r.get('error', '')}")
    for r in results:
        if r.get("split"):
            print(f"split {r['case']} N={r['nproc']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["split"].items()))
    ones = {r["case"]: r for r in results if r["nproc"] == 1 and r.get("tokens_per_s_per_gpu")}
    for r in results:
        base = ones.get(r["case"])
        if r["nproc"] > 1 and base and r.get("tokens_per_s_per_gpu"):
            print(f"scaling efficiency {r['case']} N={r['nproc']}: "
                  f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.3f}")


if __name__ == "__main__":
    main()
