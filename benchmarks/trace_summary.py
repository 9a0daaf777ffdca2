"""Where a profiled step's time goes, per phase and per rank, from the traces `trainer.profile_steps` writes.

    python benchmarks/trace_summary.py runs/NAME/profile/step_3.rank_*.json.gz

For every `lensrl/<phase>` range of the step (the trainers' `_timer` phases) it prints the wall
time, the time the GPU ran compute kernels, the time NCCL kernels ran (collectives: on several
ranks, a long NCCL time beside idle compute is a rank waiting for a slower one), and the time the
GPU did nothing (host work, launch gaps, waits). Time outside every phase is listed as `(between)`.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _clip(intervals, lo, hi):
    return [(max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi]


def load_spans(path: Path) -> list[dict]:
    """The complete-duration events ("ph": "X") of one trace file (a step's trace is hundreds of MB:
    read it once)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def summarize(spans: list[dict]) -> list[dict]:
    """Rows {phase, wall_ms, compute_ms, nccl_ms, idle_ms} of one trace's `load_spans`, in step order."""
    phases = sorted((e["ts"], e["ts"] + e["dur"], e["name"][len("lensrl/"):]) for e in spans
                     if e.get("cat") == "user_annotation" and e["name"].startswith("lensrl/"))
    gpu = [e for e in spans if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    nccl = [(e["ts"], e["ts"] + e["dur"]) for e in gpu if "nccl" in e["name"].lower()]
    compute = [(e["ts"], e["ts"] + e["dur"]) for e in gpu if "nccl" not in e["name"].lower()]
    if not phases:
        return []
    start, end = phases[0][0], max(p[1] for p in phases)
    windows = list(phases)
    cursor = start
    for a, b, _ in phases:  # the gaps between phases
        if a > cursor:
            windows.append((cursor, a, "(between)"))
        cursor = max(cursor, b)
    rows: dict[str, dict] = {}
    for a, b, name in windows:
        row = rows.setdefault(name, {"phase": name, "wall_ms": 0.0, "compute_ms": 0.0, "nccl_ms": 0.0, "idle_ms": 0.0})
        c, n = _clip(compute, a, b), _clip(nccl, a, b)
        row["wall_ms"] += (b - a) / 1e3
        row["compute_ms"] += _union(c) / 1e3
        row["nccl_ms"] += _union(n) / 1e3
        row["idle_ms"] += ((b - a) - _union(c + n)) / 1e3
    total = {"phase": "step", "wall_ms": (end - start) / 1e3,
             "compute_ms": _union(_clip(compute, start, end)) / 1e3, "nccl_ms": _union(_clip(nccl, start, end)) / 1e3}
    total["idle_ms"] = total["wall_ms"] - _union(_clip(compute + nccl, start, end)) / 1e3
    return [*rows.values(), total]


def top_kernels(events: list[dict], phase: str, top: int = 15) -> list[tuple[str, float, int]]:
    """The `top` GPU kernels of one trace's `load_spans` by summed duration inside phase `phase`
    (every range of that name): [(name, ms, count)], longest first."""
    ranges = [(e["ts"], e["ts"] + e["dur"]) for e in events
              if e.get("cat") == "user_annotation" and e["name"] == f"lensrl/{phase}"]
    totals: dict[str, list] = {}
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and any(a <= e["ts"] < b for a, b in ranges):
            entry = totals.setdefault(e["name"][:90], [0.0, 0])
            entry[0] += e["dur"] / 1e3
            entry[1] += 1
    return sorted(((n, ms, c) for n, (ms, c) in totals.items()), key=lambda x: -x[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=0, help="also list the N longest kernels of --phase")
    parser.add_argument("--phase", default="update_actor", help="the phase --top looks into")
    args = parser.parse_args()
    for path in args.traces:
        print(f"\n{path}")
        spans = load_spans(path)
        rows = summarize(spans)
        if rows and rows[-1]["compute_ms"] == 0 and rows[-1]["nccl_ms"] == 0:
            print("(no GPU kernels in this trace: a CPU run, so all its time shows as 'GPU idle')")
        print(f"{'phase':<14} {'wall ms':>9} {'compute':>9} {'nccl':>9} {'GPU idle':>9}")
        for r in rows:
            print(f"{r['phase']:<14} {r['wall_ms']:>9.1f} {r['compute_ms']:>9.1f} {r['nccl_ms']:>9.1f} {r['idle_ms']:>9.1f}")
        if args.top:
            print(f"\nlongest kernels in {args.phase}:\n{'ms':>9} {'count':>6}  kernel")
            for name, ms, count in top_kernels(spans, args.phase, args.top):
                print(f"{ms:>9.1f} {count:>6}  {name}")


if __name__ == "__main__":
    main()
