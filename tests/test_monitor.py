"""Evaluation during training and the collapse watch: the watch's rules on hand-made numbers, then
real tiny runs — a collapsing one (no text-to-image, high learning rate) that the watch stops, a
healthy one it leaves alone, and evaluation that leaves training's random streams untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reca.config import ConfigError, WatchConfig, load_config
from reca.monitor import CollapseWatch

from conftest import TINY, tiny_overrides

QUICK = ["train.sample_prompts=[]", "train.log_every=1", "eval.n_images=1", "eval.prompts=builtin:color_canonical"]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def train(toy_data: Path, out: Path, *extra: str) -> int:
    import train as entry

    return entry.main(["--config", str(TINY), *tiny_overrides(toy_data, out, *QUICK, *extra)])


def test_drop_below_step_zero_fires_once_per_category_and_good_step_follows_healthy_evaluations() -> None:
    watch = CollapseWatch(WatchConfig(max_drop=20, categories=["rare"]))
    assert watch.observe(0, {"eval/rare": 0.8, "eval/canon": 0.9, "eval/overall": 0.85}) == []
    assert watch.baseline == {"rare": 0.8, "canon": 0.9} and watch.good_step == 0
    assert watch.observe(5, {"recon": 0.1}) == [] and watch.good_step == 0  # no evaluation: not verified
    assert watch.observe(10, {"eval/rare": 0.65, "eval/canon": 0.1}) == []  # 15 points; canon is not watched
    assert watch.good_step == 10
    (alarm,) = watch.observe(20, {"eval/rare": 0.55, "eval/canon": 0.9})
    assert alarm.startswith("rare accuracy 55.0% is 25.0 points below") and watch.good_step == 10
    assert watch.observe(30, {"eval/rare": 0.1}) == []  # reported once
    again = CollapseWatch(WatchConfig(max_drop=20, categories=["rare"]))
    again.load_state_dict(json.loads(json.dumps(watch.state_dict())))  # what a checkpoint carries
    assert again.baseline == watch.baseline and again.good_step == 10 and again.fired == ["rare"]


def test_recon_floor_watches_every_step() -> None:
    watch = CollapseWatch(WatchConfig(recon_floor=0.5))
    assert watch.observe(1, {"recon": 0.9}) == [] and watch.good_step == 1
    (alarm,) = watch.observe(2, {"recon": 0.3})
    assert "below watch.recon_floor=0.5" in alarm and watch.good_step == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("watch.max_drop=10", "watch.max_drop: needs the evaluation during training"),
        ("watch.stop=true", "watch.stop: nothing is watched"),
        ("eval.n_images=0", "eval.n_images"),
    ],
)
def test_contradictory_monitoring_settings_fail_at_load(toy_data, tmp_path, override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, tiny_overrides(toy_data, tmp_path, override))


def test_bad_eval_prompts_name_the_key(toy_data, tmp_path, capsys) -> None:
    assert train(toy_data, tmp_path, "eval.every=5", "eval.prompts=builtin:colour_rare") == 2
    assert "eval.prompts: builtin has no categories ['colour_rare']" in capsys.readouterr().err


def test_collapsing_run_is_stopped_and_a_healthy_one_is_not(toy_data, tmp_path) -> None:
    watch = ["eval.every=10", "watch.recon_floor=0.5", "watch.max_drop=50", "watch.stop=true"]
    steps = ["train.max_steps=40", "train.save_every=5", "train.keep_last=1"]
    # reconstruction alone at a high learning rate: the tiny model learns to copy (loss ~1.0 → ~0.2)
    collapsed, healthy = tmp_path / "collapsed", tmp_path / "healthy"
    assert train(toy_data, collapsed, *steps, *watch, "optim.lr=3e-2", "objectives.t2i.share=0") == 0
    report = json.loads((collapsed / "collapse.json").read_text())
    assert report["step"] < 40 and "recon_floor" in report["alarms"][0], report
    # the verified checkpoint survives keep_last=1: the newest at or before the last healthy evaluation
    assert report["last_good_step"] % 10 == 0 and report["checkpoint"].endswith(f"-{report['last_good_step']}")
    assert Path(report["checkpoint"]).is_dir()
    saved = sorted(int(p.name.split("-")[1]) for p in (collapsed / "checkpoints").iterdir())
    assert max(saved) <= report["step"] and not (collapsed / "final").exists()  # no collapsed result
    log = read_log(collapsed)
    assert log[0]["step"] == 0 and "eval/color_canonical" in log[0] and log[-1]["step"] == report["step"]

    assert train(toy_data, healthy, *steps, *watch) == 0
    assert not (healthy / "collapse.json").exists() and (healthy / "final").is_dir()
    evaluated = [r for r in read_log(healthy) if "eval/overall" in r]
    assert [r["step"] for r in evaluated] == [0, 10, 20, 30, 40]
    assert all(0 <= r["eval/color_canonical"] <= 1 and r["time/eval"] > 0 for r in evaluated)
    assert (healthy / "evals/step-0000040/scores/palette/results.json").is_file()  # reca-eval's own files
    # the model card of final/ carries the evaluation table
    from huggingface_hub import ModelCard

    card = ModelCard.load(healthy / "final/README.md")
    assert card.data.library_name == "reca" and "reca" in card.data.tags and card.data.license == "other"
    assert "## Evaluation during training" in card.text and "| 40 |" in card.text


def test_evaluation_leaves_the_training_run_unchanged(toy_data, tmp_path) -> None:
    steps = ["train.max_steps=6", "train.save_every=100"]
    assert train(toy_data, tmp_path / "plain", *steps) == 0
    assert train(toy_data, tmp_path / "evaluated", *steps, "eval.every=2") == 0
    plain = [r["loss"] for r in read_log(tmp_path / "plain")]
    evaluated = [r["loss"] for r in read_log(tmp_path / "evaluated") if "loss" in r]
    assert plain == evaluated
