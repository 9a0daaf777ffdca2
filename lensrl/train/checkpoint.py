"""Resumable checkpoints and the final Hugging Face folder.

A checkpoint is `checkpoints/step_N/`:
    model + optimizer   torch.distributed.checkpoint (DCP) shards: any number of ranks can load them
    extra_rank{r}.pt    scheduler, RNG states, trainer state (step, data position), one per rank
    meta.json           step, world size, wall time; a LoRA checkpoint (adapters only) also its
                        settings, "lora": {rank, alpha, dropout, target_modules, vision_tower}, so
                        `lensrl convert` can merge or export the adapters from the checkpoint alone
    checksums.json      size and CRC-32 of every other file, verified before anything is loaded
It is written to `checkpoints/.tmp_step_N/`, fsynced, and renamed when complete, so a crash never
leaves a half-written `step_N`; pruning renames a checkpoint out of the `step_N` pattern before
deleting it, so a half-deleted one never looks complete either. A write that fails (a full disk)
removes the partial folder and says how much space the checkpoint needs. `trainer.resume=auto`
verifies the newest checkpoint and falls back to the newest intact one, saying what was wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from lensrl.train.distributed import all_gather_objects

_STEP_DIR = re.compile(r"^step_(\d+)$")
CHECKSUMS = "checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written (full disk) or must not be loaded (damaged, incomplete);
    the message names the file and what is wrong."""


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
    trainable_only: bool = False,
) -> Path:
    """Write `ckpt_root/step_{step}` atomically; keep the newest `save_limit` (0: all).

    Every rank writes its DCP shard and `extra_rank{r}.pt`, records their size and CRC-32, and
    fsyncs them; rank 0 writes checksums.json and meta.json, fsyncs the folder and renames it into
    place. Raises CheckpointError (on every rank) when any rank's write failed, after removing the
    partial folder; a full disk is named as such with the space the checkpoint needs.
    `trainable_only`: the model's trainable parameters only (LoRA: the adapters; the frozen base
    is the model folder's) and their optimizer state."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".tmp_step_{step}"
    if _rank() == 0:
        # a crash mid-save leaves a .tmp_step_* (or mid-prune a .del_step_*): a checkpoint's worth
        # of disk, never loadable
        for stale in [*ckpt_root.glob(".tmp_step_*"), *ckpt_root.glob(".del_step_*")] if ckpt_root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=trainable_only))
    model_sd = _trainable(model, model_sd) if trainable_only else model_sd
    error: BaseException | None = None
    sums: dict[str, dict] = {}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        extra = {"scheduler": scheduler.state_dict(), "rng": rng_state(), "trainer": trainer_state}
        torch.save(extra, tmp / f"extra_rank{_rank()}.pt")
        mine = [tmp / f"extra_rank{_rank()}.pt", *sorted(tmp.glob(f"__{_rank()}_*.distcp"))]
        if _rank() == 0:
            mine.append(tmp / ".metadata")
        sums = {f.name: _file_sum(f, sync=True) for f in mine if f.exists()}
    except KeyboardInterrupt:  # a second Ctrl-C: abort at once, leaving no partial folder behind
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank must reach the gather below
        if isinstance(e, CheckpointException) and any(isinstance(f[0], KeyboardInterrupt) for f in e.failures.values()):
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise KeyboardInterrupt from None
        error = e
    # one collective: every rank's failure (or None) and checksums
    reports = all_gather_objects((_describe_write_error(error, tmp, model_sd, optim_sd) if error else None, sums))
    failures = [(rank, message) for rank, (message, _) in enumerate(reports) if message]
    if failures:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        rank, message = failures[0]
        free = _free_gib(ckpt_root)
        raise CheckpointError(f"checkpoint step_{step} was not written (rank {rank}): {message}; the partial "
                              f"folder was removed ({free:.2f} GiB free now) and the previous checkpoints are "
                              "untouched") from error
    if _rank() == 0:
        merged = {name: entry for _, part in reports for name, entry in part.items()}
        world = dist.get_world_size() if dist.is_initialized() else 1
        try:
            _write_synced(tmp / CHECKSUMS, json.dumps(merged, indent=1, sort_keys=True))
            meta = {"step": step, "world_size": world, "time": time.time(), "checksums": len(merged)}
            lora = getattr(model, "lensrl_lora", None)  # set by lensrl.train.lora.add_lora
            if trainable_only and dataclasses.is_dataclass(lora):
                meta["lora"] = dataclasses.asdict(lora)
            base = getattr(model, "lensrl_base", None)  # set by lensrl.models.load.load_policy
            if base is not None:
                meta["base"] = base
            _write_synced(tmp / "meta.json", json.dumps(meta))
            _fsync_dir(tmp)
            if final.exists():
                _delete(final)
            os.replace(tmp, final)
            _fsync_dir(ckpt_root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint step_{step} was not written: {_describe_write_error(e, tmp, {}, {})}") from e
        if save_limit > 0:
            for old in list_checkpoints(ckpt_root)[:-save_limit]:
                _delete(old)
    _barrier()
    return final


def _state_bytes(*states: dict) -> int:
    """Bytes of the tensors in nested state dicts (this rank's shards)."""
    total = 0
    for state in states:
        for value in state.values():
            if isinstance(value, dict):
                total += _state_bytes(value)
            elif isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def _free_gib(path: Path) -> float:
    try:
        return shutil.disk_usage(path if path.exists() else path.parent).free / 2**30
    except OSError:
        return 0.0


def _describe_write_error(error: BaseException, where: Path, *states: dict) -> str:
    """What went wrong writing under `where`, in words: a full disk says so, with the space needed."""
    if isinstance(error, CheckpointException) and error.failures:  # DCP wraps each rank's own error
        error = next(iter(error.failures.values()))[0]
    text = str(error)
    need = _state_bytes(*states)
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or "No space left" in text
    # torch's zip writer reports a short write without its errno: full when the space was short
    full = full or (("unexpected pos" in text or "file write failed" in text) and _free_gib(where.parent) * 2**30 < need)
    if not full:
        return f"{type(error).__name__}: {text}"
    return (f"the disk is full at {where.parent} (this rank's part of the checkpoint needs about "
            f"{need / 2**30:.2f} GiB): free space or set trainer.output_dir elsewhere")


def _file_sum(path: Path, sync: bool = False) -> dict[str, int]:
    """{"size": bytes, "crc32": CRC-32} of a file, read in 16 MiB blocks; `sync` fsyncs it first."""
    crc = 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while block := f.read(16 << 20):
            crc = zlib.crc32(block, crc)
    return {"size": path.stat().st_size, "crc32": crc}


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _delete(path: Path) -> None:
    """Remove a checkpoint so it never looks complete while half-deleted: rename it out of the
    `step_N` pattern first (atomic), then delete."""
    doomed = path.with_name(f".del_{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def verify_checkpoint(path: str | Path, files: list[str] | None = None) -> str | None:
    """What is wrong with checkpoint folder `path`, in one sentence naming the file, or None when
    it is intact: meta.json, .metadata and extra_rank0.pt present, checksums.json holding as many
    entries as meta.json says were written and every shard on disk among them, and every listed
    file present with its recorded size and CRC-32 (`files`: check only these of them). Only a
    checkpoint written before checksums existed (its meta.json has no "checksums") is checked for
    its files alone."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist (no such checkpoint folder)"
    if not (path / "meta.json").is_file():
        return f"{path}/meta.json is missing (the checkpoint was never completed)"
    try:
        meta = json.loads((path / "meta.json").read_text())
        expected = meta.get("checksums")
    except (OSError, ValueError, AttributeError) as e:
        return f"{path}/meta.json is unreadable ({e})"
    for needed in (".metadata", "extra_rank0.pt"):
        if not (path / needed).is_file():
            return f"{path}/{needed} is missing"
    if expected is None:  # written before checksums existed
        return None
    try:
        recorded = json.loads((path / CHECKSUMS).read_text())
        if not isinstance(recorded, dict) or len(recorded) != expected:
            raise ValueError(f"{len(recorded)} entries where meta.json records {expected}")
        unlisted = sorted({f.name for f in path.glob("*.distcp")} - set(recorded))
        if unlisted:
            raise ValueError(f"shards on disk it does not list: {unlisted}")
    except (OSError, ValueError, TypeError) as e:
        return f"{path}/{CHECKSUMS} is missing or damaged ({e})"
    for name in files if files is not None else sorted(recorded):
        entry, file = recorded.get(name), path / name
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(entry.get("crc32"), int):
            return f"{path}/{CHECKSUMS} has no valid entry for {name}"
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{file} is {size} bytes, {entry['size']} were written (truncated or replaced)"
        if _file_sum(file)["crc32"] != entry["crc32"]:
            return f"{file} does not match the checksum written with it (its bytes changed since)"
    return None


def verify_everywhere(path: str | Path) -> str | None:
    """`verify_checkpoint` with the files shared among the ranks (a collective): the first problem
    any rank found, the same on every rank."""
    path = Path(path)
    names = None
    if (path / CHECKSUMS).is_file():
        with contextlib.suppress(OSError, ValueError, TypeError):
            names = sorted(json.loads((path / CHECKSUMS).read_text()))
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = None if names is None else names[_rank()::world]
    problems = [p for p in all_gather_objects(verify_checkpoint(path, mine)) if p]
    return problems[0] if problems else None


def checkpoint_step(path: str | Path) -> int:
    """N of a `step_N` folder; -1 for any other name."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else -1


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


def find_resumable(ckpt_root: str | Path) -> tuple[Path | None, list[Path], list[str]]:
    """The newest intact checkpoint under `ckpt_root` (verified on every rank, a collective), the
    newer `step_N` folders passed over (damaged, incomplete, or without meta.json), and one note per
    passed-over folder saying which file is wrong and how. (None, ...) when none is intact."""
    ckpt_root = Path(ckpt_root)
    notes: list[str] = []
    passed: list[Path] = []
    complete = list_checkpoints(ckpt_root)
    for child in sorted(ckpt_root.iterdir()) if ckpt_root.is_dir() else []:
        if _STEP_DIR.match(child.name) and child.is_dir() and not (child / "meta.json").is_file():
            passed.append(child)
            notes.append(f"skipped {child}: no meta.json, the checkpoint was never completed")
    for path in reversed(complete):
        problem = verify_everywhere(path)
        if problem is None:
            older = [p for p in passed if checkpoint_step(p) < checkpoint_step(path)]
            keep = [n for p, n in zip(passed, notes) if p not in older]
            return path, [p for p in passed if p not in older], keep
        passed.append(path)
        notes.append(f"skipped {path}: {problem}")
    return None, passed, notes


def set_aside(paths: list[Path]) -> list[Path]:
    """Rename damaged or incomplete checkpoint folders to `damaged_step_N` beside them (main rank
    only): kept for inspection, never loaded, never counted by `save_limit` pruning (which would
    otherwise keep a damaged newest folder and delete the run's new, intact ones)."""
    moved = []
    for path in paths:
        target = path.with_name(f"damaged_{path.name}")
        for k in range(1, 1000):
            if not target.exists():
                break
            target = path.with_name(f"damaged_{path.name}.{k}")
        os.replace(path, target)
        moved.append(target)
    return moved


def _trainable(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The entries of a model state dict that are trainable parameters (a frozen weight tied to
    another name, such as a tied lm_head, can still appear under ignore_frozen_params)."""
    names = {name for name, param in model.named_parameters() if param.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    trainable_only: bool = False,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from `path`; return the trainer state. Verifies
    the checkpoint first (`verify_everywhere`); CheckpointError names the damaged file."""
    path = Path(path)
    problem = verify_everywhere(path)
    if problem:
        raise CheckpointError(f"cannot resume from {path}: {problem}")
    options = StateDictOptions(strict=True, ignore_frozen_params=trainable_only)  # as saved
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    model_sd = _trainable(model, model_sd) if trainable_only else model_sd
    _check_same_model(path, model_sd)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=not trainable_only, ignore_frozen_params=trainable_only))
    extra_file = path / f"extra_rank{_rank()}.pt"
    new_rank = not extra_file.exists()  # resumed with more ranks than were saved
    extra = torch.load(path / "extra_rank0.pt" if new_rank else extra_file, weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    if new_rank:
        seed_new_rank(extra["rng"], _rank())
    else:
        set_rng_state(extra["rng"])
    return extra["trainer"]


def _check_same_model(path: Path, model_sd: dict[str, Any]) -> None:
    """CheckpointError, before anything loads, when the checkpoint's model weights (names and shapes
    in its DCP index) are not this model's: another architecture or size (a dense model.path for a
    MoE run's checkpoint), which DCP reports as a bare missing-key traceback."""
    saved = {k.removeprefix("model."): tuple(m.size) for k, m in dcp.FileSystemReader(str(path)).read_metadata()
             .state_dict_metadata.items() if k.startswith("model.") and hasattr(m, "size")}
    ours = {k: tuple(v.shape) for k, v in model_sd.items()}
    missing, extra = sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours))
    resized = sorted(k for k in set(ours) & set(saved) if ours[k] != saved[k])
    if not (missing or extra or resized):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of this model's weights are not in it (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} of its weights are not in this model (e.g. {extra[0]})")
    if resized:
        k = resized[0]
        parts.append(f"{len(resized)} weights differ in shape (e.g. {k}: {list(saved[k])} saved, {list(ours[k])} here)")
    raise CheckpointError(f"cannot resume from {path}: it holds another model's weights: {'; '.join(parts)}. Resume "
                          "with the model.path the run was trained with (its config.yaml names it), or start anew "
                          "with trainer.resume=never")


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
    try:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    except Exception as e:  # a full disk surfaces as OSError or as safetensors' own error
        shutil.rmtree(tmp, ignore_errors=True)
        if "No space left" in str(e) or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
            need = sum(v.numel() * v.element_size() for v in state.values()) / 2**30
            raise CheckpointError(f"the Hugging Face folder {out_dir} was not written: the disk is full (it needs "
                                  f"about {need:.2f} GiB, {_free_gib(out_dir.parent):.2f} GiB are free); the partial "
                                  "folder was removed, the checkpoints are untouched") from e
        raise
    if dtype is not None:
        config = json.loads((tmp / "config.json").read_text())
        config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    processor.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
