"""Where a profiled step's time goes, per phase and per rank, from the traces `trainer.profile_steps` writes.

    python benchmarks/trace_summary.py runs/NAME/profile/step_3.rank_*.json.gz

For every `lensrl/<phase>` range of the step (the trainers' `_timer` phases) it prints the wall
time, the time the GPU ran compute kernels, the time NCCL kernels ran (collectives: on several
ranks, a long NCCL time beside idle compute is a rank waiting for a slower one), and the time the
GPU did nothing (host work, launch gaps, waits). Time outside every phase is listed as `(between)`.

    python benchmarks/trace_summary.py --top 40 --idle 25 --phase update_actor TRACE

`--top` lists a phase's longest kernels; `--idle` what the host was running (the innermost op of
its latest work) while the GPU idled in that phase: where a host-bound phase loses its time.
"""

from __future__ import annotations

import argparse
import bisect
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


def idle_by_host_op(events: list[dict], phase: str, top: int = 15) -> tuple[list[tuple[str, float, int]], dict]:
    """What the host was doing while the GPU idled inside phase `phase`: for each GPU-idle gap of
    one trace's `load_spans`, the CPU op (or annotation) running at the gap's midpoint that started
    last on any host thread, i.e. the innermost op of the host's most recent work ("main": the
    thread of the phase's range; "other": another, e.g. autograd's backward thread; nothing but the
    phase itself: Python between ops). Returns ([(thread: op, idle ms, gaps)], longest first, and
    {gap size class: idle ms}). A long idle under a Python-level op (dynamo's cache lookup, a
    compiled function's wrapper, FSDP's hooks) is host overhead that a larger or fused unit of work
    removes; under a kernel launch or a copy, a synchronisation."""
    ranges = [(e["ts"], e["ts"] + e["dur"], e.get("tid")) for e in events
              if e.get("cat") == "user_annotation" and e["name"] == f"lensrl/{phase}"]
    main_tids = {tid for _, _, tid in ranges}
    gpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    gaps = []
    for lo, hi, _ in ranges:
        end = lo
        for a, b in _clip(gpu, lo, hi):
            if a > end:
                gaps.append((end, a))
            end = max(end, b)
        if hi > end:
            gaps.append((end, hi))
    sizes: dict[str, float] = {}
    for a, b in gaps:
        d = b - a
        label = "< 10 us" if d < 10 else "< 50 us" if d < 50 else "< 200 us" if d < 200 else "< 1 ms" if d < 1000 else ">= 1 ms"
        sizes[label] = sizes.get(label, 0.0) + d / 1e3
    threads: dict[object, list[dict]] = {}
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver"):
            threads.setdefault(e.get("tid"), []).append(e)
    starts = {}
    for tid, evs in threads.items():
        evs.sort(key=lambda e: e["ts"])
        starts[tid] = [e["ts"] for e in evs]
    totals: dict[str, list] = {}
    for a, b in gaps:
        mid = (a + b) / 2
        best = None  # over all threads: the covering op that started last (the host's most recent work)
        for tid, evs in threads.items():
            i = bisect.bisect_right(starts[tid], mid) - 1
            for j in range(i, max(i - 5000, -1), -1):  # the latest-starting op that covers mid: the innermost
                if evs[j]["ts"] + evs[j]["dur"] >= mid:
                    if best is None or evs[j]["ts"] > best[1]["ts"]:
                        best = (tid, evs[j])
                    break
        if best is None or best[1]["name"] == f"lensrl/{phase}":
            key = f"main: lensrl/{phase} (Python between ops)"
        else:
            key = f"{'main' if best[0] in main_tids else 'other'}: {best[1]['name'][:70]}"
        entry = totals.setdefault(key, [0.0, 0])
        entry[0] += (b - a) / 1e3
        entry[1] += 1
    ranked = sorted(((k, ms, n) for k, (ms, n) in totals.items()), key=lambda x: -x[1])[:top]
    return ranked, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=0, help="also list the N longest kernels of --phase")
    parser.add_argument("--phase", default="update_actor", help="the phase --top and --idle look into")
    parser.add_argument("--idle", type=int, default=0,
                        help="also list the N host ops most often running while the GPU idled in --phase")
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
        if args.idle:
            ranked, sizes = idle_by_host_op(spans, args.phase, args.idle)
            print(f"\nGPU idle in {args.phase} by gap size: "
                  + ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(sizes.items(), key=lambda x: -x[1])))
            print(f"host op at the gap's midpoint (the innermost of the latest work):\n{'idle ms':>9} {'gaps':>6}  thread: op")
            for name, ms, count in ranked:
                print(f"{ms:>9.1f} {count:>6}  {name}")


if __name__ == "__main__":
    main()
