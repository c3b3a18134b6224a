"""The reconstruction condition's form: keep_tokens (the pooled embedding alone) and LAFITE's
feature perturbation (arXiv 2111.13792 §3.2)."""

from __future__ import annotations

import pytest
import torch

from reca.config import ConfigError, ObjectivesConfig, ReconConfig, load_config
from reca.objectives import Batch, RecATask, perturb


def batch(n: int = 3, tokens: int = 5, dim: int = 16) -> Batch:
    sem = torch.nn.functional.normalize(torch.randn(n, tokens, dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    return Batch(seeds=list(range(100, 100 + n)), semantic=sem * torch.arange(1, tokens + 1)[None, :, None])


def task(**recon) -> RecATask:
    return RecATask(torch.nn.Identity(), ObjectivesConfig(recon=ReconConfig(**recon)))


def test_keep_tokens_conditions_on_the_first_tokens_only() -> None:
    b = batch()
    assert task().condition("recon", b).semantic.shape == (3, 5, 16)
    kept = task(keep_tokens=1).condition("recon", b).semantic
    assert kept.shape == (3, 1, 16) and torch.equal(kept, b.semantic[:, :1])


def test_perturbation_keeps_each_norm_moves_by_about_xi_and_follows_the_seed() -> None:
    b = batch()
    noisy = task(feature_noise=0.3).condition("recon", b).semantic
    norms = b.semantic.norm(dim=-1)
    assert torch.allclose(noisy.norm(dim=-1), norms, atol=1e-5)  # LAFITE renormalises
    # h + xi·|h|·u (u a unit vector), rescaled to |h|, turns h by at most asin(xi): a chord of
    # 2·sin(asin(xi)/2) ≈ 0.3035·|h| for xi = 0.3; in 16 dimensions u is nearly orthogonal to h
    moved = (noisy - b.semantic).norm(dim=-1) / norms
    assert 0.2 < moved.mean() < 0.3 and (moved <= 0.3036).all()
    again = task(feature_noise=0.3).condition("recon", b).semantic
    assert torch.equal(noisy, again)  # a pure function of the sample seeds
    other = perturb(b.semantic, [s + 1 for s in b.seeds], 0.3)
    assert not torch.allclose(other, noisy)
    assert torch.equal(task().condition("recon", b).semantic, b.semantic)  # off by default


def test_text_conditions_are_never_perturbed() -> None:
    b = Batch(seeds=[1, 2], captions=["a red circle", "a circle"])
    assert task(feature_noise=0.5, keep_tokens=1).condition("t2i", b).texts == ["a red circle", "a circle"]


@pytest.mark.parametrize(
    "override,key",
    [("objectives.recon.keep_tokens=-1", "keep_tokens"), ("objectives.recon.feature_noise=-0.1", "feature_noise")],
)
def test_negative_settings_are_refused(tmp_path, override: str, key: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("objectives: {recon: {data: {path: imgs}}}\n")
    with pytest.raises(ConfigError, match=f"objectives.recon.{key}"):
        load_config(cfg, [override])
