"""The evaluation CLI on real adapters: before (base) and after (a trained checkpoint, full or LoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.cli import main as eval_main
from reca.config import load_config

from conftest import ROOT, TINY, tiny_overrides


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_generate_score_compare_before_and_after_training(toy_data, tmp_path: Path, lora: bool) -> None:
    from reca.trainer import fit

    run = tmp_path / "run"
    extra = ["lora.enabled=true"] if lora else []
    fit(
        load_config(
            TINY,
            tiny_overrides(
                toy_data, run, "train.max_steps=3", "train.save_every=100", "train.sample_prompts=[]", *extra
            ),
        )
    )
    data = [f"objectives.{k}.data.path={toy_data}" for k in ("recon", "t2i", "i2t")]
    common = ["--prompts", "builtin", "--n", "1", "--steps", "2", "--batch-size", "16"]
    assert eval_main(["generate", "--config", str(TINY), "--out", str(tmp_path / "before"), *common, *data]) == 0
    assert (
        eval_main(
            [
                "generate",
                "--config",
                str(TINY),
                "--checkpoint",
                str(run / "final"),
                "--out",
                str(tmp_path / "after"),
                *common,
                *data,
            ]
        )
        == 0
    )
    for side in ("before", "after"):
        assert eval_main(["score", "--run", str(tmp_path / side), "--scorer", "vqa", "--config", str(TINY), *data]) == 0
    assert (
        eval_main(
            [
                "compare",
                "--before",
                str(tmp_path / "before"),
                "--after",
                str(tmp_path / "after"),
                "--out",
                str(tmp_path / "cmp"),
            ]
        )
        == 0
    )
    before = json.loads((tmp_path / "before/scores/vqa/results.json").read_text())
    after = (tmp_path / "after/manifest.json").read_text()
    assert "checkpoint_sha256" in after and before["scorer"] == "vqa"
    # the trained weights really were used: after-images differ from before-images for the same seeds
    b = (tmp_path / "before/00000/samples/0000.png").read_bytes()
    a = (tmp_path / "after/00000/samples/0000.png").read_bytes()
    assert a != b
    assert list((tmp_path / "cmp").glob("*.md"))


def test_pipeline_on_a_tiny_janus(toy_data, tmp_path: Path) -> None:
    config = str(ROOT / "configs/janus_tiny.yaml")
    data = [f"objectives.{k}.data.path={toy_data}" for k in ("recon", "i2t")]
    common = ["--config", config, "--prompts", "builtin", "--n", "1", "--batch-size", "16"]
    assert eval_main(["generate", *common, "--out", str(tmp_path / "a"), *data]) == 0
    assert eval_main(["generate", *common, "--out", str(tmp_path / "b"), "--seed", "1", *data]) == 0
    for side in ("a", "b"):
        assert eval_main(["score", "--run", str(tmp_path / side), "--scorer", "vqa", "--config", config, *data]) == 0
    assert (
        eval_main(
            ["compare", "--before", str(tmp_path / "a"), "--after", str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]
        )
        == 0
    )
    results = json.loads((tmp_path / "a/scores/vqa/results.json").read_text())
    assert results["scorer"] == "vqa" and results["overall"] is not None
