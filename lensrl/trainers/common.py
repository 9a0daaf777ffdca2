"""What every command does before its first step: device, seeds, run folder, model, data, rollout."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lensrl.config import DataConfig, ModelConfig, RolloutConfig, save_config, to_dict
from lensrl.data.datasets import PromptDataset, load_dataset
from lensrl.logging import RunLogger, console
from lensrl.train import distributed as dist
from lensrl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_hf
from lensrl.train.packing import plan_micro_batches


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def model_dtypes(cfg: ModelConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype or None). Parameters stay fp32 (master weights) unless
    asked; compute runs in bf16 autocast on GPU and in fp32 on CPU."""
    if cfg.dtype == "float32":
        return torch.float32, None
    if cfg.dtype == "bfloat16":
        return torch.bfloat16, None
    return torch.float32, (torch.bfloat16 if device.type == "cuda" else None)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_run_dir(output_dir: str, run_name: str, config) -> Path:
    run_dir = Path(output_dir) / run_name
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    dist.barrier()
    return run_dir


def make_logger(run_dir: Path, trainer_cfg, config, total_steps: int, start_step: int = 0) -> RunLogger:
    return RunLogger(run_dir, trainer_cfg.loggers, total_steps, to_dict(config), trainer_cfg.run_name,
                     trainer_cfg.wandb_project, enabled=dist.is_main(), start_step=start_step)


def load_split(files: list[str] | None, cfg: DataConfig, split: str, processor) -> PromptDataset | None:
    if not files:
        return None
    dataset = load_dataset(files, cfg, split_name=split, length_fn=processor.prompt_length)
    if dist.is_main():
        console.print(f"[{split}] {dataset.summary()}")
    if len(dataset) == 0:
        raise ValueError(f"the {split} data ({', '.join(files)}) has no usable rows: {dataset.summary()}")
    return dataset


def build_rollout(cfg: RolloutConfig, model: torch.nn.Module, processor, device: torch.device):
    backend = cfg.backend
    if backend == "auto":
        backend = AUTO_BACKEND
    if backend == "engine":
        from lensrl.rollout.engine import EngineRollout

        return EngineRollout(model, processor, cfg)
    from lensrl.rollout.hf import HFRollout

    return HFRollout(model, processor, batch_size=cfg.batch_size)


AUTO_BACKEND = "hf"  # what rollout.backend=auto means


@dataclass
class StopFlag:
    """Ctrl-C asks the loop to stop after the current step (which then saves a checkpoint); a
    second Ctrl-C interrupts at once."""

    requested: bool = False

    def install(self) -> None:
        if dist.world_size() > 1 and os.environ.get("LENSRL_NO_SIGNAL"):
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            console.print("[yellow]interrupt: finishing this step, saving a checkpoint, then exiting "
                          "(Ctrl-C again to abort now)[/yellow]")

        with contextlib.suppress(ValueError):  # not the main thread (e.g. inside a test runner thread)
            signal.signal(signal.SIGINT, handler)


def micro_batches(rows: list[int], seqs, use_dynamic_bsz: bool, max_tokens: int, micro_batch_size: int) -> list[list[int]]:
    """Split `rows` (indices into `seqs`) into micro-batches: balanced under a token budget when
    `use_dynamic_bsz` (each then runs as one packed row), else `micro_batch_size` at a time."""
    if use_dynamic_bsz:
        plan = plan_micro_batches([seqs[i].num_tokens for i in rows], max_tokens)
        return [[rows[j] for j in group] for group in plan if group]
    return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


def validate(trainer, step: int) -> dict[str, float]:
    """Held-out accuracy of `trainer.policy` through its rollout backend (greedy by default,
    `rollout.val_n` samples each for mean@k); a few samples written to samples/val_step_N.jsonl."""
    from lensrl.rollout.base import SamplingParams
    from lensrl.trainers.evaluate import evaluate

    r = trainer.cfg.rollout
    params = SamplingParams(n=r.val_n, temperature=r.val_temperature, top_p=r.val_top_p,
                            max_new_tokens=r.max_new_tokens, seed=trainer.cfg.trainer.seed + step)
    start = time.time()
    trainer.rollout.sync_weights(trainer.policy)  # a backend with its own weight copy must see the latest
    with torch.no_grad(), autocast(trainer.device, trainer.amp_dtype):
        metrics, records = evaluate(trainer.rollout, trainer.processor, trainer.val_data, trainer.pool, params,
                                    r.batch_size, trainer.cfg.data.val_size)
    metrics["timing_s/val"] = time.time() - start
    trainer.logger.write_samples(step, records[: trainer.cfg.trainer.num_logged_samples], "val")
    return metrics


def save(trainer) -> Path:
    """Checkpoint the trainer at its current step (model, optimizer, scheduler, RNG, data position)."""
    state = {"step": trainer.step, "sampler": trainer.sampler.state_dict(),
             "bad_steps_in_row": trainer.bad_steps_in_row}
    return save_checkpoint(trainer.ckpt_dir, trainer.step, trainer.policy, trainer.optimizer, trainer.scheduler,
                           state, trainer.cfg.trainer.save_limit)


def resume(trainer) -> None:
    """Restore the trainer from `trainer.resume` (auto: the newest complete checkpoint, if any)."""
    setting = trainer.cfg.trainer.resume
    if setting == "never":
        return
    path = latest_checkpoint(trainer.ckpt_dir) if setting == "auto" else Path(setting)
    if path is None:
        return
    state = load_checkpoint(path, trainer.policy, trainer.optimizer, trainer.scheduler)
    trainer.step = state["step"]
    trainer.sampler.load_state_dict(state["sampler"])
    trainer.bad_steps_in_row = state.get("bad_steps_in_row", 0)
    if dist.is_main():
        console.print(f"resumed from {path} at step {trainer.step}")


class BadStepsError(RuntimeError):
    """Too many consecutive steps with non-finite loss or gradients."""


def finish_step(trainer, metrics: dict[str, float], stop: StopFlag) -> bool:
    """Everything after a training step, the same for every trainer: validation on schedule,
    logging, the bad-step stop, checkpoints, Ctrl-C. Returns True when the run should stop now."""
    t = trainer.cfg.trainer
    last = trainer.step == trainer.total_steps
    if trainer.val_data is not None and ((t.test_freq and trainer.step % t.test_freq == 0) or last):
        metrics.update(validate(trainer, trainer.step))
    trainer.logger.log(metrics, trainer.step)
    trainer.logger.progress(trainer.step)
    if trainer.bad_steps_in_row >= t.max_bad_steps:
        raise BadStepsError(
            f"{trainer.bad_steps_in_row} consecutive steps had non-finite loss or gradients; stopping. "
            f"Last good checkpoint: {latest_checkpoint(trainer.ckpt_dir) or 'none'} "
            "(lower the learning rate or check the data)"
        )
    # No checkpoint while steps are failing: the last one stays the last good one.
    periodic = t.save_freq and trainer.step % t.save_freq == 0 and trainer.bad_steps_in_row == 0
    if periodic or stop.requested or last:
        save(trainer)
    if stop.requested and dist.is_main():
        console.print(f"stopped at step {trainer.step}; checkpoint saved, resume with trainer.resume=auto")
    return stop.requested


def save_final_hf(trainer) -> None:
    """runs/<name>/hf: the trained policy as a plain Hugging Face folder (rank 0)."""
    if trainer.total_steps and trainer.cfg.trainer.save_hf and dist.is_main():
        path = save_hf(trainer.policy, trainer.processor, trainer.run_dir / "hf")
        trainer.logger.info(f"Hugging Face model: {path}")


def cpu_memory_gb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0
