"""Frozen semantic encoders: the right layer, CLS handling, the bottleneck, loading by path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from reca.config import ConfigError, EncoderConfig
from reca.encoders import build_encoder

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"width": 32, "layers": 3, "patch_size": 8, "image_size": 32, "head_width": 16},
    "text_cfg": {"width": 32, "layers": 1, "heads": 2, "context_length": 77},
}
HF_CLIP = {
    "model_type": "clip",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def images(n: int = 2) -> list[Image.Image]:
    return [Image.new("RGB", (40 + 8 * i, 36), (30 * i, 200, 90)) for i in range(n)]


def test_open_clip_patch_tokens_of_the_penultimate_layer() -> None:
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(kind="open_clip", name="ViT-B-32", overrides=TINY_CLIP))
    tokens = enc.encode(images())
    assert tokens.shape == (2, 16, 32)  # (32/8)² patches, CLS dropped
    # layer -2 is block 1 of 3: recompute it by hand through the resblocks
    visual = enc.module
    x = torch.stack([enc.preprocess(im) for im in images()])
    with torch.no_grad():
        h = visual.conv1(x).flatten(2).transpose(1, 2)
        h = torch.cat([visual.class_embedding.expand(2, 1, -1), h], 1) + visual.positional_embedding
        h = visual.ln_pre(h)
        for block in visual.transformer.resblocks[:2]:
            h = block(h)
    torch.testing.assert_close(tokens, h[:, 1:], atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in visual.parameters()) and not visual.training


def test_bottleneck_resolution_gives_fewer_tokens() -> None:
    enc = build_encoder(EncoderConfig(kind="open_clip", name="ViT-B-32", overrides=TINY_CLIP, input_size=16))
    assert enc.input_size == 16 and enc.preprocess(images(1)[0]).shape == (3, 16, 16)
    assert enc.encode(images()).shape == (2, 4, 32)


def test_open_clip_local_checkpoint_file(tmp_path: Path) -> None:
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP)
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    enc = build_encoder(
        EncoderConfig(kind="open_clip", name="ViT-B-32", pretrained=str(tmp_path / "clip.pt"), overrides=TINY_CLIP)
    )
    x = torch.stack([enc.preprocess(im) for im in images()])
    expected = model.visual.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")[
        "image_intermediates"
    ][0]
    torch.testing.assert_close(enc(x), expected)


def test_hf_clip_drops_cls_and_siglip_keeps_all(tmp_path: Path) -> None:
    clip = build_encoder(EncoderConfig(kind="hf", overrides=HF_CLIP))
    assert clip.encode(images()).shape == (2, 16, 32)
    siglip = build_encoder(EncoderConfig(kind="hf", overrides={**HF_CLIP, "model_type": "siglip"}))
    assert siglip.encode(images()).shape == (2, 16, 32)  # SigLIP has no class token: all 16 kept
    kept = build_encoder(EncoderConfig(kind="hf", overrides=HF_CLIP, drop_cls="no"))
    assert kept.encode(images()).shape == (2, 17, 32)


def test_hf_encoder_loads_by_path_like_a_hub_id(tmp_path: Path) -> None:
    import transformers

    cfg = transformers.CLIPVisionConfig(**{k: v for k, v in HF_CLIP.items() if k != "model_type"})
    model = transformers.CLIPVisionModel(cfg)
    model.save_pretrained(tmp_path / "clip")
    enc = build_encoder(EncoderConfig(kind="hf", name=str(tmp_path / "clip")))
    x = torch.stack([enc.preprocess(im) for im in images()])
    with torch.no_grad():
        expected = model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(enc(x), expected)
    low = build_encoder(EncoderConfig(kind="hf", name=str(tmp_path / "clip"), input_size=16))
    assert low.encode(images()).shape == (2, 4, 32)  # position embeddings interpolated


def test_bad_encoder_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="^encoder.name: 'ViT-Nope' is not an open_clip model"):
        build_encoder(EncoderConfig(kind="open_clip", name="ViT-Nope"))
    with pytest.raises(ConfigError, match="^encoder.name: cannot load"):
        build_encoder(EncoderConfig(kind="hf", name="/no/such/dir"))
    with pytest.raises(ConfigError, match="^encoder.kind: 'umm'"):
        build_encoder(EncoderConfig(kind="umm"), adapter=object())


def test_preprocess_is_bitwise_the_torch_normalisation() -> None:
    import numpy as np

    from reca.encoders import Preprocess
    from reca.images import square_crop

    pp = Preprocess(16, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    rng = np.random.default_rng(0)
    for shape in ((32, 32), (24, 40), (16, 16)):
        image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
        x = torch.from_numpy(np.asarray(square_crop(image, 16), dtype=np.float32) / 255.0).permute(2, 0, 1)
        ref = (x - torch.tensor(pp.mean)[:, None, None]) / torch.tensor(pp.std)[:, None, None]
        got = pp(image)
        assert got.shape == (3, 16, 16) and got.dtype == torch.float32
        assert torch.equal(got, ref)  # the same bits: cached embeddings and resumed runs depend on them
