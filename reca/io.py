"""Files and folders that are never half-written: write beside the destination, then one rename.

``os.replace`` within one folder is atomic on POSIX, so a reader (or a resumed run after a crash)
sees either the old content or the new, never a torn file. Every writer in reca and eval goes
through these three functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

UMASK = os.umask(0o022)  # read once at import (reading it means setting it; threads write files later)
os.umask(UMASK)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; a written file gets the usual mode
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, sort_keys: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """``with atomic_dir(final) as tmp:`` — fill the hidden folder ``tmp`` beside ``final``; on a
    clean exit it replaces ``final`` (an old one is removed first), on an exception it is deleted.

    ``fsync=True`` flushes every file before the rename (checkpoints: a power cut must not leave a
    renamed folder of empty files)."""
    tmp = fresh_temp_dir(path)
    try:
        yield tmp
        replace_dir(tmp, path, fsync=fsync)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fresh_temp_dir(path: str | Path) -> Path:
    """An empty hidden folder beside ``path`` (a leftover from a crash is cleared)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, path: str | Path, *, fsync: bool = False) -> None:
    """The second half of :func:`atomic_dir`, for writers that fill ``tmp`` from several processes
    (accelerate's ``save_state`` writes per-rank files; only the main process renames)."""
    path = Path(path)
    if fsync:
        fsync_tree(tmp)
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)


def fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed (checkpoints can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
