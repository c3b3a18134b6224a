"""The Harmon adapter on a tiny random Harmon (Qwen2 + MAR + KL VAE): parity with the public reference
code (tests/data/harmon, see docs/harmon.md), RecA through train.py with kill-and-resume, per-sample
seeds, LoRA placement and save/load, full fine-tuning freeze lists, loading the public weight formats
by path, sampling, and the evaluation and probe CLIs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reca.adapter import Condition, HasOwnEncoder, Traceable, UMMAdapter
from reca.build import apply_lora, build, load_checkpoint, trainable_parameters
from reca.config import ConfigError, load_config
from reca.models.harmon import HarmonAdapter, HarmonConfig
from reca.models.mar import MARConfig

from conftest import ROOT

TINY = ROOT / "configs" / "harmon_tiny.yaml"
DATA = ROOT / "tests" / "data" / "harmon"
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
# the reference ran the same float16-stored weights in float32 on CPU; what is left is float
# reduction order (SDPA vs. its own attention, batched vs. one-sample LLM passes, float32 vs.
# float64 schedule tables)
TOL = {"atol": 2e-5, "rtol": 2e-5}


def tiny_build(*overrides: str):
    torch.manual_seed(0)
    cfg = load_config(TINY, list(overrides))
    adapter, encoder = build(cfg)
    return cfg, adapter.eval(), encoder


@pytest.fixture(scope="module")
def tiny():
    return tiny_build()


def wake_head(adapter) -> None:
    """MAR's diffusion head starts adaLN-zero (its output is 0 whatever the condition): perturb it so
    that changes upstream (LoRA in the LLM) can show in the generation loss."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter.mar.diffloss.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def batch(encoder, n=2):
    from PIL import Image

    from reca.images import target_pixels

    ims = [Image.new("RGB", (32, 32), (200, 60 * i, 30 + 40 * i)) for i in range(n)]
    ims[-1].paste((20, 200, 90), (8, 8, 24, 24))
    return torch.stack([target_pixels(im, 32) for im in ims]), encoder.encode(ims)


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- parity with the reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference's tiny state dict written in the public formats (Harmon's .pth, MAR's kl16.ckpt)
    and loaded through the config keys a user gives."""
    expected = json.loads((DATA / "expected.json").read_text())
    files = load_file(str(DATA / "tiny_harmon.safetensors"))
    tmp = tmp_path_factory.mktemp("harmon_public")
    torch.save(
        {k.removeprefix("harmon/"): v.float() for k, v in files.items() if k.startswith("harmon/")},
        tmp / "harmon_tiny.pth",
    )
    torch.save(
        {"model": {k.removeprefix("vae/"): v.float() for k, v in files.items() if k.startswith("vae/")}},
        tmp / "kl16_tiny.ckpt",
    )
    args = HarmonConfig(
        llm_config=expected["llm_config"],
        harmon_weights=str(tmp / "harmon_tiny.pth"),
        vae_ckpt=str(tmp / "kl16_tiny.ckpt"),
        vae_config=expected["vae_config"],
        vae_scale=expected["vae_scale"],
        mar=MARConfig(**expected["mar"]),
        resolution=16,
    )
    return HarmonAdapter.from_config(args).eval(), expected, files, tmp


def _t(values, like: torch.Tensor | None = None, shape=None) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    return t.view(shape if shape is not None else like.shape)


def test_reference_parity_tokens_features_and_prompts(reference) -> None:
    adapter, exp, files, _ = reference
    tokens = adapter.encode_tokens(files["inputs/pixels"])  # LDM VAE → diffusers conversion
    torch.testing.assert_close(tokens, _t(exp["vae_tokens"], tokens), **TOL)
    feats = adapter.visual_features(tokens)[1]
    assert list(feats.shape) == exp["features_shape"] == [2, 16 + 4, 32]  # image tokens, then the 4 buffers
    torch.testing.assert_close(feats, _t(exp["features"], feats), **TOL)
    # the templates produce the token ids the reference was given
    ids = exp["prompt_ids"]
    recon = adapter.prompt_text(Condition(semantic=tokens, instructions=["Reconstruct this image."] * 2), 0, drop=False)
    assert [adapter._ids(p) for p in recon.split("<image>")] == [ids["recon_prefix"], ids["recon_suffix"]]
    assert adapter._ids(adapter.prompt_text(Condition(texts=["a red circle"]), 0, drop=False)) == ids["t2i"]
    assert adapter._ids(adapter.prompt_text(Condition(texts=["a red circle"]), 0, drop=True)) == ids["uncond"]
    pixels = adapter.vae.decode(tokens.view(2, 4, 4, 4).permute(0, 3, 1, 2) / adapter.cfg.vae_scale).sample.double()
    assert abs(pixels.sum().item() - exp["decoded_pixels_sum"]) < 1e-3
    assert abs(pixels.abs().sum().item() - exp["decoded_pixels_abs_sum"]) < 1e-3


def test_reference_parity_mar_loss_for_fixed_masks_and_noise(reference) -> None:
    adapter, exp, files, _ = reference
    tokens = adapter.encode_tokens(files["inputs/pixels"])
    draws = [
        {"drop": False, "mask": files["inputs/masks"][i], "t": files["inputs/t"][i], "noise": files["inputs/noise"][i]}
        for i in range(2)
    ]
    assert (files["inputs/t"] == 0).any()  # the decoder-NLL branch of the variational bound is exercised
    conds = {
        "recon": lambda sl: Condition(
            semantic=tokens[sl], instructions=["Reconstruct this image."] * len(range(2)[sl])
        ),
        "t2i": lambda sl: Condition(texts=["a red circle"] * len(range(2)[sl])),
    }
    with torch.no_grad():
        for kind, make in conds.items():
            per_sample = [
                adapter.mar_loss(tokens[i : i + 1], make(slice(i, i + 1)), draws[i : i + 1]).item() for i in range(2)
            ]
            np.testing.assert_allclose(per_sample, exp["mar_loss"][kind], rtol=1e-5, atol=1e-6)
            # a batch of two (left-padded LLM, different mask counts): the mean of the per-sample losses
            both = adapter.mar_loss(tokens, make(slice(0, 2)), draws).item()
            np.testing.assert_allclose(both, np.mean(exp["mar_loss"][kind]), rtol=1e-5)


def test_reference_parity_one_sampling_step(reference) -> None:
    adapter, exp, files, _ = reference
    step = exp["step"]
    tokens = adapter.encode_tokens(files["inputs/pixels"])
    mask = files["inputs/masks"][0]
    state = tokens[0] * (1 - mask[:, None])
    with torch.no_grad():
        cond = Condition(semantic=tokens[:1], instructions=["Reconstruct this image."])
        prompts = adapter._prompt_rows(cond, [False]) + adapter._unconditional_rows(1)
        z = adapter._through_llm(prompts, [state, state], [mask, mask])
        pos = torch.tensor(step["positions"])
        torch.testing.assert_close(z[0][pos], _t(step["z_cond"], z[0][pos]), **TOL)
        g = torch.Generator().manual_seed(step["seed"])
        sampled = adapter.mar.diffloss.sample(z[0][pos], z[1][pos], step["guidance"], [g] * len(pos))
    torch.testing.assert_close(sampled, _t(step["sampled"], sampled), atol=1e-4, rtol=1e-4)


def test_public_weight_files_report_missing_and_unexpected_keys_in_one_line(reference) -> None:
    adapter, _, _, tmp = reference
    state = torch.load(tmp / "harmon_tiny.pth", weights_only=True)
    del state["mar.mask_token"]
    state["mar.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp / "broken.pth")
    args = dataclasses.replace(adapter.cfg, harmon_weights=str(tmp / "broken.pth"))
    with pytest.raises(ValueError) as info:
        HarmonAdapter.from_config(args)
    msg = str(info.value)
    assert msg.startswith("model.args.harmon_weights:") and "\n" not in msg
    assert "missing 1 keys (e.g. mar.mask_token)" in msg and "unexpected 1 keys (e.g. mar.extra.weight)" in msg
    vae = torch.load(tmp / "kl16_tiny.ckpt", weights_only=True)
    vae["model"].pop("encoder.conv_in.weight")
    torch.save(vae, tmp / "broken_vae.ckpt")
    with pytest.raises(
        ValueError, match=r"^model\.args\.vae_ckpt: .*missing 1 keys \(e\.g\. encoder\.conv_in\.weight\)"
    ):
        HarmonAdapter.from_config(dataclasses.replace(adapter.cfg, vae_ckpt=str(tmp / "broken_vae.ckpt")))


def test_converted_folder_loads_back_identically(reference, tmp_path: Path) -> None:
    """Public files → reca's save_pretrained layout (scripts/convert_harmon.py does this) → back."""
    adapter = reference[0]
    adapter.save_pretrained(tmp_path / "conv")
    assert {p.name for p in (tmp_path / "conv").iterdir()} >= {"llm", "vae", "harmon.safetensors", "reca_adapter.json"}
    again = load_checkpoint(adapter, tmp_path / "conv").eval()
    sd, sd2 = adapter.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def uninterrupted(toy_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("harmon_run")
    proc = subprocess.run(
        LAUNCH + [str(ROOT / "train.py"), "--config", str(TINY), *_run_overrides(toy_data, out)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _run_overrides(toy: Path, out: Path) -> list[str]:
    return [
        f"objectives.recon.data.path={toy}",
        f"objectives.i2t.data.path={toy}",
        f"train.output_dir={out}",
        "train.max_steps=20",
        "train.save_every=10",
        "train.log_every=1",
    ]


def test_tiny_harmon_trains_reca_through_train_py(uninterrupted: Path) -> None:
    log = read_log(uninterrupted)
    assert [r["step"] for r in log] == list(range(1, 21))
    first, last = (sum(r[k] for r in rows) / 5 for rows in (log[:5], log[-5:]) for k in ["recon"])
    assert last < 0.8 * first, (first, last)
    i2t_first, i2t_last = (sum(r["i2t"] for r in rows) / 5 for rows in (log[:5], log[-5:]))
    assert i2t_last < 0.8 * i2t_first, (i2t_first, i2t_last)
    assert (uninterrupted / "final/reca_adapter.json").is_file() and (
        uninterrupted / "final/harmon.safetensors"
    ).is_file()
    assert (uninterrupted / "samples/step-0000020.png").is_file()


def test_sigkill_then_resume_matches_uninterrupted(toy_data, tmp_path: Path, uninterrupted: Path) -> None:
    out = tmp_path / "killed"
    cmd = LAUNCH + [str(ROOT / "train.py"), "--config", str(TINY), *_run_overrides(toy_data, out)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not (out / "checkpoints/checkpoint-10").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(r["step"] for r in read_log(out)) < 20, "the run finished before it could be killed"
    resumed = subprocess.run(
        cmd + ["--resume", "latest"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = read_log(uninterrupted), read_log(out)
    assert [r["step"] for r in b] == list(range(1, 21))
    for ra, rb in zip(a[10:], b[10:]):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6, (ra, rb)


def test_generation_loss_depends_on_each_samples_seed_alone(tiny) -> None:
    _, adapter, encoder = tiny
    x, sem = batch(encoder, 3)

    def cond(sl: slice) -> Condition:
        return Condition(semantic=sem[sl], instructions=["Reconstruct.", "", "Copy it."][sl])

    with torch.no_grad():
        a = adapter.generation_loss(x, cond(slice(0, 3)), [1, 2, 3])
        assert torch.equal(a, adapter.generation_loss(x, cond(slice(0, 3)), [1, 2, 3]))
        assert not torch.equal(a, adapter.generation_loss(x, cond(slice(0, 3)), [4, 5, 6]))
        parts = [adapter.generation_loss(x[i : i + 1], cond(slice(i, i + 1)), [i + 1]) for i in range(3)]
    torch.testing.assert_close(torch.stack(parts).mean(), a, atol=1e-5, rtol=1e-5)
    # every random choice is the seed's: mask ratio in [0.7, 1] (at least one token masked)
    d = adapter.draw(7, 16)
    assert 0.7 * 16 <= d["mask"].sum() <= 16 and d["t"].shape == (2, 16) and d["noise"].shape == (2, 16, 4)
    assert all(torch.equal(d[k], adapter.draw(7, 16)[k]) for k in ("mask", "t", "noise"))


def test_understanding_loss_matches_answer_logprob(tiny) -> None:
    _, adapter, encoder = tiny
    _, sem = batch(encoder)
    prompts, answers = ["Describe."] * 2, ["a red square", "blue"]
    lp = adapter.answer_logprob(sem, prompts, answers)
    n_tokens = torch.tensor(
        [len(adapter.tokenizer(a, add_special_tokens=False).input_ids) + 1 for a in answers]
    )  # + <|im_end|>
    torch.testing.assert_close(adapter.understanding_loss(sem, prompts, answers), (-lp / n_tokens).mean())
    torch.testing.assert_close(adapter.answer_logprob(sem[1:], prompts[1:], answers[1:]), lp[1:], atol=1e-5, rtol=1e-5)


def test_own_features_are_trained_with_scaled_gradient(tiny) -> None:
    """RecA's condition path (MAR encoder → proj_in) gets gradient × grad_scale (harmon_dev.py)."""
    _, adapter, encoder = tiny
    _, sem = batch(encoder)
    grads = []
    for scale in (1.0, 0.1):
        adapter.zero_grad()
        object.__setattr__(adapter, "cfg", dataclasses.replace(adapter.cfg, grad_scale=scale))
        adapter.semantic_embeds(sem).pow(2).sum().backward()
        grads.append(adapter.proj_in[0].weight.grad.clone())
    object.__setattr__(adapter, "cfg", dataclasses.replace(adapter.cfg, grad_scale=0.1))
    adapter.zero_grad()
    torch.testing.assert_close(grads[1], 0.1 * grads[0])


def test_full_finetune_trains_llm_and_mar_never_the_vae() -> None:
    _, adapter, encoder = tiny_build()
    names = trainable_parameters(adapter, adapter.default_trainable, [])
    assert any(n.startswith("llm.model.layers.") for n in names) and any(n.startswith("mar.diffloss.") for n in names)
    assert not any(n.startswith("vae.") for n in names)
    adapter.train()
    assert not adapter.vae.training
    x, sem = batch(encoder)
    loss = adapter.generation_loss(
        x, Condition(semantic=sem, instructions=["Redraw it."] * 2), [3, 4]
    ) + adapter.understanding_loss(sem, ["Describe."] * 2, ["red", "green"])
    loss.backward()
    grads = dict(adapter.named_parameters())
    assert all(p.grad is None for n, p in grads.items() if n.startswith("vae."))
    assert all(grads[n].grad is not None for n in names if ".encoder_blocks." in n or ".layers." in n or "proj_in" in n)
    # freeze lists: the LLM alone (train_mar: false), or train.frozen prefixes
    _, llm_only, _ = tiny_build("model.args.train_mar=false")
    assert all(n.startswith("llm.") for n in trainable_parameters(llm_only, llm_only.default_trainable, []))
    assert not any(
        n.startswith("mar.diffloss") for n in trainable_parameters(adapter, adapter.default_trainable, ["mar.diffloss"])
    )


def test_lora_stays_in_the_llm_and_saves_loads_and_merges(tmp_path: Path) -> None:
    from peft import PeftModel

    cfg, adapter, encoder = tiny_build("lora.enabled=true", "lora.rank=4")
    wake_head(adapter)
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    model = apply_lora(adapter, cfg)
    lora_layers = [n for n, mod in model.named_modules() if hasattr(mod, "lora_A")]
    assert lora_layers and all(".llm.model.layers." in n for n in lora_layers)
    assert not any(".vae." in n or ".mar." in n for n in lora_layers)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero: give LoRA an effect to carry through save/load
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model.eval()
    x, sem = batch(encoder)
    cond = Condition(semantic=sem, instructions=["Redraw it.", "Copy."])
    with torch.no_grad():
        loss = model.generation_loss(x, cond, [5, 6])
        text = model.answer_logprob(sem, ["Describe."] * 2, ["a red square", "blue"])
    model.save_pretrained(tmp_path / "lora")
    _, fresh, _ = tiny_build()
    fresh.load_state_dict(before)
    with torch.no_grad():
        assert not torch.allclose(fresh.generation_loss(x, cond, [5, 6]), loss), (
            "LoRA had no effect: the test would prove nothing"
        )
        loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "lora")).eval()
        assert torch.equal(loaded.generation_loss(x, cond, [5, 6]), loss)
        assert torch.equal(loaded.answer_logprob(sem, ["Describe."] * 2, ["a red square", "blue"]), text)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged.generation_loss(x, cond, [5, 6]), loss, atol=1e-5, rtol=1e-5)


def test_lora_can_train_the_mar_fully_through_modules_to_save() -> None:
    cfg, adapter, _ = tiny_build("lora.enabled=true", "lora.rank=4", "lora.modules_to_save=[mar, proj_in, proj_out]")
    model = apply_lora(adapter, cfg)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".mar." in n and "modules_to_save" in n for n in trained) and any("lora_" in n for n in trained)
    assert not any(".vae." in n for n in trained)


def test_generate_size_and_per_image_seeds(tiny) -> None:
    _, adapter, encoder = tiny
    kw = {"guidance_scale": 3.0, "num_steps": 3}
    ims = adapter.generate(Condition(texts=["a red circle", "a blue square"]), seeds=[3, 4], **kw)
    assert [im.size for im in ims] == [(32, 32), (32, 32)]
    again = adapter.generate(Condition(texts=["a blue square"]), seeds=[4], **kw)
    assert np.array_equal(np.asarray(ims[1]), np.asarray(again[0]))
    other = adapter.generate(Condition(texts=["a blue square"]), seeds=[5], **kw)
    assert not np.array_equal(np.asarray(other[0]), np.asarray(again[0]))
    _, sem = batch(encoder)
    recon = adapter.generate(Condition(semantic=sem, instructions=["Reconstruct this image.", ""]), seeds=[7, 8], **kw)
    single = adapter.generate(Condition(semantic=sem[1:], instructions=[""]), seeds=[8], **kw)
    assert [im.size for im in recon] == [(32, 32)] * 2 and np.array_equal(np.asarray(recon[1]), np.asarray(single[0]))


def test_saved_tiny_harmon_loads_by_path(tiny, tmp_path: Path) -> None:
    cfg, adapter, encoder = tiny
    adapter.save_pretrained(tmp_path / "umm")
    x, sem = batch(encoder)
    cond = Condition(semantic=sem, instructions=["Redraw it.", "Copy."])
    with torch.no_grad():
        expected = adapter.generation_loss(x, cond, [7, 8])
        again, enc = build(
            dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, args={"pretrained": str(tmp_path / "umm"), "resolution": 32})
            )
        )
        pixels = torch.linspace(-1, 1, 2 * 3 * 16 * 16).view(2, 3, 16, 16)
        torch.testing.assert_close(enc(pixels), encoder(pixels))
        torch.testing.assert_close(again.eval().generation_loss(x, cond, [7, 8]), expected)


def test_external_encoder_goes_through_a_trained_projector() -> None:
    tiny = load_config(ROOT / "configs/tiny.yaml")  # its tiny open_clip encoder, at 16px
    _, adapter, encoder = tiny_build(
        *(f"encoder.{k}={json.dumps(v)}" for k, v in dataclasses.asdict(tiny.encoder).items())
    )
    assert (
        adapter.cfg.semantic_dim == encoder.width
        and adapter.projector is not None
        and "projector" in adapter.default_trainable
    )
    x, sem = batch(encoder)
    loss = adapter.generation_loss(x, Condition(semantic=sem, instructions=["Redraw it.", ""]), [1, 2])
    loss.backward()
    assert adapter.projector[1].weight.grad is not None


def test_encoder_input_size_is_the_bottleneck_and_bad_settings_name_the_key() -> None:
    _, adapter, encoder = tiny_build("encoder.input_size=16")
    _, sem = batch(encoder)
    assert sem.shape == (2, 4, 4)  # 16px / stride 8 → 2x2 VAE tokens for a 4x4 target grid
    assert adapter.semantic_embeds(sem).shape == (2, 4 + 4, 32)  # + the 4 buffer tokens
    assert isinstance(adapter, UMMAdapter) and isinstance(adapter, HasOwnEncoder) and isinstance(adapter, Traceable)
    for overrides, key in (
        (["encoder.layer=-2"], "encoder.layer: -2"),
        (["encoder.input_size=12"], "encoder.input_size: 12"),
        (["model.args.resolution=36"], "model.args.resolution: 36"),
        (["model.args.mar.vae_stride=16"], "model.args.mar: vae_stride=16"),
        (["model.args.harmon_weights=/no/such.pth"], "model.args.harmon_weights: no such file"),
    ):
        with pytest.raises(ConfigError) as info:
            tiny_build(*overrides)
        assert str(info.value).startswith(key), str(info.value)


def test_hidden_states_for_the_entropy_probe(tiny) -> None:
    _, adapter, encoder = tiny
    layers = adapter.llm.config.num_hidden_layers
    ((states, n),) = adapter.hidden_states(Condition(texts=["a red circle"]))
    assert len(states) == layers + 1 and states[0].shape[0] == n + 16 + 4  # prompt ; image tokens + buffers
    _, sem = batch(encoder)
    ((states, n),) = adapter.hidden_states(Condition(semantic=sem[:1], instructions=["Describe."]), answers=["red"])
    assert states[0].shape[0] - n == len(adapter.tokenizer("red", add_special_tokens=False).input_ids) + 1


# --------------------------------------------------------------------------- evaluation and probe


def test_eval_generate_score_and_probe_run_on_a_tiny_harmon(toy_data, tmp_path: Path) -> None:
    from eval.cli import main as eval_main
    from eval.probe import main as probe_main

    data = [f"objectives.{k}.data.path={toy_data}" for k in ("recon", "i2t")]
    common = ["--config", str(TINY), "--prompts", "builtin", "--n", "1", "--steps", "2", "--batch-size", "16"]
    assert eval_main(["generate", *common, "--out", str(tmp_path / "a"), *data]) == 0
    assert eval_main(["score", "--run", str(tmp_path / "a"), "--scorer", "vqa", "--config", str(TINY), *data]) == 0
    assert json.loads((tmp_path / "a/scores/vqa/results.json").read_text())["overall"] is not None
    out = tmp_path / "probe.json"
    assert (
        probe_main(["run", "--config", str(TINY), "--images", str(toy_data), "--n", "4", "--out", str(out), *data]) == 0
    )
    summary = json.loads(out.read_text())["summary"]
    assert summary["encoding"]["gap"] is not None and summary["response"]["gap"] is not None


def test_real_config_parses_into_the_adapter_settings() -> None:
    from reca.build import adapter_args, import_adapter

    cfg = load_config(ROOT / "configs/harmon_1.5b_lora.yaml")
    args = adapter_args(cfg, import_adapter(cfg.model.adapter), None)
    assert args.mar.encoder_depth == 20 and args.mar.diffloss_w == 1536 and args.resolution == 512
    assert cfg.lora.enabled and cfg.train.batch_size * cfg.train.grad_accum == 192


def test_convert_script_writes_a_loadable_folder(tmp_path: Path, capsys) -> None:
    from convert_harmon import main as convert

    assert convert([str(TINY), str(tmp_path / "out"), "model.args.mar.buffer_size=2"]) == 0
    saved = json.loads((tmp_path / "out/reca_adapter.json").read_text())
    assert saved["adapter"] == "reca.models.harmon:HarmonAdapter" and saved["args"]["mar"]["buffer_size"] == 2
    assert convert([str(TINY), str(tmp_path / "bad"), "model.args.harmon_weights=/no/such.pth"]) == 2
    assert "model.args.harmon_weights: no such file" in capsys.readouterr().err
