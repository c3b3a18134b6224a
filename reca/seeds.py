"""Named random streams: every random draw in training is a pure function of *where* it happens.

A sample's seed (:func:`sample_seed`) depends on the run's seed, the objective, the step and the
sample's position in the step's global batch — never on which process or micro-batch draws it. Each
kind of draw then has its own named stream derived from that seed, so adding a draw of one kind
cannot shift another. This is what makes a resumed run and a 2-process DDP run reproduce a single
uninterrupted one.

The stream offsets are fixed forever: changing one changes every result.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from reca.config import OBJECTIVES

# stream name → offset added to a sample's seed before seeding its generator
STREAMS: dict[str, int] = {
    "noise": 0,  # the diffusion / flow noise of a sample (and an image's sampling noise)
    "timestep": 1,  # the training noise level σ
    "cond_dropout": 2,  # whether the condition is dropped for classifier-free guidance
    "mask": 3,  # which tokens are masked, and in what order (masked generation: MAR / Harmon)
    "feature_noise": 4,  # the perturbation of a reconstruction condition (objectives.recon.feature_noise)
    "instruction": 0,  # the reconstruction instruction (a Python RNG, independent of torch's)
}
_PRIME = 1_000_003
_DATA_STRIDE = 7919  # objectives' data orders are seed + 7919·index: unrelated permutations


def sample_seed(base: int, objective: str, step: int, index: int) -> int:
    """Seed of one training sample, a pure function of where it sits in the global stream
    (``index`` is its position in the step's global batch), not of which process draws it."""
    h = (base * _PRIME + list(OBJECTIVES).index(objective)) * _PRIME + step
    return (h * _PRIME + index) % (2**62)


def data_seed(base: int, objective: str) -> int:
    """Seed of one objective's data order (its shuffles, epoch after epoch)."""
    return base + _DATA_STRIDE * list(OBJECTIVES).index(objective)


def generator(seed: int, stream: str = "noise", device: torch.device | str | None = None) -> torch.Generator:
    """A torch generator for one sample's draws of one kind."""
    g = torch.Generator(device=device) if device is not None else torch.Generator()
    return g.manual_seed((int(seed) + STREAMS[stream]) % (2**63))


def python_rng(seed: int, stream: str = "instruction") -> random.Random:
    return random.Random(int(seed) + STREAMS[stream])


def per_sample_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per seed, stacked ``(B, *shape)`` (CPU, float32)."""
    return torch.stack([torch.randn(shape, generator=generator(s, "noise")) for s in seeds])


def dropped(seeds: Sequence[int], p: float) -> list[bool]:
    """Per sample: is its condition dropped (classifier-free guidance training), with probability ``p``."""
    return [torch.rand((), generator=generator(s, "cond_dropout")).item() < p for s in seeds]
