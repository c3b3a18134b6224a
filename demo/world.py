"""A procedural world with the caption bias of the real one.

Six shapes in six colours on a dark, noisy background. Every shape has one canonical colour (the
"green broccoli"); the other 30 colour–shape pairs are rare. Captioned text-to-image data shows
canonical pairs only, with the colour word often dropped — so the generation path never reads
"a purple triangle" — while unlabelled images and dense image-to-text data cover all 36 pairs, so
the model can recognise a purple triangle it cannot draw (docs/demo.md: the bias had to be total
to reproduce the failure).

Every render is a pure function of its seed, and comes with its ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 32
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "orange": (0.95, 0.55, 0.10),
    "yellow": (0.92, 0.88, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.92),
    "purple": (0.62, 0.20, 0.85),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
CANONICAL: dict[str, str] = {
    "circle": "red",
    "square": "blue",
    "triangle": "green",
    "star": "yellow",
    "cross": "purple",
    "ring": "orange",
}
MAX_TILT = 0.2  # radians (about 11 degrees) of tilt for shapes without rotational symmetry
# The 30 rare pairs are split once, here, into a dev side (every setting of the demo is chosen on
# it, with its own sample seeds) and a test side (scored by the final run only; the README's table
# comes from it). Both sides are balanced: dev holds 2 colours per shape and uses each colour twice,
# test 3 per shape and each colour three times. The six headline pairs of the picture are on the
# test side.
HEADLINE: dict[str, str] = {
    "circle": "blue",
    "square": "yellow",
    "triangle": "purple",
    "star": "red",
    "cross": "orange",
    "ring": "green",
}
DEV: dict[str, tuple[str, str]] = {
    "circle": ("orange", "yellow"),
    "square": ("red", "orange"),
    "triangle": ("red", "yellow"),
    "star": ("green", "purple"),
    "cross": ("green", "blue"),
    "ring": ("blue", "purple"),
}
SPLITS = ("dev", "test")


@dataclass(frozen=True)
class Render:
    image: Image.Image
    shape: str
    colour: str
    center: tuple[float, float]
    radius: float
    mask: np.ndarray  # (SIZE, SIZE) bool, the object's pixels


def is_canonical(shape: str, colour: str) -> bool:
    return CANONICAL[shape] == colour


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int = SIZE) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = x - cx, y - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return rho <= r
    if shape == "ring":
        return (rho <= r) & (rho >= 0.55 * r)
    if shape == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if shape == "cross":
        arm = 0.33 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    if shape == "triangle":  # equilateral, circumradius r: inside all three half-planes
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = angle * 0 + k * 2 * np.pi / 3 + np.pi / 2
            inside &= (u * np.cos(a) + v * np.sin(a)) <= 0.5 * r
        return inside
    if shape == "star":  # five points: radius oscillates between r and 0.45 r
        k = (theta % (2 * np.pi / 5)) / (2 * np.pi / 5)
        edge = 0.45 * r + (r - 0.45 * r) * np.abs(1 - 2 * k) ** 1.5
        return rho <= edge
    raise ValueError(f"unknown shape {shape!r}")


def render(shape: str, colour: str, seed: int, size: int = SIZE) -> Render:
    """One image: position, size, rotation, background and colour jitter all from ``seed``."""
    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(13.5, 18.5, size=2) * size / SIZE
    r = rng.uniform(7.5, 10.5) * size / SIZE
    # Upright, with a little tilt: a free rotation makes a 32-pixel generator average shapes into
    # blobs (canonical pairs drawn right 60%, docs/demo.md, "What else was measured").
    angle = rng.uniform(-MAX_TILT, MAX_TILT) if shape not in ("circle", "ring") else 0.0
    mask = shape_mask(shape, cx, cy, r, angle, size)
    background = rng.uniform(0.0, 0.1, size=3)
    img = np.broadcast_to(background, (size, size, 3)).copy()
    rgb = np.clip(np.array(COLOURS[colour]) + rng.uniform(-0.05, 0.05, size=3), 0, 1)
    img[mask] = rgb
    img = np.clip(img + rng.normal(0, 0.02, size=img.shape), 0, 1)
    image = Image.fromarray((img * 255).round().astype(np.uint8))
    return Render(image, shape, colour, (float(cx), float(cy)), float(r), mask)


def dense_caption(shape: str, colour: str) -> str:
    """Image-to-text captions describe what is there, rare pairs included."""
    return f"a {colour} {shape}"


def biased_caption(shape: str, colour: str, rng: np.random.Generator, drop_colour: float = 0.5) -> str:
    """Text-to-image captions: canonical pairs only (enforced), colour word often dropped."""
    if not is_canonical(shape, colour):
        raise ValueError(f"a rare pair ({colour} {shape}) must never be captioned for the generation path")
    return f"a {shape}" if rng.random() < drop_colour else f"a {colour} {shape}"


def pairs(kind: str) -> list[tuple[str, str]]:
    """(shape, colour) pairs: "canonical", "rare" (all 30), the rare pairs of the "dev" or "test"
    side, the six "headline" pairs (test side), or "all" 36."""
    if kind == "canonical":
        return [(s, CANONICAL[s]) for s in SHAPES]
    if kind == "headline":
        return [(s, HEADLINE[s]) for s in SHAPES]
    if kind == "dev":
        return [(s, c) for s in SHAPES for c in COLOURS if c in DEV[s]]
    rare = [(s, c) for s in SHAPES for c in COLOURS if not is_canonical(s, c)]
    if kind == "rare":
        return rare
    if kind == "test":
        return [(s, c) for s, c in rare if c not in DEV[s]]
    if kind == "all":
        return [(s, c) for s in SHAPES for c in COLOURS]
    raise ValueError(f"unknown pair kind {kind!r}")
