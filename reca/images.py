"""Pixels between tensors and PIL, and image grids: one home for the conventions every adapter,
the trainer's sample grids and the evaluation's pictures share (pixels in ``[-1, 1]``, RGB)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_pil(pixels: torch.Tensor, channels_last: bool = False) -> list[Image.Image]:
    """``(B, 3, H, W)`` (or ``(B, H, W, 3)`` with ``channels_last``) in ``[-1, 1]`` → PIL images."""
    x = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    arr = (x if channels_last else x.permute(0, 2, 3, 1)).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def square_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), centre crop. May return ``image`` itself (already RGB and
    ``size``²): Pillow's convert, resize and crop would each only copy it, ~25 µs an image for the
    demo's 32² pools; read the result, never draw on it."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    if (w, h) != image.size:
        image = image.resize((w, h), Image.BICUBIC)
    if (w, h) == (size, size):
        return image
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def target_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """Generation target: square crop at the generation resolution, in [-1, 1]."""
    x = torch.from_numpy(np.asarray(square_crop(image, size), dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1)


def rows_grid(rows: Sequence[Sequence[Image.Image]], pad: int = 2) -> Image.Image:
    """Rows of images on white, each cell the size of the largest image, ``pad`` pixels apart."""
    size = max(im.width for row in rows for im in row)
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (size + pad) + pad, len(rows) * (size + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((size, size)), (pad + j * (size + pad), pad + i * (size + pad)))
    return grid


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Images edge to edge (one row unless ``cols``), all resized to the first one's size."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid
