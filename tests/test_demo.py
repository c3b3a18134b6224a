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
from demo.report import METRICS
from demo.scorer import palette_colour
from demo.seeds import EVAL_SAMPLE_SEED, SEEDS, understanding_seeds
from demo.world import CANONICAL, COLOURS, DEV, HEADLINE, SHAPES, SPLITS, biased_caption, pairs, render
from reca.build import load_trained
from reca.config import ConfigError, to_dict
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
    assert set(CANONICAL) == set(HEADLINE) == set(SHAPES) and len(COLOURS) == 6
    assert all(CANONICAL[s] != HEADLINE[s] for s in SHAPES) and len(set(HEADLINE.values())) == 6


def test_the_split_is_fixed_balanced_and_disjoint() -> None:
    """Settings are chosen on dev pairs and dev seeds; test pairs (the headline ones among them)
    are scored by the final run only. Both sides cover every shape and every colour evenly."""
    dev, test, rare = set(pairs("dev")), set(pairs("test")), set(pairs("rare"))
    assert len(rare) == 30 and not dev & test and dev | test == rare
    assert not any(CANONICAL[sh] == c for sh, c in rare)
    assert set(pairs("headline")) <= test and all(len(DEV[sh]) == 2 for sh in SHAPES)
    for side, n in (("dev", 2), ("test", 3)):
        ps = pairs(side)
        assert all(sum(sh == shape for sh, _ in ps) == n for shape in SHAPES)
        assert all(sum(c == colour for _, c in ps) == n for colour in COLOURS)
        prompts = demo.eval_prompts(side)
        other = {f"a {c} {sh}" for sh, c in pairs("test" if side == "dev" else "dev")}
        assert not {p.prompt for p in prompts} & other
        assert [p.tag for p in prompts].count("canonical") == 6
    # their own sample seeds and real renders
    assert EVAL_SAMPLE_SEED["dev"] != EVAL_SAMPLE_SEED["test"] and set(EVAL_SAMPLE_SEED) == set(SPLITS)
    seen = {side: set() for side in SPLITS}
    for side in SPLITS:
        for tag, group in (("rare", pairs(side)), ("canonical", pairs("canonical"))):
            for k in range(len(group)):
                seen[side] |= set(understanding_seeds(side, tag, k, 16))
    assert not seen["dev"] & seen["test"] and len(seen["test"]) == 16 * (18 + 6)
    assert all(SEEDS[f"{side}_renders"].start <= min(seen[side]) for side in SPLITS)


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
    from demo.scorer import train_shape_net

    out = tmp_path_factory.mktemp("demo")
    settings = demo.DemoSettings.quick()
    # the scorer at 300 steps (99.9 % on held-out renders here) instead of the demo's 1,200: ~35 s
    # less; its stage still runs, in its worker process beside the encoder, and loads this file
    net, accuracy = train_shape_net(steps=300)
    (out / "cache").mkdir()
    torch.save({"net": net.state_dict(), "accuracy": accuracy}, out / "cache/scorer.pt")
    return out, settings, demo.run(out, settings)


def test_quick_demo_runs_every_stage_and_caches_them(quick_run) -> None:
    tmp_path, settings, report = quick_run
    table = report["table"]
    assert set(table) == {"before", "RecA", "control"}
    for arm, runs in table.items():
        for label, _ in METRICS:
            m = table[arm][label]
            assert 0.0 <= m["pooled"] <= 1.0 and len(m["per_seed"]) == (1 if arm == "before" else 3)
            assert m["wilson95"][0] <= m["pooled"] <= m["wilson95"][1]
    # the test side: its 18 rare pairs, each reported alone, none of the dev side
    assert report["split"]["side"] == "test" and len(report["per_pair"]) == 18
    assert set(report["per_pair"]) == {f"a {c} {sh}" for sh, c in pairs("test")}
    assert table["before"]["rare: colour+shape"]["n"] == 18 * settings.samples
    assert table["before"]["canonical: colour+shape"]["n"] == 6 * settings.samples
    assert report["guardrails"]["t2i_captions_checked"] == settings.n_t2i
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("## The demo (test side)") and "**ring** (all its pairs)" in md
    assert not any(f"a {c} {sh} |" in md for sh, c in pairs("dev"))
    with Image.open(tmp_path / "rare_pairs.png") as im:
        assert im.width > 100
    # each side's images in their own folders, so a dev run never resumes into a test run's
    assert (tmp_path / "eval/test/before/manifest.json").is_file() and not (tmp_path / "eval/dev").exists()
    # RecA saw reconstruction batches, the control arm none
    reca_log = (tmp_path / "lora-reca-seed0/log.jsonl").read_text()
    control_log = (tmp_path / "lora-control-seed0/log.jsonl").read_text()
    assert (tmp_path / "lora-reca-seed0/final/adapter_config.json").is_file()  # the default arm is LoRA
    assert '"recon"' in reca_log and '"recon"' not in control_log and '"t2i"' in control_log
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()}
    again = demo.run(tmp_path, settings)  # every stage cached: nothing is recomputed
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()}
    # and the re-run's report does not pass its reading time off as the runs' cost
    finetuning = [[k for k in r["timings"] if k.startswith("fine-tuning")] for r in (report, again)]
    assert [k[0].endswith("(all read from their records)") for k in finetuning] == [False, True]


def test_a_cached_stage_made_from_other_settings_is_refused(quick_run) -> None:
    """Changing a setting and rerunning into the same folder must not mix two runs in one report."""
    out, settings, _ = quick_run
    with pytest.raises(ConfigError, match=r"train-lora-reca-seed0.json was made with other settings \(optim.lr"):
        demo.run(out, dataclasses.replace(settings, lora_lr=settings.lora_lr * 2))
    with pytest.raises(ConfigError, match=r"pretrain.json was made with other settings \(.*train.max_steps"):
        demo.run(out, dataclasses.replace(settings, pretrain_steps=settings.pretrain_steps + 1))


def test_a_dev_run_beside_a_test_run_reuses_its_training_and_keeps_its_report(quick_run, tmp_path: Path) -> None:
    """`python -m demo --split dev` into the folder of a finished test run: the same fine-tuning
    runs and probes (neither depends on the side), new evaluations, and a report of its own."""
    import shutil

    out, settings, _ = quick_run
    here = tmp_path / "run"
    shutil.copytree(out, here, symlinks=True)  # its pretrained world, without its fine-tuning records
    for record in (here / "stages").glob("*.json"):
        if record.name.startswith(("train-", "eval-", "entropy-")):
            record.unlink()
    shutil.rmtree(here / "eval")
    s = dataclasses.replace(settings, curve_every=0, seeds=(0,))  # as `make demo`: no curves on one side's prompts
    demo.run(here, s)
    test_report = (here / "report.md").read_text()
    trained = {p.name: p.stat().st_mtime_ns for p in (here / "stages").glob("*.json") if "eval-" not in p.name}
    report = demo.run(here, dataclasses.replace(s, split="dev"))
    assert report["split"]["side"] == "dev" and set(report["per_pair"]) == {f"a {c} {sh}" for sh, c in pairs("dev")}
    assert trained == {p.name: p.stat().st_mtime_ns for p in (here / "stages").glob("*.json") if p.name in trained}
    assert (here / "report-dev.md").read_text().startswith("## The demo (dev side)")
    assert json.loads((here / "report-dev.json").read_text())["split"]["side"] == "dev"
    assert (here / "rare_pairs-dev.png").is_file() and (here / "report.md").read_text() == test_report


def test_full_fine_tuning_beside_a_lora_run_reuses_the_pretrained_models_records(quick_run, tmp_path: Path) -> None:
    """`python -m demo --full` into the folder of a finished (LoRA) run: the evaluation and probe of
    the pretrained model are the same stages whichever arm follows, so they are reused, not refused
    as made with other settings; the full runs train every weight (no adapter)."""
    import shutil

    out, settings, _ = quick_run
    here = tmp_path / "run"
    shutil.copytree(out, here, symlinks=True)
    records = ("eval-test-before.json", "entropy-before.json", "pretrain.json")
    stamps = {r: (here / "stages" / r).stat().st_mtime_ns for r in records}
    report = demo.run(here, dataclasses.replace(settings, lora=False, seeds=(0,)))
    assert stamps == {r: (here / "stages" / r).stat().st_mtime_ns for r in records}
    assert set(report["table"]) == {"before", "RecA", "control"} and report["variants"] == ["full"]
    final = here / "full-reca-seed0/final"
    assert final.is_dir() and not (final / "adapter_config.json").exists()


@pytest.mark.parametrize(
    "argv,lora,variants", [([], True, None), (["--full"], False, None), (["--compare"], True, ("full", "lora"))]
)
def test_the_command_line_picks_the_arms(monkeypatch, argv: list[str], lora: bool, variants) -> None:
    """`python -m demo` runs LoRA, `--full` full fine-tuning, `--compare` both."""
    seen = {}
    monkeypatch.setattr(demo, "run", lambda out, s, v: seen.update(lora=s.lora, variants=v))
    assert demo.main(["--out", "x", *argv]) == 0
    assert seen == {"lora": lora, "variants": variants}
    with pytest.raises(SystemExit):
        demo.main(["--full", "--compare"])


def test_compare_trains_lora_beside_full_with_curves(quick_run, tmp_path: Path) -> None:
    """`--compare`: full fine-tuning and LoRA, each with its control, and the curves PNG drawn from
    the evaluations during fine-tuning; the pretrained model of the first run is reused."""
    out, settings, _ = quick_run
    s = dataclasses.replace(settings, curve_every=2, seeds=(0,))
    compare = tmp_path / "compare"
    compare.mkdir()
    for stage in ("scorer", "encoder", "data", "tokenizer", "pretrain"):  # the same pretrained world
        (compare / "stages").mkdir(exist_ok=True)
        (compare / "stages" / f"{stage}.json").write_text((out / "stages" / f"{stage}.json").read_text())
    for sub in ("cache", "data", "pretrain"):
        (compare / sub).symlink_to(out / sub)
    report = demo.run(compare, s, variants=("full", "lora"))
    # the curves sample as the final evaluation does (quick: 2 steps; the base config's own is 20)
    curve_cfg = demo.finetune_config(compare, dataclasses.replace(s, guidance=2.5), "reca", 0)
    assert (curve_cfg.train.sample_steps, curve_cfg.train.guidance_scale) == (s.sample_steps, 2.5)
    assert set(report["table"]) == {"before", "RecA full", "control full", "RecA lora", "control lora"}
    log = [json.loads(line) for line in (compare / "lora-reca-seed0/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval/rare" in r] == [0, 2, 4]
    assert (compare / "lora-reca-seed0/final/adapter_config.json").is_file()
    with Image.open(compare / "curves.png") as im:
        assert im.width > 300
    assert "![curves](curves.png)" in (compare / "report.md").read_text()


def test_curve_bands_pool_the_images_of_every_seed() -> None:
    from demo.report import pooled_interval
    from eval.stats import wilson_interval

    assert pooled_interval([0.5, 0.25, 0.75], 24) == wilson_interval(36, 72)
    lo, hi = pooled_interval([0.5] * 3, 24)
    one_lo, one_hi = wilson_interval(12, 24)
    assert hi - lo < one_hi - one_lo  # three seeds' images, not one seed's


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
    """`make demo` at full size (LoRA; 7.5 and 9.5 min measured on two 2-core CPUs): every stage, 3 seeds per arm."""
    settings = demo.DemoSettings()
    report = demo.run(tmp_path, settings)
    assert report["scorer_accuracy"] >= 0.99 and report["encoder_zero_shot"] >= 0.97
    table = report["table"]
    assert table["before"]["rare: colour+shape"]["n"] == 18 * settings.samples
    assert all(len(table[arm]["rare: colour+shape"]["per_seed"]) == len(settings.seeds) for arm in ("RecA", "control"))
    assert (tmp_path / "rare_pairs.png").is_file() and (tmp_path / "probe.png").is_file()


def test_encoder_alignment_pulls_images_onto_their_captions(tmp_path: Path) -> None:
    """demo.encoder.pretrain's align term: after the same steps, images sit closer to their own
    caption than with the contrastive loss alone (a term that was not applied would tie)."""
    from demo import encoder as demo_encoder

    def own_caption_cosine(align: float) -> float:
        path = tmp_path / f"enc-{align}.pt"
        demo_encoder.pretrain(path, steps=30, align=align)
        model, tokenizer, pre = demo_encoder.build()
        model.load_state_dict(torch.load(path))
        model.eval()
        items = [(sh, c) for sh, c in pairs("all")]
        with torch.no_grad():
            img = model.encode_image(
                torch.stack([pre(render(sh, c, 123 + i).image) for i, (sh, c) in enumerate(items)]), normalize=True
            )
            txt = model.encode_text(tokenizer([f"a {c} {sh}" for sh, c in items]), normalize=True)
        return float((img * txt).sum(-1).mean())

    assert own_caption_cosine(3.0) > own_caption_cosine(0.0) + 0.05


@pytest.mark.parametrize(
    "jobs,cores,expected", [(6, 2, (2, 1)), (6, 1, (1, 1)), (6, 16, (6, 2)), (1, 8, (1, 8)), (4, 6, (4, 1))]
)
def test_runs_go_side_by_side_on_one_thread_each(jobs: int, cores: int, expected: tuple[int, int]) -> None:
    assert demo.workers_for(jobs, cores) == expected


def _script(name: str, monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(Path(demo.__file__).parents[1] / "scripts"))
    return importlib.import_module(name)


def test_shape_diagnostic_finds_a_confused_image_and_caption(monkeypatch) -> None:
    """scripts/demo_shapes.py's encoder tables on embeddings whose answer is known: one held-out
    red circle placed on the red square's images, one caption on another pair's images."""
    shapes = _script("demo_shapes", monkeypatch)
    all_pairs = pairs("all")
    labels = [k for k in range(len(all_pairs)) for _ in range(2)]  # 2 renders a pair: 1 centroid, 1 test
    pooled = torch.eye(len(all_pairs))[labels]
    red_circle, red_square = all_pairs.index(("circle", "red")), all_pairs.index(("square", "red"))
    pooled[2 * red_circle + 1] = torch.eye(len(all_pairs))[red_square]
    captions = torch.eye(len(all_pairs))
    captions[0] = captions[5]
    tables = shapes.encoder_tables(pooled, captions, labels, renders=2)
    assert tables["nearest_image_centroid"]["circle"] == {"circle": 5, "square": 1} | dict.fromkeys(SHAPES[2:], 0)
    assert sum(sum(row.values()) for row in tables["nearest_image_centroid"].values()) == len(all_pairs)
    assert tables["captions_nearest_another_pair"] == {
        f"a {all_pairs[0][1]} {all_pairs[0][0]}": f"a {all_pairs[5][1]} {all_pairs[5][0]}"
    }


def test_shape_diagnostic_runs_on_a_finished_run(quick_run, capsys, monkeypatch) -> None:
    shapes = _script("demo_shapes", monkeypatch)
    out, _, _ = quick_run
    assert shapes.main(["--out", str(out), "--runs", "no-such-run"]) == 2
    assert "no-such-run/final is missing" in capsys.readouterr().err
    assert shapes.main(["--out", str(out), "--runs", "lora-reca-seed0", "--renders", "2"]) == 0
    result = json.loads((out / "shapes.json").read_text())
    rare, canonical = result["lora-reca-seed0"]["rare"], result["lora-reca-seed0"]["canonical"]
    assert all(sum(rare[sh].values()) == 5 * 2 and sum(canonical[sh].values()) == 2 for sh in SHAPES)


def test_ablation_script_runs_both_arms_on_the_dev_side_and_refuses_bad_keys(quick_run, capsys, monkeypatch) -> None:
    """scripts/demo_ablation.py from a finished run's pretrained model: RecA and control side by
    side, scored on the dev side only; an unknown setting is one line, exit 2."""
    # importable by name: the spawned workers unpickle its functions by module name
    ablation = _script("demo_ablation", monkeypatch)
    out, _, _ = quick_run
    small = ["reca_steps=2", "reca_batch=8", "samples=1", "renders=1", "sample_steps=1", "lr=1"]
    assert ablation.main(["--out", str(out), "--tag", "t", "--seeds", "0", *small]) == 2
    assert "'lr=1': expected key=value with a key of DemoSettings" in capsys.readouterr().err
    # a typo is not another setting ("fasle" is a truthy string), and the test side is never scored
    assert ablation.main(["--out", str(out), "--tag", "t", "lora=fasle"]) == 2
    assert capsys.readouterr().err == "error: 'lora=fasle': lora must be of type bool, like its default True\n"
    assert ablation.main(["--out", str(out), "--tag", "t", "split=test"]) == 2
    assert "'split=test': split is not set here (this script scores the dev side only)" in capsys.readouterr().err
    assert ablation.settings_from(["lora_lr=4e-3"], (0,)).lora_lr == 4e-3  # YAML reads "4e-3" as a string
    assert ablation.main(["--out", str(out), "--tag", "t", "--seeds", "0,1", *small[:-1]]) == 0
    summary = json.loads((out / "ablations/t/summary.json").read_text())
    assert summary["settings"]["split"] == "dev"
    assert {arm: len(m["rare: colour+shape"]["per_seed"]) for arm, m in summary["table"].items()} == {
        "reca": 2,
        "control": 2,
    }
    assert summary["table"]["reca"]["rare: colour+shape"]["n"] == 2 * len(pairs("dev"))
    assert (out / "eval/dev/ablation-t-lora-control-seed1/manifest.json").is_file()


@pytest.mark.parametrize("percent,cores,free", [(0.0, 2, 2), (50.0, 2, 1), (100.0, 2, 1), (25.0, 8, 6), (3.0, 2, 2)])
def test_single_runs_use_the_cores_other_processes_leave_free(monkeypatch, percent, cores, free) -> None:
    import psutil

    monkeypatch.setattr(psutil, "cpu_percent", lambda interval: percent)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: cores)
    assert demo.free_cores() == free


def test_pool_workers_end_when_the_demo_is_killed(tmp_path: Path) -> None:
    """A demo ended by SIGTERM or SIGKILL never shuts its pool down: its workers must still end
    rather than train on, orphaned, holding the cores."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = (
        "import os, time\n"
        "from demo.run import spawn_pool\n"
        "pool = spawn_pool(1)\n"
        "print(pool.submit(os.getpid).result(), flush=True)\n"
        "pool.submit(time.sleep, 120)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(Path(demo.__file__).parents[1])},
    )
    worker = psutil.Process(int(parent.stdout.readline()))

    def gone() -> bool:
        try:
            return worker.status() == psutil.STATUS_ZOMBIE  # exited; reaped by whoever adopted it
        except psutil.NoSuchProcess:
            return True

    try:
        assert worker.ppid() == parent.pid and not gone()
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.time() + 10
        while time.time() < deadline and not gone():
            time.sleep(0.2)
        assert gone(), "the worker outlived the demo"
    finally:  # nothing left behind when an assertion fails before the kill
        parent.kill()
        parent.wait(10)
        if not gone():
            worker.kill()
