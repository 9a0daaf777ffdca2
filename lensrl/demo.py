"""`lensrl demo`: the whole pipeline, offline, on a laptop CPU in a few minutes.

A tiny random-init Qwen2.5-VL and rendered shape images are made on the spot; the model is
fine-tuned briefly (SFT), then trained with GRPO; held-out accuracy is printed before and after
each phase. The recipes are `lensrl/configs/tiny_demo_{sft,grpo}.yaml`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from lensrl.config import GRPOConfig, SFTConfig, load_config
from lensrl.logging import console

RECIPES = Path(__file__).parent / "configs"

# Demo sizes: (train rows, test rows, SFT steps, GRPO steps). `quick` is what the test runs.
FULL = dict(n_train=2000, n_test=200, sft_steps=None, grpo_steps=None)
QUICK = dict(n_train=2000, n_test=100, sft_steps=None, grpo_steps=30)
TASK = "color"
PRESET = "5m"


def run_demo(out: str = "runs/demo", seed: int = 1, quick: bool = False, extra_sft: tuple = (),
             extra_grpo: tuple = ()) -> dict[str, float]:
    from lensrl.data.synth import make_synth
    from lensrl.models.tiny import make_tiny_model
    from lensrl.trainers.grpo import GRPOTrainer
    from lensrl.trainers.sft import SFTTrainer

    sizes = QUICK if quick else FULL
    out = Path(out)
    start = time.time()
    console.rule("lensrl demo")
    model_dir = make_tiny_model(out / "model", arch="qwen2_5_vl", preset=PRESET, seed=seed)
    make_synth(TASK, sizes["n_train"], seed, out / "data", n_test=sizes["n_test"])
    data = [f"data.train_files=[{out / 'data' / 'train.parquet'}]", f"data.val_files=[{out / 'data' / 'test.parquet'}]"]
    runs = out / "runs"
    console.print(f"tiny model: {model_dir}   data: {out / 'data'} (task '{TASK}')   [{time.time() - start:.0f}s]")

    console.rule("SFT")
    sft_overrides = [f"model.path={model_dir}", *data, f"trainer.output_dir={runs}", f"trainer.seed={seed}",
                     f"data.seed={seed}", "trainer.resume=never"]
    if sizes["sft_steps"]:
        sft_overrides.append(f"trainer.total_steps={sizes['sft_steps']}")
    sft = SFTTrainer(load_config(SFTConfig, RECIPES / "tiny_demo_sft.yaml", [*sft_overrides, *extra_sft]))
    sft.fit()
    sft_acc = _val_accuracy(runs / "sft")
    console.print(f"[{time.time() - start:.0f}s]")

    console.rule("GRPO")
    grpo_overrides = [f"model.path={runs / 'sft' / 'hf'}", *data, f"trainer.output_dir={runs}",
                      f"trainer.seed={seed}", f"data.seed={seed}", "trainer.resume=never"]
    if sizes["grpo_steps"]:
        grpo_overrides.append(f"trainer.total_steps={sizes['grpo_steps']}")
    grpo = GRPOTrainer(load_config(GRPOConfig, RECIPES / "tiny_demo_grpo.yaml", [*grpo_overrides, *extra_grpo]))
    grpo.fit()
    grpo_acc = _val_accuracy(runs / "grpo")
    elapsed = time.time() - start

    result = {"untrained": sft_acc[0], "sft": sft_acc[1], "grpo": grpo_acc[1], "seconds": elapsed}
    table = Table(title=f"held-out accuracy ({TASK} task, {sizes['n_test']} test images, greedy)")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_row("untrained (random init)", f"{result['untrained']:.1%}")
    table.add_row("after SFT", f"{result['sft']:.1%}")
    table.add_row("after GRPO", f"{result['grpo']:.1%}")
    console.print(table)
    console.print(f"GRPO gain over SFT: {100 * (result['grpo'] - result['sft']):+.1f} points; total {elapsed:.0f}s")
    console.print(f"runs: {runs / 'sft'}, {runs / 'grpo'} (metrics.jsonl, tensorboard/, samples/, checkpoints/, hf/)")
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result


def _val_accuracy(run_dir: Path) -> tuple[float, float]:
    """(first, last) val/accuracy recorded in a run's metrics.jsonl."""
    from lensrl.logging import read_metrics

    values = [r["val/accuracy"] for r in read_metrics(run_dir) if "val/accuracy" in r]
    return values[0], values[-1]
