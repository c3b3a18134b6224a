"""Embedding cache: the frozen encoder's output never changes, so compute it once per image.

Keys are the SHA-1 of the exact encoder input tensor (the image content after the encoder's own
preprocessing at its input resolution) inside a folder named by the encoder's identity (model,
weights, layer, resolution) and the storage dtype — change any of these and nothing stale can be
read. Entries live in append-only safetensors shards with random names, each written to a temporary
name and renamed, so a crash never leaves a half-written shard and runs sharing the folder never
overwrite each other's; shards are memory-mapped on read.
"""

from __future__ import annotations

import hashlib
import typing
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from reca.config import TrainConfig
from reca.encoders import FrozenEncoder
from reca.io import atomic_write_bytes

STORAGE_DTYPES = typing.get_args(typing.get_type_hints(TrainConfig)["cache_dtype"])


def content_key(x: torch.Tensor) -> str:
    """SHA-1 of one encoder-input tensor's bytes (float32, contiguous)."""
    return hashlib.sha1(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


class EmbeddingCache:
    def __init__(
        self, root: str | Path, encoder_identity: str, dtype: str = "float32", rank: int = 0, flush_every: int = 256
    ):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"train.cache_dtype: '{dtype}' is not one of {', '.join(STORAGE_DTYPES)}")
        tag = hashlib.sha1(f"{encoder_identity}|{dtype}".encode()).hexdigest()[:16]
        self.dir = Path(root) / tag
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "identity.txt").write_text(f"{encoder_identity}\n{dtype}\n")
        self.dtype, self.rank, self.flush_every = getattr(torch, dtype), rank, flush_every
        self.index: dict[str, Path] = {}
        self.handles: dict[Path, object] = {}  # open, memory-mapped shards
        self.pending: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0
        self.refresh()

    def refresh(self) -> None:
        """Index every complete shard (other processes may have written new ones)."""
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            if shard not in self.index.values():
                with safe_open(str(shard), framework="pt") as f:
                    for key in f.keys():
                        self.index.setdefault(key, shard)

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.pending:
            return self.pending[key]
        shard = self.index.get(key)
        if shard is None:
            return None
        if shard not in self.handles:
            self.handles[shard] = safe_open(str(shard), framework="pt")
        return self.handles[shard].get_tensor(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.pending[key] = value.detach().to("cpu", self.dtype).contiguous()
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        # a fresh random name, not a count of existing shards: runs sharing one folder (a sweep, all
        # rank 0) may flush at the same moment, and two counts taken before either file exists collide
        final = self.dir / f"shard-r{self.rank}-{uuid.uuid4().hex}.safetensors"
        atomic_write_bytes(final, save(self.pending))
        for key in self.pending:
            self.index[key] = final
        self.pending = {}

    def encode(self, pixels: torch.Tensor, encoder: FrozenEncoder) -> torch.Tensor:
        """Encoder output for a batch of encoder inputs: cached rows read, missing rows computed
        in one encoder call and stored."""
        keys = [content_key(x) for x in pixels]
        rows: list[torch.Tensor | None] = [self.get(k) for k in keys]
        missing = [i for i, r in enumerate(rows) if r is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = encoder(pixels[missing]).to("cpu", self.dtype)
            for i, value in zip(missing, fresh):
                rows[i] = value
                self.put(keys[i], value)
        return torch.stack(rows).float()  # type: ignore[arg-type]

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("shard-*.safetensors"))
