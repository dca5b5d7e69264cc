"""Seeded synthetic scenes with a question and its answer: what the demo VLM was trained on and is evaluated on.

A scene is one to three flat shapes (circle, square, triangle, star) of five colors, several sizes and positions,
on a plain or lightly noisy background, in an image of 112-224 pixels per side (square or not). Numpy and Pillow
only: `edgevlm demo` draws scenes on devices that have no torch.

Question types, each with a one-word answer:

- ``shape``: one shape, "What shape is this?" -> "circle"
- ``color``: one to three shapes of different kinds, "What color is the triangle?" -> "red"
- ``count``: one to three shapes, kinds may repeat, "How many shapes are there?" -> "2"
- ``position``: two shapes of different kinds, "Is the red square left or right of the circle?" -> "left"

`scene(index, split)` is a pure function of its arguments. Each split draws from its own seed stream: training
uses "train", its early stopping "val", tests and the benchmark "test", `edgevlm demo` "demo".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 185),
}
QUESTION_TYPES = ("shape", "color", "count", "position")
SPLITS = {"train": 0, "val": 1, "test": 2, "demo": 3}
MIN_SIDE, MAX_SIDE = 112, 224
MAX_SHAPES = 3


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    center: tuple[float, float]  # (x, y) in pixels
    radius: float  # half the side of the shape's bounding square
    rotation: float = 0.0  # radians, triangles and stars


@dataclass(frozen=True)
class Scene:
    """A rendered image with its shapes, one question about it and the expected answer."""

    image: Image.Image
    shapes: tuple[Shape, ...]
    question_type: str
    question: str
    answer: str


def scene(index: int, split: str = "train", question_type: str | None = None) -> Scene:
    """Scene number `index` of `split` (train, val, test or demo); `question_type` None picks one at random."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if question_type is not None and question_type not in QUESTION_TYPES:
        raise ValueError(f"question type {question_type!r} is not one of {', '.join(QUESTION_TYPES)}")
    rng = np.random.default_rng([SPLITS[split], index])
    if question_type is None:
        question_type = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
    width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    return _ASK[question_type](rng, width, height)


def _ask_shape(rng: np.random.Generator, width: int, height: int) -> Scene:
    (shape,) = _place(rng, width, height, _kinds(rng, 1, distinct=True))
    return _render(rng, width, height, (shape,), "shape", "What shape is this?", shape.kind)


def _ask_color(rng: np.random.Generator, width: int, height: int) -> Scene:
    shapes = _place(rng, width, height, _kinds(rng, int(rng.integers(1, MAX_SHAPES + 1)), distinct=True))
    target = shapes[rng.integers(len(shapes))]
    return _render(rng, width, height, shapes, "color", f"What color is the {target.kind}?", target.color)


def _ask_count(rng: np.random.Generator, width: int, height: int) -> Scene:
    shapes = _place(rng, width, height, _kinds(rng, int(rng.integers(1, MAX_SHAPES + 1)), distinct=False))
    return _render(rng, width, height, shapes, "count", "How many shapes are there?", str(len(shapes)))


def _ask_position(rng: np.random.Generator, width: int, height: int) -> Scene:
    # The two shapes do not overlap horizontally, so "left" and "right" are never ambiguous.
    shapes = _place(rng, width, height, _kinds(rng, 2, distinct=True), separate_x=True)
    subject, reference = shapes if rng.random() < 0.5 else shapes[::-1]
    question = f"Is the {subject.color} {subject.kind} left or right of the {reference.kind}?"
    answer = "left" if subject.center[0] < reference.center[0] else "right"
    return _render(rng, width, height, shapes, "position", question, answer)


_ASK = {"shape": _ask_shape, "color": _ask_color, "count": _ask_count, "position": _ask_position}


def _kinds(rng: np.random.Generator, n: int, *, distinct: bool) -> list[tuple[str, str]]:
    kinds = rng.choice(len(SHAPES), size=n, replace=not distinct)
    colors = rng.choice(len(COLORS), size=n, replace=not distinct)
    names = list(COLORS)
    return [(SHAPES[k], names[c]) for k, c in zip(kinds, colors, strict=True)]


def _place(
    rng: np.random.Generator, width: int, height: int, kinds: list[tuple[str, str]], *, separate_x: bool = False
) -> tuple[Shape, ...]:
    """Non-overlapping shapes: random radius and center, redrawn (smaller each round) until they fit."""
    side = min(width, height)
    for attempt in range(200):
        shrink = 1.0 - min(attempt, 100) / 200
        shapes: list[Shape] = []
        for kind, color in kinds:
            radius = float(rng.uniform(0.12, 0.24 * shrink if len(kinds) > 1 else 0.34) * side)
            radius = max(radius, 13.0)
            x = float(rng.uniform(radius + 2, width - radius - 2))
            y = float(rng.uniform(radius + 2, height - radius - 2))
            shapes.append(Shape(kind, color, (x, y), radius))
        if all(_apart(a, b, separate_x) for i, a in enumerate(shapes) for b in shapes[i + 1 :]):
            return tuple(shapes)
    raise RuntimeError(f"could not place {len(kinds)} shapes in {width}x{height}")  # not reached for these sizes


def _apart(a: Shape, b: Shape, separate_x: bool) -> bool:
    gap = a.radius + b.radius + 4
    if separate_x:
        return abs(a.center[0] - b.center[0]) >= gap
    return math.dist(a.center, b.center) >= gap * 1.1


def _render(
    rng: np.random.Generator, width: int, height: int, shapes: tuple[Shape, ...], question_type: str, question: str,
    answer: str,
) -> Scene:  # fmt: skip
    image = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(image)
    drawn = []
    for shape in shapes:
        fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[shape.color])
        drawn.append(replace(shape, rotation=float(rng.uniform(-0.3, 0.3))))
        _draw(draw, drawn[-1], fill)
    return Scene(image, tuple(drawn), question_type, question, answer)


def shape_map(s: Scene, size: tuple[int, int]) -> np.ndarray:
    """Per pixel of `s.image` resized to `size` (width, height): 0 for background, else 1 + the index in `s.shapes`
    of the shape drawn there. What the trainer's per-token targets are made of."""
    mask = Image.new("L", s.image.size, 0)
    draw = ImageDraw.Draw(mask)
    for i, shape in enumerate(s.shapes):
        _draw(draw, shape, 1 + i)
    return np.asarray(mask.resize(size, Image.NEAREST))


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A low-saturation light or dark color, sometimes with pixel noise: never mistaken for a shape's color."""
    level = rng.uniform(175, 250) if rng.random() < 0.8 else rng.uniform(15, 70)
    tint = rng.uniform(-12, 12, size=3)
    pixels = np.broadcast_to(level + tint, (height, width, 3)).astype(np.float32)
    if rng.random() < 0.4:
        pixels = pixels + rng.normal(0, rng.uniform(2, 10), size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, fill: tuple[int, ...] | int) -> None:
    (x, y), r, rotation = shape.center, shape.radius, shape.rotation
    if shape.kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape.kind == "square":
        draw.polygon(_regular(x, y, r * 0.85 * math.sqrt(2), 4, math.pi / 4), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon(_regular(x, y, r, 3, -math.pi / 2 + rotation), fill=fill)
    elif shape.kind == "star":
        outer = _regular(x, y, r, 5, -math.pi / 2 + rotation)
        inner = _regular(x, y, r * 0.45, 5, -math.pi / 2 + rotation + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")


def _regular(x: float, y: float, r: float, n: int, start: float) -> list[tuple[float, float]]:
    return [(x + r * math.cos(start + 2 * math.pi * i / n), y + r * math.sin(start + 2 * math.pi * i / n)) for i in range(n)]  # fmt: skip
