"""The statistics of every report (evaluation, entropy probe, demo), numpy only.

* :func:`wilson_interval`: k successes in n trials (images as independent trials).
* Percentile bootstrap, two resampling schemes and one interval:

  - :func:`bootstrap_means`: means of resampled rows (multinomial counts per replicate), for curves
    and scalar means (the entropy probe); :func:`bootstrap_ci` wraps it for a 1-D mean;
  - :func:`bootstrap_indices` + :func:`resampled_accuracy`: resampled *positions* per category,
    drawn once and reusable for two runs (a paired bootstrap), for ratios of sums (accuracy of
    prompts with several images each);
  - :func:`percentile_interval`: the (lo, hi) quantiles of either's replicates.

* :func:`t_interval`: mean and 95% Student-t interval over a few training seeds.

Every random draw comes from a ``numpy`` generator seeded by the caller.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

Z95 = 1.959963984540054
#: two-sided 95% Student-t quantiles by sample size (degrees of freedom + 1); 2.0 beyond the table
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (sane at 0% and 100%, unlike Wald)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact bounds at 0 and n (the formula leaves float dust like 7e-18 there)
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def bootstrap_means(values, n_resamples: int = 1000, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Means of ``n_resamples`` resamples with replacement of the rows of ``values`` (shape (n, ...))
    → shape (n_resamples, ...). Drawn as multinomial counts per resample, so the cost is one
    (n_resamples × n) @ (n × rest) product rather than copying the data n_resamples times."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        raise ValueError("cannot bootstrap zero values")
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples) / n
    return (weights @ v.reshape(n, -1)).reshape((n_resamples,) + v.shape[1:])


def bootstrap_indices(sizes: Mapping[str, int], n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Resampled positions per category, ``(n_boot, m)`` each, drawn in sorted category order
    from one seeded generator; reusing them for two runs gives a paired bootstrap."""
    rng = np.random.default_rng(seed)
    return {tag: rng.integers(0, sizes[tag], size=(n_boot, sizes[tag])) for tag in sorted(sizes)}


def resampled_accuracy(correct: np.ndarray, total: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Accuracy (correct / total, summed over the resampled positions ``idx``) of each replicate."""
    return correct[idx].sum(axis=1) / np.maximum(total[idx].sum(axis=1), 1)


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple:
    """(lo, hi) percentile interval over the first axis of ``replicates``: two floats for 1-D
    replicates, two arrays (one value per remaining position) otherwise."""
    lo, hi = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2], axis=0)
    if np.ndim(lo) == 0:
        return float(lo), float(hi)
    return lo, hi


def bootstrap_ci(values, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the sample mean of 1-D ``values`` and its percentile-bootstrap interval at
    ``level`` (seeded, ``n_resamples`` resamples). NaNs if ``values`` is empty."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    lo, hi = percentile_interval(bootstrap_means(v, n_resamples, seed), level)
    return float(v.mean()), float(lo), float(hi)


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of a few proportions (one per training seed) and its 95% t-interval,
    clipped to [0, 1]; all three equal the mean for fewer than two values."""
    m = float(np.mean(values))
    if len(values) < 2:
        return m, m, m
    half = T95.get(len(values), 2.0) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return m, max(0.0, m - half), min(1.0, m + half)
