"""Write a small folder of captioned synthetic images (coloured shapes on dark ground) with a
``captions.jsonl`` manifest, for the tiny smoke-test configs. Deterministic by seed."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def write(out: Path, n: int = 32, size: int = 32, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        im = Image.new("RGB", (size, size), (rng.randrange(0, 25),) * 3)
        r = rng.uniform(0.25, 0.35) * size
        cx, cy = rng.uniform(0.4, 0.6) * size, rng.uniform(0.4, 0.6) * size
        box = (cx - r, cy - r, cx + r, cy + r)
        draw = ImageDraw.Draw(im)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        name = f"{i:04d}.png"
        im.save(out / name)
        lines.append({"image": name, "caption": f"a {colour} {shape}"})
    manifest = out / "captions.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(write(a.out, a.n, a.size, a.seed))
