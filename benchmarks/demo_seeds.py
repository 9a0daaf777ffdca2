"""The demo's bar: GRPO raises held-out accuracy over its SFT start by >= 10 points, for 3 seeds.

    python benchmarks/demo_seeds.py [--seeds 1 2 3] [--out runs/demo_seeds]

Prints one row per seed (untrained / after SFT / after GRPO / gain / seconds) and the verdict.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers.utils import logging as hf_logging

from lensrl.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", default="runs/demo_seeds")
    parser.add_argument("--quick", action="store_true", help="the reduced size the test runs")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    rows = []
    for seed in args.seeds:
        result = run_demo(str(Path(args.out) / f"seed{seed}"), seed=seed, quick=args.quick)
        rows.append({"seed": seed, **result, "gain": result["grpo"] - result["sft"]})
    print("\n| seed | untrained | after SFT | after GRPO | GRPO gain (points) | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['untrained']:.1%} | {r['sft']:.1%} | {r['grpo']:.1%} | {100 * r['gain']:+.1f} | "
              f"{r['seconds']:.0f} |")
    ok = all(r["gain"] >= 0.10 for r in rows)
    print(f"\nbar (gain >= 10 points for every seed): {'met' if ok else 'MISSED'}")
    (Path(args.out) / "summary.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
