"""The RecA objective mixture: reconstruction from frozen semantic tokens, plus optional text-to-image
and image-to-text, each with its share of the batch and its loss coefficient. What each objective
*is* (its condition, its loss, the views of an image it needs) is one row of
:data:`reca.config.OBJECTIVES`; this module turns a row into a loss.

:class:`RecATask` wraps the adapter in one ``nn.Module`` whose ``forward`` computes every loss, so
accelerate prepares a single module (DeepSpeed cannot prepare several) and DDP's gradient hooks
fire through ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from reca.adapter import Condition
from reca.config import OBJECTIVES, ObjectivesConfig
from reca.encoders import Preprocess
from reca.images import target_pixels
from reca.instructions import draw_instruction
from reca.seeds import generator, python_rng


@dataclass
class Batch:
    """One objective's micro-batch, as the loss sees it."""

    seeds: list[int]  # per-sample seeds (reca.seeds.sample_seed): all of a sample's randomness
    target: torch.Tensor | None = None  # pixels at the generation resolution, [-1, 1]
    semantic: torch.Tensor | None = None  # the frozen encoder's tokens (B, N, D)
    captions: list[str] | None = None

    def to(self, device: torch.device) -> "Batch":
        move = lambda x: x.to(device) if x is not None else None  # noqa: E731
        return Batch(self.seeds, move(self.target), move(self.semantic), self.captions)


@dataclass(frozen=True)
class Transform:
    """Per image: the views its objective needs (picklable for loader workers)."""

    resolution: int
    encoder: Preprocess | None
    target: bool

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        out = {}
        if self.target:
            out["target"] = target_pixels(image, self.resolution)
        if self.encoder is not None:
            out["enc"] = self.encoder(image)
        return out


def transform_for(objective: str, resolution: int, encoder: Preprocess) -> Transform:
    views = OBJECTIVES[objective].views
    return Transform(resolution, encoder if "enc" in views else None, "target" in views)


def instructions_for(seeds: Sequence[int], cfg: ObjectivesConfig) -> list[str]:
    r = cfg.recon
    return [draw_instruction(python_rng(s), r.instructions, r.fixed_instruction, r.instruction_dropout) for s in seeds]


def perturb(tokens: torch.Tensor, seeds: Sequence[int], xi: float) -> torch.Tensor:
    """LAFITE's perturbation (arXiv 2111.13792, §3.2), per token: ``h + xi·‖h‖·ε/‖ε‖`` with
    ε ~ N(0, I) drawn from the sample's seed, rescaled to ``‖h‖`` (LAFITE normalises; unit-norm
    tokens stay unit-norm). Image features then cover a shell around each image, where the text
    features of its caption fall."""
    eps = torch.stack([torch.randn(tuple(tokens.shape[1:]), generator=generator(s, "feature_noise")) for s in seeds])
    eps = eps.to(tokens)
    norm = tokens.norm(dim=-1, keepdim=True)
    noisy = tokens + xi * norm * eps / eps.norm(dim=-1, keepdim=True)
    return noisy * norm / noisy.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class RecATask(nn.Module):
    """``forward(batches)`` → ``{"loss": weighted sum, "recon": …, "t2i": …, "i2t": …}``."""

    def __init__(self, umm: nn.Module, cfg: ObjectivesConfig):
        super().__init__()
        self.umm = umm
        self.cfg = cfg

    def condition(self, name: str, b: Batch) -> Condition:
        if OBJECTIVES[name].condition == "text":
            return Condition(texts=list(b.captions or []))
        r = self.cfg.recon
        semantic = b.semantic[:, : r.keep_tokens] if r.keep_tokens else b.semantic
        if r.feature_noise:
            semantic = perturb(semantic, b.seeds, r.feature_noise)
        return Condition(semantic=semantic, instructions=instructions_for(b.seeds, self.cfg))

    def forward(self, batches: dict[str, Batch]) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        for name, b in batches.items():
            if OBJECTIVES[name].loss == "generation":
                losses[name] = self.umm.generation_loss(b.target, self.condition(name, b), b.seeds)
            else:  # understanding: caption the image after the fixed question
                captions = list(b.captions or [])
                losses[name] = self.umm.understanding_loss(b.semantic, [self.cfg.i2t_prompt] * len(captions), captions)
        losses["loss"] = sum(getattr(self.cfg, k).weight * v for k, v in losses.items())
        return losses
