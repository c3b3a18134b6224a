"""The embedded demo: its world, its guardrails, and a reduced end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from demo import run as demo
from demo.scorer import palette_colour
from demo.world import CANONICAL, COLOURS, RARE, SHAPES, biased_caption, render
from reca.build import load_trained
from reca.config import to_dict
from reca.models.metaquery import MetaQueryAdapter
from reca.objectives import OBJECTIVES


def dotted(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as {"section.key": value}."""
    out = {}
    for k, v in tree.items():
        out |= dotted(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


def test_world_is_deterministic_with_ground_truth() -> None:
    a, b = render("star", "purple", seed=5), render("star", "purple", seed=5)
    assert a.image.tobytes() == b.image.tobytes() and a.image.size == (32, 32)
    assert render("star", "purple", seed=6).image.tobytes() != a.image.tobytes()
    assert 30 < a.mask.sum() < 32 * 32 // 2
    assert palette_colour(a.image) == "purple"
    assert set(CANONICAL) == set(RARE) == set(SHAPES) and len(COLOURS) == 6
    assert all(CANONICAL[s] != RARE[s] for s in SHAPES) and len(set(RARE.values())) == 6


def test_a_flat_disc_on_gray_scores_its_colour() -> None:
    x = np.full((32, 32, 3), 0.05, dtype=np.float32)
    yy, xx = np.mgrid[0:32, 0:32]
    x[(yy - 16) ** 2 + (xx - 16) ** 2 < 64] = COLOURS["yellow"]
    assert palette_colour(Image.fromarray((x * 255).astype(np.uint8))) == "yellow"
    assert palette_colour(Image.new("RGB", (32, 32))) is None


def test_guardrails_refuse_rare_captions_and_overlapping_seeds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rare pair"):
        biased_caption("triangle", "purple", np.random.default_rng(0))
    demo.check_guardrails()
    (tmp_path / "t2i.jsonl").write_text(json.dumps({"image": "x.png", "caption": "a purple triangle"}) + "\n")
    (tmp_path / "recon.jsonl").write_text(json.dumps({"image": "y.png"}) + "\n")
    with pytest.raises(AssertionError, match="rare pairs in text-to-image captions"):
        demo.audit_data(tmp_path)
    (tmp_path / "t2i.jsonl").write_text(json.dumps({"image": "x.png", "caption": "a triangle"}) + "\n")
    (tmp_path / "recon.jsonl").write_text(json.dumps({"image": "y.png", "caption": "a green triangle"}) + "\n")
    with pytest.raises(AssertionError, match="no captions"):
        demo.audit_data(tmp_path)


def test_control_arm_replaces_reconstruction_by_captioned_samples() -> None:
    """The control differs from RecA only in what the reconstruction samples are: the same steps,
    batch, seed, schedule and image-to-text share; its generation samples are captioned ones."""
    s = demo.DemoSettings()
    reca, control = (dotted(to_dict(demo.finetune_config(Path("out"), s, arm, 0))) for arm in ("reca", "control"))
    shares = {
        arm: {k: float(o[f"objectives.{k}.share"]) for k in OBJECTIVES}
        for arm, o in (("reca", reca), ("control", control))
    }
    assert shares["control"]["recon"] == 0.0 and shares["reca"]["recon"] > 0
    assert shares["control"]["t2i"] == shares["reca"]["t2i"] + shares["reca"]["recon"]
    assert shares["control"]["i2t"] == shares["reca"]["i2t"]
    assert {k: v for k, v in reca.items() if ".share" not in k} == {
        k: v for k, v in control.items() if ".share" not in k
    }


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, demo.DemoSettings, dict]:
    out = tmp_path_factory.mktemp("demo")
    settings = demo.DemoSettings.quick()
    return out, settings, demo.run(out, settings)


def test_quick_demo_runs_every_stage_and_caches_them(quick_run) -> None:
    tmp_path, settings, report = quick_run
    table = report["table"]
    assert set(table) == {"before", "reca", "control"}
    for arm, runs in table.items():
        for label, _ in demo.METRICS:
            m = table[arm][label]
            assert 0.0 <= m["pooled"] <= 1.0 and len(m["per_seed"]) == (1 if arm == "before" else 3)
            assert m["wilson95"][0] <= m["pooled"] <= m["wilson95"][1]
    assert table["before"]["rare: colour+shape"]["n"] == 6 * settings.samples
    assert report["guardrails"]["t2i_captions_checked"] == settings.n_t2i
    assert (tmp_path / "report.md").read_text().startswith("| metric |")
    with Image.open(tmp_path / "rare_pairs.png") as im:
        assert im.width > 100
    # RecA saw reconstruction batches, the control arm none
    reca_log = (tmp_path / "reca-seed0/log.jsonl").read_text()
    control_log = (tmp_path / "control-seed0/log.jsonl").read_text()
    assert '"recon"' in reca_log and '"recon"' not in control_log and '"t2i"' in control_log
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()}
    demo.run(tmp_path, settings)  # every stage cached: nothing is recomputed
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()}


def test_lora_arm_trains_an_adapter_and_loads_back(quick_run) -> None:
    """`--lora`: RecA through PEFT on the pretrained demo model; evaluation loads base + adapter."""
    out, settings, _ = quick_run
    lora = dataclasses.replace(settings, lora=True)
    demo.train(out / "lora-reca", demo.finetune_config(out, lora, "reca", 0))
    final = out / "lora-reca/final"
    assert (final / "adapter_config.json").is_file() and not (final / "reca_adapter.json").exists()
    # the adapter merged into the base
    tuned = load_trained(*demo.eval_config(out, final, lora=True))[0].state_dict()
    base = load_trained(*demo.eval_config(out, out / "pretrain/final", lora=False))[0].state_dict()
    assert tuned.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed, "the LoRA update did not reach the loaded model"
    target = re.compile(MetaQueryAdapter.default_lora_targets)
    assert all(target.fullmatch(k.rsplit(".", 1)[0]) for k in changed), sorted(changed)[
        :3
    ]  # only LoRA-targeted layers moved


@pytest.mark.slow
def test_full_demo(tmp_path: Path) -> None:
    """The README's demo at full size (about 20 minutes on 2 cores): every stage, 3 seeds per arm."""
    settings = demo.DemoSettings()
    report = demo.run(tmp_path, settings)
    assert report["scorer_accuracy"] >= 0.99
    table = report["table"]
    assert table["before"]["rare: colour+shape"]["n"] == 6 * settings.samples
    assert all(len(table[arm]["rare: colour+shape"]["per_seed"]) == len(settings.seeds) for arm in ("reca", "control"))
    assert (tmp_path / "rare_pairs.png").is_file() and (tmp_path / "probe.png").is_file()
