"""Optimisers: bitsandbytes AdamW8bit (8-bit states, on its CPU backend here), a clear error without
it, diffusers-style learning-rate scaling, and data.max_samples for quick runs."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from reca.config import ConfigError, load_config

from conftest import TINY, tiny_overrides

QUICK = ["train.max_steps=3", "train.save_every=100", "train.sample_prompts=[]", "train.log_every=1"]


def fit_capturing_optimizer(cfg, monkeypatch) -> torch.optim.Optimizer:
    import reca.trainer as trainer

    seen = {}
    real = trainer.make_optimizer
    monkeypatch.setattr(trainer, "make_optimizer", lambda *a: seen.setdefault("opt", real(*a)))
    trainer.fit(cfg)
    return seen["opt"]


def test_adamw8bit_keeps_8bit_states_and_trains(toy_data, tmp_path, monkeypatch) -> None:
    pytest.importorskip("bitsandbytes")
    cfg = load_config(TINY, tiny_overrides(toy_data, tmp_path, *QUICK, "optim.name=adamw8bit"))
    opt = fit_capturing_optimizer(cfg, monkeypatch)
    assert type(opt).__name__ == "AdamW8bit"
    dtypes = {v.dtype for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)}
    assert torch.uint8 in dtypes  # large tensors' moments are quantised (bitsandbytes' min_8bit_size)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["loss"] == r["loss"] for r in log)


def test_adamw8bit_without_bitsandbytes_names_the_fix(toy_data, tmp_path, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_bnb(name, globals=None, *args, **kwargs):
        # only reca's import fails: diffusers' lazy modules probe bitsandbytes themselves, and would
        # fail first when this test runs before anything imported them
        if name.startswith("bitsandbytes") and (globals or {}).get("__name__", "").startswith("reca"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, globals, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    cfg = load_config(TINY, tiny_overrides(toy_data, tmp_path, *QUICK, "optim.name=adamw8bit"))
    with pytest.raises(ConfigError, match=r"adamw8bit needs bitsandbytes; pip install 'reca\[bnb\]'"):
        fit_capturing_optimizer(cfg, monkeypatch)


def test_optimizer_by_import_path_and_scaled_lr(toy_data, tmp_path, monkeypatch) -> None:
    extra = ["optim.name=torch.optim:Adam", "optim.scale_lr=true", "optim.schedule=constant", "optim.warmup_steps=0"]
    cfg = load_config(TINY, tiny_overrides(toy_data, tmp_path, *QUICK, *extra, "optim.lr=1e-4"))
    opt = fit_capturing_optimizer(cfg, monkeypatch)
    assert type(opt) is torch.optim.Adam
    lr = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["lr"]
    assert lr == pytest.approx(1e-4 * 1 * 1 * 8)  # one process × no accumulation × batch 8


def test_bad_optimizer_name_fails_at_load(toy_data, tmp_path) -> None:
    with pytest.raises(ConfigError, match="optim.name: 'sgd' is not adamw"):
        load_config(TINY, tiny_overrides(toy_data, tmp_path, "optim.name=sgd"))


def test_max_samples_keeps_the_first_rows(toy_data, tmp_path) -> None:
    from reca.build import build
    from reca.trainer import open_streams

    cfg = load_config(TINY, tiny_overrides(toy_data, tmp_path, "objectives.recon.data.max_samples=3"))
    adapter, encoder = build(cfg)
    stream = open_streams(cfg, adapter.resolution, encoder, 0, 0, 1)["recon"]
    seen = torch.cat([next(stream)["target"] for _ in range(4)])  # 16 draws from 3 images
    assert len({tuple(x.flatten()[:64].tolist()) for x in seen}) == 3


def test_fused_adamw_trains_and_is_refused_for_other_optimizers(toy_data, tmp_path, monkeypatch) -> None:
    cfg = load_config(TINY, tiny_overrides(toy_data, tmp_path, *QUICK, "optim.fused=true"))
    opt = fit_capturing_optimizer(cfg, monkeypatch)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values())
    with pytest.raises(ConfigError, match=r"optim.fused: only for optim.name: adamw"):
        load_config(TINY, tiny_overrides(toy_data, tmp_path, *QUICK, "optim.fused=true", "optim.name=torch.optim:Adam"))
