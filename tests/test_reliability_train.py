"""Resume always finds the last good checkpoint; reca's own state is JSON (a crafted pickle runs no
code); a run that ends non-finite exports nothing; command-line ordering and partial logs."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest

import train
from reca import checkpoint as ckpt
from reca.config import ConfigError, load_config
from reca.trainer import TrainingFailed, fit

from conftest import TINY, tiny_overrides

STEPS = ["train.log_every=1", "train.sample_prompts=[]", "train.sample_every=0"]


def cfg_for(toy: Path, out: Path, *extra: str):
    return load_config(TINY, tiny_overrides(toy, out, *STEPS, *extra))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def four_steps(toy_data, tmp_path_factory) -> Path:
    """A 4-step run with a checkpoint after every step."""
    out = tmp_path_factory.mktemp("four")
    fit(cfg_for(toy_data, out, "train.max_steps=4", "train.save_every=1", "train.keep_last=4"))
    return out


class Boom:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoints_carry_an_integrity_manifest_and_no_pickle_of_ours(four_steps):
    folder = four_steps / "checkpoints" / "checkpoint-4"
    files = json.loads((folder / ckpt.INTEGRITY).read_text())["files"]
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {ckpt.INTEGRITY}
    assert set(files) == on_disk and {"model.safetensors", "trainer_state.json", "config.yaml"} <= on_disk
    assert not list(folder.glob("custom_checkpoint_*"))  # loop state and LR schedule are JSON
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["lr_scheduler"]["last_epoch"] == 4
    assert ckpt.damage(folder) is None


def test_resume_latest_skips_damaged_and_foreign_folders(toy_data, four_steps, tmp_path, caplog):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    root = out / "checkpoints"
    (root / "checkpoint-4" / "model.safetensors").write_bytes(b"")  # emptied
    (root / "checkpoint-5").mkdir()  # an empty folder
    (root / "checkpoint-28.bak").mkdir()  # not ours: never listed, never a crash
    (root / "checkpoint-old").mkdir()
    # a crafted pickle where accelerate would look for registered objects: must never be loaded
    marker = tmp_path / "pwned"
    (root / "checkpoint-3" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Boom(str(marker))))
    ckpt.write_integrity(root / "checkpoint-3")  # even with a matching manifest
    (root / "checkpoint-1" / "optimizer.bin").unlink()
    caplog.set_level(logging.WARNING, logger="reca")
    assert ckpt.resolve_resume(root, "latest") == root / "checkpoint-2"
    skipped = [r.getMessage() for r in caplog.records if "skipping damaged" in r.getMessage()]
    assert len(skipped) == 3 and "checkpoint-5: no reca_integrity.json" in skipped[0]
    assert "model.safetensors is 0 bytes" in skipped[1] and "custom_checkpoint_0.pkl, which reca never" in skipped[2]
    with pytest.raises(ConfigError, match="--resume .*checkpoint-1: not a complete reca checkpoint .optimizer.bin"):
        ckpt.resolve_resume(root, str(root / "checkpoint-1"))

    # the run resumes from step 2 and reproduces the uninterrupted losses; a log line cut short by a
    # kill is dropped; the changed max_steps is reported in one block
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    caplog.clear()
    fit(cfg_for(toy_data, out, "train.max_steps=5", "train.save_every=1", "train.keep_last=4"), resume="latest")
    assert not marker.exists()
    changes = [r.getMessage() for r in caplog.records if "differ from" in r.getMessage()]
    assert len(changes) == 1 and "train.max_steps: 4 -> 5" in changes[0]
    assert "output_dir" in changes[0]
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert (root / "checkpoint-28.bak").is_dir() and (root / "checkpoint-old").is_dir()
    weights = root / "checkpoint-5" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "model.safetensors is 100 bytes, expected" in ckpt.damage(root / "checkpoint-5")


def test_resume_reproduces_the_uninterrupted_losses(toy_data, four_steps, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    for step in (3, 4):
        shutil.rmtree(out / "checkpoints" / f"checkpoint-{step}")
    fit(cfg_for(toy_data, out, "train.max_steps=4", "train.save_every=1", "train.keep_last=4"), resume="latest")
    a, b = read_log(four_steps), read_log(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6 and ra["lr"] == rb["lr"], (ra, rb)


def test_overrides_may_follow_resume_and_a_damaged_path_is_one_line(toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    argv = [
        "--config",
        str(TINY),
        *tiny_overrides(toy_data, out)[:2],
        "--resume",
        str(out / "checkpoints/checkpoint-3"),
    ]
    argv += [*tiny_overrides(toy_data, out)[2:], "train.max_steps=30"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a complete reca checkpoint (no reca_integrity.json" in err[0]


def test_a_run_ending_nonfinite_exports_no_model(toy_data, tmp_path, monkeypatch, capsys):
    from reca.models.metaquery import MetaQueryAdapter

    real = MetaQueryAdapter.generation_loss
    calls = {"n": 0}

    def last_step_nan(self, images, cond, seeds):
        calls["n"] += 1
        loss = real(self, images, cond, seeds)
        return loss * float("nan") if calls["n"] > 4 else loss  # recon + t2i: steps 1-2 fine, step 3 NaN

    monkeypatch.setattr(MetaQueryAdapter, "generation_loss", last_step_nan)
    out = tmp_path / "run"
    with pytest.raises(TrainingFailed, match="last 1 step.s. had a non-finite loss"):
        fit(cfg_for(toy_data, out, "train.max_steps=3", "train.save_every=100"))
    assert not (out / "final").exists()
    calls["n"] = 0
    argv = ["--config", str(TINY), *tiny_overrides(toy_data, tmp_path / "cli", *STEPS, "train.max_steps=3")]
    assert train.main(argv) == 1
    assert "no final model exported" in capsys.readouterr().err and not (tmp_path / "cli" / "final").exists()


def test_resume_latest_with_only_damaged_checkpoints_is_one_line_not_a_fresh_start(tmp_path) -> None:
    from reca.checkpoint import resolve_resume
    from reca.config import ConfigError

    root = tmp_path / "checkpoints"
    (root / "checkpoint-10").mkdir(parents=True)  # an empty folder: damaged
    with pytest.raises(ConfigError, match="none of the 1 checkpoints"):
        resolve_resume(root, "latest")
    assert resolve_resume(tmp_path / "nothing-yet", "latest") is None  # nothing saved: start fresh
