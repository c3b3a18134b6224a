"""Checkpoints that are never half-written: accelerate ``save_state`` into a hidden temporary folder,
then one atomic rename. Keep-last-K, ``--resume latest|PATH``, the resolved config in every one.

Each checkpoint ends with an integrity manifest (:data:`INTEGRITY`: size and sha256 of every other
file), written last: a folder without it, or whose files do not match it (a truncated
``model.safetensors``, a deleted optimizer file), is damaged; ``--resume latest`` skips it with one
warning and takes the newest complete one. reca's own loop state (:class:`TrainState` and the LR
schedule) is JSON in ``trainer_state.json``, never a pickle; accelerate's model and optimizer files
are safetensors and ``torch.load(weights_only=True)`` files, its RNG states pickles of tensors
loaded the same way."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from reca.config import ConfigError
from reca.io import atomic_write_json, fresh_temp_dir, replace_dir, sha256_file

PREFIX = "checkpoint-"
NAME = re.compile(r"checkpoint-(\d+)")  # ours; checkpoint-28.bak or checkpoint-old are someone else's
INTEGRITY = "reca_integrity.json"
STATE = "trainer_state.json"

log = logging.getLogger("reca")


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
    """Folders named ``checkpoint-<step>``, oldest first (temporary and foreign folders are never
    listed); :func:`damage` tells the complete ones."""
    if not root.is_dir():
        return []
    ours = [p for p in root.iterdir() if p.is_dir() and NAME.fullmatch(p.name)]
    return sorted(ours, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def write_integrity(folder: Path) -> None:
    """Size and sha256 of every file in ``folder``; call it after everything else is written."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != INTEGRITY)
    manifest = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    atomic_write_json(folder / INTEGRITY, {"files": manifest})


def damage(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when every file matches its manifest."""
    if not folder.is_dir():
        return "not a folder"
    try:
        files = json.loads((folder / INTEGRITY).read_text())["files"]
    except FileNotFoundError:
        return f"no {INTEGRITY} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{INTEGRITY} is unreadable"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} is {size} bytes, expected {want['size']} (truncated or replaced)"
        if sha256_file(path) != want["sha256"]:
            return f"{name} does not match its sha256"
    if STATE not in files:
        return f"no {STATE}"
    if pickles := sorted(p.name for p in folder.glob("custom_checkpoint_*.pkl")):
        # reca registers nothing with accelerate, which would unpickle these with weights_only=False
        return f"holds {pickles[0]}, which reca never writes (loading it could run code)"
    return None


def resolve_resume(root: Path, resume: str | None) -> Path | None:
    """``latest``: the newest complete checkpoint under ``root`` (damaged ones skipped with one warning
    each; None when nothing was saved yet: start fresh — but never when checkpoints exist and none is
    complete, which would silently throw the run's progress away); a path: that checkpoint, which
    must be complete."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(root)
        for path in reversed(found):
            if (reason := damage(path)) is None:
                return path
            log.warning(f"--resume latest: skipping damaged checkpoint {path}: {reason}")
        if found:
            raise ConfigError(
                f"--resume latest: none of the {len(found)} checkpoints in {root} is complete (see the warnings); "
                "resume from one with --resume PATH after repairing it, or move them away to start over"
            )
        return None
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"--resume {resume}: no such checkpoint folder")
    if (reason := damage(path)) is not None:
        raise ConfigError(f"--resume {resume}: not a complete reca checkpoint ({reason}); use --resume latest")
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def save(accelerator, root: Path, step: int, config: dict, state: dict, export=None) -> Path:
    """Every process calls this (accelerate saves per-process RNG states); the main one writes
    ``state`` (JSON) and the config, then the integrity manifest, and renames."""
    final = root / f"{PREFIX}{step}"
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        fresh_temp_dir(final)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's files are in tmp before they are hashed
    if accelerator.is_main_process:
        if export is not None:
            export(tmp)  # files of the caller's: a LoRA adapter folder, EMA weights
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / STATE).write_text(json.dumps({"step": step, **state}))
        write_integrity(tmp)
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
