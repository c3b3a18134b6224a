"""Matrix-based Rényi entropy of token hidden states: the maths of the pseudo-unification probe.

For one sequence of token states Z ∈ R^{n×d} (Sánchez Giraldo, Rao & Príncipe, "Measures of entropy
from data using infinitely divisible kernels", IEEE T-IT 2015; used per layer by arXiv 2604.10949)::

    K_ij = exp(−‖z_i − z_j‖² / 2σ²)          Gaussian Gram matrix, K_ii = 1
    A    = K / tr(K)                          unit trace, eigenvalues λ_i ≥ 0, Σ λ_i = 1
    H_α  = 1/(1−α) · log tr(A^α) = 1/(1−α) · log Σ_i λ_i^α      (α ≠ 1; default α = 1.01)
    H_1  = −Σ_i λ_i log λ_i                   (the α → 1 limit, von Neumann / Shannon)

0 ≤ H_α ≤ log n: 0 when all tokens coincide, log n when they are mutually far apart at scale σ.
The response proxy is Ĥ(Z_r | Z_p) = H_α(K_joint) − H_α(K_pp) (:func:`conditional_entropy`).

Choices (fixed here so every checkpoint is measured the same way; docs/probe.md):

* everything is computed in float64 whatever the input dtype, eigenvalues by ``torch.linalg.eigvalsh``
  and clamped at 0 (round-off makes the smallest slightly negative);
* σ defaults to the median pairwise distance (:func:`median_sigma`), which makes H invariant to the
  overall scale of a layer's activations — layers differ in norm by orders of magnitude;
* natural log (nats) by default, ``base=2`` for bits;
* ``drop_first`` removes leading tokens (BOS / attention sinks, whose huge norm would otherwise set
  σ) and ``max_tokens`` keeps a seeded random subset of a long sequence (:func:`select_tokens`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Pairs with ‖a − b‖² ≤ _SNAP · (‖a‖² + ‖b‖²) (after centring) count as identical. The Gram trick
# ‖a‖² + ‖b‖² − 2a·b has a round-off floor of ~eps·√d·(‖a‖² + ‖b‖²) (≈1e-14 relative at d = 2048),
# so without the snap repeated tokens look microscopically distinct and, when they are most pairs,
# set the median σ to noise. A relative distance of 1e-6 is below what fp32/bf16 states resolve.
_SNAP = 1e-12


def _as_f64(z: Tensor) -> Tensor:
    z = torch.as_tensor(z).detach()
    if z.ndim != 2:
        raise ValueError(f"expected a (tokens, dim) matrix, got shape {tuple(z.shape)}")
    return z.to(torch.float64)


def select_tokens(z: Tensor, drop_first: int = 0, max_tokens: int | None = None, seed: int = 0) -> Tensor:
    """The tokens the entropy is computed on: ``z[drop_first:]``, then, if more than ``max_tokens``
    remain, a uniformly random subset of ``max_tokens`` of them drawn by a ``torch.Generator``
    seeded with ``seed`` (same seed → same subset), kept in sequence order."""
    if drop_first < 0 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"need drop_first ≥ 0 and max_tokens ≥ 1, got {drop_first}, {max_tokens}")
    z = z[drop_first:]
    if max_tokens is not None and len(z) > max_tokens:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(z), generator=g)[:max_tokens].sort().values
        z = z[keep.to(z.device)]
    return z


def squared_distances(z: Tensor) -> Tensor:
    """All pairwise ‖z_i − z_j‖² in float64 (n×n), exactly 0 on the diagonal and for repeated tokens.

    Computed by the Gram trick on centred tokens (distances are translation invariant and centring
    removes the cancellation from a large common offset)."""
    c = _as_f64(z)
    c = c - c.mean(0)
    sq = c.square().sum(1)
    norms = sq[:, None] + sq[None, :]
    d2 = (norms - 2.0 * (c @ c.T)).clamp_min_(0.0)
    d2[d2 <= _SNAP * norms] = 0.0
    return d2.fill_diagonal_(0.0)


def _median_sigma_from_d2(d2: Tensor) -> float:
    n = d2.shape[0]
    if n < 2:
        return 0.0
    i, j = torch.triu_indices(n, n, offset=1, device=d2.device)
    dist = d2[i, j].sqrt()
    sigma = dist.median().item()
    if sigma == 0.0:  # most pairs are repeats: take the scale of the pairs that differ at all
        positive = dist[dist > 0]
        sigma = positive.median().item() if len(positive) else 0.0
    return sigma


def median_sigma(z: Tensor) -> float:
    """σ = median of the off-diagonal pairwise distances ‖z_i − z_j‖ (i < j; the lower median for
    an even count, as ``torch.median``). If more than half the pairs are repeated tokens (median 0),
    the median of the non-zero distances; 0.0 only when all tokens are identical (or n < 2)."""
    return _median_sigma_from_d2(squared_distances(z))


def _gram_from_d2(d2: Tensor, sigma: float | None) -> Tensor:
    if sigma is None:
        sigma = _median_sigma_from_d2(d2)
        if sigma == 0.0:  # all tokens identical: K = 1 for any σ
            return torch.ones_like(d2)
    elif sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    return torch.exp(-d2 / (2.0 * sigma * sigma))


def gaussian_gram(z: Tensor, sigma: float | None = None) -> Tensor:
    """K_ij = exp(−‖z_i − z_j‖² / 2σ²) in float64; σ = :func:`median_sigma` when None.

    All tokens identical (σ = 0) gives the all-ones matrix, the limit for any σ."""
    return _gram_from_d2(squared_distances(z), sigma)


def renyi_entropy_from_gram(K: Tensor, alpha: float = 1.01, base: float = math.e) -> float:
    """H_α of a PSD Gram matrix: A = K / tr(K), λ = eig(A) (float64, clamped ≥ 0, renormalised to
    sum 1), H_α = log(Σ λ^α) / (1 − α), or −Σ λ log λ at α = 1; divided by log(base)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    K = torch.as_tensor(K).detach().to(torch.float64)
    if K.shape[0] == 0:
        return 0.0
    lam = torch.linalg.eigvalsh(K / torch.trace(K)).clamp_min(0.0)
    lam = lam / lam.sum()
    if alpha == 1:
        h = -torch.special.xlogy(lam, lam).sum().item()
    else:
        h = math.log(lam.pow(alpha).sum().item()) / (1.0 - alpha)
    return max(h, 0.0) / math.log(base)  # H ≥ 0 exactly; only round-off can push it below


def renyi_entropy(
    z: Tensor,
    alpha: float = 1.01,
    sigma: float | None = None,
    base: float = math.e,
    drop_first: int = 0,
    max_tokens: int | None = None,
    seed: int = 0,
) -> float:
    """H_α(Z) of one sequence of token states ``z`` (n×d, any float dtype, computed in float64).

    H_α = 1/(1−α) · log Σ λ_i^α with λ the eigenvalues of K/tr(K), K_ij = exp(−‖z_i − z_j‖²/2σ²);
    exactly −Σ λ log λ at α = 1. ``sigma=None`` uses :func:`median_sigma` of the selected tokens;
    ``drop_first`` / ``max_tokens`` / ``seed`` select the tokens (:func:`select_tokens`).
    Returns 0.0 for fewer than two tokens or all tokens identical."""
    z = select_tokens(z, drop_first, max_tokens, seed)
    if len(z) < 2:
        return 0.0
    d2 = squared_distances(z)
    if not bool(d2.any()):
        return 0.0
    return renyi_entropy_from_gram(_gram_from_d2(d2, sigma), alpha, base)


def conditional_entropy(
    prompt: Tensor,
    response: Tensor,
    alpha: float = 1.01,
    sigma: float | None = None,
    base: float = math.e,
    drop_first: int = 0,
    max_tokens: int | None = None,
    seed: int = 0,
) -> float:
    """Response proxy Ĥ(Z_r | Z_p) = H_α(K_joint) − H_α(K_pp).

    K_joint is the Gaussian Gram matrix of the concatenated [prompt; response] tokens and K_pp its
    prompt block. Both use ONE σ (the median pairwise distance over the joint tokens unless given):
    with separate σs the two entropies would be measured at different scales and their difference
    would mix the change of scale into the "new information". With one σ, a response that repeats
    the prompt gives exactly 0 (the joint spectrum equals the prompt's) and a response far from the
    prompt gives the most. It can be slightly negative when the response piles onto a few prompt
    tokens (the joint distribution is then more concentrated than the prompt's).

    ``drop_first`` applies to the prompt only (BOS / sink); ``max_tokens`` caps prompt and response
    separately (seeds ``seed`` and ``seed + 1``) so both stay represented."""
    p = select_tokens(prompt, drop_first, max_tokens, seed)
    r = select_tokens(response, 0, max_tokens, seed + 1)
    if len(r) == 0:
        return 0.0
    d2 = squared_distances(torch.cat([_as_f64(p), _as_f64(r)]))
    if not bool(d2.any()):  # every token identical: both entropies are exactly 0
        return 0.0
    K = _gram_from_d2(d2, sigma)  # one σ for the joint matrix and its prompt block
    n_p = len(p)
    h_pp = renyi_entropy_from_gram(K[:n_p, :n_p], alpha, base) if n_p else 0.0
    return renyi_entropy_from_gram(K, alpha, base) - h_pp
