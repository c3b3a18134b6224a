"""Rectified-flow (flow-matching) maths as pure functions, following diffusers' own Sana/SD3 training
scripts: ``x_t = (1 − σ)·x + σ·ε``, the model predicts the velocity ``ε − x``, weighted MSE.

Randomness is drawn per sample from its own seed (:mod:`reca.seeds`), so a sample's noise and timestep do not depend on
how the batch is split across processes or micro-batches (two-process DDP then reproduces the
one-process run, and a resumed run reproduces the uninterrupted one).
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from reca.seeds import generator


def sample_sigmas(
    seeds: Sequence[int],
    scheduler_sigmas: torch.Tensor,
    weighting_scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Training noise levels σ ∈ (0, 1], one per sample, indexed into the scheduler's σ table as
    diffusers' scripts do (``compute_density_for_timestep_sampling`` then ``sigmas[indices]``)."""
    u = torch.cat(
        [
            compute_density_for_timestep_sampling(
                weighting_scheme, 1, logit_mean, logit_std, mode_scale, generator=generator(s, "timestep")
            )
            for s in seeds
        ]
    )
    n = len(scheduler_sigmas) - 1  # the table ends with the terminal 0, never a training σ
    indices = (u * n).long().clamp(0, n - 1)
    return scheduler_sigmas[indices].float()


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1.0 - s) * x0 + s * noise


def flow_matching_loss(
    pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    weighting_scheme: str = "logit_normal",
) -> torch.Tensor:
    """Weighted MSE between the predicted and the true velocity ``ε − x0``, mean over samples."""
    target = noise - x0
    weight = compute_loss_weighting_for_sd3(weighting_scheme, sigmas).to(pred)
    weight = weight.view(-1, *([1] * (pred.ndim - 1)))
    per_sample = (weight * (pred.float() - target.float()) ** 2).flatten(1).mean(1)
    return per_sample.mean()


def x0_loss(
    pred_x0: torch.Tensor, x0: torch.Tensor, sigmas: torch.Tensor, weighting_scheme: str = "logit_normal"
) -> torch.Tensor:
    """MSE of a clean-sample prediction. For small models it learns sharper shapes than velocity
    prediction (in an early prototype of the demo world: canonical colour+shape 46% → 91%)."""
    weight = compute_loss_weighting_for_sd3(weighting_scheme, sigmas).to(pred_x0).view(-1, *([1] * (pred_x0.ndim - 1)))
    return (weight * (pred_x0.float() - x0.float()) ** 2).flatten(1).mean(1).mean()


def velocity_from_x0(xt: torch.Tensor, pred_x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """v = ε − x0 = (x_t − x0) / σ, since x_t = (1 − σ)·x0 + σ·ε."""
    return (xt - pred_x0) / sigma


def guided(pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)
