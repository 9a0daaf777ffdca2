"""Resumable checkpoints and the final Hugging Face folder.

A checkpoint is `checkpoints/step_N/`:
    model + optimizer   torch.distributed.checkpoint (DCP) shards: any number of ranks can load them
    extra_rank{r}.pt    scheduler, RNG states, trainer state (step, data position), one per rank
    meta.json           step, world size, wall time
It is written to `checkpoints/.tmp_step_N/` and renamed when complete, so a crash never leaves a
half-written `step_N`; `latest_checkpoint` only ever sees complete ones.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """This rank's random streams: Python's, torch's CPU generator and its own GPU's (the current
    device's only: the other visible GPUs are other ranks', and a resume may see fewer of them)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s streams; the GPU one onto the current device. Checkpoints written
    before 2026-11-30 hold a list (every device the rank could see): the entry of the current
    device is used, else the first. Restoring that whole list failed with `IndexError: tuple index
    out of range` when a run saved at 2 ranks (each seeing 2 GPUs) resumed on 1 visible GPU."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)


def seed_new_rank(state: dict[str, Any], rank: int) -> None:
    """RNG streams of a rank that did not exist when the checkpoint was written: derived from the
    saved rank 0 state and the rank, so they are reproducible and differ from every other rank's
    (never a copy of rank 0's)."""
    set_rng_state(state)
    seed = (random.getrandbits(62) ^ (0x9E3779B97F4A7C15 * (rank + 1))) % (1 << 62)
    random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    save_limit: int = 0,
) -> Path:
    """Write `ckpt_root/step_{step}` atomically; keep the newest `save_limit` (0: all)."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".tmp_step_{step}"
    if _rank() == 0:
        # a crash mid-save leaves a .tmp_step_*: a full checkpoint's worth of disk, never loadable
        for stale in ckpt_root.glob(".tmp_step_*") if ckpt_root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    extra = {"scheduler": scheduler.state_dict(), "rng": rng_state(), "trainer": trainer_state}
    torch.save(extra, tmp / f"extra_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": world, "time": time.time()}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if save_limit > 0:
            for old in list_checkpoints(ckpt_root)[:-save_limit]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = []
    for child in ckpt_root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "meta.json").is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from `path`; return the trainer state."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete lensrl checkpoint (no meta.json)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=True))
    extra_file = path / f"extra_rank{_rank()}.pt"
    new_rank = not extra_file.exists()  # resumed with more ranks than were saved
    extra = torch.load(path / "extra_rank0.pt" if new_rank else extra_file, weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    if new_rank:
        seed_new_rank(extra["rng"], _rank())
    else:
        set_rng_state(extra["rng"])
    return extra["trainer"]


def save_hf(
    model: torch.nn.Module,
    processor: Any,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a plain Hugging Face folder (safetensors + config + processor files), atomically.
    `state_dict`: full tensors to write instead of `model.state_dict()` (a sharded model's,
    gathered)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    state = {k: v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()
             for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    if dtype is not None:
        config = json.loads((tmp / "config.json").read_text())
        config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    processor.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
