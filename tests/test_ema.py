"""EMA of the trained weights: exact across a resume, exported beside the raw weights in final/ema,
and loaded for evaluation with ``--weights ema``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reca.build import load_trained
from reca.config import ConfigError, load_config

from conftest import TINY, tiny_overrides

# a constant schedule, so a 3-step run followed by a resume to 6 plans the same learning rates
RUN = ["train.ema_decay=0.9", "optim.schedule=constant", "optim.warmup_steps=0", "train.save_every=3"]
QUIET = ["train.sample_prompts=[]", "train.log_every=1"]


def fit(toy_data: Path, out: Path, *extra: str, resume: str | None = None):
    from reca.trainer import fit as train

    cfg = load_config(TINY, tiny_overrides(toy_data, out, *RUN, *QUIET, *extra))
    train(cfg, resume)
    return cfg


def weights(cfg, path: Path, which: str) -> dict[str, torch.Tensor]:
    adapter, _ = load_trained(cfg, path, weights=which)
    return {k: v.clone() for k, v in adapter.state_dict().items()}


@pytest.mark.parametrize("lora", [False, True])
def test_ema_is_exported_and_resumes_exactly(toy_data, tmp_path, lora) -> None:
    extra = ["lora.enabled=true", "lora.rank=4", "optim.lr=1e-2"] if lora else []
    cfg = fit(toy_data, tmp_path / "straight", "train.max_steps=6", *extra)
    fit(toy_data, tmp_path / "resumed", "train.max_steps=3", *extra)
    fit(toy_data, tmp_path / "resumed", "train.max_steps=6", *extra, resume="latest")
    raw = weights(cfg, tmp_path / "straight/final", "raw")
    ema = weights(cfg, tmp_path / "straight/final", "ema")
    again = weights(cfg, tmp_path / "resumed/final", "ema")
    assert (tmp_path / "straight/final/ema").is_dir()
    changed = [k for k in raw if not torch.equal(raw[k], ema[k])]
    assert changed, "the EMA export holds the raw weights"
    for k in raw:
        torch.testing.assert_close(again[k], ema[k], rtol=0, atol=1e-6)  # the average survived the resume
    # the average lags the raw weights: after 6 steps it sits between the start and the end
    start = weights(cfg, None, "raw")
    k = changed[0]
    assert 0 < (ema[k] - start[k]).norm() < (raw[k] - start[k]).norm()


def test_weights_ema_without_an_export_says_so(toy_data, tmp_path) -> None:
    cfg = load_config(TINY, tiny_overrides(toy_data, tmp_path))
    with pytest.raises(ConfigError, match="--weights ema: .* holds no ema/ folder"):
        load_trained(cfg, tmp_path, weights="ema")
