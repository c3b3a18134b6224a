"""generate → score → compare on a tiny deterministic test world, plus resume, failure, ordering,
atomicity, manifest, the understanding-vs-generation gap and the CLI.

The test UMM really draws: a flat disc per "COLOUR OBJECT" phrase of the prompt on a flat gray
background, with seeded jitter (position, radius, gray level, colour). ``draws="canonical"`` is
the biased model (a yellow broccoli comes out green, the RecA failure); ``draws="requested"`` is the
fixed one. Its understanding reads the colour back from an encoder's tokens, so it "recognises a
yellow broccoli" either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import eval.runner as runner
import reca.io
from eval.cli import main
from eval.prompts import COLORS, EvalError, load_builtin
from eval.report import compare, load_results, log_wandb, score_run, understanding_gap
from eval.runner import SEED_RULE, describe_model, generate, image_seed, sha256_tree
from eval.scorers import GENEVAL_PALETTE, PaletteScorer, VQAScorer, foreground_mask

BUILTIN = load_builtin()
CANONICAL = {p.include[0]["class"]: p.extra["canonical_color"] for p in BUILTIN if p.tag == "color_canonical"}
COLOUR_PROMPTS = [p for p in BUILTIN if p.tag in ("color_rare", "color_canonical")]
PHRASE = re.compile(r"\b(?:a|an) (" + "|".join(COLORS) + r") ([a-z ]+?)(?= and |$)")
N = 2


class DiscAdapter:
    resolution = 32

    def __init__(self, draws: str = "requested", fail_after_calls: int | None = None):
        self.draws = draws
        self.fail_after_calls = fail_after_calls
        self.calls = 0
        self.generated = 0

    def generate(self, cond, *, seeds, guidance_scale, num_steps):
        assert cond.texts is not None and len(seeds) == len(cond)
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.generated += len(seeds)
        return [self.draw(text, seed) for text, seed in zip(cond.texts, seeds)]

    def draw(self, text: str, seed: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        gray = int(rng.integers(140, 170))
        im = Image.new("RGB", (32, 32), (gray, gray, gray))
        draw = ImageDraw.Draw(im)
        phrases = PHRASE.findall(text)
        for k, (colour, obj) in enumerate(phrases):
            if self.draws == "canonical":
                colour = CANONICAL.get(obj, colour)
            rgb = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in GENEVAL_PALETTE[colour])
            cx = 16 if len(phrases) == 1 else 8 + 16 * k
            cy, r = 16 + int(rng.integers(-2, 3)), int(rng.integers(7, 11) if len(phrases) == 1 else rng.integers(5, 8))
            cx += int(rng.integers(-1, 2))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        return im

    def answer_logprob(self, semantic, prompts, answers):
        """Understands colours perfectly: compares the asked colour with the one in the tokens."""
        out = []
        for tokens, question, answer in zip(semantic, prompts, answers):
            seen = min(
                GENEVAL_PALETTE, key=lambda c: float(((tokens[0] * 255 - torch.tensor(GENEVAL_PALETTE[c])) ** 2).sum())
            )
            asked = next(c for c in COLORS if f" {c} " in question)
            out.append(0.0 if (answer == "yes") == (asked == seen) else -4.0)
        return torch.tensor(out)


class ForegroundEncoder:
    """(B, 1, 3) tokens: the mean RGB of the foreground pixels."""

    def encode(self, images):
        rows = []
        for im in images:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
            rows.append(torch.tensor(rgb[foreground_mask(im)].mean(0)))
        return torch.stack(rows)[:, None, :]


def gen(adapter, prompts, out, **kw):
    settings = dict(
        n_images=N, seed=0, guidance_scale=3.0, num_steps=4, batch_size=5, model_info=describe_model(adapter)
    )
    settings.update(kw)
    return generate(adapter, prompts, out, **settings)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Before (canonical colours) and after (requested colours) runs, scored with PaletteScorer."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, draws in (("before", "canonical"), ("after", "requested")):
        gen(DiscAdapter(draws), COLOUR_PROMPTS, root / name)
        score_run(root / name, PaletteScorer(), n_boot=200)
        out[name] = root / name
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "scores", ignore_errors=True)
    return dst


# --------------------------------------------------------------------------- the whole pipeline


def test_generate_score_compare(runs, tmp_path):
    before, after = runs["before"], runs["after"]
    # GenEval layout
    p = COLOUR_PROMPTS[0]
    folder = before / f"{p.index:05d}"
    assert folder.name == "00000" and (folder / "metadata.jsonl").read_text() == json.dumps(p.to_geneval()) + "\n"
    assert sorted(f.name for f in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
    assert Image.open(folder / "grid.png").size == (32 * N, 32)
    assert len([d for d in before.iterdir() if d.name.isdigit()]) == len(COLOUR_PROMPTS)

    rb, ra = load_results(before / "scores" / "palette" / "results.json"), load_results(after)
    assert set(rb["categories"]) == {"color_rare", "color_canonical"}  # labelled by name
    assert rb["categories"]["color_rare"]["accuracy"] == 0.0 and rb["categories"]["color_canonical"]["accuracy"] == 1.0
    assert ra["categories"]["color_rare"]["accuracy"] == 1.0 == ra["overall"]["accuracy"]
    assert rb["overall"]["accuracy"] == 0.5  # unweighted mean of the two categories
    rare = rb["categories"]["color_rare"]
    assert (
        rare["n_prompts"] == 24
        and rare["n_images"] == 24 * N
        and rare["wilson95"][0] == 0.0 < rare["wilson95"][1] < 0.1
    )
    assert len(rb["prompts"]) == len(COLOUR_PROMPTS)
    scores = [json.loads(line) for line in (before / "scores" / "palette" / "scores.jsonl").read_text().splitlines()]
    assert (
        len(scores) == len(COLOUR_PROMPTS) * N
        and {"index", "tag", "prompt", "image", "correct", "color"} <= scores[0].keys()
    )
    assert "| color_rare | 0.0 |" in (before / "scores" / "palette" / "results.md").read_text()

    result = compare(before, after, tmp_path / "cmp", n_boot=500)
    r = result["categories"]["color_rare"]
    assert r["delta"] == 1.0 and r["delta_ci95"][0] > 0.5
    assert result["categories"]["color_canonical"]["delta"] == 0.0
    assert result["overall"]["delta"] == 0.5
    grids = sorted((tmp_path / "cmp" / "grids").glob("*.png"))
    assert len(grids) == len(COLOUR_PROMPTS)
    w, h = Image.open(grids[0]).size
    assert w > 32 * N and h > 2 * 32  # two rows plus a title strip
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| color_rare | 0.0 | 100.0 | +100.0 |" in md and "yellow broccoli" in md


def test_understanding_gap(runs, tmp_path):
    """The UMM recognises rare pairs it cannot draw: understanding 100% vs generation 0% on rare."""
    world = DiscAdapter("requested")
    labels = []
    for p in COLOUR_PROMPTS:
        item = p.include[0]
        name = f"{p.index:03d}.png"
        world.draw(p.prompt, 1000 + p.index).save(tmp_path / name)
        labels.append({"image": name, "color": item["color"], "object": item["class"], "category": p.tag})
    random.Random(0).shuffle(labels)  # file order must not matter
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    vqa = VQAScorer(DiscAdapter("canonical"), ForegroundEncoder())
    gap = understanding_gap(tmp_path / "labels.jsonl", vqa, runs["before"], out_dir=tmp_path / "gap", n_boot=200)
    rare = gap["categories"]["color_rare"]
    assert (rare["understanding"], rare["generation"], rare["gap"]) == (1.0, 0.0, 1.0)
    assert gap["categories"]["color_canonical"]["gap"] == 0.0
    assert rare["understanding_wilson95"][0] > 0.8 and rare["n_labelled"] == 24
    assert "| color_rare | 100.0" in (tmp_path / "gap" / "gap.md").read_text()
    # a wrong contrast attribute given explicitly is used instead of all other colours
    labels[0]["wrong"] = labels[0]["color"]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    again = understanding_gap(tmp_path / "labels.jsonl", vqa, runs["before"], n_boot=50)
    assert sum(not r["understood"] for r in again["rows"]) == 1  # P(yes|true) == P(yes|wrong) is not understanding


# --------------------------------------------------------------------------- resume and determinism


def test_rerun_skips_finished_images(tmp_path, monkeypatch):
    writes: list[Path] = []
    real_save = runner.save_png
    monkeypatch.setattr(runner, "save_png", lambda path, im: (writes.append(Path(path)), real_save(path, im)))
    prompts = COLOUR_PROMPTS[:6]
    adapter = DiscAdapter()
    stats = gen(adapter, prompts, tmp_path / "run")
    samples = [w for w in writes if w.parent.name == "samples"]
    assert stats.written == len(samples) == 6 * N and adapter.generated == 6 * N
    original = {p: p.read_bytes() for p in samples}

    writes.clear()
    adapter = DiscAdapter()
    stats = gen(adapter, prompts, tmp_path / "run")
    assert (stats.written, stats.skipped, adapter.generated, writes) == (0, 6 * N, 0, [])

    gone, broken = samples[3], samples[7]
    gone.unlink()
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated PNG
    adapter = DiscAdapter()
    stats = gen(adapter, prompts, tmp_path / "run")
    assert sorted(w for w in writes if w.parent.name == "samples") == sorted([gone, broken])
    assert stats.written == adapter.generated == 2
    assert {p: p.read_bytes() for p in samples} == original  # same seeds, same pixels
    # only the two touched prompts' grids were redrawn
    assert sorted(w.parent.name for w in writes if w.name == "grid.png") == sorted(
        {gone.parent.parent.name, broken.parent.parent.name}
    )


def test_any_subset_and_batch_size_reproduce_the_pixels(runs, tmp_path):
    subset = [COLOUR_PROMPTS[i] for i in (13, 2, 40)]
    gen(DiscAdapter("requested"), subset, tmp_path / "subset", batch_size=1)
    for p in subset:
        for i in range(N):
            rel = Path(f"{p.index:05d}/samples/{i:04d}.png")
            assert (tmp_path / "subset" / rel).read_bytes() == (runs["after"] / rel).read_bytes()


def test_image_seed_is_the_documented_pure_function():
    seeds = {image_seed(0, p, i) for p in range(50) for i in range(12)}
    assert len(seeds) == 600 and all(0 <= s < 2**31 for s in seeds)
    assert image_seed(3, 7, 1) == image_seed(3, 7, 1) != image_seed(4, 7, 1)
    sha256 = lambda s: hashlib.sha256(s.encode())  # noqa: E731 (the names SEED_RULE uses)
    for seed, prompt_index, image_index in [(0, 0, 0), (5, 42, 3), (123, 552, 11)]:
        assert eval(SEED_RULE, {"sha256": sha256}, locals()) == image_seed(seed, prompt_index, image_index)


def test_interrupted_generation_leaves_no_partial_files_and_resumes(tmp_path):
    prompts = COLOUR_PROMPTS[:6]
    with pytest.raises(KeyboardInterrupt):
        gen(DiscAdapter(fail_after_calls=1), prompts, tmp_path / "run", batch_size=4)
    pngs = sorted((tmp_path / "run").rglob("*.png"))
    assert len(pngs) == 4 and all(runner.is_valid_image(p) for p in pngs)
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.endswith(".tmp")]
    adapter = DiscAdapter()
    stats = gen(adapter, prompts, tmp_path / "run", batch_size=4)
    assert stats.written == adapter.generated == 6 * N - 4 and stats.skipped == 4


def test_crash_while_writing_a_png_leaves_no_half_written_file(tmp_path, monkeypatch):
    real_save = Image.Image.save
    calls = []

    def flaky_save(self, fp, format=None, **kw):
        calls.append(fp)
        if len(calls) == 3:  # die half-way through the third image
            fp.write(b"\x89PNG\r\n\x1a\n half")
            raise OSError("killed mid-write")
        return real_save(self, fp, format, **kw)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(OSError, match="mid-write"):
        gen(DiscAdapter(), COLOUR_PROMPTS[:3], tmp_path / "run", batch_size=6)
    pngs = sorted((tmp_path / "run").rglob("*.png"))
    assert len(pngs) == 2 and all(runner.is_valid_image(p) for p in pngs)
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.endswith(".tmp")]


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "results.json"
    reca.io.atomic_write_json(target, {"v": 1})

    def half_then_crash(f):
        f.write(b'{"v": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError):
        reca.io.atomic_write(target, half_then_crash)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


# --------------------------------------------------------------------------- failures and ordering


def test_missing_or_corrupt_images_fail_scoring_naming_paths(runs, tmp_path):
    run = copy_run(runs["after"], tmp_path / "run")
    gone = run / "00003" / "samples" / "0001.png"
    broken = run / "00010" / "samples" / "0000.png"
    gone.unlink()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(EvalError) as e:
        score_run(run, PaletteScorer())
    msg = str(e.value)
    assert str(gone) in msg and str(broken) in msg and "2 missing or unreadable" in msg and "\n" not in msg
    assert not (run / "scores").exists()  # nothing half-scored
    shutil.rmtree(run / "00005")
    with pytest.raises(EvalError, match="00005 \\(missing prompt folder\\)"):
        score_run(run, PaletteScorer())


def test_results_do_not_depend_on_listing_order(runs, tmp_path, monkeypatch):
    src = runs["after"]
    ref_scores = (src / "scores" / "palette" / "scores.jsonl").read_bytes()
    ref = load_results(src)
    # 1) prompt folders created in a shuffled order
    dst = tmp_path / "shuffled"
    dst.mkdir()
    shutil.copy(src / "manifest.json", dst)
    folders = sorted(d for d in src.iterdir() if d.name.isdigit())
    random.Random(1).shuffle(folders)
    for d in folders:
        shutil.copytree(d, dst / d.name)
    # 2) and every directory listing served backwards
    real_iterdir, real_glob = Path.iterdir, Path.glob
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(real_iterdir(self), reverse=True)))
    monkeypatch.setattr(Path, "glob", lambda self, pat, **kw: iter(sorted(real_glob(self, pat, **kw), reverse=True)))
    res = score_run(dst, PaletteScorer(), n_boot=200)
    assert (dst / "scores" / "palette" / "scores.jsonl").read_bytes() == ref_scores
    assert {k: v for k, v in res.items() if k != "run"} == {k: v for k, v in ref.items() if k != "run"}


def test_geneval_folder_without_manifest_is_scored(runs, tmp_path):
    run = copy_run(runs["before"], tmp_path / "foreign")
    (run / "manifest.json").unlink()
    # without a manifest, the images from 0000 up to the first gap count; nothing else in samples/ does
    (run / "00001" / "samples" / f"{N - 1:04d}.png").unlink()
    shutil.copy(run / "00000" / "samples" / "0000.png", run / "00000" / "samples" / "0000 (copy).png")
    res = score_run(run, PaletteScorer(), n_boot=50)
    assert res["overall"]["n_images"] == len(COLOUR_PROMPTS) * N - 1
    assert res["ignored_files"] == ["00000/samples/0000 (copy).png"]


def test_bad_scorer_output_is_rejected(runs, tmp_path):
    class Vague:
        name = "vague"

        def score(self, image, prompt):
            return {"ok": 1.0}

    with pytest.raises(EvalError, match="scorer 'vague'.*no boolean 'correct'"):
        score_run(runs["after"], Vague(), out_dir=tmp_path / "s")


# --------------------------------------------------------------------------- manifest


def test_manifest_records_model_and_refuses_a_mismatched_resume(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"weights" * 1000)
    (ckpt / "sub" / "config.json").write_text("{}")
    h = sha256_tree(ckpt)
    shutil.copytree(ckpt, tmp_path / "elsewhere")
    assert sha256_tree(tmp_path / "elsewhere") == h  # content, not location
    (ckpt / "sub" / "config.json").write_text('{"r": 8}')
    assert sha256_tree(ckpt) != h

    adapter = DiscAdapter()
    info = describe_model(adapter, ckpt, config="configs/tiny.yaml")
    gen(adapter, COLOUR_PROMPTS[:2], tmp_path / "run", model_info=info)
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["model"]["adapter"] == f"{__name__}:DiscAdapter" and m["model"]["checkpoint"] == str(ckpt)
    assert m["model"]["checkpoint_sha256"] == sha256_tree(ckpt)
    assert {"torch", "transformers", "diffusers", "open_clip", "reca"} <= m["versions"].keys() and m["versions"][
        "torch"
    ]
    assert (m["seed_rule"], m["guidance_scale"], m["num_steps"], m["n_images"], m["resolution"]) == (
        SEED_RULE,
        3.0,
        4,
        N,
        32,
    )
    assert m["prompts"]["count"] == 2 and len(m["prompts"]["sha256"]) == 64
    with pytest.raises(EvalError, match="'guidance_scale' differs"):
        gen(adapter, COLOUR_PROMPTS[:2], tmp_path / "run", model_info=info, guidance_scale=5.0)
    with pytest.raises(EvalError, match="'prompts' differs"):
        gen(adapter, COLOUR_PROMPTS[:3], tmp_path / "run", model_info=info)


# --------------------------------------------------------------------------- wandb


def test_log_wandb_logs_a_table_or_skips_with_a_log_line(runs, caplog, monkeypatch):
    class FakeRun:
        def __init__(self):
            self.logged = []

        def log(self, data):
            self.logged.append(data)

    results = load_results(runs["before"])
    fake = FakeRun()
    assert log_wandb(results, fake) is True
    (data,) = fake.logged
    assert data["eval/color_rare"] == 0.0 and data["eval/overall"] == 0.5
    table = data["eval/prompts"]
    assert table.columns[:3] == ["index", "category", "prompt"] and len(table.data) == len(COLOUR_PROMPTS)
    import wandb

    monkeypatch.setattr(wandb, "run", None)  # whatever other tests left behind: no active run
    with caplog.at_level(logging.INFO, logger="eval.report"):
        assert log_wandb(results) is False
    assert "not logged to wandb" in caplog.text


# --------------------------------------------------------------------------- CLI


def test_cli_score_and_compare(runs, tmp_path, capsys):
    before, after = copy_run(runs["before"], tmp_path / "b"), copy_run(runs["after"], tmp_path / "a")
    for run in (before, after):
        assert (
            main(
                [
                    "score",
                    "--run",
                    str(run),
                    "--scorer",
                    "eval.scorers:PaletteScorer",
                    "--scorer-arg",
                    "min_share=0.25",
                    "--bootstrap",
                    "100",
                ]
            )
            == 0
        )
    assert "color_rare\t0.0" in capsys.readouterr().out
    assert (
        main(["compare", "--before", str(before), "--after", str(after), "--out", str(tmp_path / "cmp"), "--no-grids"])
        == 0
    )
    assert "color_rare\t0.0 → 100.0\t+100.0" in capsys.readouterr().out
    assert not (tmp_path / "cmp" / "grids").exists()
    assert main(["score", "--run", str(tmp_path / "nope"), "--scorer", "palette"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reca-eval: error:") and "nope" in err and err.count("\n") == 1


def test_cli_generate_builds_through_reca(monkeypatch, tmp_path, capsys):
    """generate's wiring: config → (stubbed) build → runner, with the config hashed into the manifest."""
    import reca.build
    import reca.config

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        "train: {guidance_scale: 2.5, sample_steps: 3}\nobjectives: {recon: {share: 1.0, data: {path: unused}}}\n"
    )
    seen = {}
    real_load_config = reca.config.load_config

    def spy_load_config(config, overrides):
        seen.update(config=config, overrides=list(overrides))
        return real_load_config(config, overrides)

    monkeypatch.setattr(reca.config, "load_config", spy_load_config)
    monkeypatch.setattr(reca.build, "load_trained", lambda cfg, checkpoint, device: (DiscAdapter(), None))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(p.to_geneval()) + "\n" for p in COLOUR_PROMPTS[:3]))
    out = tmp_path / "run"
    assert (
        main(
            [
                "generate",
                "--config",
                str(cfg_file),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--n",
                "1",
                "--device",
                "cpu",
                "train.seed=3",
            ]
        )
        == 0
    )
    assert "3 images written" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert (m["guidance_scale"], m["num_steps"]) == (2.5, 3)  # defaults from the config
    assert m["model"]["config_sha256"] == hashlib.sha256(cfg_file.read_bytes()).hexdigest()
    assert m["model"]["overrides"] == ["train.seed=3"] == seen["overrides"]
    assert m["prompts_source"]["files"] == {str(prompts): hashlib.sha256(prompts.read_bytes()).hexdigest()}
    assert main(["generate", "--prompts", str(prompts), "--out", str(out)]) == 2  # no config, no checkpoint


def test_atomic_write_gives_files_the_usual_permissions(tmp_path):

    reca.io.atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~reca.io.UMASK
