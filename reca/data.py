"""Data: image folders, jsonl/csv manifests, WebDataset shards and Hugging Face datasets, read through ``datasets``.

Images stay undecoded (paths or bytes) until a batch is assembled, so a broken file can only ever
be skipped, never crash a run. Skips (missing, undecodable, tiny, no_caption) and conversions
(grayscale, palette, cmyk, alpha, orientation) are counted per batch and summed into the training
log: never a silent change of what the model sees.

The stream of one rank is a sequence of *positions* (epoch after epoch of its shard). A batch is
the next ``batch_size`` usable positions, so the stream is a pure function of (data, seed, rank,
world size): loader workers and resumption change how it is computed, never what it is.
"""

from __future__ import annotations

import codecs
import glob
import io
import itertools
import logging
import math
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from datasets.packaged_modules.webdataset.webdataset import base_plus_ext
from PIL import Image, ImageOps, UnidentifiedImageError

from reca.config import ConfigError, DataSource

log = logging.getLogger("reca.data")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SHUFFLE_BUFFER = 1000  # streaming shuffle window: datasets' default, enough to break file order
STREAM_SKIP_LIMIT = 100_000  # unusable rows in a row before a stream of unknown size is called empty
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
GRAY_MODES = {"1", "L", "LA", "La", "I", "F"}  # plus every "I;16…" variant
# Pillow's own default decompression-bomb limit, applied per image here (Image.MAX_IMAGE_PIXELS is
# process-wide and only warns between 1× and 2× of it): a larger image is skipped as too_large.
MAX_PIXELS = 89_478_485


class NoUsableData(ConfigError):
    """A data source with nothing to train on (empty, or every image unusable)."""


# ----------------------------------------------------------------------------------- opening


def open_source(
    src: DataSource, *, need_captions: bool, key: str = "data"
) -> datasets.Dataset | datasets.IterableDataset:
    """Open ``src`` without decoding any image; ``key`` (e.g. ``objectives.recon.data``) names it in errors."""
    path = Path(src.path).expanduser()
    if not src.path:
        raise FileNotFoundError(
            f"{key}.path is empty: set a folder of images, a .jsonl/.csv manifest, .tar shards or a dataset name"
        )
    if src.path.endswith(".tar"):  # one shard, a glob or a brace pattern of WebDataset shards
        ds = _open_shards(src, key, need_captions)
    elif path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):  # save_to_disk
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise ConfigError(f"{key}.split: no split '{src.split}' in {path} (splits: {', '.join(ds)})")
            ds = ds[src.split]
        ds = ds.to_iterable_dataset() if src.streaming else ds
    elif path.suffix in (".jsonl", ".csv"):
        if not path.is_file():
            raise FileNotFoundError(f"{key}.path: no such manifest {path}")
        _require_utf8(path, key)
        if not _has_content(path):
            raise NoUsableData(f"{key}.path: {path} holds no examples (the manifest is empty)")
        try:
            ds = datasets.load_dataset(
                "json" if path.suffix == ".jsonl" else "csv",
                data_files=str(path),
                split="train",
                streaming=src.streaming,
            )
        except datasets.exceptions.DatasetGenerationError as e:
            cause = e.__cause__ or e
            raise ConfigError(f"{key}.path: cannot read manifest {path} ({str(cause).splitlines()[0]})") from None
        _require_columns(ds, src, key, need_captions)
        root = str(path.parent.resolve())
        if not src.allow_outside_root and not src.streaming:
            real_dirs: dict[str, str] = {}  # each folder resolved once, not once per row
            # ds[:][column], not ds[column]: the latter is a lazy column read row by row (~14 µs a row)
            outside = sum(_outside(v, root, real_dirs) for v in ds[:][src.image_column])
            if outside:
                raise ConfigError(
                    f"{key}.allow_outside_root: {outside} image path(s) in {path} are absolute or leave its folder "
                    f"(../); move the images under {path.parent} or set {key}.allow_outside_root=true"
                )
        # relative image paths are relative to the manifest, not to wherever training was launched
        fn_kwargs = {"column": src.image_column, "root": root, "allow_outside": src.allow_outside_root, "key": key}
        ds = ds.map(_resolve, fn_kwargs=fn_kwargs)
    elif path.is_dir() and (files := sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)):
        # A plain listing rather than the imagefolder builder: nothing is opened, so a broken file
        # is met (and counted) only when its batch is assembled.
        ds = datasets.Dataset.from_dict({src.image_column: files})
        ds = ds.to_iterable_dataset() if src.streaming else ds
    else:  # a dataset name in the local HF cache, or a folder of parquet/arrow/json files
        try:
            ds = datasets.load_dataset(src.path, split=src.split, streaming=src.streaming)
        except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
            raise FileNotFoundError(
                f"{key}.path: '{src.path}' is neither an image folder, a .jsonl/.csv manifest nor a dataset "
                f"loadable offline ({str(e).splitlines()[0]})"
            ) from None
    _require_columns(ds, src, key, need_captions)
    if not isinstance(ds, datasets.IterableDataset) and len(ds) == 0:
        raise NoUsableData(f"{key}.path: {src.path} holds no examples")
    return _undecoded(ds, src.image_column)


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, as the shell (and webdataset's braceexpand) spell it:
    ``{000..002}`` is a range (zero padding kept when a bound is padded), ``{a,b}`` a list; groups
    expand left to right. A brace group with neither ``,`` nor ``..`` is literal text."""
    m = re.search(r"\{([^{}]*(?:,|\.\.)[^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    if r := re.fullmatch(r"(\d+)\.\.(\d+)", body):
        lo, hi = r.group(1), r.group(2)
        width = (
            max(len(lo), len(hi)) if (lo.startswith("0") and len(lo) > 1) or (hi.startswith("0") and len(hi) > 1) else 0
        )
        step = 1 if int(lo) <= int(hi) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    out = [name for item in items for name in expand_braces(head + item + tail)]
    return list(dict.fromkeys(out))  # nested groups ({a,{b,c}}) expand innermost first: drop repeats


def shard_files(pattern: str, key: str = "data") -> list[str]:
    """The ``.tar`` files a path, glob or brace pattern names, in pattern order (globs sorted).
    Every part must match a file: a shard silently left out would be a silently smaller dataset."""
    files, unmatched = [], []
    for part in expand_braces(str(Path(pattern).expanduser())):
        found = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part] if Path(part).is_file() else []
        files.extend(found) if found else unmatched.append(part)
    if unmatched:
        more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
        raise FileNotFoundError(f"{key}.path: no shard matches {unmatched[0]}{more}")
    return list(dict.fromkeys(files))


def _member_keys(shard: str, key: str, limit: int = 1000) -> list[str]:
    """The member extensions (webdataset's column names: ``jpg``, ``txt``…) among a shard's first members."""
    try:
        with tarfile.open(shard) as tar:
            names = [m.name for m in itertools.islice(tar, limit) if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise ConfigError(f"{key}.path: {shard} is not a readable tar archive ({e})") from None
    return list(dict.fromkeys(ext for _, ext in map(base_plus_ext, names) if ext))


def _open_shards(src: DataSource, key: str, need_captions: bool) -> datasets.Dataset | datasets.IterableDataset:
    """WebDataset shards through ``datasets``' webdataset loader. Its columns are the member extensions.

    The features are given rather than inferred: inference reads the first five samples and fails
    unless they all have the same members (a sample without caption or image is common), and the
    image stays undecoded bytes (``Image(decode=False)``) so a broken one is skipped, not fatal.
    Members other than the image and caption columns are dropped.
    """
    files = shard_files(src.path, key)
    members = _member_keys(files[0], key)
    found = ", ".join(members) or "none"
    if src.image_column not in members or "." + src.image_column.rsplit(".", 1)[-1].lower() not in IMAGE_SUFFIXES:
        raise ConfigError(
            f"{key}.image_column: '{src.image_column}' is not an image member of {files[0]} (members: {found}); "
            f"for shards name the image's extension, e.g. {key}.image_column=jpg"
        )
    features = {src.image_column: datasets.Image(decode=False), "__key__": datasets.Value("string")}
    if need_captions:
        if src.caption_column not in members or src.caption_column.rsplit(".", 1)[-1] not in ("txt", "text"):
            raise ConfigError(
                f"{key}.caption_column: this objective needs captions but '{src.caption_column}' is not a text "
                f"member of {files[0]} (members: {found}); for shards name the caption's extension, e.g. "
                f"{key}.caption_column=txt"
            )
        features[src.caption_column] = datasets.Value("string")
    try:
        return datasets.load_dataset(
            "webdataset",
            data_files=files,
            split="train",
            streaming=src.streaming,
            features=datasets.Features(features),
        )
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise ConfigError(f"{key}.path: cannot read shards {src.path} ({str(cause).splitlines()[0]})") from None


def _has_content(path: Path) -> bool:
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return True
    return False


def _require_utf8(path: Path, key: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise ConfigError(f"{key}.path: {path} is not UTF-8 text (byte {offset + e.start})") from None
            offset += len(block)


def _outside(value: Any, root: str, real_dirs: dict[str, str] | None = None) -> bool:
    """Does a manifest's image path leave the manifest's folder (absolute, through ``..``, or
    through a symlink)? ``root`` is resolved. The path is resolved as ``os.path.realpath`` would:
    its folder once per ``real_dirs`` cache (a manifest names few folders), its file name only when
    it is a symlink — resolving every row in full cost ~0.1 ms a row (2.3 s for 24,000)."""
    if not isinstance(value, str) or not value:
        return False
    if os.path.isabs(value):
        return True
    joined = os.path.join(root, value)
    folder, name = os.path.split(joined)
    if name in ("", ".", "..") or os.path.islink(joined):
        real = os.path.realpath(joined)
    else:
        cache = real_dirs if real_dirs is not None else {}
        if folder not in cache:
            cache[folder] = os.path.realpath(folder)
        real = os.path.join(cache[folder], name)
    return os.path.commonpath([real, root]) != root


def _columns(ds: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    if ds.column_names is not None:
        return list(ds.column_names)
    # a streamed json/csv has no schema until read: its first row tells
    return list(next(iter(ds.iter(batch_size=1)), {}).keys())


def _require_columns(ds, src: DataSource, key: str, need_captions: bool) -> None:
    columns = _columns(ds)
    if src.image_column not in columns:
        raise ConfigError(
            f"{key}.image_column: '{src.image_column}' is not a column of {src.path} (columns: {', '.join(columns)})"
        )
    if need_captions and (not src.caption_column or src.caption_column not in columns):
        raise ConfigError(
            f"{key}.caption_column: this objective needs captions but '{src.caption_column}' is not a column "
            f"of {src.path} (columns: {', '.join(columns)})"
        )


def _resolve(row: dict, column: str, root: str, allow_outside: bool = True, key: str = "data") -> dict:
    value = row[column]
    if not allow_outside and _outside(value, root):  # streamed manifests are checked row by row
        raise ConfigError(
            f"{key}.allow_outside_root: image path {value!r} is absolute or leaves the manifest's folder; "
            f"set {key}.allow_outside_root=true to allow it"
        )
    return {
        column: str(Path(root) / value) if isinstance(value, str) and value and not Path(value).is_absolute() else value
    }


def _undecoded(ds, column: str):
    """Datasets decode ``Image`` features on access; undo that so decoding happens where failures are counted."""
    feature = (ds.features or {}).get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


# ----------------------------------------------------------------------------------- decoding


def load_image(value: Any, min_side: int = 16) -> tuple[Image.Image | None, str | None]:
    """An RGB image and ``None`` or ``"converted:<kind>[,<kind>…]"``, or ``(None, reason)`` with reason
    one of ``missing``, ``undecodable``, ``tiny``. Never raises for a bad image."""
    # Pillow's global ImageFile.LOAD_TRUNCATED_IMAGES, when a user turns it on, decodes a truncated
    # file with a grey bottom; reca never changes it for the process, it checks the decode instead
    try:
        if isinstance(value, Image.Image):
            return _finish(value, min_side)
        if isinstance(value, dict):  # how datasets stores an undecoded image
            value = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
        if not value:
            return None, "missing"
        with Image.open(value) as image:
            if image.size[0] * image.size[1] > MAX_PIXELS:  # known from the header, before decoding
                return None, "too_large"
            image.load()  # the full decode: header-only checks miss truncation
            return _finish(image, min_side)
    except FileNotFoundError:
        return None, "missing"
    except Image.DecompressionBombError:
        return None, "too_large"
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError):
        return None, "undecodable"


def _finish(image: Image.Image, min_side: int) -> tuple[Image.Image | None, str | None]:
    if min(image.size) < min_side:
        return None, "tiny"
    kinds = []
    if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation: the pixels are stored rotated/flipped
        image = ImageOps.exif_transpose(image)
        kinds.append("orientation")
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        image = _gray8(image)
    if mode in ("P", "PA"):
        kinds.append("palette")
        image = image.convert("RGBA")  # carries the palette's transparency, if any, as alpha
    elif mode in GRAY_MODES or mode.startswith("I;16"):
        kinds.append("grayscale")
    elif mode == "CMYK":
        kinds.append("cmyk")  # PIL's conversion, which also undoes Adobe's inverted CMYK JPEGs
    elif mode not in ("RGB", "RGBA", "RGBa"):
        kinds.append(mode.lower())  # YCbCr, LAB, HSV…: PIL's conversion, but never unreported
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            # Transparent pixels have undefined RGB (often black): composite on white, as viewers show them.
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            rgba = canvas
            kinds.append("alpha")
        image = rgba
    return image.convert("RGB"), (
        "converted:" + ",".join(kinds)
    ) if kinds else None  # convert copies: the file can close


def _gray8(image: Image.Image) -> Image.Image:
    """High-bit-depth grayscale to 8 bits by its range; PIL's own conversion clips at 255 (a 16-bit
    photo turns white)."""
    a = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (
        image.mode == "I" and a.max() > 255
    ):  # "I" has no declared depth: >255 means 16-bit
        a = a / 257
    elif image.mode == "F" and a.max() <= 1:  # float images are conventionally in [0, 1]
        a = a * 255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _decode(
    row: dict, image_column: str, caption_column: str | None, min_side: int
) -> tuple[Image.Image | None, str | None, str | None]:
    """``(image, note, caption)``; image None means skipped for reason ``note``."""
    caption = None
    if caption_column:
        caption = row.get(caption_column)
        if caption is None or (isinstance(caption, float) and math.isnan(caption)) or not str(caption).strip():
            return None, "no_caption", None  # cheap, so before decoding
        caption = str(caption)
    image, note = load_image(row[image_column], min_side)
    return image, note, caption


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("path") or "<bytes>")
    return "<PIL image>" if isinstance(value, Image.Image) else str(value)


# ----------------------------------------------------------------------------------- ordering


def _shard(n: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """Epoch ``epoch``'s permutation, then this rank's interleaved shard (rank, rank+world, …):
    ranks are disjoint and together cover the data."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return perm[rank::world]


def _items(ds, seed: int, rank: int, world: int, start: int) -> Iterator[Any]:
    """This rank's stream from position ``start`` on: indices (map-style) or undecoded rows (streamed)."""
    if not isinstance(ds, datasets.IterableDataset):
        epoch, offset = divmod(start, len(range(rank, len(ds), world)))
        for e in itertools.count(epoch):
            yield from _shard(len(ds), seed, e, rank, world)[offset:]
            offset = 0
        return
    for e in itertools.count():
        shard = split_dataset_by_node(
            ds.shuffle(seed=seed + e, buffer_size=SHUFFLE_BUFFER), rank=rank, world_size=world
        )
        rows = 0
        # .iter() rather than iter(): inside a loader worker, iter() would shard by worker on its own
        for chunk in shard.iter(batch_size=64):
            for i in range(len(next(iter(chunk.values())))):
                rows += 1
                if start > 0:
                    start -= 1  # fast-forward reads rows but decodes nothing
                    continue
                yield {k: v[i] for k, v in chunk.items()}
        if rows == 0:
            raise ValueError(f"rank {rank}'s share of the streamed dataset is empty")


def _rows(ds, items: list) -> list[dict]:
    """The rows of a chunk: streamed rows as they are, map-style indices in one ``ds[indices]``
    (one read of the table; ``ds[i]`` per row cost ~30 µs each)."""
    if not items or isinstance(items[0], dict):
        return items
    columns = ds[items]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _start_position(
    ds, usable: int, seed: int, rank: int, world: int, decode: Callable[[dict], bool], key: str = "data"
) -> int:
    """The position just after this rank's ``usable``-th usable image: where a resumed stream starts.

    Exact rather than fast: which images are usable is known only by decoding them, so resuming
    decodes, but never twice the same index (a map-style index is remembered across epochs, and an
    epoch whose indices are all known is skipped whole). Transforms never run here.
    """
    if usable == 0:
        return 0
    if isinstance(ds, datasets.IterableDataset):  # rows have no stable index to remember: decode each
        run = 0
        for position, row in enumerate(_items(ds, seed, rank, world, 0), 1):
            ok = decode(row)
            usable, run = usable - ok, 0 if ok else run + 1
            if usable == 0:
                return position
            if run >= STREAM_SKIP_LIMIT:
                raise NoUsableData(f"{key}.path: no usable image in {run} consecutive examples")
    n = len(ds)
    valid = np.full(n, -1, np.int8)  # -1 unknown, 0 unusable, 1 usable
    position, run = 0, 0
    for epoch in itertools.count():
        shard = _shard(n, seed, epoch, rank, world)
        known = valid[shard]
        if (known >= 0).all() and known.sum() < usable:
            usable, position = usable - int(known.sum()), position + len(shard)
            run = run + len(shard) if known.sum() == 0 else 0
        else:
            for i in shard:
                if valid[i] < 0:
                    valid[i] = decode(ds[i])
                position, usable, run = position + 1, usable - int(valid[i]), 0 if valid[i] else run + 1
                if usable == 0:
                    return position
        if run >= n:
            raise NoUsableData(
                f"{key}.path: no usable image in {n} consecutive examples: every image is missing, undecodable, "
                "tiny, too large or uncaptioned"
            )
    raise AssertionError("unreachable: epochs are endless")


# ----------------------------------------------------------------------------------- batching


class _Samples(torch.utils.data.IterableDataset):
    """Decoded, transformed samples of one rank, in chunks of consecutive positions. With loader
    workers, chunk c is made by worker c mod N, and the DataLoader returns workers' outputs round
    robin, so chunks arrive in order whatever N is."""

    def __init__(self, ds, transform, caption_column, image_column, min_side, seed, rank, world, start, chunk):
        self.ds, self.transform, self.caption_column, self.image_column, self.min_side = (
            ds,
            transform,
            caption_column,
            image_column,
            min_side,
        )
        self.seed, self.rank, self.world, self.start, self.chunk = seed, rank, world, start, chunk

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        items = _items(self.ds, self.seed, self.rank, self.world, self.start)
        for c in itertools.count():
            chunk = list(itertools.islice(items, self.chunk))
            if c % workers == worker:
                yield self._make(chunk)

    def _make(self, chunk: list) -> tuple[dict[str, torch.Tensor], list[tuple[bool, str | None, str | None, str]]]:
        """Stacked tensors of the usable positions (one shared-memory tensor per key, not per image),
        and per position: (usable, note, caption, where)."""
        tensors, meta = [], []
        for row in _rows(self.ds, chunk):
            image, note, caption = _decode(row, self.image_column, self.caption_column, self.min_side)
            if image is not None:
                tensors.append(self.transform(image))
            meta.append((image is not None, note, caption, _describe(row[self.image_column])))
        return ({k: torch.stack([t[k] for t in tensors]) for k in tensors[0]} if tensors else {}), meta


def _identity(x):
    return x


def batches(
    ds,
    *,
    batch_size: int,
    transform: Callable[[Image.Image], dict[str, torch.Tensor]],
    caption_column: str | None,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    num_workers: int = 0,
    image_column: str = "image",
    min_side: int = 16,
    key: str = "data",
) -> Iterator[dict]:
    """Endless batches of exactly ``batch_size`` usable images: ``transform``'s tensors stacked,
    ``caption`` (when ``caption_column``), and the ``skipped`` / ``converted`` counts met while
    filling this batch. ``start_batch=k`` yields exactly what an uninterrupted stream yields from
    batch k on; ``num_workers`` decodes and transforms in loader processes, same batches."""
    ds = _undecoded(ds, image_column)
    sized = not isinstance(ds, datasets.IterableDataset)
    if sized and len(ds) < world_size:
        raise ValueError(f"{len(ds)} examples cannot be shared by {world_size} processes")

    def usable(row: dict) -> bool:
        return _decode(row, image_column, caption_column, min_side)[0] is not None

    start = _start_position(ds, start_batch * batch_size, seed, rank, world_size, usable, key)
    samples = _Samples(ds, transform, caption_column, image_column, min_side, seed, rank, world_size, start, batch_size)
    # batch_size=None: chunks pass through as made; collate would only repack them
    loader = torch.utils.data.DataLoader(samples, batch_size=None, num_workers=num_workers, collate_fn=_identity)
    chunks = iter(loader) if num_workers > 0 else iter(samples)
    limit = len(ds) if sized else STREAM_SKIP_LIMIT
    warned: set[str] = set()
    pending: list[dict[str, torch.Tensor]] = []
    captions: list[str] = []
    skipped: dict[str, int] = {}
    converted: dict[str, int] = {}
    run = 0
    for stacked, meta in chunks:
        j = 0
        for ok, note, caption, where in meta:
            if not ok:
                skipped[note] = skipped.get(note, 0) + 1
                if note not in warned:  # once per reason: a bad corpus must not flood the log
                    warned.add(note)
                    log.warning("skipping %s image %s (further %s images are counted, not logged)", note, where, note)
                run += 1
                if run >= limit:
                    raise NoUsableData(
                        f"{key}.path: no usable image in {run} consecutive examples (skipped so far in this batch: "
                        f"{skipped})"
                    )
                continue
            run = 0
            for kind in note.removeprefix("converted:").split(",") if note else ():
                converted[kind] = converted.get(kind, 0) + 1
            pending.append({k: v[j] for k, v in stacked.items()})
            j += 1
            if caption_column:
                captions.append(caption)
            if len(pending) == batch_size:
                batch: dict[str, Any] = {k: torch.stack([p[k] for p in pending]) for k in pending[0]}
                if caption_column:
                    batch["caption"] = captions
                batch["skipped"], batch["converted"] = skipped, converted
                yield batch
                pending, captions, skipped, converted = [], [], {}, {}
