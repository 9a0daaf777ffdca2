"""Same training at any rank count, on real shapes: GRPO at 2 ranks against 1 rank, a checkpoint
saved at 2 ranks resumed at 1, and that checkpoint converted to a Hugging Face folder.

    python benchmarks/grpo_ranks.py --out DIR                 # two GPUs: Qwen2.5-VL-3B shape, bf16 compute
    python benchmarks/grpo_ranks.py --out DIR --tiny          # CPU smoke test (gloo, tiny model)
    python benchmarks/grpo_ranks.py --out DIR2 --steps 4 --resume-only DIR/ranks.json   # two, resume, convert only

Runs (each `torchrun ... -m lensrl grpo ...`, FSDP2 at every rank count, so the rank count is the
only difference; the same global batch and `rollout.seed`):
  one        1 rank (GPU 0)
  one_split  1 rank with another micro-batch split (actor.max_tokens_per_mbs; GPU 1, beside `one`)
  two        2 ranks, a checkpoint every 5 steps
  resume     1 rank, resumed from two's checkpoint at step 5, runs step 6
and then `lensrl convert` of two's last checkpoint, whose logits are compared on the GPU with the
policy loaded from the same checkpoint the way the trainer resumes it, and whose weights are
compared with the folder the 2-rank run wrote at its end.

The reward is configs/rewards/letter_share.py (`reward.function`): the share of letters in the
completion, which a random-weight model earns in varying amounts, so every step has a signal. The tolerance of each metric is derived from the
1-rank run against itself with another micro-batch split (the largest difference over the steps,
at least float tolerance): in bf16 that split changes rounding, later weights and, through them, what is
sampled, which is as much as 2 ranks may change. Prints the table, writes ranks.json and ranks.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = ("critic/score/mean", "actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/ppo_kl")


def compare_logits(ckpt: str, converted: str, device: str) -> dict:
    """Logits of the converted folder (plain transformers) against the policy loaded from the DCP
    checkpoint as the trainer resumes it, fp32, on a rendered geometry prompt."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from transformers import AutoModelForImageTextToText

    from lensrl.config import GRPOConfig, load_config
    from lensrl.data.datasets import load_dataset
    from lensrl.models.load import load_policy
    from lensrl.models.rope import mm_token_type_ids

    cfg = load_config(GRPOConfig, str(Path(ckpt).parents[1] / "config.yaml"), [])
    live, processor = load_policy(cfg.model.path, dtype=torch.float32, device=torch.device(device))
    state = get_model_state_dict(live)
    dcp.load({"model": state}, checkpoint_id=ckpt)
    set_model_state_dict(live, state)
    plain = AutoModelForImageTextToText.from_pretrained(converted, dtype=torch.float32).to(device).eval()
    data = load_dataset(cfg.data.train_files, cfg.data, split_name="train", length_fn=processor.prompt_length)
    p = processor(data[0])
    ids = p.input_ids[None]
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
              "mm_token_type_ids": mm_token_type_ids(ids, processor.image_token_id).to(device),
              "pixel_values": p.pixel_values.to(device), "image_grid_thw": p.image_grid_thw.to(device)}
    live.eval()
    with torch.no_grad():
        a = live(**inputs).logits.float()
        b = plain(**inputs).logits.float()
    return {"logits_max_abs_diff": (a - b).abs().max().item(),
            "logits_rel_norm_diff": ((a - b).norm() / a.norm()).item(), "logits_shape": list(a.shape)}


def launch(name: str, nproc: int, overrides: list[str], gpus: str | None, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lensrl", "grpo", *overrides, f"trainer.run_name={name}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    log = open(out / f"{name}.log", "w")
    print(f"[{time.strftime('%H:%M:%S')}] start {name}: {' '.join(cmd[-8:])}", flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait(procs: dict[str, subprocess.Popen], out: Path, timeout: float) -> dict[str, int]:
    rcs = {}
    deadline = time.time() + timeout
    for name, proc in procs.items():
        try:
            rcs[name] = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rcs[name] = 124
        if rcs[name] == 0:
            status = "ok"
        else:  # the error lines anywhere in the log (torchrun's own traceback hides the cause at the end)
            log = (out / f"{name}.log").read_text(errors="replace").splitlines()
            errors = [line for line in log if ("Error" in line or "error:" in line) and "ChildFailedError" not in line]
            status = f"FAILED rc={rcs[name]}:\n" + "\n".join(errors[:8] + log[-15:])
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {status}", flush=True)
    return rcs


def read(run: Path) -> dict[int, dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines()) if "actor/pg_loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (global), x rollout.n=8")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--model", default="qwen2_5_vl_3b")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny model")
    parser.add_argument("--resume-only", metavar="RANKS_JSON",
                        help="only two, resume and convert, judged by the tolerances of an earlier full run's ranks.json")
    parser.add_argument("--timeout", type=float, default=330, help="seconds per stage")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import shutil

    for stale in ("one", "one_split", "two", "resume", "converted"):  # an earlier run's would resume or be compared
        shutil.rmtree(out / stale, ignore_errors=True)
    earlier = json.loads(Path(args.resume_only).read_text()) if args.resume_only else None
    from lensrl.data.synth import make_synth

    data = out / "geo"
    if not (data / "train.parquet").exists():
        make_synth("geo", 256, 0, data, image_size=448, n_test=8)
    model, device, gpu = args.model, "auto", ["0", "1"]
    if args.tiny:
        from lensrl.models.tiny import make_tiny_model

        model, device, gpu = str(make_tiny_model(out / "tiny_model", preset="1m")), "cpu", [None, None]
        args.prompts, args.max_new_tokens = 4, 8
        args.steps = min(args.steps, 3)
    else:
        from lensrl.models.shapes import shape_dir

        shape_dir(model)  # made once here, not by four runs at once
    half = args.steps // 2
    common = [
        f"model.path={model}", f"data.train_files=[{data / 'train.parquet'}]", "data.max_prompt_length=512",
        "rollout.n=8", f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.temperature=1.0", "rollout.seed=5",
        "rollout.gpu_memory_utilization=0.2", f"trainer.rollout_batch_size={args.prompts}",
        f"actor.mini_batch_size={args.prompts // 2}", "actor.optim.lr=1e-6", "actor.max_tokens_per_mbs=16384",
        "model.gradient_checkpointing=true", "trainer.fsdp.reduce_grads=per_step", "trainer.fsdp.reshard_after_forward=false",
        f"trainer.total_steps={args.steps}", "trainer.test_freq=0", "trainer.save_hf=false",
        "trainer.val_before_train=false", f"trainer.save_freq={half}", "trainer.save_limit=0",
        "trainer.loggers=[jsonl]", "trainer.fsdp.enable=always", f"trainer.device={device}",
        f"trainer.output_dir={out}", "reward.num_workers=1",
        f"reward.function={ROOT / 'configs' / 'rewards' / 'letter_share.py'}:letter_share",
    ]
    if args.tiny:
        common += ["rollout.backend=hf", "rollout.batch_size=8", "actor.max_tokens_per_mbs=256"]  # 1 prompt a call
    split = "actor.max_tokens_per_mbs=" + ("96" if args.tiny else "6144")
    one_only = ["trainer.save_freq=0", "trainer.save_last=false"]
    t0 = time.time()
    rcs = {}
    if not earlier:
        rcs |= wait({"one": launch("one", 1, common + one_only, gpu[0], out),
                     "one_split": launch("one_split", 1, common + one_only + [split], gpu[1], out)}, out, args.timeout)
    rcs |= wait({"two": launch("two", 2, common, None, out)}, out, args.timeout)
    ckpt = out / "two" / "checkpoints" / f"step_{half}"
    resume = [*common, *one_only, f"trainer.total_steps={half + 1}", f"trainer.resume={ckpt}"]
    stage = {"resume": launch("resume", 1, resume, gpu[0], out)}
    converted = out / "converted"
    convert_rc = subprocess.run([sys.executable, "-m", "lensrl", "convert", "--ckpt", str(ckpt), "--out",
                                 str(converted)], cwd=ROOT, capture_output=True, text=True)
    print(f"convert rc={convert_rc.returncode} {convert_rc.stderr[-500:] if convert_rc.returncode else ''}")
    logits = {}
    if convert_rc.returncode == 0:
        if gpu[1] is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu[1]
        import torch

        logits = compare_logits(str(ckpt), str(converted), "cuda" if torch.cuda.is_available() else "cpu")
        print("convert:", json.dumps(logits))
    rcs |= wait(stage, out, args.timeout)
    runs = {name: read(out / name) for name in ("one", "one_split", "two", "resume")}
    report(runs, half, out, logits, rcs, time.time() - t0, earlier)


def rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else float("nan")


def tolerances(one: dict, split: dict, n: int) -> dict[str, dict]:
    """From the 1-rank run against itself with another micro-batch split, per metric: sigma, the
    rms of the per-step differences (their scale once bf16 rounding has changed what is sampled);
    `series`, the bound on the rms of n per-step differences of another pair of runs that differ
    only in rounding: sigma x sqrt(F(0.99; n, n)), a 1% false-alarm test that the two sets of
    differences have the same variance; `single`, the bound on one step's difference: 3 sigma.
    At least float tolerance each (fp32 runs: the split changes only summation order)."""
    from scipy.stats import f as f_dist

    factor = math.sqrt(f_dist.ppf(0.99, n, n))
    out = {}
    for k in METRICS:
        floor = 1e-5 + 1e-4 * max((abs(r[k]) for r in one.values()), default=0.0)
        sigma = rms([split[s][k] - one[s][k] for s in one if s in split])
        out[k] = {"sigma": sigma, "series": max(sigma * factor, floor), "single": max(3 * sigma, floor)}
    return out


def report(runs, half, out: Path, logits: dict, rcs: dict, wall: float, earlier: dict | None) -> None:
    one, split, two, resumed = runs["one"], runs["one_split"], runs["two"], runs["resume"]
    result = {"rcs": rcs, "wall_s": round(wall, 1), "convert": logits}
    if earlier:  # resume only: the tolerances of the full run
        tolerance = earlier["tolerance"]
    else:
        tolerance = tolerances(one, split, len([s for s in one if s in two]))
        rows, diffs = [], {k: [] for k in METRICS}
        print(f"\n{'step':>4} " + " ".join(f"{k + ' 1 | 2 rank':>34}" for k in METRICS[:3]))
        for s in sorted(one):
            if s not in two:
                continue
            print(f"{s:>4} " + " ".join(f"{one[s][k]:>16.6g} | {two[s][k]:<15.6g}" for k in METRICS[:3]))
            rows.append({"step": s, **{f"{k}|{name}": run.get(s, {}).get(k) for k in METRICS
                                       for name, run in (("one", one), ("two", two), ("one_split", split))}})
            for k in METRICS:
                diffs[k].append(two[s][k] - one[s][k])
        print(f"\n{'metric':<16} {'rms |2 - 1 rank|':>17} {'max':>9} {'sigma (1 rank, other split)':>28} "
              f"{'bound on rms':>13}  within")
        within = {}
        for k in METRICS:
            within[k] = rms(diffs[k]) <= tolerance[k]["series"]
            print(f"{k:<16} {rms(diffs[k]):>17.3g} {max(map(abs, diffs[k]), default=float('nan')):>9.3g} "
                  f"{tolerance[k]['sigma']:>28.3g} {tolerance[k]['series']:>13.3g}  {within[k]}")
        result |= {"within": within, "rms_two_vs_one": {k: rms(v) for k, v in diffs.items()}, "steps": rows}
    result["tolerance"] = tolerance
    resume_check = {}
    if half + 1 in resumed and half + 1 in two:
        for k in METRICS:
            d = abs(resumed[half + 1][k] - two[half + 1][k])
            resume_check[k] = {"two": two[half + 1][k], "resumed_at_one": resumed[half + 1][k], "diff": d,
                               "bound": tolerance[k]["single"], "within": d <= tolerance[k]["single"]}
        print(f"\nstep {half + 1}, saved at 2 ranks and resumed at 1 vs uninterrupted 2 ranks (bound: 3 sigma):")
        for k, v in resume_check.items():
            print(f"  {k:<18} {v['two']:.6g} vs {v['resumed_at_one']:.6g}  |diff| {v['diff']:.3g} "
                  f"bound {v['bound']:.3g}  within {v['within']}")
    result["resume"] = resume_check
    (out / "ranks.json").write_text(json.dumps(result, indent=2))
    if earlier:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, k in zip(axes, METRICS[:3]):
            for name, run, style in (("1 rank", one, "o-"), ("1 rank, other split", split, "s:"), ("2 ranks", two, "x--")):
                xs = sorted(run)
                ax.plot(xs, [run[s][k] for s in xs], style, label=name, markersize=4)
            if resumed:
                ax.plot(sorted(resumed), [resumed[s][k] for s in sorted(resumed)], "k*", markersize=10,
                        label="saved at 2, resumed at 1")
            ax.set_title(k)
            ax.set_xlabel("step")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / "ranks.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
