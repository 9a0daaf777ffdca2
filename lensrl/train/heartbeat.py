"""Which rank hung. Each rank notes the phase of the step it is in (`mark`, a tiny file per rank
under `runs/<name>/.ranks/`); when a collective times out (`trainer.dist_timeout_s`), the rank that
waited reads every rank's note and names the one that stopped, instead of reporting only itself.

    heartbeat.start(run_dir, rank)
    heartbeat.mark("reward", step)      # at every phase boundary (the trainers' timers do it)
    except Exception as e:
        if heartbeat.is_timeout(e): raise RankHungError(heartbeat.diagnose(rank, timeout)) from e

A run folder on a filesystem every node shares (the usual cluster setup) covers all ranks; on
node-local folders only the ranks of this node are seen, and the message says which were missing.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

_state: dict = {"dir": None, "rank": 0}


class RankHungError(RuntimeError):
    """A collective timed out; the message names the rank that stopped and where."""


def start(run_dir: str | Path, rank: int) -> None:
    """Begin noting this rank's phases under `run_dir/.ranks/` (created here)."""
    folder = Path(run_dir) / ".ranks"
    folder.mkdir(parents=True, exist_ok=True)
    _state.update(dir=folder, rank=rank)
    mark("start", 0)


def mark(phase: str, step: int | None = None) -> None:
    """Note that this rank entered `phase` (of `step`, if given) now. A no-op before `start`; a
    failed write (full disk) is ignored: the note is a diagnosis aid, never a reason to stop."""
    folder = _state["dir"]
    if folder is None:
        return
    if step is not None:
        _state["step"] = step
    note = {"rank": _state["rank"], "phase": phase, "step": _state.get("step", 0), "time": time.time(),
            "host": socket.gethostname(), "pid": os.getpid()}
    path = folder / f"rank_{_state['rank']}.json"
    tmp = folder / f".rank_{_state['rank']}.json.tmp"
    try:
        tmp.write_text(json.dumps(note))
        os.replace(tmp, path)
    except OSError:
        pass


def is_timeout(error: BaseException) -> bool:
    """Whether `error` is a collective that gave up waiting (gloo's and NCCL's wording)."""
    import torch.distributed as dist

    text = str(error).lower()
    backend_error = getattr(dist, "DistBackendError", ())
    return ("timed out" in text or "timeout" in text) and isinstance(error, (RuntimeError, backend_error))


def diagnose(rank: int, world_size: int, timeout_s: float) -> str:
    """One paragraph: which rank(s) stopped (the oldest notes: phase, step, seconds since), where
    this rank waited, and ranks without a note. Reads every rank's note; never raises."""
    folder = _state["dir"]
    notes: dict[int, dict] = {}
    for r in range(world_size):
        try:
            notes[r] = json.loads((folder / f"rank_{r}.json").read_text()) if folder else None
        except (OSError, ValueError):
            notes[r] = None
    now = time.time()
    seen = {r: n for r, n in notes.items() if n}
    mine = seen.get(rank)
    where = f"in '{mine['phase']}' of step {mine['step']}" if mine else "(no note)"
    head = f"rank {rank} waited {timeout_s:.0f} s (trainer.dist_timeout_s) for the other ranks {where}"
    if not seen:
        return head + "; no rank's progress notes were found"
    oldest = min(n["time"] for n in seen.values())
    stuck = [r for r, n in seen.items() if r != rank and n["time"] - oldest < 1.0 and now - n["time"] > 0.5 * timeout_s]
    parts = [head + "."]
    for r in stuck:
        n = seen[r]
        parts.append(f"rank {r} (host {n['host']}, pid {n['pid']}) hung: it entered '{n['phase']}' of step {n['step']} "
                     f"{now - n['time']:.0f} s ago and has not moved since.")
    if not stuck:
        parts.append("No other rank's notes are older than this rank's: "
                     + ", ".join(f"rank {r} '{n['phase']}' step {n['step']} {now - n['time']:.0f} s ago"
                                 for r, n in sorted(seen.items())) + ".")
    missing = [r for r, n in notes.items() if not n]
    if missing:
        parts.append(f"No notes from rank(s) {missing} (a run folder not shared between nodes?).")
    return " ".join(parts)
