"""The entropy probe on real adapters: traces from hidden states, JSON, plots, before/after."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from eval.probe import collect_traces
from eval.probe import main as probe_main
from reca.build import build
from reca.config import load_config

from conftest import TINY, tiny_overrides


def test_traces_split_prompt_and_response(toy_data) -> None:
    torch.manual_seed(0)
    adapter, encoder = build(load_config(TINY, tiny_overrides(toy_data, Path("/tmp/unused"))))
    from PIL import Image

    images = [Image.new("RGB", (32, 32), (200, 20, 20)), Image.new("RGB", (32, 32), (20, 20, 200))]
    with torch.no_grad():
        encoding, response = collect_traces(
            adapter.eval(), encoder, ["a red circle", "a blue square"], images, ["a red", "a blue"]
        )
    layers = adapter.lm.config.num_hidden_layers + 1
    assert [t.modality for t in encoding] == ["text", "text", "image", "image"]
    assert all(len(t.layers) == layers for t in encoding + response)
    text_enc = encoding[0]
    assert text_enc.prompt_len == 1 + len("a red circle") and text_enc.layers[0].shape[0] == text_enc.prompt_len
    image_resp = response[0]  # text prompt → the queries carry the image
    assert (
        image_resp.modality == "image"
        and image_resp.layers[0].shape[0] == image_resp.prompt_len + adapter.cfg.num_queries
    )
    caption = response[2]
    assert caption.modality == "text" and caption.layers[0].shape[0] - caption.prompt_len == len("a red") + 1  # + eos


def test_probe_cli_runs_before_and_after_and_plots(toy_data, tmp_path: Path) -> None:
    from reca.trainer import fit

    run = tmp_path / "run"
    fit(
        load_config(
            TINY, tiny_overrides(toy_data, run, "train.max_steps=3", "train.save_every=100", "train.sample_prompts=[]")
        )
    )
    data = [f"objectives.{k}.data.path={toy_data}" for k in ("recon", "t2i", "i2t")]
    common = ["--config", str(TINY), "--images", str(toy_data), "--n", "6"]
    assert probe_main(["run", *common, "--out", str(tmp_path / "before.json"), *data]) == 0
    assert (
        probe_main(["run", *common, "--checkpoint", str(run / "final"), "--out", str(tmp_path / "after.json"), *data])
        == 0
    )
    before = json.loads((tmp_path / "before.json").read_text())
    after = json.loads((tmp_path / "after.json").read_text())
    assert before["summary"]["encoding"]["gap"] is not None and before["summary"]["response"]["gap"] is not None
    assert before["summary"] != after["summary"]  # trained weights change the hidden states
    assert (
        probe_main(
            [
                "plot",
                "--inputs",
                f"before={tmp_path / 'before.json'}",
                f"after={tmp_path / 'after.json'}",
                "--out",
                str(tmp_path / "probe.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "probe.png").stat().st_size > 1000


def test_probe_runs_on_a_tiny_janus(toy_data, tmp_path: Path) -> None:
    from conftest import ROOT

    data = [f"objectives.{k}.data.path={toy_data}" for k in ("recon", "i2t")]
    out = tmp_path / "janus.json"
    assert (
        probe_main(
            [
                "run",
                "--config",
                str(ROOT / "configs/janus_tiny.yaml"),
                "--images",
                str(toy_data),
                "--n",
                "4",
                "--out",
                str(out),
                *data,
            ]
        )
        == 0
    )
    summary = json.loads(out.read_text())["summary"]
    assert summary["encoding"]["gap"] is not None and summary["response"]["gap"] is not None
    assert probe_main(["plot", "--inputs", f"janus={out}", "--out", str(tmp_path / "p.png")]) == 0
