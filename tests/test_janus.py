"""The Janus adapter on a tiny random transformers Janus: RecA training through train.py, the
image-token loss against a hand-computed reference, LoRA placement and save/load/merge, sampling
(against transformers' own generate), and loading back by path."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reca.adapter import Condition, UMMAdapter
from reca.build import apply_lora, build, load_checkpoint, trainable_parameters
from reca.config import ConfigError, load_config

from conftest import ROOT

JANUS_TINY = ROOT / "configs" / "janus_tiny.yaml"
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--num_processes",
    "1",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def tiny_build(*overrides: str):
    torch.manual_seed(0)
    cfg = load_config(JANUS_TINY, list(overrides))
    adapter, encoder = build(cfg)
    return cfg, adapter.eval(), encoder


@pytest.fixture(scope="module")
def tiny():
    return tiny_build()


def batch(encoder, n=2):
    from PIL import Image

    from reca.images import target_pixels

    ims = [Image.new("RGB", (32, 32), (200, 60 * i, 30 + 40 * i)) for i in range(n)]
    ims[-1].paste((20, 200, 90), (8, 8, 24, 24))
    return torch.stack([target_pixels(im, 32) for im in ims]), encoder.encode(ims)


def with_args(cfg, **args):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, args={**cfg.model.args, **args}))


def test_tiny_janus_trains_reca_through_train_py(toy_data, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [
        f"objectives.recon.data.path={toy_data}",
        f"objectives.i2t.data.path={toy_data}",
        f"train.output_dir={out}",
        "train.max_steps=20",
        "train.save_every=20",
        "train.log_every=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        LAUNCH + [str(ROOT / "train.py"), "--config", str(JANUS_TINY), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    first, last = (sum(r["recon"] for r in rows) / 5 for rows in (log[:5], log[-5:]))
    assert last < 0.85 * first, (first, last)  # image-token CE starts near ln(32) = 3.47
    assert log[-1]["i2t"] < log[0]["i2t"]
    assert (out / "final/reca_adapter.json").is_file() and (out / "final/model/model.safetensors").is_file()
    assert (out / "samples/step-0000020.png").is_file()


def test_image_token_ce_matches_hand_computed_reference(tiny, monkeypatch) -> None:
    _, adapter, encoder = tiny
    m, tok = adapter.model, adapter.tokenizer
    x, sem = batch(encoder)
    instructions = ["Reconstruct this image.", ""]  # prompts of different lengths: left padding is exercised
    boi, image_id = tok.convert_tokens_to_ids("<begin_of_image>"), tok.convert_tokens_to_ids("<image_placeholder>")
    block = "<begin_of_image>" + "<image_placeholder>" * sem.shape[1] + "<end_of_image>"

    def reference(drop: bool) -> torch.Tensor:
        """One sample at a time, no padding: JanusModel.forward on explicit embeddings, manual log_softmax."""
        with torch.no_grad():
            tokens = m.model.vqmodel.encode(x).image_tokens.view(2, -1)
            losses = []
            for i, user in enumerate([f"{block}\n{instructions[0]}", block]):
                ids = torch.tensor(
                    [tok.bos_token_id]
                    + tok(f"<|User|>: {user}\n\n<|Assistant|>:", add_special_tokens=False).input_ids
                    + [boi]
                )
                if drop:  # the unconditional prompt: BOS, pads, BOI
                    ids[1:-1] = tok.pad_token_id
                emb = m.get_input_embeddings()(ids)
                if not drop:
                    emb[ids == image_id] = m.model.aligner(sem[i])
                image = m.model.generation_aligner(m.model.generation_embeddings(tokens[i]))
                hidden = m.model(inputs_embeds=torch.cat([emb, image])[None]).last_hidden_state[0]
                logits = m.model.generation_head(hidden[len(ids) - 1 : -1])
                losses.append(-torch.log_softmax(logits, -1).gather(-1, tokens[i][:, None]).mean())
            return torch.stack(losses).mean()

    cond = Condition(semantic=sem, instructions=instructions)
    for dropout, drop in ((0.0, False), (1.0, True)):
        monkeypatch.setattr(adapter, "cfg", dataclasses.replace(adapter.cfg, cond_dropout=dropout))
        torch.testing.assert_close(adapter.generation_loss(x, cond, [1, 2]), reference(drop), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reference(False), reference(True))


def test_understanding_loss_matches_answer_logprob(tiny) -> None:
    _, adapter, encoder = tiny
    _, sem = batch(encoder)
    prompts, answers = ["Describe."] * 2, ["a red square", "blue"]
    lp = adapter.answer_logprob(sem, prompts, answers)
    n_tokens = torch.tensor(
        [len(adapter.tokenizer(" " + a, add_special_tokens=False).input_ids) + 1 for a in answers]
    )  # + EOS
    torch.testing.assert_close(adapter.understanding_loss(sem, prompts, answers), (-lp / n_tokens).mean())
    # padding is masked: one sample's log-probability does not depend on its batch neighbour
    torch.testing.assert_close(adapter.answer_logprob(sem[1:], prompts[1:], answers[1:]), lp[1:], atol=1e-5, rtol=1e-5)


def test_full_finetune_trains_llm_and_generation_head_never_siglip_or_vq() -> None:
    _, adapter, encoder = tiny_build()
    names = trainable_parameters(adapter, adapter.default_trainable, [])
    assert any(".language_model." in n for n in names) and any(".generation_head." in n for n in names)
    assert not any(
        part in n for n in names for part in (".vision_model.", ".vqmodel.", ".aligner.")
    )  # train_aligner: false
    adapter.train()
    assert not adapter.model.model.vqmodel.training and not adapter.model.model.vision_model.training
    x, sem = batch(encoder)
    loss = adapter.generation_loss(
        x, Condition(semantic=sem, instructions=["Redraw it."] * 2), [3, 4]
    ) + adapter.understanding_loss(sem, ["Describe."] * 2, ["red", "green"])
    loss.backward()
    grads = {n: p.grad for n, p in adapter.named_parameters()}
    assert all(grads[n] is None for n in grads if ".vision_model." in n or ".vqmodel." in n)
    assert all(grads[n] is not None for n in names if ".language_model.layers." in n or ".generation_head." in n)


def test_lora_stays_in_the_llm_and_saves_loads_and_merges(tmp_path: Path) -> None:
    from peft import PeftModel

    cfg, adapter, encoder = tiny_build("lora.enabled=true", "lora.rank=4")
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    model = apply_lora(adapter, cfg)
    lora_layers = [n for n, mod in model.named_modules() if hasattr(mod, "lora_A")]
    assert lora_layers and all(".language_model.layers." in n for n in lora_layers)
    assert not any("vision_model" in n or "vqmodel" in n or "generation_head" in n for n in lora_layers)
    assert {n.rsplit(".", 1)[-1] for n in lora_layers} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero: give LoRA an effect to carry through save/load
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model.eval()
    x, sem = batch(encoder)
    cond = Condition(semantic=sem, instructions=["Redraw it.", "Copy."])
    logits = model.image_logits(x, cond)[0]
    text = model.answer_logprob(sem, ["Describe."] * 2, ["a red square", "blue"])
    model.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora/adapter_model.safetensors").is_file()

    _, fresh, _ = tiny_build()
    fresh.load_state_dict(before)
    with torch.no_grad():
        base_logits = fresh.image_logits(x, cond)[0]
    assert not torch.allclose(base_logits, logits), "LoRA had no effect: the test would prove nothing"
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "lora")).eval()
    with torch.no_grad():
        assert torch.equal(loaded.image_logits(x, cond)[0], logits)
        assert torch.equal(loaded.answer_logprob(sem, ["Describe."] * 2, ["a red square", "blue"]), text)
        merged = loaded.merge_and_unload()
        assert not any("lora" in n for n, _ in merged.named_modules())
        torch.testing.assert_close(merged.image_logits(x, cond)[0], logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            merged.answer_logprob(sem, ["Describe."] * 2, ["a red square", "blue"]), text, atol=1e-5, rtol=1e-5
        )


def test_generate_size_and_per_image_seeds(tiny) -> None:
    _, adapter, encoder = tiny
    ims = adapter.generate(
        Condition(texts=["a red circle", "a blue square"]), seeds=[3, 4], guidance_scale=2.0, num_steps=1
    )
    assert [im.size for im in ims] == [(32, 32), (32, 32)]
    again = adapter.generate(Condition(texts=["a blue square"]), seeds=[4], guidance_scale=2.0, num_steps=1)
    assert np.array_equal(np.asarray(ims[1]), np.asarray(again[0]))
    other = adapter.generate(Condition(texts=["a blue square"]), seeds=[5], guidance_scale=2.0, num_steps=1)
    assert not np.array_equal(np.asarray(other[0]), np.asarray(again[0]))
    # semantic conditions (which transformers' generate cannot take) through the same sampler
    _, sem = batch(encoder)
    cond = Condition(semantic=sem, instructions=["Reconstruct this image.", ""])
    recon = adapter.generate(cond, seeds=[7, 8], guidance_scale=5.0, num_steps=1)
    assert [im.size for im in recon] == [(32, 32), (32, 32)]
    single = adapter.generate(
        Condition(semantic=sem[1:], instructions=[""]), seeds=[8], guidance_scale=5.0, num_steps=1
    )
    assert np.array_equal(np.asarray(recon[1]), np.asarray(single[0]))


def test_sampler_matches_transformers_generate(tiny) -> None:
    """reca's loop = transformers' generate(generation_mode="image") after torch.manual_seed(seed):
    same CFG, same unconditional prompt, same draws."""
    _, adapter, _ = tiny
    for prompt, seed, guidance in (("a red circle", 7, 2.0), ("b", 11, 5.0)):
        cond = Condition(texts=[prompt])
        ids = torch.tensor([adapter.generation_ids(cond, 0)])
        torch.manual_seed(seed)
        expected = adapter.model.generate(
            ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=True, guidance_scale=guidance
        )
        assert torch.equal(adapter.sample_tokens(cond, [seed], guidance), expected)


def test_saved_tiny_janus_loads_by_path(tiny, tmp_path: Path) -> None:
    cfg, adapter, encoder = tiny
    adapter.save_pretrained(tmp_path / "umm")
    assert not (tmp_path / "umm/heads.safetensors").exists()  # no projector with Janus's own encoder
    x, sem = batch(encoder)
    cond = Condition(semantic=sem, instructions=["Redraw it.", "Copy."])
    expected = adapter.generation_loss(x, cond, [7, 8])
    # the key a user gives a hub id: a save_pretrained folder, or the plain transformers folder in it
    for ref in (tmp_path / "umm", tmp_path / "umm/model"):
        again, enc = build(
            dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, args={"model": str(ref), "resolution": 32}))
        )
        torch.testing.assert_close(enc(_encoder_input(encoder)), encoder(_encoder_input(encoder)))
        torch.testing.assert_close(again.eval().generation_loss(x, cond, [7, 8]), expected)
    rebuilt = load_checkpoint(adapter, tmp_path / "umm")  # the evaluation path (reca_adapter.json)
    torch.testing.assert_close(rebuilt.eval().generation_loss(x, cond, [7, 8]), expected)


def _encoder_input(encoder) -> torch.Tensor:
    return torch.linspace(-1, 1, 2 * 3 * encoder.input_size**2).view(2, 3, encoder.input_size, encoder.input_size)


def test_external_encoder_goes_through_a_trained_projector(tmp_path: Path) -> None:
    tiny = load_config(ROOT / "configs/tiny.yaml")  # its tiny open_clip encoder, at 16px
    cfg, adapter, encoder = tiny_build(
        *(f"encoder.{k}={json.dumps(v)}" for k, v in dataclasses.asdict(tiny.encoder).items())
    )
    assert adapter.cfg.semantic_dim == encoder.width and adapter.projector is not None  # filled in by reca.build
    assert "projector" in adapter.default_trainable
    x, sem = batch(encoder)
    cond = Condition(semantic=sem, instructions=["Redraw it.", ""])
    loss = adapter.generation_loss(x, cond, [1, 2])
    loss.backward()
    assert adapter.projector[1].weight.grad is not None
    adapter.save_pretrained(tmp_path / "ext")
    again, _ = build(with_args(cfg, model=str(tmp_path / "ext"), model_config={}))
    torch.testing.assert_close(again.eval().generation_loss(x, cond, [1, 2]), loss.detach())


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.args.model=/no/such/dir"], "model.args.model: cannot load '/no/such/dir'"),
        (["model.args.resolution=64"], "model.args.resolution: 64 does not match"),
        (["encoder.input_size=12"], "encoder.input_size: 12 must be a multiple"),
        (
            ["model.args.model_config.vision_config.num_image_tokens=9"],
            "model.args.model_config: vision_config.num_image_tokens",
        ),
    ],
    ids=["model", "resolution", "input_size", "num_image_tokens"],
)
def test_bad_settings_name_the_key(overrides, key) -> None:
    with pytest.raises(ConfigError) as info:
        tiny_build(*overrides)
    assert str(info.value).startswith(key), str(info.value)


def test_lower_encoder_input_size_interpolates_siglip_positions() -> None:
    _, adapter, encoder = tiny_build("encoder.input_size=16")
    x, sem = batch(encoder)
    assert sem.shape == (2, 4, 32)  # 16px / patch 8 → 2x2 tokens
    assert torch.isfinite(adapter.generation_loss(x, Condition(semantic=sem, instructions=["Redraw."] * 2), [1, 2]))
    assert isinstance(adapter, UMMAdapter)


def test_hidden_states_for_the_entropy_probe(tiny) -> None:
    from reca.adapter import Traceable

    _, adapter, encoder = tiny
    assert isinstance(adapter, Traceable)
    layers = adapter.model.config.text_config.num_hidden_layers
    _, sem = batch(encoder)
    texts = adapter.hidden_states(Condition(texts=["a red circle"]))
    ((states, n),) = texts
    assert len(states) == layers + 1 and states[0].shape[0] == n + adapter.num_image_tokens  # prompt ; image tokens
    assert n == len(adapter.generation_ids(Condition(texts=["a red circle"]), 0))
    caption = adapter.hidden_states(Condition(semantic=sem[:1], instructions=["Describe."]), answers=["red"])
    ((states, n),) = caption
    assert (
        states[0].shape[0] - n == len(adapter.tokenizer(" red", add_special_tokens=False).input_ids) + 1
    )  # answer + EOS
