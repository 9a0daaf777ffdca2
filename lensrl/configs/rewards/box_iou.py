"""A reward of your own, for lensrl's `reward.function`: grounding by box overlap.

    reward:
      function: configs/rewards/box_iou.py:box_iou
      function_kwargs: {format_weight: 0.1}

The policy answers with a box `[x1, y1, x2, y2]` (pixels, inclusive corners) and is scored by the
intersection over union with the row's answer box (`lensrl data synth --task box` writes such
rows). Called once per completion in lensrl's reward workers, with a timeout.
"""

from __future__ import annotations

import json
import re

BOX = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")


def parse_box(text: str) -> list[float] | None:
    """The last `[x1, y1, x2, y2]` in `text`, or None."""
    found = BOX.findall(text)
    return [float(v) for v in found[-1]] if found else None


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two inclusive pixel boxes (0 for a degenerate box)."""
    if a[2] < a[0] or a[3] < a[1]:
        return 0.0
    width = min(a[2], b[2]) - max(a[0], b[0]) + 1
    height = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(width, 0.0) * max(height, 0.0)
    area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / area if area > 0 else 0.0


def box_iou(completion: str, sample: dict, format_weight: float = 0.1) -> dict[str, float]:
    """{"score": (1 - w) * IoU + w * format, "iou": ..., "format": 1 if a box was given}."""
    gold = json.loads(sample["answer"])
    pred = parse_box(completion)
    overlap = iou(pred, gold) if pred is not None else 0.0
    has_box = 1.0 if pred is not None else 0.0
    return {"score": (1 - format_weight) * overlap + format_weight * has_box, "iou": overlap, "format": has_box}
