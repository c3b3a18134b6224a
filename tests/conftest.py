"""Shared fixtures: everything tiny, random, offline and deterministic."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1)

TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """32 captioned 32×32 images and their manifest."""
    from toy_images import write

    return write(tmp_path_factory.mktemp("toy"), n=32, size=32, seed=0)


def tiny_overrides(toy: Path, out: Path, *extra: str) -> list[str]:
    """configs/tiny.yaml pointed at the toy data and a temp output dir."""
    data = [f"objectives.{k}.data.path={toy}" for k in ("recon", "t2i", "i2t")]
    return data + [f"train.output_dir={out}", *extra]
