"""Data: image folders, jsonl/csv manifests and Hugging Face datasets, read through ``datasets``.

Images stay undecoded until a batch is assembled, so a broken file can only ever be skipped, never
crash a run. Conversions (grayscale, palette, CMYK, alpha) and skips (missing, undecodable, tiny)
are counted per batch and summed into the training log — never a silent change of results.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

log = logging.getLogger("reca.data")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class DataSource:
    path: str = field(default="", metadata={"help": "folder of images, .jsonl/.csv manifest (image path + optional caption), or a dataset name / save_to_disk dir"})
    split: str = field(default="train", metadata={"help": "dataset split"})
    image_column: str = field(default="image", metadata={"help": "image column in manifests and datasets"})
    caption_column: str = field(default="caption", metadata={"help": "caption column; empty = none (reconstruction needs none)"})
    streaming: bool = field(default=False, metadata={"help": "stream a large dataset instead of loading its index"})
    min_side: int = field(default=16, metadata={"help": "images whose shorter side is below this are skipped as tiny"})


def open_source(src: DataSource, *, need_captions: bool, key: str = "data") -> datasets.Dataset | datasets.IterableDataset:
    """Open a source without decoding any image."""
    path = Path(src.path)
    if path.is_dir() and not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{key}.path: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
        ds = datasets.Dataset.from_dict({src.image_column: files})
    elif path.suffix in (".jsonl", ".csv"):
        if not path.is_file():
            raise FileNotFoundError(f"{key}.path: no such manifest {path}")
        ds = datasets.load_dataset("json" if path.suffix == ".jsonl" else "csv", data_files=str(path), split="train",
                                   streaming=src.streaming)
        root = str(path.parent)
        ds = ds.map(lambda row: {src.image_column: _resolve(row[src.image_column], root)})
    elif path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[src.split]
    else:
        try:
            ds = datasets.load_dataset(src.path, split=src.split, streaming=src.streaming)
        except Exception as e:  # datasets raises many types for "not found"
            raise FileNotFoundError(f"{key}.path: '{src.path}' is neither a folder, a manifest nor a loadable dataset ({str(e).splitlines()[0]})") from None
    columns = ds.column_names or []
    if src.image_column not in columns:
        raise ValueError(f"{key}.image_column: '{src.image_column}' is not a column of {src.path} (columns: {', '.join(columns)})")
    if need_captions and (not src.caption_column or src.caption_column not in columns):
        raise ValueError(f"{key}.caption_column: this objective needs captions but '{src.caption_column}' is not a column of {src.path} (columns: {', '.join(columns)})")
    features = ds.features or {}
    if isinstance(features.get(src.image_column), datasets.Image):
        ds = ds.cast_column(src.image_column, datasets.Image(decode=False))  # decode later, where failures are counted
    return ds


def _resolve(value: Any, root: str) -> Any:
    return str(Path(root) / value) if isinstance(value, str) and not Path(value).is_absolute() else value


def load_image(value: Any, min_side: int = 16) -> tuple[Image.Image | None, str | None]:
    """An RGB image, or ``(None, reason)``; a conversion is reported as ``"converted:<kind>"``."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode half grey
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        else:
            image = Image.open(value)
        image.load()
        image = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        return None, "missing"
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        return None, "undecodable"
    if min(image.size) < min_side:
        return None, "tiny"
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode == "P":
        image = image.convert("RGBA")
        mode = "PA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # transparent pixels have undefined (often black) RGB: composite on white, as viewers show them
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas, "converted:alpha"
    if mode == "CMYK":
        return image.convert("RGB"), "converted:cmyk"
    if mode in ("L", "I", "I;16", "F", "1"):
        if mode in ("I", "I;16", "F"):  # high bit depth: scale to 8 bits before expanding
            arr = torch.from_numpy(__import__("numpy").asarray(image, dtype="float32"))
            hi = float(arr.max()) or 1.0
            image = Image.fromarray((arr / hi * 255).clamp(0, 255).byte().numpy(), "L")
        return image.convert("RGB"), "converted:grayscale"
    return image.convert("RGB"), f"converted:{mode.lower()}"


def _order(n: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """Epoch ``epoch``'s permutation, then this rank's interleaved shard (rank, rank+world, ...),
    so one process with batch B·world sees exactly the union of the ranks' batches."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return perm[rank::world]


def _examples(ds, seed: int, rank: int, world: int) -> Iterator[dict]:
    epoch = 0
    while True:
        if isinstance(ds, datasets.IterableDataset):
            shard = datasets.distributed.split_dataset_by_node(ds.shuffle(seed=seed + epoch, buffer_size=1000), rank=rank, world_size=world)
            yield from shard
        else:
            for i in _order(len(ds), seed, epoch, rank, world):
                yield ds[i]
        epoch += 1


def batches(ds, *, batch_size: int, transform: Callable[[Image.Image], dict[str, torch.Tensor]], caption_column: str | None,
            seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0, num_workers: int = 0,
            image_column: str = "image", min_side: int = 16) -> Iterator[dict]:
    """Endless batches of exactly ``batch_size`` usable images: transformed tensors stacked, captions,
    and the ``skipped`` / ``converted`` counts met while filling this batch.

    ``start_batch=k`` reproduces the stream from batch k on. It re-reads the first k batches' images
    (decoding is what tells a bad file from a good one) but skips their transforms; exactness is
    worth that cost on resume. ``num_workers`` is accepted for interface stability; decoding runs
    in-process (see the benchmark for when that is the bottleneck).
    """
    examples = _examples(ds, seed, rank, world_size)
    produced = 0
    while True:
        items, captions, skipped, converted = [], [], {}, {}
        fast_forward = produced < start_batch
        while len(items) < batch_size:
            row = next(examples)
            image, note = load_image(row[image_column], min_side)
            if image is None:
                skipped[note] = skipped.get(note, 0) + 1
                if skipped[note] == 1:
                    log.warning("skipping %s image %s", note, _describe(row[image_column]))
                continue
            if note:
                kind = note.split(":", 1)[1]
                converted[kind] = converted.get(kind, 0) + 1
            items.append(None if fast_forward else transform(image))
            if caption_column:
                captions.append(str(row[caption_column]))
        produced += 1
        if fast_forward:
            continue
        batch: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        if caption_column:
            batch["caption"] = captions
        batch["skipped"], batch["converted"] = skipped, converted
        yield batch


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("path") or "<bytes>")
    return str(value)
