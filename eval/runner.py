"""Generate evaluation images in GenEval's folder layout, resumably, and read such runs back.

Layout (what GenEval's own scorer reads, plus a manifest)::

    <out>/manifest.json                 model, checkpoint hash, prompts hash, seeds rule, settings, versions
    <out>/00042/metadata.jsonl          one json.dumps of the prompt's GenEval line
    <out>/00042/samples/0000.png ...    n_images samples
    <out>/00042/grid.png                the samples side by side (for eyes, never scored)

Every file is written atomically (``reca.io``: temporary file in the same folder, then
``os.replace``), so a killed run leaves complete files or none; a re-run only draws the images that
are missing or unreadable. Image ``i`` of prompt ``p`` always gets seed :func:`image_seed` ``(seed, p, i)`` and
adapters draw each image from its own seed alone, so any subset, batch size or resume order
reproduces the same pixels.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image

from eval.prompts import EvalError, Prompt, prompts_digest, read_lines
from reca.io import atomic_write, atomic_write_json, atomic_write_text, sha256_file

MANIFEST = "manifest.json"
SEED_RULE = "int(sha256(f'reca-eval/{seed}/{prompt_index}/{image_index}').hexdigest()[:8], 16) & 0x7FFFFFFF"
#: distributions whose versions a manifest records (import name differs for open_clip).
VERSIONED = {
    "torch": "torch",
    "transformers": "transformers",
    "diffusers": "diffusers",
    "open_clip": "open_clip_torch",
    "reca": "reca",
    "pillow": "pillow",
}


# --------------------------------------------------------------------------- small pure helpers


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index`` (see :data:`SEED_RULE`).

    A hash rather than arithmetic so that neighbouring prompts get unrelated seeds, and 31 bits so
    every RNG (torch, numpy, random) accepts it."""
    digest = hashlib.sha256(f"reca-eval/{seed}/{prompt_index}/{image_index}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def prompt_dir(out: Path, index: int) -> Path:
    return out / f"{index:05d}"


def sample_path(out: Path, index: int, image_index: int) -> Path:
    return prompt_dir(out, index) / "samples" / f"{image_index:04d}.png"


def sha256_tree(path: str | Path) -> str:
    """sha256 of a file, or of a folder as (relative path, file hash) pairs in sorted order, so the
    hash does not depend on listing order or on where the folder lives."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise EvalError(f"{path}: no such file or directory to hash")
    h = hashlib.sha256()
    for f in sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide the pixels (None where absent)."""
    out: dict[str, str | None] = {}
    for name, dist in VERSIONED.items():
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------- images on disk


def save_png(path: str | Path, image: Image.Image) -> None:
    """``image`` as a PNG at ``path``, atomically (:func:`reca.io.atomic_write`)."""
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def _save_all(paths: Sequence[Path], images: Sequence[Image.Image]) -> None:
    """One batch's images, in order, stopping at the first failure."""
    for path, image in zip(paths, images):
        save_png(path, image)


def _write_texts(files: Sequence[tuple[Path, str]]) -> None:
    for path, text in files:
        atomic_write_text(path, text)


def is_valid_image(path: Path) -> bool:
    """True if ``path`` is a complete, decodable image (resume skips only these)."""
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (OSError, ValueError, SyntaxError):  # PIL raises SyntaxError for some broken headers
        return False


# --------------------------------------------------------------------------- model description


def adapter_import_path(adapter: object) -> str:
    cls = type(adapter)
    return f"{cls.__module__}:{cls.__qualname__}"


def describe_model(adapter: object, checkpoint: str | Path | None = None, **info: Any) -> dict[str, Any]:
    """``model_info`` for :func:`generate`: adapter import path, checkpoint path + content hash,
    plus anything the caller adds (config path and hash, resolved config...)."""
    out: dict[str, Any] = {"adapter": adapter_import_path(adapter)}
    if checkpoint is not None:
        out["checkpoint"] = str(checkpoint)
        out["checkpoint_sha256"] = sha256_tree(checkpoint)
    out.update(info)
    return out


# --------------------------------------------------------------------------- generation


@dataclass
class GenerateStats:
    written: int = 0
    skipped: int = 0
    prompts: int = 0
    paths: list[Path] = field(default_factory=list)  # images written this call


def _settings(
    prompts: Sequence[Prompt], *, seed: int, guidance_scale: float, num_steps: int, model_info: dict
) -> dict[str, Any]:
    """What decides the pixels; a resumed run must match all of it (the prompt set is identified
    by content, so the same file under another path resumes fine)."""
    return {
        "model": model_info,
        "prompts": {
            "sha256": prompts_digest(prompts),
            "count": len(prompts),
            "indices": sorted(p.index for p in prompts),
        },
        "seed": seed,
        "seed_rule": SEED_RULE,
        "guidance_scale": guidance_scale,
        "num_steps": num_steps,
    }


def _check_resume(existing: dict, settings: dict, path: Path) -> None:
    for key, value in settings.items():
        if json.loads(json.dumps(existing.get(key))) != json.loads(json.dumps(value)):
            raise EvalError(
                f"{path}: '{key}' differs from this call's; refusing to mix two settings in one run "
                f"(use a new --out, or delete the folder)"
            )


def generate(
    adapter: Any,
    prompts: Sequence[Prompt],
    out_dir: str | Path,
    *,
    n_images: int = 4,
    seed: int = 0,
    guidance_scale: float,
    num_steps: int,
    batch_size: int = 8,
    model_info: dict,
    prompts_source: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> GenerateStats:
    """Draw ``n_images`` per prompt into ``out_dir`` (GenEval layout); skip valid existing images.

    ``model_info``: see :func:`describe_model`. ``prompts_source``: extra manifest fields about the
    prompt file (spec, file hashes). Batches mix prompts; that is safe because each image depends
    on its own seed only (the adapter contract)."""
    from reca.adapter import Condition  # reca's torch imports stay out of `import eval.runner`
    from reca.images import make_grid

    if n_images < 1 or batch_size < 1:
        raise EvalError(f"n_images ({n_images}) and batch_size ({batch_size}) must be ≥ 1")
    indices = [p.index for p in prompts]
    if len(set(indices)) != len(indices):
        raise EvalError("prompts: duplicate prompt indices; each prompt needs its own folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = sorted(prompts, key=lambda p: p.index)

    settings = _settings(prompts, seed=seed, guidance_scale=guidance_scale, num_steps=num_steps, model_info=model_info)
    manifest_path = out / MANIFEST
    previous_n = 0
    if manifest_path.is_file():
        existing = json.loads(manifest_path.read_text())
        _check_resume(existing, settings, manifest_path)
        previous_n = int(existing.get("n_images", 0))
    # Written before any image, so an interrupted run can be resumed and checked.
    atomic_write_json(
        manifest_path,
        {
            **settings,
            "n_images": max(n_images, previous_n),
            "prompts_source": prompts_source or {},
            "resolution": getattr(adapter, "resolution", None),
            "layout": "geneval",
            "versions": versions(),
        },
    )

    stats = GenerateStats(prompts=len(prompts))
    jobs: list[tuple[Prompt, int]] = []
    metadata: list[tuple[Path, str]] = []  # written by the writer thread below, first
    for p in prompts:
        line = json.dumps(p.to_geneval()) + "\n"
        meta = prompt_dir(out, p.index) / "metadata.jsonl"
        if not meta.is_file() or meta.read_text(encoding="utf-8") != line:
            metadata.append((meta, line))
        for i in range(n_images):
            if is_valid_image(sample_path(out, p.index, i)):
                stats.skipped += 1
            else:
                jobs.append((p, i))

    touched: set[int] = set()
    # One writer thread saves batch k while the model draws batch k+1 (the prompts' metadata
    # while it draws the first): each atomic write ends in an fsync (reca.io), which costs as much
    # as drawing a small image on a slow disk. At most one batch waits to be written, its error
    # surfaces before the next batch is queued, and leaving the block (an exception, Ctrl-C) first
    # finishes the writes already queued.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future | None = writer.submit(_write_texts, metadata) if metadata else None
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            cond = Condition(texts=[p.prompt for p, _ in batch])
            images = adapter.generate(
                cond,
                seeds=[image_seed(seed, p.index, i) for p, i in batch],
                guidance_scale=guidance_scale,
                num_steps=num_steps,
            )
            if len(images) != len(batch) or not all(isinstance(im, Image.Image) for im in images):
                raise EvalError(
                    f"{adapter_import_path(adapter)}.generate returned {len(images)} objects for "
                    f"{len(batch)} conditions; expected one PIL image each"
                )
            if pending is not None:
                pending.result()
            paths = [sample_path(out, p.index, i) for p, i in batch]
            pending = writer.submit(_save_all, paths, images)
            stats.written += len(batch)
            stats.paths += paths
            touched.update(p.index for p, _ in batch)
            if progress:
                progress(f"{min(start + batch_size, len(jobs))}/{len(jobs)} images")
        if pending is not None:
            pending.result()

    for p in prompts:
        grid = prompt_dir(out, p.index) / "grid.png"
        if p.index in touched or not grid.is_file():
            samples = [sample_path(out, p.index, i) for i in range(n_images)]
            images = []
            for s in samples:
                with Image.open(s) as im:
                    images.append(im.convert("RGB"))
            save_png(grid, make_grid(images))
    return stats


# --------------------------------------------------------------------------- reading runs back


@dataclass
class RunPrompt:
    prompt: Prompt
    images: list[Path]
    ignored: list[Path] = field(default_factory=list)  # files in samples/ outside the layout, never scored


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest, or ``{}`` for GenEval-layout folders written by other tools."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: malformed JSON ({getattr(e, 'msg', e)})") from None


def layout_images(samples: Path, n_images: int | None) -> tuple[list[Path], list[Path]]:
    """(images to score, files ignored) of one ``samples/`` folder.

    The layout defines the images: ``NNNN.png`` for ``NNNN < n_images`` (the manifest's count), or,
    for folders written by other tools, ``0000.png, 0001.png, ...`` up to the first gap. Anything
    else there (``0000 (copy).png``, a stray PNG after a gap) is never scored, only listed."""
    if n_images is None:
        n = 0
        while (samples / f"{n:04d}.png").is_file():
            n += 1
    else:
        n = n_images
    images = [samples / f"{i:04d}.png" for i in range(n)]
    wanted = {p.name for p in images}
    present = samples.iterdir() if samples.is_dir() else []
    return images, sorted((p for p in present if p.name not in wanted), key=lambda p: p.name)


def load_run(run_dir: str | Path) -> list[RunPrompt]:
    """Prompts and image paths of a run, sorted by prompt index and image name.

    Fails, listing every offending path, when a prompt folder or an image the manifest promises is
    missing or unreadable (a silently skipped image would bias the accuracy, GenEval's defect), when
    a prompt folder is not in the manifest's prompt set, or when the prompts in ``metadata.jsonl``
    are not the ones the manifest hashed."""
    run = Path(run_dir)
    if not run.is_dir():
        raise EvalError(f"{run}: no such run directory")
    manifest = read_manifest(run)
    n_images = manifest.get("n_images")
    folders = sorted((d for d in run.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    problems: list[str] = []
    expected = manifest.get("prompts", {}).get("indices")
    if expected is not None:
        have = {int(d.name) for d in folders}
        problems += [f"{prompt_dir(run, i)} (missing prompt folder)" for i in expected if i not in have]
        stray = [d for d in folders if int(d.name) not in set(expected)]
        if stray:
            raise EvalError(
                f"{run}: prompt folder(s) {', '.join(d.name for d in stray[:5])} are not in the prompt set the "
                f"manifest records ({len(expected)} prompts); move them out or generate into a new --out"
            )
    if not folders and not problems:
        raise EvalError(f"{run}: no prompt folders (expected GenEval layout <run>/00000/samples/0000.png)")

    out: list[RunPrompt] = []
    for d in folders:
        meta = d / "metadata.jsonl"
        if not meta.is_file():
            problems.append(f"{meta} (missing)")
            continue
        try:
            line = json.loads(next(x for x in read_lines(meta) if x.strip()))
        except (json.JSONDecodeError, StopIteration):
            problems.append(f"{meta} (malformed)")
            continue
        prompt = Prompt.from_geneval(int(d.name), line, f"{meta}:1")
        images, ignored = layout_images(d / "samples", None if n_images is None else int(n_images))
        if not images:
            problems.append(f"{d / 'samples'} (no images named 0000.png, 0001.png, ...)")
        for path in images:
            if not path.is_file():
                problems.append(f"{path} (missing)")
            elif not is_valid_image(path):
                problems.append(f"{path} (unreadable)")
        out.append(RunPrompt(prompt, images, ignored))
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise EvalError(f"{run}: {len(problems)} missing or unreadable file(s): {shown}")
    recorded = manifest.get("prompts", {}).get("sha256")
    if recorded is not None and prompts_digest([rp.prompt for rp in out]) != recorded:
        raise EvalError(
            f"{run}: the prompts in its */metadata.jsonl differ from those the manifest recorded at generation "
            f"(sha256 {recorded[:12]}...); the images were drawn for other prompts — regenerate, never re-label"
        )
    return out


def iter_images(run: Iterable[RunPrompt]) -> Iterable[tuple[Prompt, Path]]:
    for rp in run:
        for path in rp.images:
            yield rp.prompt, path
