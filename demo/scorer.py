"""The world's deterministic scorer: it sees only pixels, never model internals.

Colour: the majority nearest palette colour over the object's pixels (foreground = pixels clearly
brighter than the dark background). Shape: a small CNN trained on ground-truth renders, accepted only
if it is ≥ 99 % accurate on held-out renders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from demo.seeds import SCORER_TEST_SEEDS, SCORER_TRAIN_SEED, SCORER_TRAIN_SEEDS
from demo.world import COLOURS, SHAPES, render
from eval.scorers import palette_votes
from reca.io import atomic_write

PALETTE_RGB255 = {name: tuple(255 * c for c in rgb) for name, rgb in COLOURS.items()}


def foreground(pixels: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """Object pixels of an (H, W, 3) float image in [0, 1]: the background is at most ~0.15."""
    return pixels.max(-1) > threshold


def palette_colour(image: Image.Image) -> str | None:
    """Majority nearest palette colour of the foreground pixels, or None for an empty image."""
    fg = foreground(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    if fg.sum() < 4:
        return None
    votes = palette_votes(image, PALETTE_RGB255, fg)
    return max(votes, key=votes.get)  # the first colour in palette order on a tie


class ShapeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(256, len(SHAPES)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _silhouettes(images: list[Image.Image]) -> torch.Tensor:
    """Shape is judged on the foreground silhouette alone, so colour cannot leak into it."""
    arr = np.stack([foreground(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0) for im in images])
    return torch.from_numpy(arr.astype(np.float32))[:, None]


def _renders(seeds: range) -> tuple[list[Image.Image], torch.Tensor]:
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    items = [render(*pairs[i % len(pairs)], seed=seed) for i, seed in enumerate(seeds)]
    return [r.image for r in items], torch.tensor([SHAPES.index(r.shape) for r in items])


def train_shape_net(steps: int = 1200, seed: int = SCORER_TRAIN_SEED) -> tuple[ShapeNet, float]:
    """Train on ground-truth renders; returns the net and its held-out accuracy."""
    torch.manual_seed(seed)
    images, labels = _renders(SCORER_TRAIN_SEEDS)
    x = _silhouettes(images)
    net = ShapeNet()
    opt = torch.optim.Adam(net.parameters(), lr=4e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(net(x[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    test_images, test_labels = _renders(SCORER_TEST_SEEDS)
    net.eval()
    with torch.no_grad():
        accuracy = (net(_silhouettes(test_images)).argmax(1) == test_labels).float().mean().item()
    return net, accuracy


class WorldScorer:
    """Scores generated images against the (shape, colour) they were asked for."""

    name = "world"

    def __init__(self, net: ShapeNet, accuracy: float):
        if accuracy < 0.99:
            raise ValueError(f"shape classifier is {accuracy:.1%} accurate on held-out renders; the demo needs >= 99%")
        self.net, self.accuracy = net.eval(), accuracy

    @classmethod
    def load_or_train(cls, path: str | Path | None = None) -> "WorldScorer":
        path = Path(path) if path else None
        if path and path.is_file():
            state = torch.load(path)
            net = ShapeNet()
            net.load_state_dict(state["net"])
            return cls(net, state["accuracy"])
        net, accuracy = train_shape_net()
        if path:
            atomic_write(path, lambda f: torch.save({"net": net.state_dict(), "accuracy": accuracy}, f))
        return cls(net, accuracy)

    @torch.no_grad()
    def shapes(self, images: list[Image.Image]) -> list[str]:
        return [SHAPES[i] for i in self.net(_silhouettes(images)).argmax(1).tolist()]

    def judge(self, images: list[Image.Image], shapes: list[str], colours: list[str]) -> list[dict]:
        predicted = self.shapes(images)
        rows = []
        for im, ps, s, c in zip(images, predicted, shapes, colours):
            pc = palette_colour(im) or "none"  # an empty image has no colour
            rows.append(
                {"shape": ps, "colour": pc, "shape_ok": ps == s, "colour_ok": pc == c, "correct": ps == s and pc == c}
            )
        return rows

    def score(self, image: Image.Image, prompt) -> dict:
        """The evaluation suite's scorer interface: the prompt's first included object."""
        item = prompt.include[0]
        return self.judge([image], [item["class"]], [item.get("color", "")])[0]


def load(path: str) -> WorldScorer:
    """The scorer saved at ``path`` (trained there first if missing): the factory that
    ``eval.scorer: demo.scorer:load`` names for the evaluation during fine-tuning."""
    return WorldScorer.load_or_train(path)
