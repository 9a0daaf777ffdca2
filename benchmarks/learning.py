"""Learning at GPU scale (issue 18, point 6): does GRPO teach a from-scratch VLM what SFT left out?

    python benchmarks/learning.py --out runs/bench/learning            # one H200 (about 5 minutes)
    python benchmarks/learning.py --out DIR --skip-tis --seed 2        # the learning run only
    python benchmarks/learning.py --tiny --out /tmp/learning_tiny      # CPU smoke test (~5 minutes, 2 cores)

On the device machine (no network; lensrl's needs travel as wheels in `.whl/`):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site && python3 benchmarks/learning.py --out $OUT/learning

Every phase is the real command line in a subprocess (its log in OUT/logs/), the numbers come from
the runs' metrics.jsonl, and OUT/learning.json is rewritten after each phase. A phase that fails is
recorded (rc, last error line) and the phases that do not need its output still run.

1. setup: `lensrl model tiny --arch qwen2_5_vl --preset 50m` (a Qwen2.5-VL from random init, ~50M
   parameters) and `lensrl data synth --task count` (1 to 5 shapes on white: the answer is a number
   that exists only in the image; `angle` needs reading digits and arithmetic, too much from scratch).
2. sft: `lensrl sft --config lensrl/configs/tiny_demo_sft.yaml ...`, the demo's recipe: it stops once
   the mean loss of 5 steps is below its stop loss (0.15 in the recipe, 0.25 on the GPU: the model reads
   the image but has not mastered it).
3. grpo: `lensrl grpo --config lensrl/configs/tiny_demo_grpo.yaml model.path=RUNS/sft/hf ...` with
   validation before training and every `test_freq` steps. Held-out accuracy (greedy, `val/accuracy`)
   untrained (SFT's step-0 validation), after SFT, at GRPO's start and after GRPO; the gain is after
   GRPO minus GRPO's start. **Bar: a gain of >= 20 points on the GPU** (the tiny run only has to work).
4. tis: the same GRPO run again from the same SFT folder with `actor.importance_sampling_fix=true`
   (truncated importance sampling); step 3 is its `false` twin (lensrl's default). On CUDA the rollout
   runs in bf16 (engine backend) and training keeps fp32 master weights with bf16 autocast
   (`model.dtype=auto`), so the two policies differ and TIS has something to correct. On the CPU both
   are fp32 on one model (train_kl 0, weights 1): the two runs coincide. For each: final reward (mean
   `critic/score/mean` of the last 5 steps), last `val/accuracy`, mean `rollout/train_kl`,
   `rollout/is_weight_mean`, `rollout/is_clip_frac`.
5. report: `lensrl report RUNS/grpo_tis RUNS/grpo --out OUT/report`, both runs' curves in one page.

GPU sizes. 50m preset; 112-px images (16 image tokens, a shape spanning one or two 28-px tokens,
instead of 4 tokens each holding parts of several shapes); 20,000 train / 500 test images (an
accuracy's standard error <= 2.2 points); SFT at most 1,000 steps of 32 at lr 3e-4, stopping at a
mean loss of 0.25 (the policy counts, badly: ~38% held-out); GRPO 250 steps of 32 prompts x 8
samples, one mini-batch (exactly on-policy) at lr 3e-5, 16 new tokens at most, with DAPO's overlong
penalty from the 9th token on (`reward.overlong_buffer_len=8`); validation every 25 steps. The two
GRPO runs (TIS off and on) run at the same time, each with half the host's CPU threads: a 50M model
leaves the GPU mostly idle, and two such jobs with 16 threads each slowed SFT 20x. Why these
settings (H200, benchmarks/RESULTS.md, seventh to ninth sessions): SFT to loss 0.15 (70%) left GRPO
little to gain and it learnt to stop emitting EOS, hence the overlong penalty (which must start past
the answers' 5 tokens); SFT to 0.35 or 0.5 stops at chance (20%: format learnt, the image not
read) and GRPO never left it; at lr 1e-4 or 2e-4 the policy's entropy collapsed within 60 steps
(every group all right or all wrong: no gradient) with no gain, at 3e-5 and 1e-5 held-out rose
steadily (+9 points from the loss-0.2 start in 250 steps; +21 from the loss-0.25 start).
`--sft-set` / `--grpo-set key=value` override anything (`--grpo-set` applies to both GRPO runs);
`--steps-sft 2000` gives SFT more room.

Numbers go to benchmarks/RESULTS.md with the command, the device and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "lensrl" / "configs"
TASK = "count"

SIZES = {  # (setup, SFT and GRPO sizes and overrides) per mode
    "gpu": dict(preset="50m", n_train=20000, n_test=500, image_size=112, sft_steps=1000, grpo_steps=250, test_freq=25,
                sft=["optim.lr=3e-4", "optim.warmup_steps=20", "trainer.stop_at_loss=0.25"],
                grpo=["actor.optim.lr=3e-5", "trainer.rollout_batch_size=32", "actor.mini_batch_size=32",
                      "rollout.max_new_tokens=16", "reward.overlong_buffer_len=8"], together=True),
    # the demo's data sizes (lensrl/demo.py QUICK), fewer steps; count is not learned on the CPU: it only has to run
    "tiny": dict(preset="5m", n_train=2000, n_test=100, image_size=None, sft_steps=60, grpo_steps=20, test_freq=10,
                 sft=["trainer.device=cpu"], grpo=["trainer.device=cpu", "rollout.backend=hf"], together=False),
}
COMMON = ["trainer.resume=never", "trainer.save_last=false", "trainer.save_freq=0", "trainer.loggers=[console,jsonl]"]


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            pass
    return records


def val_points(records: list[dict]) -> list[tuple[int, float]]:
    return [(r.get("step", 0), r["val/accuracy"]) for r in records if "val/accuracy" in r]


def mean_of(records: list[dict], key: str, last: int | None = None) -> float | None:
    values = [r[key] for r in records if key in r]
    values = values[-last:] if last else values
    return round(statistics.mean(values), 6) if values else None


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0"}


class Bench:
    def __init__(self, out: Path, timeout: float):
        self.out, self.timeout = out, timeout
        self.result: dict = {"phases": {}}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        (self.out / "learning.json").write_text(json.dumps(self.result, indent=2))

    def phase(self, name: str, commands: list[list[str]]) -> bool:
        """Run `commands` one after another as phase `name`; False (and the error recorded) if one fails."""
        start, log_path = time.time(), self.out / "logs" / f"{name}.log"
        entry = {"commands": [" ".join(c) for c in commands], "log": str(log_path)}
        print(f"--- {name}: {' && '.join(' '.join(c[2:]) for c in commands)}", flush=True)
        env = _env()
        with open(log_path, "w") as log:
            for cmd in commands:
                try:
                    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                        timeout=self.timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = 124
                if rc != 0:
                    break
        return self._record(name, entry, rc, start, log_path)

    def phases_together(self, phases: dict[str, list[str]]) -> dict[str, bool]:
        """Run one command per phase, all at once (the two GRPO twins on one GPU: a 50M model leaves
        it mostly idle, so together they take about the time of one); {name: succeeded}."""
        start, env = time.time(), _env()
        procs = {}
        for name, cmd in phases.items():
            log_path = self.out / "logs" / f"{name}.log"
            print(f"--- {name} (together with {len(phases) - 1} other): {' '.join(cmd[2:])}", flush=True)
            log = open(log_path, "w")
            procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log,
                           log_path, {"commands": [" ".join(cmd)], "log": str(log_path)})
        done = {}
        for name, (proc, log, log_path, entry) in procs.items():
            try:
                rc = proc.wait(timeout=max(1.0, self.timeout - (time.time() - start)))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = 124
            log.close()
            done[name] = self._record(name, entry, rc, start, log_path)
        return done

    def _record(self, name: str, entry: dict, rc: int, start: float, log_path: Path) -> bool:
        entry.update(rc=rc, wall_s=round(time.time() - start, 1))
        if rc != 0:
            lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
            errors = [line for line in lines if "error" in line.lower()]
            entry["error"] = "timeout" if rc == 124 else (errors or lines or ["no output"])[-1][:300]
            print(f"    FAILED (rc {rc}): {entry['error']}  [log: {log_path}]", flush=True)
        print(f"    {name}: {entry['wall_s']:.0f}s", flush=True)
        self.result["phases"][name] = entry
        self.save()
        return rc == 0

    def skip(self, name: str, why: str) -> None:
        print(f"--- {name}: skipped ({why})", flush=True)
        self.result["phases"][name] = {"rc": None, "skipped": why, "wall_s": 0.0}
        self.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: 5m preset, the demo's sizes")
    parser.add_argument("--steps-sft", type=int, default=None, help="SFT steps at most (it stops earlier at its stop loss)")
    parser.add_argument("--steps-grpo", type=int, default=None, help="steps of each GRPO run")
    parser.add_argument("--skip-tis", action="store_true", help="no TIS-on run, no report")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per phase")
    parser.add_argument("--sft-set", nargs="*", default=[], metavar="KEY=VALUE", help="more SFT overrides")
    parser.add_argument("--grpo-set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides of both GRPO runs")
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "gpu"]
    sft_steps, grpo_steps = args.steps_sft or size["sft_steps"], args.steps_grpo or size["grpo_steps"]
    out = Path(args.out).resolve()
    model, data, runs = out / "model", out / "data", out / "runs"
    bench, started = Bench(out, args.timeout), time.time()
    import torch

    device = "cpu" if args.tiny or not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    bench.result.update(command=" ".join([sys.executable, *sys.argv]), device=device, date=time.strftime("%Y-%m-%d %H:%M"),
                        task=TASK, sizes={**size, "sft_steps": sft_steps, "grpo_steps": grpo_steps}, seed=args.seed)
    lensrl = [sys.executable, "-m", "lensrl"]
    data_files = [f"data.train_files=[{data / 'train.parquet'}]", f"data.val_files=[{data / 'test.parquet'}]"]
    seeds = [f"trainer.seed={args.seed}", f"data.seed={args.seed}"]
    image = ["--image-size", str(size["image_size"])] if size["image_size"] else []
    ok = bench.phase("setup", [
        [*lensrl, "model", "tiny", "--arch", "qwen2_5_vl", "--preset", size["preset"], "--out", str(model), "--force",
         "--seed", str(args.seed)],
        [*lensrl, "data", "synth", "--task", TASK, "--n", str(size["n_train"]), "--n-test", str(size["n_test"]),
         "--seed", str(args.seed), "--out", str(data), *image]])

    def command(kind: str, name: str, overrides: list[str]) -> list[str]:
        shutil.rmtree(runs / name, ignore_errors=True)  # a fresh run folder each time (no resume, no appended metrics)
        recipe = RECIPES / f"tiny_demo_{kind}.yaml"
        return [*lensrl, kind, "--config", str(recipe), *data_files, *seeds, *COMMON, f"trainer.output_dir={runs}",
                f"trainer.run_name={name}", *overrides]

    def train(kind: str, name: str, overrides: list[str]) -> bool:
        return bench.phase(name, [command(kind, name, overrides)])

    if ok:
        train("sft", "sft", [f"model.path={model}", f"trainer.total_steps={sft_steps}", "trainer.val_before_train=true",
                             *size["sft"], *args.sft_set])
    else:
        bench.skip("sft", "setup failed")
    sft = read_metrics(runs / "sft")
    sft_val = val_points(sft)
    acc = bench.result["accuracy"] = {
        "untrained": sft_val[0][1] if sft_val and sft_val[0][0] == 0 else None,
        "after_sft": sft_val[-1][1] if sft_val and sft_val[-1][0] > 0 else None,
        "sft_steps": max((r.get("step", 0) for r in sft), default=0)}
    # SFT that ran all its steps never got below the stop loss: the policy may still answer at chance,
    # and GRPO from there has little signal (on the CPU it lost the answer format within 10 steps)
    acc["sft_reached_stop_loss"] = bool(sft) and acc["sft_steps"] < sft_steps
    bench.save()

    grpo_common = [f"model.path={runs / 'sft' / 'hf'}", f"trainer.total_steps={grpo_steps}", "trainer.val_before_train=true",
                   f"trainer.test_freq={size['test_freq']}", *size["grpo"], *args.grpo_set]
    names = {"grpo": "false"} if args.skip_tis else {"grpo": "false", "grpo_tis": "true"}
    if not (runs / "sft" / "hf" / "config.json").exists():
        for name in names:
            bench.skip(name, "no SFT model (sft failed)")
    elif size["together"] and len(names) > 1:  # the twins at once, the host's cores split between them
        threads = [f"trainer.cpu_threads={max(1, (os.cpu_count() or 2) // len(names))}"]
        bench.phases_together({name: command("grpo", name, [*threads, *grpo_common, f"actor.importance_sampling_fix={tis}"])
                               for name, tis in names.items()})
    else:
        for name, tis in names.items():
            train("grpo", name, [*grpo_common, f"actor.importance_sampling_fix={tis}"])
    tis_rows = {}
    for name, tis in names.items():
        records = read_metrics(runs / name)
        points = val_points(records)
        tis_rows[name] = {"tis": tis == "true", "steps": max((r.get("step", 0) for r in records), default=0),
                          "final_reward": mean_of(records, "critic/score/mean", last=5),
                          "val_start": points[0][1] if points and points[0][0] == 0 else None,
                          "val_accuracy": points[-1][1] if points and points[-1][0] > 0 else None,
                          "val_curve": points,
                          **{k.split("/")[1]: mean_of(records, k) for k in
                             ("rollout/train_kl", "rollout/is_weight_mean", "rollout/is_clip_frac")}}
    grpo = tis_rows["grpo"]
    start = grpo["val_start"] if grpo["val_start"] is not None else acc["after_sft"]
    acc.update(grpo_start=grpo["val_start"], after_grpo=grpo["val_accuracy"], grpo_steps=grpo["steps"],
               gain_points=round(100 * (grpo["val_accuracy"] - start), 2)
               if grpo["val_accuracy"] is not None and start is not None else None)
    bench.result["tis"] = tis_rows
    bench.save()

    report = out / "report"
    present = [runs / n for n in ("grpo_tis", "grpo") if (runs / n / "metrics.jsonl").exists() and n in names]
    if args.skip_tis:
        bench.skip("report", "--skip-tis")
    elif present:
        shutil.rmtree(report, ignore_errors=True)
        if bench.phase("report", [[*lensrl, "report", *map(str, present), "--out", str(report)]]):
            bench.result["report"] = str(report / "report.html")
    else:
        bench.skip("report", "no GRPO run wrote metrics")
    bench.result["total_s"] = round(time.time() - started, 1)  # phases may overlap: the wall time
    bench.save()

    def pct(x):
        return f"{x:.1%}" if x is not None else "-"

    def num(x, fmt="{:.4f}"):
        return fmt.format(x + 0.0) if x is not None else "-"  # + 0.0: no "-0.0000"

    print(f"\nheld-out accuracy ({TASK} task, {size['n_test']} test images, greedy; {size['preset']} Qwen2.5-VL, {device})")
    print(f"  {'untrained (random init)':<28} {pct(acc['untrained']):>7}")
    print(f"  {'after SFT (' + str(acc['sft_steps']) + ' steps)':<28} {pct(acc['after_sft']):>7}")
    print(f"  {'GRPO start (its step 0)':<28} {pct(acc['grpo_start']):>7}")
    print(f"  {'after GRPO (' + str(acc['grpo_steps']) + ' steps)':<28} {pct(acc['after_grpo']):>7}")
    if sft and not acc["sft_reached_stop_loss"]:
        print(f"  note: SFT ran all {sft_steps} steps without its mean loss falling below the stop loss: "
              "it may not read the image yet")
    gain = acc["gain_points"]
    verdict = "" if gain is None else ("met" if gain >= 20 else "MISSED") + (" (bar is for the GPU)" if args.tiny else "")
    print(f"GRPO gain over its SFT start: {num(gain, '{:+.1f}')} points; bar >= 20: {verdict or '-'}")
    if not args.skip_tis:
        print(f"\nTIS (rollout {'fp32 hf' if args.tiny else 'bf16 engine'}, fp32 master weights), same SFT start:")
        print(f"  {'run':<9} {'TIS':>5} {'reward (last 5)':>15} {'val acc':>8} {'train_kl':>10} {'is_weight':>10} "
              f"{'is_clip':>8}")
        for name in ("grpo_tis", "grpo"):
            r = tis_rows[name]
            print(f"  {name:<9} {'on' if r['tis'] else 'off':>5} {num(r['final_reward']):>15} {pct(r['val_accuracy']):>8} "
                  f"{num(r['train_kl'], '{:.2e}'):>10} {num(r['is_weight_mean']):>10} {num(r['is_clip_frac']):>8}")
        print(f"  report: {bench.result.get('report', '-')}")
    print(f"\n  {'phase':<9} {'rc':>4} {'wall s':>8}")
    for name, p in bench.result["phases"].items():
        print(f"  {name:<9} {str(p['rc']) if p['rc'] is not None else 'skip':>4} {p['wall_s']:>8.1f}  {(p.get('error') or p.get('skipped') or '')[:120]}")
    print(f"  {'total':<9} {'':>4} {bench.result['total_s']:>8.1f}\nresults: {out / 'learning.json'}")


if __name__ == "__main__":
    main()
