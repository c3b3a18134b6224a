"""The demo, end to end: world → scorer → frozen encoder → UMM pretraining on biased captions →
evaluation before → RecA and a control arm (same steps and data, no reconstruction), several seeds
each → evaluation after → report. Every finished stage is cached under ``--out``; a re-run skips it.

    python -m demo [--out runs/demo] [--quick] [--lora]

Its UMM is ``demo/config.yaml`` (package data); every stage's config is derived from it as an
object (:func:`base_config`, :func:`pretrain_config`, :func:`finetune_config`, :func:`eval_config`).
Seeds: :mod:`demo.seeds`; statistics: :mod:`eval.stats`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.resources
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from demo import encoder as demo_encoder
from demo.scorer import WorldScorer
from demo.seeds import (
    EVAL_SAMPLE_SEED,
    SEEDS,
    caption_seed,
    check_guardrails,
    finetune_seed,
    probe_seeds,
    understanding_seeds,
)
from demo.world import CANONICAL, biased_caption, dense_caption, is_canonical, pairs, render
from eval.stats import t_interval, wilson_interval
from reca.config import Config, derive, load_config, validate
from reca.io import atomic_dir, atomic_write_json, atomic_write_text
from reca.models.tokenizer import save_word_tokenizer

INSTRUCTION = "Reconstruct this image."
I2T_PROMPT = "Describe the image."  # demo/config.yaml objectives.i2t_prompt


@dataclass
class DemoSettings:
    n_t2i: int = 6_000
    n_i2t: int = 12_000
    n_recon: int = 12_000
    # 1,200 steps: the generator draws canonical pairs right 89% of the time at 1,200 steps and 67%
    # at 900 (README, the demo). Understanding is learnt long before, so a quarter of the batch is
    # image-to-text: the same 48 text-to-image samples a step as a 48 + 48 batch, 15% faster.
    pretrain_steps: int = 1200
    pretrain_batch: int = 64
    pretrain_shares: dict = field(default_factory=lambda: {"recon": 0.0, "t2i": 0.75, "i2t": 0.25})
    reca_steps: int = 200
    reca_batch: int = 64
    # Harmon's mixture, recon : image-to-text : text-to-image = 2 : 2 : 0 (`repeat = [2, 2, 0]` in the
    # official RecA repository's Harmon/configs/datasets/qwen2_5_1_5b/image2text_recon_mid.py). Keeping
    # some captioned text-to-image data (0.34 / 0.16 / 0.5) protects canonical prompts but, at this
    # budget, stops the transfer altogether (README, the demo).
    reca_shares: dict = field(default_factory=lambda: {"recon": 0.5, "t2i": 0.0, "i2t": 0.5})
    reca_lr: float = 5e-4
    reca_schedule: str = "cosine"  # 5% warmup then cosine, as Harmon (Harmon/configs/examples/reca.py)
    seeds: tuple = (0, 1, 2)
    samples: int = 32  # generated images per prompt
    renders: int = 16  # real renders per pair for understanding and reconstruction
    guidance: float = 3.0
    sample_steps: int = 10  # x0-prediction: 8, 12 and 20 steps score alike
    encoder_steps: int = 400
    lora: bool = False

    @classmethod
    def quick(cls) -> "DemoSettings":
        """The reduced run of the test suite: every stage, tiny budgets, numbers meaningless."""
        return cls(
            n_t2i=192,
            n_i2t=384,
            n_recon=384,
            pretrain_steps=6,
            pretrain_batch=16,
            reca_steps=4,
            reca_batch=16,
            seeds=(0, 1, 2),
            samples=2,
            renders=2,
            sample_steps=2,
            encoder_steps=5,
        )


def cached(path: Path, make: Callable[[], dict]) -> dict:
    """Run a stage once; its result JSON is written atomically after the stage has finished."""
    if path.is_file():
        return json.loads(path.read_text())
    started = time.time()
    result = make() | {"seconds": round(time.time() - started, 1)}
    atomic_write_json(path, result, sort_keys=False)
    return result


# ------------------------------------------------------------------------------ data


def write_pool(folder: Path, kind: str, n: int) -> dict:
    """Render a pool to PNGs plus a manifest. t2i: canonical pairs, biased captions; i2t: all
    pairs, dense captions; recon: all pairs, no caption column at all. The folder appears whole
    (filled beside it, then renamed), then its manifest."""
    rng = np.random.default_rng(caption_seed(kind))
    choices = pairs("canonical") if kind == "t2i" else pairs("all")
    lines = []
    with atomic_dir(folder) as tmp:
        for i, seed in enumerate(SEEDS[kind][:n]):
            shape, colour = choices[i % len(choices)]
            name = f"{kind}-{i:06d}.png"
            render(shape, colour, seed).image.save(tmp / name)
            line = {"image": f"{folder.name}/{name}"}
            if kind == "t2i":
                line["caption"] = biased_caption(shape, colour, rng)
            elif kind == "i2t":
                line["caption"] = dense_caption(shape, colour)
            lines.append(line)
    manifest = folder.parent / f"{kind}.jsonl"
    atomic_write_text(manifest, "".join(json.dumps(line) + "\n" for line in lines))
    return {"manifest": str(manifest), "n": n}


def audit_data(data: Path) -> dict:
    """Guardrails, checked on the files actually written: no rare pair in any caption that reaches
    the generation path, and no caption at all in the reconstruction pool."""
    rare_words = {f"{c} {s}" for s, c in pairs("all") if not is_canonical(s, c)}
    t2i = [json.loads(line) for line in (data / "t2i.jsonl").read_text().splitlines()]
    leaked = [r["caption"] for r in t2i if any(w in r["caption"] for w in rare_words)]
    if leaked:
        raise AssertionError(f"rare pairs in text-to-image captions: {leaked[:3]}")
    recon = [json.loads(line) for line in (data / "recon.jsonl").read_text().splitlines()]
    if any(set(r) != {"image"} for r in recon):
        raise AssertionError("the reconstruction pool must carry no captions")
    return {"t2i_captions_checked": len(t2i), "recon_rows_without_caption": len(recon)}


# ------------------------------------------------------------------------------ training


def world_vocabulary() -> list[str]:
    """Every text the demo's LM reads: captions, prompts, instructions. The dense captions of all 36
    pairs hold every word a biased caption or an evaluation prompt can use."""
    from reca.instructions import INSTRUCTIONS

    return [dense_caption(sh, c) for sh, c in pairs("all")] + list(INSTRUCTIONS) + [INSTRUCTION, I2T_PROMPT]


def with_shares(cfg: Config, shares: dict[str, float]) -> Config:
    """``cfg`` with these objectives' shares of each batch."""
    return derive(cfg, objectives={k: {"share": float(v)} for k, v in shares.items()})


def with_pretrained(cfg: Config, pretrained: Path) -> Config:
    """``cfg`` whose UMM starts from the ``save_pretrained`` folder ``pretrained``."""
    return derive(cfg, model={"args": {**cfg.model.args, "pretrained": str(pretrained)}})


@functools.lru_cache(maxsize=1)
def _config_yaml() -> Config:
    with importlib.resources.as_file(importlib.resources.files("demo") / "config.yaml") as path:
        return load_config(path)


def base_config(out: Path) -> Config:
    """demo/config.yaml (read once) with this run's files: the frozen encoder, the word tokenizer
    and the three data pools, logging every 25 steps."""
    cfg = copy.deepcopy(_config_yaml())
    data = out / "data"
    cfg = derive(
        cfg,
        encoder={"pretrained": str(out / "cache/encoder.pt")},
        model={"args": {**cfg.model.args, "tokenizer": str(out / "cache/tokenizer")}},
        objectives={k: {"data": {"path": str(data / f"{k}.jsonl")}} for k in ("recon", "t2i", "i2t")},
        train={"log_every": 25},
    )
    validate(cfg)
    return cfg


def pretrain_config(out: Path, s: DemoSettings) -> Config:
    """The UMM's pretraining on biased captions (no reconstruction)."""
    cfg = derive(
        base_config(out),
        optim={"warmup_steps": min(100, s.pretrain_steps // 10)},
        train={
            "max_steps": s.pretrain_steps,
            "batch_size": s.pretrain_batch,
            "save_every": s.pretrain_steps,
            "sample_every": 0,
        },
    )
    cfg = with_shares(cfg, s.pretrain_shares)
    validate(cfg)
    return cfg


def train(out_dir: Path, cfg: Config) -> dict:
    from reca.trainer import fit

    cfg = derive(cfg, train={"output_dir": str(out_dir)})
    validate(cfg)
    metrics = fit(cfg)
    return {"final": str(out_dir / "final"), "last": metrics}


def arm_shares(s: DemoSettings, arm: str) -> dict[str, float]:
    """RecA's mixture, or the control's: the same image-to-text share, with the reconstruction
    samples replaced by captioned text-to-image ones (more of the pretraining mixture)."""
    shares = dict(s.reca_shares)
    if arm == "control":
        shares["t2i"], shares["recon"] = shares["t2i"] + shares["recon"], 0.0
    return shares


def finetune_config(out: Path, s: DemoSettings, arm: str, seed: int) -> Config:
    """Same steps, batch, seed and schedule for both arms; only the mixture differs (arm_shares)."""
    cfg = derive(
        with_pretrained(base_config(out), out / "pretrain/final"),
        train={
            "max_steps": s.reca_steps,
            "batch_size": s.reca_batch,
            "seed": finetune_seed(seed),
            "save_every": s.reca_steps,
            "sample_every": 0,
        },
        optim={"lr": float(s.reca_lr), "warmup_steps": max(1, s.reca_steps // 20), "schedule": s.reca_schedule},
    )
    cfg = with_shares(cfg, arm_shares(s, arm))
    if s.lora:
        cfg = derive(cfg, lora={"enabled": True, "rank": 16, "alpha": 32}, train={"trainable": []})
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------ evaluation


def eval_config(out: Path, checkpoint: Path, lora: bool) -> tuple[Config, Path | None]:
    """(config, checkpoint) for ``reca.build.load_trained``: a LoRA result is loaded onto the
    pretrained model; a full model (``save_pretrained`` folder) is the config's starting point."""
    if lora and (checkpoint / "adapter_config.json").is_file():
        return with_pretrained(base_config(out), out / "pretrain/final"), checkpoint
    return with_pretrained(base_config(out), checkpoint), None


def eval_prompts():
    from eval.prompts import Prompt

    items = [("rare", s, c) for s, c in pairs("rare")] + [("canonical", s, c) for s, c in pairs("canonical")]
    return [
        Prompt(
            index=i, prompt=f"a {c} {s}", tag=tag, include=[{"class": s, "count": 1, "color": c}], exclude=[], extra={}
        )
        for i, (tag, s, c) in enumerate(items)
    ]


def evaluate(out: Path, name: str, checkpoint: Path, s: DemoSettings, scorer: WorldScorer) -> dict:
    """Generation (through eval.runner + eval.report), understanding and reconstruction."""
    from eval.report import score_run
    from eval.runner import describe_model, generate
    from reca.build import load_trained

    adapter, encoder = load_trained(*eval_config(out, checkpoint, s.lora))
    run_dir = out / "eval" / name
    generate(
        adapter,
        eval_prompts(),
        run_dir,
        n_images=s.samples,
        seed=EVAL_SAMPLE_SEED,
        guidance_scale=s.guidance,
        num_steps=s.sample_steps,
        batch_size=64,
        model_info=describe_model(adapter, checkpoint),
    )
    score_run(run_dir, scorer)
    rows = [json.loads(line) for line in (run_dir / "scores/world/scores.jsonl").read_text().splitlines()]
    gen = {}
    for tag in ("rare", "canonical"):
        tagged = [r for r in rows if r["tag"] == tag]
        gen[tag] = {
            "n": len(tagged),
            "colour": sum(r["colour_ok"] for r in tagged),
            "shape": sum(r["shape_ok"] for r in tagged),
            "both": sum(r["correct"] for r in tagged),
            "drawn_canonical_colour": sum(r["colour"] == CANONICAL[r["prompt"].split()[-1]] for r in tagged),
        }
    und = {}
    captions = [dense_caption(sh, c) for sh, c in pairs("all")]
    for tag in ("rare", "canonical"):
        items = [
            (sh, c, seed) for k, (sh, c) in enumerate(pairs(tag)) for seed in understanding_seeds(tag, k, s.renders)
        ]
        with torch.no_grad():
            sem = encoder.encode([render(sh, c, seed).image for sh, c, seed in items])
            # understanding: which of the 36 dense captions does the model find most likely?
            correct, k = 0, 8  # k images × 36 captions per forward pass
            for i in range(0, len(items), k):
                chunk = sem[i : i + k]
                logp = adapter.answer_logprob(
                    chunk.repeat_interleave(len(captions), 0),
                    [I2T_PROMPT] * (len(chunk) * len(captions)),
                    captions * len(chunk),
                ).view(len(chunk), len(captions))
                correct += sum(
                    captions[int(j)] == dense_caption(sh, c) for j, (sh, c, _) in zip(logp.argmax(1), items[i : i + k])
                )
        und[tag] = {"n": len(items), "correct": int(correct)}
        if tag == "rare":  # the report reads reconstruction of rare pairs only
            rare_items, rare_sem = items, sem
    with torch.no_grad():
        recons = adapter.generate(
            _recon_condition(rare_sem),
            seeds=[seed for *_, seed in rare_items],
            guidance_scale=s.guidance,
            num_steps=s.sample_steps,
        )
    judged = scorer.judge(recons, [sh for sh, _, _ in rare_items], [c for _, c, _ in rare_items])
    rec = {
        "rare": {
            "n": len(rare_items),
            "both": sum(j["correct"] for j in judged),
            "colour": sum(j["colour_ok"] for j in judged),
        }
    }
    return {"generation": gen, "understanding": und, "reconstruction": rec}


def _recon_condition(sem: torch.Tensor):
    from reca.adapter import Condition

    return Condition(semantic=sem, instructions=[INSTRUCTION] * len(sem))


def probe(out: Path, name: str, checkpoint: Path, s: DemoSettings) -> dict:
    """The entropy probe on one checkpoint: all 36 pairs as text prompts and as captioned renders."""
    from eval.probe import analyse, collect_traces, save_json
    from reca.build import load_trained

    adapter, encoder = load_trained(*eval_config(out, checkpoint, s.lora))
    items = pairs("all")
    renders = [render(sh, c, seed).image for (sh, c), seed in zip(items, probe_seeds(len(items)))]
    with torch.no_grad():
        encoding, response = collect_traces(
            adapter,
            encoder,
            [dense_caption(sh, c) for sh, c in items],
            renders,
            [dense_caption(sh, c) for sh, c in items],
        )
    result = analyse(encoding, response, drop_first=1, n_resamples=200 if s.samples < 8 else 1000)
    save_json(result, out / "probe" / f"{name}.json")
    return {"json": str(out / "probe" / f"{name}.json")}


# ------------------------------------------------------------------------------ report


METRICS = [
    ("rare: colour+shape", ("generation", "rare", "both")),
    ("rare: right colour", ("generation", "rare", "colour")),
    ("rare: right shape", ("generation", "rare", "shape")),
    ("rare: drawn in canonical colour", ("generation", "rare", "drawn_canonical_colour")),
    ("canonical: colour+shape", ("generation", "canonical", "both")),
    ("understanding, rare (36-way)", ("understanding", "rare", "correct")),
    ("understanding, canonical (36-way)", ("understanding", "canonical", "correct")),
    ("reconstruction from semantics, rare", ("reconstruction", "rare", "both")),
]


def summarise(results: dict[str, list[dict]]) -> dict:
    table = {}
    for arm, runs in results.items():
        table[arm] = {}
        for label, (a, b, c) in METRICS:
            ks = [r[a][b][c] for r in runs]
            ns = [r[a][b]["n"] for r in runs]
            lo, hi = wilson_interval(sum(ks), sum(ns))
            mean, slo, shi = t_interval([k / n for k, n in zip(ks, ns)])
            table[arm][label] = {
                "pooled": sum(ks) / sum(ns),
                "wilson95": [lo, hi],
                "seed_mean": mean,
                "seed_t95": [slo, shi],
                "per_seed": [k / n for k, n in zip(ks, ns)],
                "n": sum(ns),
            }
    return table


def markdown(table: dict, settings: DemoSettings, timings: dict) -> str:
    arms = list(table)
    lines = ["| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for label, _ in METRICS:
        cells = []
        for arm in arms:
            m = table[arm][label]
            w = m["wilson95"]
            cell = f"{100 * m['pooled']:.1f}% [{100 * w[0]:.0f}, {100 * w[1]:.0f}]"
            if len(m["per_seed"]) > 1:
                t = m["seed_t95"]
                cell += f" seeds [{100 * t[0]:.0f}, {100 * t[1]:.0f}]"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    note = (
        f"\nCell: pooled accuracy [Wilson 95% over all samples]; for RecA and control also the 95% t-interval over "
        f"their {len(settings.seeds)} fine-tuning seeds (seeds [lo, hi]). Before = the pretrained model; "
        f"{settings.samples} generated images per prompt and {settings.renders} real renders per pair "
        f"(understanding, reconstruction), "
        f"6 prompts per group, per seed; RecA / control: {settings.reca_steps} steps each. "
        f"Per-seed values are in report.json.\n"
    )
    stages = ", ".join(f"{k} {v}" for k, v in timings.items())
    return "\n".join(lines) + "\n" + note + "\nStage timings (s): " + stages + "\n"


def picture(out: Path, arms: dict[str, str], path: Path, per_cell: int = 4) -> None:
    """Rows: rare prompts; column groups: before | RecA | control (seed 0), ``per_cell`` samples each."""
    from eval.runner import sample_path, save_png

    prompts = [p for p in eval_prompts() if p.tag == "rare"]
    cell, pad, label_w, head = 32, 2, 120, 18
    width = label_w + len(arms) * (per_cell * (cell + pad) + 8)
    canvas = Image.new("RGB", (width, head + len(prompts) * (cell + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, arm in enumerate(arms):
        draw.text((label_w + j * (per_cell * (cell + pad) + 8), 2), arm, fill=(0, 0, 0))
    for i, p in enumerate(prompts):
        y = head + i * (cell + pad)
        draw.text((4, y + 10), p.prompt, fill=(0, 0, 0))
        for j, run in enumerate(arms.values()):
            for k in range(per_cell):
                with Image.open(sample_path(out / "eval" / run, p.index, k)) as im:
                    canvas.paste(im.convert("RGB"), (label_w + j * (per_cell * (cell + pad) + 8) + k * (cell + pad), y))
    save_png(path, canvas.resize((canvas.width * 3, canvas.height * 3), Image.NEAREST))


# ------------------------------------------------------------------------------ main


def run(out: Path, settings: DemoSettings) -> dict:
    check_guardrails()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    (out / "cache").mkdir(parents=True, exist_ok=True)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    st = out / "stages"
    timings = {}
    t = cached(st / "scorer.json", lambda: {"accuracy": WorldScorer.load_or_train(out / "cache/scorer.pt").accuracy})
    timings["scorer"] = t["seconds"]
    scorer = WorldScorer.load_or_train(out / "cache/scorer.pt")
    enc = cached(
        st / "encoder.json",
        lambda: {"zero_shot_36way": demo_encoder.pretrain(out / "cache/encoder.pt", steps=settings.encoder_steps)},
    )
    timings["encoder"] = enc["seconds"]
    sizes = {"t2i": settings.n_t2i, "i2t": settings.n_i2t, "recon": settings.n_recon}
    data = cached(
        st / "data.json",
        lambda: {k: write_pool(out / "data" / k, k, n) for k, n in sizes.items()} | {"audit": audit_data(out / "data")},
    )
    timings["data"] = data["seconds"]
    tok = cached(
        st / "tokenizer.json", lambda: {"path": str(save_word_tokenizer(world_vocabulary(), out / "cache/tokenizer"))}
    )
    timings["tokenizer"] = tok["seconds"]
    pre = cached(st / "pretrain.json", lambda: train(out / "pretrain", pretrain_config(out, settings)))
    timings["pretrain"] = pre["seconds"]
    before = cached(st / "eval-before.json", lambda: evaluate(out, "before", out / "pretrain/final", settings, scorer))
    results: dict[str, list[dict]] = {"before": [before]}
    for arm in ("reca", "control"):
        results[arm] = []
        for seed in settings.seeds:
            name = f"{arm}-seed{seed}"
            tr = cached(st / f"train-{name}.json", lambda: train(out / name, finetune_config(out, settings, arm, seed)))
            timings[f"train {name}"] = tr["seconds"]
            results[arm].append(
                cached(st / f"eval-{name}.json", lambda: evaluate(out, name, out / name / "final", settings, scorer))
            )
    probes = {}
    seed0 = settings.seeds[0]
    for label, name, ckpt in (
        ("before", "before", out / "pretrain/final"),
        ("RecA", f"reca-seed{seed0}", out / f"reca-seed{seed0}/final"),
        ("control", f"control-seed{seed0}", out / f"control-seed{seed0}/final"),
    ):
        probes[label] = cached(st / f"probe-{name}.json", lambda: probe(out, name, ckpt, settings))["json"]
    from eval.probe import compare as probe_compare
    from eval.probe import load_json
    from eval.probe import plot as probe_plot

    probe_results = {k: load_json(v) for k, v in probes.items()}
    probe_plot(probe_results, out / "probe.png")
    table = summarise(results)
    report = {
        "settings": asdict(settings),
        "scorer_accuracy": t["accuracy"],
        "encoder_zero_shot": enc["zero_shot_36way"],
        "guardrails": data["audit"],
        "table": table,
        "timings": timings,
    }
    atomic_write_json(out / "report.json", report, sort_keys=False)
    md = (
        markdown(table, settings, timings)
        + "\n### Entropy probe (seed 0 checkpoints; probe.png)\n\n"
        + probe_compare(probe_results)
    )
    atomic_write_text(out / "report.md", md)
    picture(
        out,
        {"before": "before", "RecA (seed 0)": f"reca-seed{seed0}", "control (seed 0)": f"control-seed{seed0}"},
        out / "rare_pairs.png",
        per_cell=min(4, settings.samples),
    )
    print(md)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="the reduced run of the test suite (minutes → seconds; numbers meaningless)",
    )
    p.add_argument("--lora", action="store_true", help="RecA and control with LoRA instead of full fine-tuning")
    a = p.parse_args(argv)
    settings = DemoSettings.quick() if a.quick else DemoSettings()
    settings.lora = a.lora
    run(a.out, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
