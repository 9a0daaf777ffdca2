"""Procedurally rendered visual problems: the answer is in the image and nowhere else.

Tasks, easiest first (the prompt text is the same for every row of a task):

| task    | question                    | answers                                          |
|---------|-----------------------------|--------------------------------------------------|
| `color` | What colour is the shape?   | red, green, blue, yellow, purple                 |
| `shape` | What shape is this?         | circle, square, triangle, star                   |
| `count` | How many shapes are there?  | 1, 2, 3, 4, 5                                    |
| `angle` | Find x.                     | integer degrees (triangle angles, parallel lines)|
| `geo`   | Find x.                     | `35`, `\\frac{5}{2}`, `4\\sqrt{3}`, ... (geometry3k-like) |
| `box`   | Where is the shape? ...     | its bounding box in pixels, `[x1, y1, x2, y2]` (grounding; score it by IoU) |

The easy tasks use one large, saturated shape (or a few for `count`) on white, small images
(56 px by default) and exactly balanced answers, so a tiny model trained from scratch on a CPU
learns them in minutes. `angle`/`geo` draw labelled triangles and parallel lines (112 px by
default, rendered at twice the size and downsampled so the labels stay legible).

Train and test are disjoint by construction: each split draws from its own seeded stream and
keeps only images whose pixel hash falls on its side, so no image can appear in both.

    make_synth("color", n=1000, seed=0, out_dir="data/synth_color")   # geometry3k layout
    make_synth("geo", n=1000, seed=0, out_dir="data/synth_geo_mc", fmt="choice")  # Robo2VLM layout
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from lensrl.data.datasets import IMAGE_LIST_TYPE, IMAGE_TYPE
from lensrl.data.sample import IMAGE_PLACEHOLDER

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 200, 0),
    "purple": (145, 45, 195),
}
SHAPES = ("circle", "square", "triangle", "star")
COUNTS = ("1", "2", "3", "4", "5")
ANGLE_KINDS = ("triangle_angle", "parallel")
GEO_KINDS = ("triangle_angle", "parallel", "pythagoras", "midsegment", "special_right")

QUESTIONS = {
    "color": "What colour is the shape?",
    "shape": "What shape is this?",
    "count": "How many shapes are there?",
    "angle": "Find x.",
    "geo": "Find x.",
    "box": "Where is the shape? Answer with its bounding box in pixels as [x1, y1, x2, y2].",
}
TASKS = tuple(QUESTIONS)
DEFAULT_IMAGE_SIZE = {"color": 56, "shape": 56, "count": 56, "angle": 112, "geo": 112, "box": 56}
NUM_CHOICES = 4
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


@dataclass
class SynthItem:
    """One rendered problem."""

    image: Image.Image
    question: str  # without the <image> placeholder
    answer: str
    tag: str  # the class (easy tasks) or the kind of geometry problem
    distractors: list[str]  # plausible wrong answers, for the multiple-choice format


# ----------------------------------------------------------------------------------------------
# Writing datasets
# ----------------------------------------------------------------------------------------------


def make_synth(
    task: str,
    n: int,
    seed: int,
    out_dir: str | os.PathLike,
    image_size: int | None = None,
    n_test: int | None = None,
    fmt: Literal["geo3k", "choice"] = "geo3k",
) -> dict[str, str]:
    """Write `n` training rows to `out_dir/train.parquet` and `n_test` (default n // 5, at least
    1) to `out_dir/test.parquet`; returns the two paths.

    fmt "geo3k": the geometry3k layout (`images` list of PNG `{bytes, path}`, `problem`
    "<image>{question}", `answer`, plus `id`). fmt "choice": the Robo2VLM layout (`id`,
    `question`, `choices` as a Python-list string, `correct_answer` index, `image`, `tag`).
    """
    if task not in QUESTIONS:
        raise ValueError(f"unknown synth task {task!r}; choose one of {', '.join(TASKS)}")
    if fmt not in ("geo3k", "choice"):
        raise ValueError(f"fmt must be 'geo3k' or 'choice', got {fmt!r}")
    n_test = max(1, n // 5) if n_test is None else n_test
    if n < 1 or n_test < 1:
        raise ValueError(f"n and n_test must be at least 1, got n={n}, n_test={n_test}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, num_rows in (("train", n), ("test", n_test)):
        rows = _split_rows(task, split, num_rows, seed, image_size or DEFAULT_IMAGE_SIZE[task], fmt)
        paths[split] = str(out / f"{split}.parquet")
        pq.write_table(rows, paths[split])
    return paths


def _split_rows(task: str, split: str, num_rows: int, seed: int, size: int, fmt: str) -> pa.Table:
    rng = random.Random(f"lensrl-synth:{task}:{split}:{seed}")
    classes = _classes(task)
    slots = _balanced(len(classes), num_rows, rng)
    positions = _balanced(NUM_CHOICES, num_rows, rng)  # where the correct choice goes
    ids, images, problems, answers, choices, correct, tags = [], [], [], [], [], [], []
    for i in range(num_rows):
        item = _render_in_split(task, classes[slots[i]], size, rng, test=split == "test")
        image = {"bytes": _png(item.image), "path": None}
        ids.append(f"{task}-{split}-{seed}-{i:06d}")
        tags.append(item.tag)
        if fmt == "geo3k":
            images.append([image])
            problems.append(IMAGE_PLACEHOLDER + item.question)
            answers.append(item.answer)
        else:
            images.append(image)
            problems.append(item.question)
            options = rng.sample(item.distractors, NUM_CHOICES - 1)
            options.insert(positions[i], item.answer)
            choices.append(repr(options))  # Robo2VLM keeps choices as a Python-list string
            correct.append(positions[i])
    if fmt == "geo3k":
        return pa.table(
            {"id": ids, "images": pa.array(images, IMAGE_LIST_TYPE), "problem": problems, "answer": answers}
        )
    return pa.table(
        {
            "id": ids,
            "question": problems,
            "choices": choices,
            "correct_answer": pa.array(correct, pa.int64()),
            "image": pa.array(images, IMAGE_TYPE),
            "tag": tags,
        }
    )


def _classes(task: str) -> tuple[str, ...]:
    """What `_balanced` balances over: the answers of the easy tasks, the kinds of figure otherwise."""
    return {"color": tuple(COLORS), "shape": SHAPES, "count": COUNTS, "angle": ANGLE_KINDS, "geo": GEO_KINDS,
            "box": SHAPES}[task]


def _balanced(num_classes: int, num_rows: int, rng: random.Random) -> list[int]:
    """Each class equally often (up to one), in a shuffled order."""
    slots = [i % num_classes for i in range(num_rows)]
    rng.shuffle(slots)
    return slots


def _render_in_split(task: str, cls: str, size: int, rng: random.Random, test: bool) -> SynthItem:
    """Draw until the image's pixel hash falls on this split's side (half of all images each)."""
    while True:
        item = _RENDERERS[task](cls, size, rng)
        digest = hashlib.blake2b(item.image.tobytes(), digest_size=8).digest()
        if bool(digest[0] & 1) == test:
            return item


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_example(task: str, seed: int = 0, index: int = 0, image_size: int | None = None) -> SynthItem:
    """Render one problem of `task` (not necessarily one that is in a written split)."""
    rng = random.Random(f"lensrl-synth-example:{task}:{seed}:{index}")
    classes = _classes(task)
    return _RENDERERS[task](classes[index % len(classes)], image_size or DEFAULT_IMAGE_SIZE[task], rng)


def save_preview(
    task: str, path: str | os.PathLike, num: int = 16, seed: int = 0, image_size: int | None = None
) -> list[str]:
    """Write a grid of `num` rendered problems to a PNG (to look at); returns their answers in order."""
    rng = random.Random(f"lensrl-synth-preview:{task}:{seed}")
    classes = _classes(task)
    size = image_size or DEFAULT_IMAGE_SIZE[task]
    columns = min(num, 8)
    grid = Image.new("RGB", (columns * (size + 4), -(-num // columns) * (size + 4)), (128, 128, 128))
    answers = []
    for i in range(num):
        item = _RENDERERS[task](classes[i % len(classes)], size, rng)
        grid.paste(item.image, ((i % columns) * (size + 4) + 2, (i // columns) * (size + 4) + 2))
        answers.append(item.answer)
    grid.save(path)
    return answers


# ----------------------------------------------------------------------------------------------
# Easy tasks: colour, shape, count
# ----------------------------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        half = r * 0.85  # about the area of the circle
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "triangle":
        draw.polygon([_polar(cx, cy, r * 1.1, -90 + 120 * k) for k in range(3)], fill=fill)
    elif shape == "star":
        points = [_polar(cx, cy, r * (1.1 if k % 2 == 0 else 0.45), -90 + 36 * k) for k in range(10)]
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _polar(cx: float, cy: float, r: float, degrees: float) -> tuple[float, float]:
    return cx + r * math.cos(math.radians(degrees)), cy + r * math.sin(math.radians(degrees))


def _one_shape(size: int, rng: random.Random, shape: str, color: str) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUND)
    r = size * rng.uniform(0.24, 0.36)
    margin = r * 1.12 + 1
    cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, COLORS[color])
    return image


def _render_color(color: str, size: int, rng: random.Random) -> SynthItem:
    image = _one_shape(size, rng, rng.choice(SHAPES), color)
    return SynthItem(image, QUESTIONS["color"], color, color, [c for c in COLORS if c != color])


def _render_shape(shape: str, size: int, rng: random.Random) -> SynthItem:
    image = _one_shape(size, rng, shape, rng.choice(list(COLORS)))
    return SynthItem(image, QUESTIONS["shape"], shape, shape, [s for s in SHAPES if s != shape])


def _render_box(shape: str, size: int, rng: random.Random) -> SynthItem:
    """One shape of any colour and size; the answer is the box of its drawn pixels, inclusive."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    r = size * rng.uniform(0.12, 0.3)
    margin = r * 1.12 + 1
    cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, COLORS[rng.choice(list(COLORS))])
    x1, y1, x2, y2 = Image.eval(image.convert("L"), lambda v: 255 if v < 250 else 0).getbbox()
    box = [x1, y1, x2 - 1, y2 - 1]

    def shifted(dx: int, dy: int) -> str:
        return str([box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy])

    distractors = [shifted(d, 0) for d in (-9, 9)] + [shifted(0, d) for d in (-9, 9)]
    return SynthItem(image, QUESTIONS["box"], str(box), shape, distractors)


def _render_count(count: str, size: int, rng: random.Random) -> SynthItem:
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < int(count):
        r = size * rng.uniform(0.08, 0.11)
        cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
        if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
            placed.append((cx, cy, r))
            _draw_shape(draw, rng.choice(("circle", "square")), cx, cy, r, rng.choice(list(COLORS.values())))
    return SynthItem(image, QUESTIONS["count"], count, count, [c for c in COUNTS if c != count])


# ----------------------------------------------------------------------------------------------
# Geometry: labelled figures, geometry3k-style answers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Surd:
    """The number `num * sqrt(root) / den`, written the way geometry3k writes answers."""

    num: int
    root: int = 1
    den: int = 1

    def simplified(self) -> Surd:
        num, root = self.num, self.root
        factor = 2
        while factor * factor <= root:
            while root % (factor * factor) == 0:
                root //= factor * factor
                num *= factor
            factor += 1
        common = math.gcd(num, self.den)
        return Surd(num // common, root, self.den // common)

    def latex(self) -> str:
        s = self.simplified()
        if s.root == 1:
            core = str(s.num)
        else:
            core = f"\\sqrt{{{s.root}}}" if s.num == 1 else f"{s.num}\\sqrt{{{s.root}}}"
        return core if s.den == 1 else f"\\frac{{{core}}}{{{s.den}}}"

    def value(self) -> float:
        return self.num * math.sqrt(self.root) / self.den


def _geo_distractors(answer: Surd, rng: random.Random, is_angle: bool) -> list[str]:
    """Plausible wrong answers of the same form as `answer`."""
    correct = answer.latex()
    if is_angle:
        n = answer.num
        values = [180 - n, 90 - n, n + 10, n - 10, n + 20, n - 20, n + 5, n - 5, n + 30, n - 30]
        candidates = [str(v) for v in values if 0 < v < 180]
    else:
        s = answer.simplified()
        other_roots = [r for r in (2, 3, 5) if r != s.root]
        candidates = [
            Surd(s.num + 1, s.root, s.den).latex(),
            Surd(s.num + 2, s.root, s.den).latex(),
            Surd(max(1, s.num - 1), s.root, s.den).latex(),
            Surd(s.num * 2, s.root, s.den).latex(),
            Surd(s.num, s.root, s.den * 2).latex(),
            Surd(s.num, rng.choice(other_roots), s.den).latex(),
            Surd(s.num, 1, s.den).latex(),
        ]
    unique = list(dict.fromkeys(c for c in candidates if c != correct))
    while len(unique) < NUM_CHOICES - 1:  # tiny answers can run short of natural mistakes
        extra = str(rng.randint(1, 60))
        if extra != correct and extra not in unique:
            unique.append(extra)
    return unique


@lru_cache(maxsize=8)
def _font(pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=pixels)


class _Canvas:
    """A supersampled drawing surface for a figure: lines, right-angle marks and text labels."""

    def __init__(self, size: int):
        self.size = size
        self.width = size * 2
        self.image = Image.new("RGB", (self.width, self.width), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.font = _font(max(8, round(self.width * 0.1)))
        self.line_width = max(2, round(self.width / 110))
        self.cluttered = False  # a label landed on ink (a line or another label)

    def line(self, a, b) -> None:
        self.draw.line([a, b], fill=INK, width=self.line_width)

    def polygon(self, points) -> None:
        for a, b in zip(points, points[1:] + points[:1]):
            self.line(a, b)

    def right_angle(self, corner, toward_a, toward_b) -> None:
        s = self.width * 0.06
        u, v = _unit(corner, toward_a), _unit(corner, toward_b)
        p1 = (corner[0] + u[0] * s, corner[1] + u[1] * s)
        p2 = (p1[0] + v[0] * s, p1[1] + v[1] * s)
        p3 = (corner[0] + v[0] * s, corner[1] + v[1] * s)
        self.draw.line([p1, p2, p3], fill=INK, width=max(1, self.line_width // 2))

    def tick(self, a, b, count: int) -> None:
        """`count` short marks across the middle of segment a-b (equal-length marks)."""
        u = _unit(a, b)
        normal = (-u[1], u[0])
        mid = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
        s = self.width * 0.025
        for k in range(count):
            offset = (k - (count - 1) / 2) * s * 0.8
            c = (mid[0] + u[0] * offset, mid[1] + u[1] * offset)
            self.draw.line(
                [(c[0] - normal[0] * s, c[1] - normal[1] * s), (c[0] + normal[0] * s, c[1] + normal[1] * s)],
                fill=INK,
                width=max(1, self.line_width // 2),
            )

    def text_size(self, text: str) -> tuple[float, float]:
        left, top, right, bottom = self.font.getbbox(text)
        return right - left, bottom - top

    def label(self, text: str, at) -> None:
        w, h = self.text_size(text)
        x = min(max(at[0], w / 2 + 2), self.width - w / 2 - 2)
        y = min(max(at[1], h / 2 + 2), self.width - h / 2 - 2)
        pad = self.line_width
        box = (round(x - w / 2 - pad), round(y - h / 2 - pad), round(x + w / 2 + pad), round(y + h / 2 + pad))
        if min(low for low, _ in self.image.crop(box).getextrema()) < 128:
            self.cluttered = True
        self.draw.text((x, y), text, fill=INK, font=self.font, anchor="mm")

    def side_label(self, text: str, a, b, inside) -> None:
        """Label segment a-b on the side away from the point `inside`."""
        u = _unit(a, b)
        normal = (-u[1], u[0])
        mid = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
        if (inside[0] - mid[0]) * normal[0] + (inside[1] - mid[1]) * normal[1] > 0:
            normal = (-normal[0], -normal[1])
        w, h = self.text_size(text)
        d = 4 + abs(normal[0]) * w / 2 + abs(normal[1]) * h / 2 + self.line_width
        self.label(text, (mid[0] + normal[0] * d, mid[1] + normal[1] * d))

    def angle_label(self, text: str, vertex, toward_a, toward_b) -> None:
        """Label the angle at `vertex` between rays to a and b, inside it, clear of both rays."""
        u, v = _unit(vertex, toward_a), _unit(vertex, toward_b)
        bisector = _unit((0, 0), (u[0] + v[0], u[1] + v[1]))
        half = math.acos(max(-1.0, min(1.0, u[0] * v[0] + u[1] * v[1]))) / 2
        w, h = self.text_size(text)
        # Far enough along the bisector that the text box clears both rays.
        clearance = max(abs(-r[1]) * w / 2 + abs(r[0]) * h / 2 for r in (u, v)) + self.line_width + 2
        d = clearance / max(math.sin(half), 0.2)
        self.label(text, (vertex[0] + bisector[0] * d, vertex[1] + bisector[1] * d))

    def finish(self) -> Image.Image:
        return self.image.reduce(2)  # 2x2 box average: smooth lines and legible text


def _unit(a, b) -> tuple[float, float]:
    dx, dy = b[0] - a[0], b[1] - a[1]
    length = math.hypot(dx, dy) or 1.0
    return dx / length, dy / length


def _fit(points: list[tuple[float, float]], width: float, rng: random.Random, margin: float = 0.2):
    """Rotate a little, flip at random, and scale the figure into the canvas leaving room for labels."""
    phi = math.radians(rng.uniform(-20, 20))
    flip = rng.choice((1, -1))
    rotated = [
        (flip * (x * math.cos(phi) - y * math.sin(phi)), x * math.sin(phi) + y * math.cos(phi))
        for x, y in points
    ]
    xs, ys = [p[0] for p in rotated], [p[1] for p in rotated]
    span = max(max(xs) - min(xs), max(ys) - min(ys))
    inner = width * (1 - 2 * margin)
    scale = inner / span * rng.uniform(0.85, 1.0)
    free_x = width - (max(xs) - min(xs)) * scale
    free_y = width - (max(ys) - min(ys)) * scale
    ox = rng.uniform(free_x * 0.4, free_x * 0.6) - min(xs) * scale
    oy = rng.uniform(free_y * 0.4, free_y * 0.6) - min(ys) * scale
    return [(x * scale + ox, y * scale + oy) for x, y in rotated]


def _triangle_from_angles(a0: float, a1: float) -> list[tuple[float, float]]:
    """Vertices with interior angles a0 at the first, a1 at the second (degrees); base of length 1."""
    t = math.sin(math.radians(a1)) / math.sin(math.radians(a0 + a1))
    return [(0.0, 0.0), (1.0, 0.0), (t * math.cos(math.radians(a0)), -t * math.sin(math.radians(a0)))]


def _centroid(points):
    return sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points)


def _geo_triangle_angle(canvas: _Canvas, rng: random.Random) -> tuple[Surd, str]:
    while True:
        x, a = rng.randint(35, 105), rng.randint(35, 105)
        b = 180 - x - a
        if 35 <= b <= 105:
            break
    values = [a, b, x]
    order = [0, 1, 2]
    rng.shuffle(order)  # which vertex carries which angle; value index 2 is the unknown
    points = _fit(_triangle_from_angles(values[order[0]], values[order[1]]), canvas.width, rng, margin=0.06)
    canvas.polygon(points)
    for i in range(3):
        text = "x°" if order[i] == 2 else f"{values[order[i]]}°"
        canvas.angle_label(text, points[i], points[i - 1], points[(i + 1) % 3])
    return Surd(x), "triangle_angle"


def _geo_parallel(canvas: _Canvas, rng: random.Random) -> tuple[Surd, str]:
    w = canvas.width
    theta = rng.choice((rng.randint(50, 78), rng.randint(102, 130)))
    lines_y = (w * rng.uniform(0.3, 0.36), w * rng.uniform(0.64, 0.7))
    cx = w * rng.uniform(0.42, 0.58)
    mid_y = (lines_y[0] + lines_y[1]) / 2
    dx = 1 / math.tan(math.radians(theta))  # x change per unit of upward travel

    def x_at(y):
        return cx + (mid_y - y) * dx

    for y in lines_y:
        canvas.line((w * 0.04, y), (w * 0.96, y))
        arrow_x, s = w * 0.86, w * 0.03  # ">" marks: the lines are parallel
        canvas.draw.line(
            [(arrow_x - s, y - s), (arrow_x, y), (arrow_x - s, y + s)], fill=INK, width=canvas.line_width
        )
    top, bottom = lines_y[0] - w * 0.24, lines_y[1] + w * 0.24
    canvas.line((x_at(top), top), (x_at(bottom), bottom))

    # The four angles at an intersection, as (ray, ray, size): rays along the line (left/right)
    # and the transversal (up/down); corresponding and vertical angles are equal.
    def quadrants(y):
        point = (x_at(y), y)
        right, left = (point[0] + 1, y), (point[0] - 1, y)
        up, down = (x_at(y - 1), y - 1), (x_at(y + 1), y + 1)
        return point, [
            (right, up, theta),
            (up, left, 180 - theta),
            (left, down, theta),
            (down, right, 180 - theta),
        ]

    spots = [(line, q) for line in range(2) for q in range(4)]
    given, unknown = rng.sample(spots, 2)
    for (line, q), is_unknown in ((given, False), (unknown, True)):
        point, corners = quadrants(lines_y[line])
        ray_a, ray_b, size = corners[q]
        canvas.angle_label("x°" if is_unknown else f"{size}°", point, ray_a, ray_b)
    unknown_size = quadrants(lines_y[0])[1][unknown[1]][2]
    return Surd(unknown_size), "parallel"


def _geo_pythagoras(canvas: _Canvas, rng: random.Random) -> tuple[Surd, str]:
    while True:
        find_hypotenuse = rng.random() < 0.5
        if find_hypotenuse:
            a, b = rng.randint(1, 12), rng.randint(1, 12)
            answer, labels = Surd(1, a * a + b * b), (str(a), str(b), "x")
        else:
            c = rng.randint(3, 15)
            a = rng.randint(1, c - 1)
            b_squared = c * c - a * a
            b = math.sqrt(b_squared)
            answer, labels = Surd(1, b_squared), (str(a), "x", str(c))
        if 0.4 <= a / b <= 2.5:
            break
    # Right angle at C = (0, 0); legs along the axes (y up is negative in image coordinates).
    points = _fit([(0.0, 0.0), (b, 0.0), (0.0, -a)], canvas.width, rng)
    c_point, b_point, a_point = points
    canvas.polygon(points)
    canvas.right_angle(c_point, b_point, a_point)
    inside = _centroid(points)
    canvas.side_label(labels[0], c_point, a_point, inside)  # leg of length a
    canvas.side_label(labels[1], c_point, b_point, inside)  # leg of length b
    canvas.side_label(labels[2], a_point, b_point, inside)  # hypotenuse
    return answer, "pythagoras"


def _geo_midsegment(canvas: _Canvas, rng: random.Random) -> tuple[Surd, str]:
    while True:
        a0, a1 = rng.randint(40, 85), rng.randint(40, 85)
        if a0 + a1 <= 140:
            break
    points = _fit(_triangle_from_angles(a0, a1), canvas.width, rng)
    p0, p1, apex = points
    m0 = ((p0[0] + apex[0]) / 2, (p0[1] + apex[1]) / 2)
    m1 = ((p1[0] + apex[0]) / 2, (p1[1] + apex[1]) / 2)
    canvas.polygon(points)
    canvas.line(m0, m1)
    for a, b, count in ((p0, m0, 1), (m0, apex, 1), (p1, m1, 2), (m1, apex, 2)):
        canvas.tick(a, b, count)
    base = rng.randint(3, 24)
    if rng.random() < 0.7:
        answer, base_text, mid_text = Surd(base, 1, 2), str(base), "x"
    else:
        answer, base_text, mid_text = Surd(base * 2), "x", str(base)
    canvas.side_label(base_text, p0, p1, apex)
    canvas.side_label(mid_text, m0, m1, apex)
    return answer, "midsegment"


def _geo_special_right(canvas: _Canvas, rng: random.Random) -> tuple[Surd, str]:
    """30-60-90 triangle: one side and the 30° angle given."""
    short = rng.randint(1, 10)
    # Sides in units of the short leg: short 1, long sqrt(3), hypotenuse 2.
    sides = {"short": Surd(short), "long": Surd(short, 3), "hypotenuse": Surd(2 * short)}
    given, unknown = rng.sample(["short", "hypotenuse", "long"], 2)
    if given == "long":  # label it as an integer: scale so the long leg is k, short leg k/sqrt(3)
        k = rng.randint(2, 12)
        sides = {"short": Surd(k, 3, 3), "long": Surd(k), "hypotenuse": Surd(2 * k, 3, 3)}
    points = _fit([(0.0, 0.0), (math.sqrt(3), 0.0), (0.0, -1.0)], canvas.width, rng)
    c_point, a_point, b_point = points  # right angle at C, 30° at A, 60° at B
    canvas.polygon(points)
    canvas.right_angle(c_point, a_point, b_point)
    canvas.angle_label("30°", a_point, c_point, b_point)
    inside = _centroid(points)
    segments = {"short": (c_point, b_point), "long": (c_point, a_point), "hypotenuse": (a_point, b_point)}
    canvas.side_label(sides[given].latex(), *segments[given], inside)
    canvas.side_label("x", *segments[unknown], inside)
    return sides[unknown], "special_right"


_GEO_DRAWERS: dict[str, Callable[[_Canvas, random.Random], tuple[Surd, str]]] = {
    "triangle_angle": _geo_triangle_angle,
    "parallel": _geo_parallel,
    "pythagoras": _geo_pythagoras,
    "midsegment": _geo_midsegment,
    "special_right": _geo_special_right,
}


def _render_geo(kind: str, size: int, rng: random.Random, task: str = "geo") -> SynthItem:
    for _ in range(100):  # redraw figures whose labels would touch a line or each other
        canvas = _Canvas(size)
        answer, tag = _GEO_DRAWERS[kind](canvas, rng)
        if not canvas.cluttered:
            break
    distractors = _geo_distractors(answer, rng, is_angle=kind in ANGLE_KINDS)
    return SynthItem(canvas.finish(), QUESTIONS[task], answer.latex(), tag, distractors)


_RENDERERS: dict[str, Callable[[str, int, random.Random], SynthItem]] = {
    "color": _render_color,
    "shape": _render_shape,
    "count": _render_count,
    "angle": lambda kind, size, rng: _render_geo(kind, size, rng, "angle"),
    "geo": _render_geo,
    "box": _render_box,
}
