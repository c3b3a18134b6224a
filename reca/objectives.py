"""The RecA objective mixture: reconstruction from frozen semantic tokens, plus optional text-to-image
and image-to-text, each with its share of the batch and its loss coefficient.

:class:`RecATask` wraps the adapter in one ``nn.Module`` whose ``forward`` computes every loss, so
accelerate prepares a single module (DeepSpeed cannot prepare several) and DDP's gradient hooks
fire through ``forward``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from reca.adapter import Condition
from reca.config import ObjectivesConfig
from reca.encoders import Preprocess, target_pixels
from reca.instructions import draw_instruction

OBJECTIVES = ("recon", "t2i", "i2t")


def sequence_nll(logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from per-token log-probs ``(B, T)`` and a mask: token mean per sample, then mean
    over samples. Unlike one token mean over the batch, it does not depend on how a batch is split
    across processes or micro-batches (two-process DDP reproduces one process)."""
    return (-(logp * valid).sum(1) / valid.sum(1)).mean()


def sample_seed(base: int, objective: str, step: int, index: int) -> int:
    """Seed of one sample's randomness, a pure function of where it sits in the global stream
    (``index`` is its position in the step's global batch), not of which process draws it."""
    h = (base * 1_000_003 + OBJECTIVES.index(objective)) * 1_000_003 + step
    return (h * 1_000_003 + index) % (2**62)


@dataclass(frozen=True)
class Transform:
    """Per image: the generation target and/or the encoder input (picklable for loader workers)."""

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
    # recon needs both views (that the two resolutions differ is the bottleneck), t2i only the
    # target, i2t only what the encoder sees.
    return Transform(resolution, None if objective == "t2i" else encoder, objective != "i2t")


def instructions_for(seeds: Sequence[int], cfg: ObjectivesConfig) -> list[str]:
    r = cfg.recon
    return [draw_instruction(random.Random(s), r.instructions, r.fixed_instruction, r.instruction_dropout) for s in seeds]


class RecATask(nn.Module):
    """``forward(batches)`` → ``{"loss": weighted sum, "recon": …, "t2i": …, "i2t": …}``."""

    def __init__(self, umm: nn.Module, cfg: ObjectivesConfig):
        super().__init__()
        self.umm = umm
        self.cfg = cfg

    def forward(self, batches: dict[str, dict]) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        if "recon" in batches:
            b = batches["recon"]
            cond = Condition(semantic=b["semantic"], instructions=instructions_for(b["seeds"], self.cfg))
            losses["recon"] = self.umm.generation_loss(b["target"], cond, b["seeds"])
        if "t2i" in batches:
            b = batches["t2i"]
            losses["t2i"] = self.umm.generation_loss(b["target"], Condition(texts=list(b["caption"])), b["seeds"])
        if "i2t" in batches:
            b = batches["i2t"]
            losses["i2t"] = self.umm.understanding_loss(b["semantic"], [self.cfg.i2t_prompt] * len(b["caption"]), list(b["caption"]))
        losses["loss"] = sum(getattr(self.cfg, k).weight * v for k, v in losses.items())
        return losses
