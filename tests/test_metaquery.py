"""The reference UMM: losses, generation, and every part saved and loaded back by path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from reca.adapter import Condition, UMMAdapter
from reca.build import build
from reca.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# the tiny config with PixArt (plain softmax attention, the demo's DiT) in place of Sana; one block
PIXART = [
    "model.args.transformer_class=PixArtTransformer2DModel",
    "model.args.transformer_config={in_channels: 4, out_channels: 4, num_attention_heads: 2, attention_head_dim: 8,"
    " num_layers: 1, cross_attention_dim: 16, caption_channels: 24, sample_size: 16, patch_size: 2}",
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/tiny.yaml")
    adapter, encoder = build(cfg)
    return cfg, adapter.eval(), encoder


def batch(encoder, n=2):
    from PIL import Image

    from reca.images import target_pixels

    ims = [Image.new("RGB", (32, 32), (200, 40 * i, 30)) for i in range(n)]
    return torch.stack([target_pixels(im, 32) for im in ims]), encoder.encode(ims)


def test_satisfies_protocol(tiny) -> None:
    assert isinstance(tiny[1], UMMAdapter)


def test_losses_are_deterministic_per_sample_seed(tiny) -> None:
    _, adapter, encoder = tiny
    x, sem = batch(encoder, 4)
    cond = Condition(semantic=sem, instructions=["Reconstruct."] * 4)
    a = adapter.generation_loss(x, cond, [1, 2, 3, 4])
    b = adapter.generation_loss(x, cond, [1, 2, 3, 4])
    c = adapter.generation_loss(x, cond, [5, 6, 7, 8])
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the same samples split in two halves average to the whole: nothing depends on batch layout
    h1 = adapter.generation_loss(x[:2], Condition(semantic=sem[:2], instructions=["Reconstruct."] * 2), [1, 2])
    h2 = adapter.generation_loss(x[2:], Condition(semantic=sem[2:], instructions=["Reconstruct."] * 2), [3, 4])
    torch.testing.assert_close((h1 + h2) / 2, a, atol=1e-5, rtol=1e-5)


def test_understanding_loss_matches_answer_logprob(tiny) -> None:
    _, adapter, encoder = tiny
    _, sem = batch(encoder, 2)
    prompts, answers = ["Describe."] * 2, ["a red square", "blue"]
    lp = adapter.answer_logprob(sem, prompts, answers)
    n_tokens = torch.tensor(
        [len(adapter.tokenizer(a, add_special_tokens=False).input_ids) + 1 for a in answers]
    )  # + eos
    torch.testing.assert_close(adapter.understanding_loss(sem, prompts, answers), (-lp / n_tokens).mean())
    # answer_logprob of one sample does not depend on its batch neighbours (padding is masked)
    torch.testing.assert_close(adapter.answer_logprob(sem[1:], prompts[1:], answers[1:]), lp[1:], atol=1e-5, rtol=1e-5)


def test_a_mixed_batch_is_each_sample_alone(tiny) -> None:
    # prompts are tokenized once per batch over the distinct strings: each sample must still get
    # its own instruction (or none), its own question and its own answer
    _, adapter, encoder = tiny
    _, sem = batch(encoder, 4)
    instructions = ["Reconstruct.", "", "Redraw this image.", "Reconstruct."]
    whole = adapter.condition(Condition(semantic=sem, instructions=instructions), [False, False, False, True])
    for i, (ins, drop) in enumerate(zip(instructions, [False, False, False, True])):
        alone = adapter.condition(Condition(semantic=sem[i : i + 1], instructions=[ins]), [drop])
        torch.testing.assert_close(whole[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(whole[0], whole[1], atol=1e-3)  # the instruction reaches the LM
    prompts, answers = ["Describe.", "What is it?", "Describe.", "What is it?"], ["a red square", "blue", "", "red"]
    lp = adapter.answer_logprob(sem, prompts, answers)
    for i in range(4):
        alone = adapter.answer_logprob(sem[i : i + 1], prompts[i : i + 1], answers[i : i + 1])
        torch.testing.assert_close(lp[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    texts = ["a red square", "", "a red square", "a blue circle"]
    whole = adapter.condition(Condition(texts=texts), [False, False, True, False])
    for i, drop in enumerate([False, False, True, False]):
        torch.testing.assert_close(
            whole[i : i + 1], adapter.condition(Condition(texts=texts[i : i + 1]), [drop]), atol=1e-5, rtol=1e-5
        )


def test_generate_is_seeded_per_image(tiny) -> None:
    _, adapter, _ = tiny
    ims = adapter.generate(
        Condition(texts=["a red circle", "a blue square"]), seeds=[3, 4], guidance_scale=2.0, num_steps=3
    )
    assert [im.size for im in ims] == [(32, 32), (32, 32)]
    again = adapter.generate(Condition(texts=["a blue square"]), seeds=[4], guidance_scale=2.0, num_steps=3)
    pixels = [np.asarray(im).astype(int) for im in (ims[1], again[0])]
    # The same noise, so the same image up to rounding: on some CPUs (AVX-512 here) a batch of one
    # sums its matrix products in another order than a batch of two, and a pixel can land one
    # level apart after quantising to uint8. Another seed moves pixels by tens of levels.
    assert np.abs(pixels[0] - pixels[1]).max() <= 1
    other = adapter.generate(Condition(texts=["a blue square"]), seeds=[5], guidance_scale=2.0, num_steps=3)
    assert np.abs(np.asarray(other[0]).astype(int) - pixels[1]).mean() > 10


def test_every_part_loads_back_by_path(tiny, tmp_path: Path) -> None:
    cfg, adapter, encoder = tiny
    adapter.save_pretrained(tmp_path / "umm")
    x, sem = batch(encoder)
    cond = Condition(semantic=sem, instructions=["Redraw it."] * 2)
    expected = adapter.generation_loss(x, cond, [7, 8])
    # the keys a user fills with hub ids, here pointing at local dirs
    args = {
        "lm": str(tmp_path / "umm/lm"),
        "transformer": str(tmp_path / "umm/transformer"),
        "vae": str(tmp_path / "umm/vae"),
        "heads": str(tmp_path / "umm/heads.safetensors"),
        "num_queries": 8,
        "resolution": 32,
    }
    for overrides in (args, {"pretrained": str(tmp_path / "umm"), "num_queries": 8, "resolution": 32}):
        loaded = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, args=overrides))
        again, _ = build(loaded)
        torch.testing.assert_close(again.eval().generation_loss(x, cond, [7, 8]), expected)


def test_bad_part_path_names_the_key(tiny) -> None:
    from reca.config import ConfigError

    cfg = tiny[0]
    bad = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, args={**cfg.model.args, "transformer": "/no/such/dir"})
    )
    with pytest.raises(ConfigError, match=r"^model\.args\.transformer: cannot load '/no/such/dir'"):
        build(bad)


def test_pixel_space_x0_prediction_with_text_through_the_encoder(tmp_path: Path) -> None:
    from reca.flow import velocity_from_x0

    ov = [
        "model.args.vae_class=none",
        "model.args.prediction=x0",
        "model.args.text_path=encoder",
        "model.args.transformer_config.in_channels=3",
        "model.args.transformer_config.out_channels=3",
        "model.args.transformer_config.sample_size=32",
        "model.args.transformer_config.patch_size=4",
        "encoder.space=joint",
    ]
    cfg = load_config(ROOT / "configs/tiny.yaml", ov)
    torch.manual_seed(0)
    adapter, encoder = build(cfg)
    adapter.eval()
    assert adapter.vae is None and adapter.latent_size == 32 and adapter.latent_channels == 3
    x, sem = batch(encoder)
    assert sem.shape[1] == 1 + 4  # pooled embedding + patch tokens in the joint space
    loss = adapter.generation_loss(x, Condition(texts=["a red circle", "a blue star"]), [1, 2])
    assert torch.isfinite(loss)
    # text enters through the encoder's text tower: different words, different conditions
    a = adapter.condition(Condition(texts=["a red circle"]))
    b = adapter.condition(Condition(texts=["a blue star"]))
    assert not torch.allclose(a, b)
    ims = adapter.generate(Condition(texts=["a red circle"]), seeds=[0], guidance_scale=2.0, num_steps=3)
    assert ims[0].size == (32, 32)
    # x0 → velocity: with x_t = (1-σ)x0 + σε the recovered velocity is ε − x0
    x0, eps, s = torch.randn(2, 3), torch.randn(2, 3), torch.tensor(0.3)
    torch.testing.assert_close(velocity_from_x0((1 - s) * x0 + s * eps, x0, s), eps - x0)
    adapter.save_pretrained(tmp_path / "px")  # no VAE folder to write
    assert not (tmp_path / "px/vae").exists()


def test_pixart_transformer_trains_samples_and_loads_back(tmp_path: Path) -> None:
    """PixArt (plain softmax attention, the demo's DiT) in place of Sana: loss, sampling, save → load by path."""
    cfg = load_config(ROOT / "configs/tiny.yaml", PIXART)
    torch.manual_seed(0)
    adapter, encoder = build(cfg)
    adapter.eval()
    assert type(adapter.transformer).__name__ == "PixArtTransformer2DModel"
    x, sem = batch(encoder)
    cond = Condition(semantic=sem, instructions=["Redraw it."] * 2)
    loss = adapter.generation_loss(x, cond, [7, 8])
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert adapter.transformer.proj_out.weight.grad.abs().sum() > 0  # the DiT is on the loss path
    ims = adapter.generate(Condition(texts=["a red circle"]), seeds=[0], guidance_scale=2.0, num_steps=2)
    assert ims[0].size == (32, 32)
    adapter.save_pretrained(tmp_path / "umm")
    again, _ = build(load_config(ROOT / "configs/tiny.yaml", PIXART + [f"model.args.pretrained={tmp_path / 'umm'}"]))
    torch.testing.assert_close(again.eval().generation_loss(x, cond, [7, 8]), loss.detach())


@pytest.mark.parametrize("dit", ["sana", "pixart"])
def test_default_lora_targets_cover_the_dit_blocks_attention_and_feed_forward(dit: str) -> None:
    """The default LoRA reaches every linear layer of the DiT's blocks — attention output and
    PixArt's feed-forward included (q/k/v alone moved rare prompts ~10 points less on the demo's dev
    side) — and leaves the timestep embedding, the output projection, the LM's MLP and Sana's
    convolutional feed-forward as they are."""
    from reca.build import apply_lora

    cfg = load_config(
        ROOT / "configs/tiny.yaml", ["lora.enabled=true", "lora.rank=2"] + (PIXART if dit == "pixart" else [])
    )
    adapter, _ = build(cfg)
    layers = {n for n, m in adapter.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    linear = {n for n, m in adapter.named_modules() if isinstance(m, torch.nn.Linear)}
    wrapped = {n.removeprefix("base_model.model.") for n, m in apply_lora(adapter, cfg).named_modules()}
    lora = {n for n in layers if f"{n}.lora_A" in wrapped}
    block = {n for n in linear if n.startswith("transformer.transformer_blocks.")}
    assert block <= lora, sorted(block - lora)
    assert len({n for n in block if ".ff." in n}) == (2 if dit == "pixart" else 0)  # PixArt: 2 in its one block
    assert {"transformer.caption_projection.linear_1", "sem_proj.1", "connector.0"} <= lora
    assert any(n.startswith("lm.") and n.endswith("self_attn.o_proj") for n in lora)
    untouched = {n for n in layers if any(k in n for k in ("timestep_embedder", "proj_out", ".mlp.", ".ff.conv"))}
    assert untouched and not untouched & lora, sorted(untouched & lora)
