"""Checkpoints that are never half-written: accelerate ``save_state`` into a hidden temporary folder,
then one atomic rename. Keep-last-K, ``--resume latest|PATH``, the resolved config in every one."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from reca.io import fresh_temp_dir, replace_dir

PREFIX = "checkpoint-"


@dataclass
class TrainState:
    """Loop state that accelerate saves and restores beside model and optimizer."""

    step: int = 0
    nonfinite_in_a_row: int = 0
    data_counts: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"step": self.step, "nonfinite_in_a_row": self.nonfinite_in_a_row, "data_counts": dict(self.data_counts)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.nonfinite_in_a_row, self.data_counts = (
            state["step"],
            state["nonfinite_in_a_row"],
            dict(state["data_counts"]),
        )


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)),
        key=lambda p: int(p.name[len(PREFIX) :]),
    )


def resolve_resume(root: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(root)
        return found[-1] if found else None  # nothing saved yet: start fresh
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a reca checkpoint (no trainer_state.json)")
    return path


def save(accelerator, root: Path, step: int, config: dict, export=None) -> Path:
    """Every process calls this (accelerate saves per-process RNG states); the main one renames."""
    final = root / f"{PREFIX}{step}"
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        fresh_temp_dir(final)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        if export is not None:
            export(tmp / "adapter")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        replace_dir(tmp, final, fsync=True)
    accelerator.wait_for_everyone()
    return final


def prune(root: Path, keep: int, protect: int | None = None) -> None:
    """Keep the last ``keep`` checkpoints, and the newest one at or before step ``protect`` (the
    collapse watch's last healthy step) however old."""
    found = checkpoints(root)
    spared = [p for p in found if protect is not None and int(p.name[len(PREFIX) :]) <= protect][-1:]
    for old in found[:-keep]:
        if old not in spared:
            shutil.rmtree(old, ignore_errors=True)
