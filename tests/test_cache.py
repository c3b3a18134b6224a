"""Embedding cache: hits return exactly what the encoder computes; every key change invalidates."""

from __future__ import annotations

from pathlib import Path

import torch
from test_encoders import TINY_CLIP, images

from reca.cache import EmbeddingCache, content_key
from reca.config import EncoderConfig
from reca.encoders import build_encoder


class Counting:
    """Wraps an encoder and counts the images it really encodes."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, 0

    def __call__(self, pixels):
        self.calls += len(pixels)
        return self.encoder(pixels)


def encoder(layer: int = -2, input_size: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    return build_encoder(
        EncoderConfig(kind="open_clip", name="ViT-B-32", overrides=TINY_CLIP, layer=layer, input_size=input_size)
    )


def pixels(enc, n=3):
    return torch.stack([enc.preprocess(im) for im in images(n)])


def test_hits_are_identical_and_skip_the_encoder(tmp_path: Path) -> None:
    enc = encoder()
    x = pixels(enc)
    counting = Counting(enc)
    cache = EmbeddingCache(tmp_path, enc.identity)
    first = cache.encode(x, counting)
    assert counting.calls == 3 and torch.equal(first, enc(x))
    again = cache.encode(x, counting)
    assert counting.calls == 3 and torch.equal(again, first)
    cache.flush()
    reopened = EmbeddingCache(tmp_path, enc.identity)  # from disk, memory-mapped shards
    assert torch.equal(reopened.encode(x, counting), first) and counting.calls == 3
    assert reopened.disk_bytes() > first.numel() * 4 and not list(reopened.dir.glob(".tmp-*"))


def test_every_key_change_invalidates(tmp_path: Path) -> None:
    base = encoder()
    cache = EmbeddingCache(tmp_path, base.identity)
    cache.encode(pixels(base), base)
    cache.flush()
    variants = {
        "layer": encoder(layer=-1),
        "resolution": encoder(input_size=16),
    }
    for name, other in variants.items():
        assert other.identity != base.identity, name
        fresh = EmbeddingCache(tmp_path, other.identity)
        counting = Counting(other)
        fresh.encode(pixels(other), counting)
        assert counting.calls == 3, f"{name} change must not hit the old cache"
    # weights (the identity names the checkpoint) and storage dtype
    assert EmbeddingCache(tmp_path, base.identity.replace("random", "other.pt")).dir != cache.dir
    assert EmbeddingCache(tmp_path, base.identity, dtype="bfloat16").dir != cache.dir
    # content: a changed image is a different key
    x = pixels(base)
    y = x.clone()
    y[0, 0, 0, 0] += 1e-3
    assert content_key(x[0]) != content_key(y[0]) and content_key(x[1]) == content_key(y[1])


def test_bf16_storage_is_close(tmp_path: Path) -> None:
    enc = encoder()
    x = pixels(enc)
    cached = EmbeddingCache(tmp_path, enc.identity, dtype="bfloat16").encode(x, enc)
    torch.testing.assert_close(cached, enc(x), atol=2e-2, rtol=2e-2)


def test_two_processes_flushing_at_once_keep_both_shards(tmp_path: Path, monkeypatch) -> None:
    """Two runs sharing one cache folder (a sweep), both rank 0, flush at the same moment: the
    second picks its shard name while the first is still writing. Each must still read its own
    entries afterwards — a name derived from counting existing shards would let one overwrite
    the other."""
    import reca.cache as cache_mod

    a = EmbeddingCache(tmp_path, "enc", rank=0)
    b = EmbeddingCache(tmp_path, "enc", rank=0)
    a.put("key-a", torch.ones(2))
    b.put("key-b", torch.full((2,), 2.0))
    write = cache_mod.atomic_write_bytes

    def racing_write(path, data):  # b flushes after a has named its shard, before a's file exists
        monkeypatch.setattr(cache_mod, "atomic_write_bytes", write)
        b.flush()
        write(path, data)

    monkeypatch.setattr(cache_mod, "atomic_write_bytes", racing_write)
    a.flush()
    assert torch.equal(a.get("key-a"), torch.ones(2))
    assert torch.equal(b.get("key-b"), torch.full((2,), 2.0))
    fresh = EmbeddingCache(tmp_path, "enc", rank=0)  # a third run sees both
    assert torch.equal(fresh.get("key-a"), torch.ones(2)) and torch.equal(fresh.get("key-b"), torch.full((2,), 2.0))
