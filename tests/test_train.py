"""The training path end to end: accelerate launch, LoRA vs full fine-tuning, frozen parts,
kill-and-resume, two-process DDP, bad images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reca.config import load_config

from conftest import ROOT, TINY, tiny_overrides

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
ONE = ACCELERATE + ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# accelerate on a CPU machine: --multi_gpu plus Accelerator(cpu=True) inside gives real DDP over
# gloo; `--cpu --num_processes 2` would start one process only (measured with accelerate 1.15).
TWO = ACCELERATE + [
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def launch(launcher: list[str], overrides: list[str], *extra: str) -> subprocess.CompletedProcess:
    cmd = launcher + [str(ROOT / "train.py"), "--config", str(TINY), *extra, *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(toy_data, tmp_path_factory) -> Path:
    """One 40-step run through `accelerate launch train.py`, shared by the tests below."""
    out = tmp_path_factory.mktemp("run")
    proc = launch(ONE, tiny_overrides(toy_data, out, "train.max_steps=40", "train.save_every=10", "train.log_every=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_launch_trains_and_reconstruction_loss_falls(uninterrupted: Path) -> None:
    log = read_log(uninterrupted)
    assert [r["step"] for r in log] == list(range(1, 41))
    first = sum(r["recon"] for r in log[:5]) / 5
    last = sum(r["recon"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert {"recon", "t2i", "i2t", "loss", "lr"} <= set(log[-1])
    ckpts = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]  # keep_last = 3
    saved = (uninterrupted / "checkpoints/checkpoint-40/config.yaml").read_text()
    assert "max_steps: 40" in saved
    assert (uninterrupted / "final/reca_adapter.json").is_file()
    assert (uninterrupted / "samples/step-0000040.png").is_file()


def test_sigkill_then_resume_latest_matches_uninterrupted(toy_data, tmp_path: Path, uninterrupted: Path) -> None:
    out = tmp_path / "killed"
    overrides = tiny_overrides(toy_data, out, "train.max_steps=40", "train.save_every=10", "train.log_every=1")
    cmd = ONE + [str(ROOT / "train.py"), "--config", str(TINY), *overrides]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not (out / "checkpoints/checkpoint-10").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in read_log(out))
    assert killed_at < 40, "the run finished before it could be killed"
    resumed = launch(ONE, overrides, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = read_log(uninterrupted), read_log(out)
    assert [r["step"] for r in b] == list(range(1, 41))  # lines after the checkpoint were rewritten
    for ra, rb in zip(a[-5:], b[-5:]):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6, (ra, rb)


def test_two_process_ddp_matches_one_process(toy_data, tmp_path: Path) -> None:
    steps = ["train.max_steps=6", "train.log_every=1", "train.save_every=100", "train.sample_every=0"]
    one = launch(ONE, tiny_overrides(toy_data, tmp_path / "one", *steps, "train.batch_size=8"))
    two = launch(TWO, tiny_overrides(toy_data, tmp_path / "two", *steps, "train.batch_size=4"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "processes: 2 (MULTI_CPU)" in two.stdout, two.stdout[-2000:]
    for ra, rb in zip(read_log(tmp_path / "one"), read_log(tmp_path / "two")):
        # same global batch, per-sample noise: equal up to float reduction order
        assert abs(ra["loss"] - rb["loss"]) <= 1e-4 * max(1.0, abs(ra["loss"])), (ra, rb)


def _fit_capturing(cfg, monkeypatch):
    """Run fit() in-process and hand back the very adapter and encoder it trained with."""
    import reca.trainer as trainer

    built = {}
    real_build = trainer.build

    def spy(c):
        built["adapter"], built["encoder"] = real_build(c)
        built["before"] = {k: v.clone() for k, v in built["adapter"].state_dict().items()}
        built["encoder_before"] = {k: v.clone() for k, v in built["encoder"].module.state_dict().items()}
        return built["adapter"], built["encoder"]

    monkeypatch.setattr(trainer, "build", spy)
    trainer.fit(cfg)
    return built


def test_full_finetune_trains_only_trainable_and_keeps_frozen_bit_identical(toy_data, tmp_path, monkeypatch) -> None:
    # the adapter's default_trainable leaves the LM frozen
    cfg = load_config(
        TINY, tiny_overrides(toy_data, tmp_path, "train.max_steps=3", "train.save_every=100", "train.sample_prompts=[]")
    )
    built = _fit_capturing(cfg, monkeypatch)
    after = built["adapter"].state_dict()
    for k, v in built["encoder"].module.state_dict().items():
        assert torch.equal(v, built["encoder_before"][k]), f"frozen encoder changed: {k}"
    trainable = tuple(built["adapter"].default_trainable)
    for k, v in after.items():
        if k.startswith(("lm.", "vae.")):
            assert torch.equal(v, built["before"][k]), f"frozen {k} changed"
    changed = [k for k, v in after.items() if k.startswith(trainable) and not torch.equal(v, built["before"][k])]
    assert any(k.startswith("transformer.") for k in changed) and any(k.startswith("connector.") for k in changed)


def test_lora_trains_only_lora_weights_and_saves_peft_format(toy_data, tmp_path, monkeypatch) -> None:
    from peft import PeftModel

    from reca.adapter import Condition
    from reca.build import build

    cfg = load_config(
        TINY,
        tiny_overrides(
            toy_data,
            tmp_path,
            "lora.enabled=true",
            "lora.rank=4",
            "optim.lr=1e-2",
            "train.max_steps=3",
            "train.save_every=100",
            "train.sample_prompts=[]",
        ),
    )
    built = _fit_capturing(cfg, monkeypatch)
    after = built["adapter"].state_dict()
    lora_keys = [k for k in after if "lora_" in k]
    assert (
        lora_keys
        and any(k.startswith("lm.") for k in lora_keys)
        and any(k.startswith("transformer.") for k in lora_keys)
    )
    assert not any(k.startswith("vae.") for k in lora_keys)
    for k, v in after.items():
        if "lora_" not in k:
            base = k.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(v, built["before"][base]), f"non-LoRA weight {k} changed"
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora_keys if "lora_B" in k)
    # the exported adapter is plain PEFT format; loaded and merged it reproduces the trained model
    assert (tmp_path / "final/adapter_config.json").is_file() and (
        tmp_path / "final/adapter_model.safetensors"
    ).is_file()
    torch.manual_seed(123)
    fresh, encoder = build(cfg)
    fresh.load_state_dict(built["before"])
    x = torch.zeros(2, 3, 32, 32)
    cond = Condition(semantic=torch.randn(2, 4, encoder.width), instructions=["Redraw it."] * 2)
    trained = built["adapter"].eval().generation_loss(x, cond, [1, 2])
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "final")).eval()
    torch.testing.assert_close(loaded.generation_loss(x, cond, [1, 2]), trained)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged.generation_loss(x, cond, [1, 2]), trained, atol=1e-5, rtol=1e-5)
    # the merge command writes a full model that loads by path like any other
    from reca.build import load_checkpoint
    from reca.merge import main as merge_main

    torch.manual_seed(123)
    overrides = tiny_overrides(toy_data, tmp_path, "lora.enabled=true")
    assert (
        merge_main(
            ["--config", str(TINY), "--adapter", str(tmp_path / "final"), "--out", str(tmp_path / "merged"), *overrides]
        )
        == 0
    )
    again = load_checkpoint(build(cfg)[0], tmp_path / "merged").eval()
    # the merge script builds a fresh random base: compare against a base with the same init
    torch.manual_seed(123)
    base, _ = build(cfg)
    reference = PeftModel.from_pretrained(base, str(tmp_path / "final")).merge_and_unload().eval()
    torch.testing.assert_close(again.generation_loss(x, cond, [1, 2]), reference.generation_loss(x, cond, [1, 2]))


def test_corrupt_and_odd_images_train_and_are_counted(tmp_path, monkeypatch) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (32, 32), (20 * i, 100, 50)).save(folder / f"good{i}.png")
    Image.new("L", (32, 32), 128).save(folder / "gray.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    (folder / "text.png").write_text("not an image")
    Image.new("RGB", (4, 4)).save(folder / "tiny.png")
    good = folder / "good0.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    steps = 3
    cfg = load_config(
        TINY,
        [
            f"objectives.recon.data.path={folder}",
            "objectives.t2i.share=0",
            "objectives.i2t.share=0",
            "train.batch_size=12",
            f"train.max_steps={steps}",
            "train.log_every=1",
            "train.save_every=100",
            "train.sample_prompts=[]",
            f"train.output_dir={tmp_path / 'out'}",
        ],
    )
    _fit_capturing(cfg, monkeypatch)
    last = read_log(tmp_path / "out")[-1]
    # 12 usable images (2 converted) per epoch, 12 per step: each step is one whole epoch, so
    # every bad file was met exactly once per step except possibly after the last good one
    undecodable = last.get("data/skipped/undecodable", 0)
    tiny = last.get("data/skipped/tiny", 0)
    assert 2 * (steps - 1) <= undecodable <= 2 * steps and steps - 1 <= tiny <= steps, last
    assert (
        steps - 1 <= last.get("data/converted/cmyk", 0) <= steps
        and steps - 1 <= last.get("data/converted/grayscale", 0) <= steps
    )


def test_nonfinite_losses_skip_updates_then_abort(toy_data, tmp_path, monkeypatch) -> None:
    from reca.models.metaquery import MetaQueryAdapter

    real = MetaQueryAdapter.generation_loss
    calls = {"n": 0}

    def flaky(self, images, cond, seeds):
        calls["n"] += 1
        loss = real(self, images, cond, seeds)
        return loss * float("nan") if calls["n"] <= 4 else loss  # recon + t2i of steps 1 and 2

    monkeypatch.setattr(MetaQueryAdapter, "generation_loss", flaky)
    cfg = load_config(
        TINY,
        tiny_overrides(
            toy_data,
            tmp_path / "a",
            "train.max_steps=4",
            "train.log_every=1",
            "train.save_every=100",
            "train.sample_prompts=[]",
            "train.max_nonfinite=3",
        ),
    )
    built = _fit_capturing(cfg, monkeypatch)
    log = read_log(tmp_path / "a")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["loss"] != r["loss"] for r in log[:2]) and all(r["loss"] == r["loss"] for r in log[2:])

    calls["n"] = -(10**9)  # NaN from now on
    cfg = load_config(
        TINY,
        tiny_overrides(
            toy_data,
            tmp_path / "b",
            "train.max_steps=10",
            "train.save_every=100",
            "train.sample_prompts=[]",
            "train.max_nonfinite=3",
        ),
    )
    with pytest.raises(RuntimeError, match=r"3 non-finite losses in a row \(train.max_nonfinite=3\)"):
        _fit_capturing(cfg, monkeypatch)
    assert built["adapter"] is not None


def test_cached_embeddings_give_identical_losses(toy_data, tmp_path, monkeypatch) -> None:
    steps = ["train.max_steps=4", "train.log_every=1", "train.save_every=100", "train.sample_prompts=[]"]
    _fit_capturing(load_config(TINY, tiny_overrides(toy_data, tmp_path / "plain", *steps)), monkeypatch)
    cache = f"train.embedding_cache={tmp_path / 'cache'}"
    _fit_capturing(load_config(TINY, tiny_overrides(toy_data, tmp_path / "cold", *steps, cache)), monkeypatch)
    _fit_capturing(load_config(TINY, tiny_overrides(toy_data, tmp_path / "warm", *steps, cache)), monkeypatch)
    plain, cold, warm = (read_log(tmp_path / name) for name in ("plain", "cold", "warm"))
    assert [r["loss"] for r in plain] == [r["loss"] for r in cold] == [r["loss"] for r in warm]
    assert cold[-1]["cache/misses"] > 0 and warm[-1]["cache/misses"] == 0 and warm[-1]["cache/hits"] > 0


def test_wandb_without_api_key_logs_offline_and_says_so(toy_data, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(
        TINY,
        tiny_overrides(
            toy_data,
            tmp_path,
            "log.wandb=true",
            "train.max_steps=3",
            "train.log_every=1",
            "train.save_every=100",
            "train.sample_prompts=[]",
        ),
    )
    _fit_capturing(cfg, monkeypatch)
    assert "wandb: no WANDB_API_KEY — logging offline" in capsys.readouterr().out
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline wandb run was written"
    assert len(read_log(tmp_path)) == 3  # the local jsonl is written all the same
