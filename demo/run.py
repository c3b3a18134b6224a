"""The demo, end to end: world → scorer → frozen encoder → UMM pretraining on biased captions →
evaluation before → RecA and a control arm (same steps and data, no reconstruction), several seeds
each → evaluation after → report. Every finished stage is cached under ``--out``; a re-run skips it.

    python -m demo [--out runs/demo] [--quick] [--full | --compare] [--split dev]

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
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from demo import encoder as demo_encoder
from demo import report
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
from demo.world import CANONICAL, SPLITS, biased_caption, dense_caption, is_canonical, pairs, render
from reca.config import Config, ConfigError, derive, load_config, validate
from reca.io import atomic_dir, atomic_write_json, atomic_write_text
from reca.models.tokenizer import save_word_tokenizer

INSTRUCTION = "Reconstruct this image."
CURVE_EVERY = 200  # steps between the points of the curves, with --compare
I2T_PROMPT = "Describe the image."  # demo/config.yaml objectives.i2t_prompt


@dataclass
class DemoSettings:
    n_t2i: int = 6_000
    n_i2t: int = 12_000
    n_recon: int = 12_000
    # 1,200 steps: the generator then draws canonical pairs right 78-87 % of the time (docs/demo.md).
    # Understanding is learnt long before, so a quarter of the batch is image-to-text: the same 48
    # text-to-image samples a step as a 48 + 48 batch, 15% faster.
    pretrain_steps: int = 1200
    pretrain_batch: int = 64
    pretrain_shares: dict = field(default_factory=lambda: {"recon": 0.0, "t2i": 0.75, "i2t": 0.25})
    # 1,200 steps: the first ~200 steps of RecA break canonical prompts (their colour+shape fell
    # from ~90 % to ~30 % on the dev side), the rest of the run rebuilds them while rare prompts
    # rise (docs/demo.md, "How long RecA must run"); 200 or 400 steps stopped inside that dip, and
    # 1,000 left some seeds at its end on some CPUs (better on the dev side at 1,200 on two CPU types).
    reca_steps: int = 1200
    reca_batch: int = 40
    # 32 reconstruction + 8 image-to-text samples a step (recon : i2t : t2i = 4 : 1 : 0). Harmon's
    # mixture is 2 : 2 : 0 (`repeat = [2, 2, 0]` in the official RecA repository's
    # Harmon/configs/datasets/qwen2_5_1_5b/image2text_recon_mid.py); a smaller image-to-text share kept
    # understanding and the result on the dev side at 0.7x the step time (docs/demo.md).
    reca_shares: dict = field(default_factory=lambda: {"recon": 0.8, "t2i": 0.0, "i2t": 0.2})
    reca_lr: float = 5e-4
    reca_schedule: str = "cosine"  # 5% warmup then cosine, as Harmon (Harmon/configs/examples/reca.py)
    # Which parts fine-tuning trains (full fine-tuning): empty = all that pretraining trained.
    reca_trainable: tuple = ()
    # The reconstruction condition in the form of a text prompt's: the pooled image embedding alone
    # (objectives.recon.keep_tokens = 1), no instruction (instruction_dropout = 1). A text prompt
    # reaches the LM as one embedding of the same space; with the 16 patch tokens and an
    # instruction, RecA teaches the LM a form text prompts never take (docs/demo.md).
    keep_tokens: int = 1
    instruction_dropout: float = 1.0
    feature_noise: float = 0.0  # objectives.recon.feature_noise (LAFITE)
    ema_decay: float = 0.0  # train.ema_decay; the evaluation then reads the EMA weights
    lora_rank: int = 16
    lora_lr: float = 2e-3  # 4x the full rate; chosen on the dev side among 1e-3 to 8e-3 (docs/demo.md)
    lora_targets: tuple = ()  # empty = the adapter's default LoRA targets
    # Evaluation during fine-tuning every N steps (eval.every), for the curves; 0 = off. `make demo`
    # leaves them off (about 8 % of its time); `--compare` draws them every CURVE_EVERY steps.
    curve_every: int = 0
    curve_images: int = 4  # images per prompt at each point of the curves
    seeds: tuple = (0, 1, 2)
    split: str = "test"  # the side of the rare pairs the evaluation scores (demo.world.SPLITS)
    samples: int = 16  # generated images per prompt and seed
    renders: int = 8  # real renders per pair for understanding and reconstruction
    guidance: float = 3.0
    sample_steps: int = 10  # x0-prediction: 8, 12 and 20 steps score alike
    encoder_steps: int = 400
    encoder_align: float = 1.0  # demo.encoder.pretrain's alignment term (docs/demo.md, "The encoder")
    # LoRA (True) or full fine-tuning. LoRA is the default: on the dev side of two CPU types it tied full
    # fine-tuning on rare pairs and kept canonical prompts 4-6 points higher, at the same cost per step
    # (docs/demo.md, "LoRA beside full fine-tuning"); and LoRA on an in-house UMM is the common case.
    lora: bool = True

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
            curve_every=2,
            seeds=(0, 1, 2),
            samples=2,
            renders=2,
            sample_steps=2,
            encoder_steps=5,
        )


def cached(path: Path, make: Callable[[], dict], key: dict | None = None) -> dict:
    """Run a stage once; its result JSON is written atomically after the stage has finished.
    ``key`` is what the stage was made from (a config, the settings it reads): a stage cached
    from another key is refused, never silently reused."""
    from reca.trainer import config_changes

    key = json.loads(json.dumps(key if key is not None else {}, default=str))
    if path.is_file():
        result = json.loads(path.read_text())
        if changes := config_changes(result.get("key", {}), key):
            raise ConfigError(
                f"{path} was made with other settings ({', '.join(c.strip() for c in changes)[:300]}); "
                f"use a fresh --out, or delete {path.parent.parent} to start over"
            )
        return result
    started = time.time()
    result = make() | {"seconds": round(time.time() - started, 1), "key": key}
    atomic_write_json(path, result, sort_keys=False)
    return result


def config_key(cfg: Config, out: Path) -> dict:
    """A training stage's key: its whole config, with the run folder's own path written ``<out>``
    (a moved run folder stays valid)."""
    from reca.config import to_dict

    return json.loads(json.dumps(to_dict(cfg)).replace(json.dumps(str(out))[1:-1], "<out>"))


def eval_key(s: "DemoSettings", checkpoint: Path) -> dict:
    """An evaluation stage's key: what it generates and scores, and from which weights. ``lora``
    is whether those weights are a LoRA adapter, not the setting: the pretrained model's records
    are the same whichever arm follows it."""
    fields = ("split", "samples", "renders", "guidance", "sample_steps", "keep_tokens", "instruction_dropout")
    return {f: getattr(s, f) for f in fields} | {
        "lora": eval_weights(checkpoint, s.lora)[1],
        "checkpoint": checkpoint.name if checkpoint.name != "final" else checkpoint.parent.name,
    }


def probe_key(s: "DemoSettings", checkpoint: Path) -> dict:
    """The entropy probe's key: it reads all 36 pairs whatever the side, so the side is not in it
    (a dev run after a test run reuses the probes)."""
    return {k: v for k, v in eval_key(s, checkpoint).items() if k in ("lora", "checkpoint")} | {
        "resamples": probe_resamples(s)
    }


def probe_resamples(s: "DemoSettings") -> int:
    return 200 if s.samples < 8 else 1000


def side_suffix(split: str) -> str:
    """File names of a side's report: ``report.md`` for the test side, ``report-dev.md`` for the
    dev side, so choosing settings never overwrites the result."""
    return "" if split == "test" else f"-{split}"


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
    evaluator = None
    if cfg.eval.every:  # the curves: evaluation during training, as train.py wires it
        from eval.during import TrainingEvaluator

        evaluator = TrainingEvaluator(cfg)
    metrics = fit(cfg, evaluator=evaluator)
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
    cfg = derive(
        cfg,
        objectives={
            "recon": {
                "keep_tokens": s.keep_tokens,
                "instruction_dropout": s.instruction_dropout,
                "feature_noise": s.feature_noise,
            }
        },
        train={"ema_decay": s.ema_decay},
    )
    if s.reca_trainable:
        cfg = derive(cfg, train={"trainable": list(s.reca_trainable)})
    if s.curve_every:  # the evaluation during training (eval/during.py), on this side's prompts
        cfg = derive(
            cfg,
            # it samples with train.sample_steps / guidance_scale: the final evaluation's, so that the
            # curves differ from the table only in their images (fewer, other seeds)
            train={"sample_steps": s.sample_steps, "guidance_scale": s.guidance},
            eval={
                "every": s.curve_every,
                "prompts": str(write_prompts(out / "cache" / f"prompts-{s.split}.jsonl", s.split)),
                "scorer": "demo.scorer:load",
                "scorer_args": {"path": str(out / "cache/scorer.pt")},
                "n_images": s.curve_images,
                "seed": EVAL_SAMPLE_SEED[s.split] + 1,  # not the final evaluation's images
                "batch_size": 64,
            },
        )
    if s.lora:
        cfg = with_lora(cfg, s)
    validate(cfg)
    return cfg


def variant_of(s: DemoSettings) -> str:
    """The name of the fine-tuning ``s`` runs, as its runs' folders carry it."""
    return "lora" if s.lora else "full"


def run_name(variant: str, arm: str, seed: int) -> str:
    """A fine-tuning run's folder under ``--out`` (and the name of its stage records)."""
    return f"{variant}-{arm}-seed{seed}"


def with_lora(cfg: Config, s: DemoSettings) -> Config:
    """``cfg`` fine-tuning through a LoRA adapter as the demo's LoRA arm does: only the adapter trains."""
    lora = {"enabled": True, "rank": s.lora_rank, "alpha": 2 * s.lora_rank, "target_modules": list(s.lora_targets)}
    return derive(cfg, lora=lora, optim={"lr": float(s.lora_lr or s.reca_lr)}, train={"trainable": []})


# ------------------------------------------------------------------------------ evaluation


def eval_weights(checkpoint: Path, lora: bool) -> tuple[Path, bool]:
    """(the folder evaluation reads, whether it is a LoRA adapter) for a run's ``checkpoint``: its
    EMA weights (``final/ema``) when it was trained with EMA; an adapter only for a LoRA run."""
    if (checkpoint / "ema").is_dir():
        checkpoint = checkpoint / "ema"
    return checkpoint, lora and (checkpoint / "adapter_config.json").is_file()


def eval_config(out: Path, checkpoint: Path, lora: bool) -> tuple[Config, Path | None]:
    """(config, checkpoint) for ``reca.build.load_trained``: a LoRA result is loaded onto the
    pretrained model; a full model (``save_pretrained`` folder) is the config's starting point."""
    weights, adapter = eval_weights(checkpoint, lora)
    if adapter:
        return with_pretrained(base_config(out), out / "pretrain/final"), weights
    return with_pretrained(base_config(out), weights), None


def eval_prompts(split: str):
    """The generation prompts of one side of the split: its rare pairs, then the six canonical
    pairs (shared by both sides, which differ in their sample seeds)."""
    from eval.prompts import Prompt

    items = [("rare", s, c) for s, c in pairs(split)] + [("canonical", s, c) for s, c in pairs("canonical")]
    return [
        Prompt(
            index=i, prompt=f"a {c} {s}", tag=tag, include=[{"class": s, "count": 1, "color": c}], exclude=[], extra={}
        )
        for i, (tag, s, c) in enumerate(items)
    ]


def write_prompts(path: Path, split: str) -> Path:
    """:func:`eval_prompts` as a GenEval-schema file, for ``eval.prompts``."""
    rows = [{"tag": p.tag, "include": p.include, "prompt": p.prompt} for p in eval_prompts(split)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:  # never an older version's prompts
        atomic_write_text(path, text)
    return path


def evaluate(out: Path, name: str, checkpoint: Path, s: DemoSettings, scorer: WorldScorer) -> dict:
    """Generation (through eval.runner + eval.report), understanding and reconstruction."""
    from eval.report import score_run
    from eval.runner import describe_model, generate
    from reca.build import load_trained

    adapter, encoder = load_trained(*eval_config(out, checkpoint, s.lora))
    run_dir = out / "eval" / s.split / name  # one folder per side: a dev run never meets a test run's images
    generate(
        adapter,
        eval_prompts(s.split),
        run_dir,
        n_images=s.samples,
        seed=EVAL_SAMPLE_SEED[s.split],
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
            "per_prompt": {
                p: {
                    k: sum(r[f] for r in tagged if r["prompt"] == p)
                    for k, f in (("colour", "colour_ok"), ("both", "correct"))
                }
                | {"n": sum(r["prompt"] == p for r in tagged)}
                for p in dict.fromkeys(r["prompt"] for r in tagged)
            },
        }
    und = {}
    captions = [dense_caption(sh, c) for sh, c in pairs("all")]
    for tag in ("rare", "canonical"):
        group = pairs(s.split) if tag == "rare" else pairs("canonical")
        items = [
            (sh, c, seed) for k, (sh, c) in enumerate(group) for seed in understanding_seeds(s.split, tag, k, s.renders)
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
            _recon_condition(rare_sem, s),
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


def _recon_condition(sem: torch.Tensor, s: DemoSettings):
    """Reconstruction in the form fine-tuning trained it: the first ``keep_tokens`` tokens, and no
    instruction when instructions were always dropped."""
    from reca.adapter import Condition

    sem = sem[:, : s.keep_tokens] if s.keep_tokens else sem
    instruction = "" if s.instruction_dropout >= 1 else INSTRUCTION
    return Condition(semantic=sem, instructions=[instruction] * len(sem))


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
    result = analyse(encoding, response, drop_first=1, n_resamples=probe_resamples(s))
    save_json(result, out / "probe" / f"{name}.json")
    return {"json": str(out / "probe" / f"{name}.json")}


# ------------------------------------------------------------------------------ main


def scorer_stage(out: Path, threads: int) -> dict:
    """The world scorer, a cached stage (it needs nothing else, so it can run in a worker process)."""
    torch.set_num_threads(threads)
    path = out / "cache/scorer.pt"
    return cached(out / "stages/scorer.json", lambda: {"accuracy": WorldScorer.load_or_train(path).accuracy})


def free_cores(sample_s: float = 0.5) -> int:
    """Cores that other processes leave idle, measured over ``sample_s`` (psutil.cpu_percent).
    torch on as many threads as cores runs ~3x slower when another process holds one of them
    (docs/demo.md, "Time"); on the free cores only, it loses just that core."""
    import psutil

    cores = os.cpu_count() or 1
    busy = psutil.cpu_percent(interval=sample_s) / 100 * cores
    return max(1, min(cores, round(cores - busy)))


def prepare(out: Path, s: DemoSettings, threads: int) -> dict:
    """Scorer, frozen encoder, data pools, tokenizer, pretrained UMM: each a cached stage, on
    ``threads`` cores. The scorer trains in a second process while this one makes the encoder,
    data and tokenizer, one core each (they need nothing from each other); pretraining then has
    all ``threads``."""
    st = out / "stages"
    side_by_side = threads > 1 and not (st / "scorer.json").is_file()
    pool = spawn_pool(1) if side_by_side else None
    try:
        job = pool.submit(scorer_stage, out, 1) if pool else None
        torch.set_num_threads(threads - 1 if side_by_side else threads)
        enc, data, tok = _encoder_data_tokenizer(out, s)
        scorer = job.result() if job else scorer_stage(out, threads)
    finally:
        if pool:
            pool.shutdown()
    torch.set_num_threads(threads)
    pre_cfg = pretrain_config(out, s)
    pre = cached(
        st / "pretrain.json",
        lambda: train(out / "pretrain", pre_cfg),
        config_key(pre_cfg, out) | encoder_key(s) | data_sizes(s),
    )
    stages = {"scorer": scorer, "encoder": enc, "data": data, "tokenizer": tok, "pretrain": pre}
    return {"stages": stages, "timings": {k: v["seconds"] for k, v in stages.items()}}


def encoder_key(s: DemoSettings) -> dict:
    return {"encoder_steps": s.encoder_steps, "encoder_align": s.encoder_align}


def data_sizes(s: DemoSettings) -> dict:
    return {"t2i": s.n_t2i, "i2t": s.n_i2t, "recon": s.n_recon}


def _encoder_data_tokenizer(out: Path, s: DemoSettings) -> tuple[dict, dict, dict]:
    st = out / "stages"
    enc = cached(
        st / "encoder.json",
        lambda: {
            "zero_shot_36way": demo_encoder.pretrain(
                out / "cache/encoder.pt", steps=s.encoder_steps, align=s.encoder_align
            )
        },
        encoder_key(s),
    )
    sizes = data_sizes(s)
    data = cached(
        st / "data.json",
        lambda: {k: write_pool(out / "data" / k, k, n) for k, n in sizes.items()} | {"audit": audit_data(out / "data")},
        sizes,
    )
    tok = cached(
        st / "tokenizer.json", lambda: {"path": str(save_word_tokenizer(world_vocabulary(), out / "cache/tokenizer"))}
    )
    return enc, data, tok


def ablation_dir(out: Path, tag: str) -> Path:
    """Where an ablation's runs, stage records and summary live (scripts/demo_ablation.py)."""
    return out / "ablations" / tag


def arm_job(out: Path, s: DemoSettings, variant: str, arm: str, seed: int, threads: int, tag: str = "") -> dict:
    """One fine-tuning run and its evaluation, each a cached stage; runs in a worker process. With
    an ablation ``tag`` (scripts/demo_ablation.py) the run and its stage records live under
    ``out/ablations/<tag>`` and its images under ``eval/<split>/ablation-<tag>-…``, apart from the
    demo's own runs."""
    torch.set_num_threads(threads)
    name = run_name(variant, arm, seed)
    home = ablation_dir(out, tag) if tag else out
    cfg = finetune_config(out, s, arm, seed)
    tr = cached(home / "stages" / f"train-{name}.json", lambda: train(home / name, cfg), config_key(cfg, out))
    checkpoint = home / name / "final"
    scorer = WorldScorer.load_or_train(out / "cache/scorer.pt")
    label = f"ablation-{tag}-{name}" if tag else name
    ev = cached(
        home / "stages" / f"eval-{s.split}-{name}.json",
        lambda: evaluate(out, label, checkpoint, s, scorer),
        eval_key(s, checkpoint),
    )
    return {"name": name, "train": tr, "eval": ev}


def exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """Worker initializer: end this process once ``parent`` is gone. A parent ended by SIGTERM or
    SIGKILL never shuts its pool down, and its spawn workers would otherwise train to the end of
    their job as orphans, holding the cores (Ctrl-C reaches the whole process group, kill does not)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def spawn_pool(workers: int):
    """A process pool whose workers are fresh interpreters (spawn): no state forked from this one,
    and none outliving this process (``exit_with_parent``)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=exit_with_parent, initargs=(os.getpid(),))


def map_side_by_side(fn: Callable, arglists: list[tuple], workers: int) -> list:
    """``fn(*args)`` for each tuple of ``arglists``, in order: in this process for one worker,
    else in a spawn pool of ``workers`` processes."""
    if workers == 1:
        return [fn(*args) for args in arglists]
    with spawn_pool(workers) as pool:
        return list(pool.map(fn, *zip(*arglists)))


def workers_for(jobs: int, cores: int | None = None) -> tuple[int, int]:
    """(processes, torch threads each) for ``jobs`` independent runs. Small models barely gain from
    a second thread (one thread is 1.22-1.34x slower than two for this world's steps,
    ``scripts/bench_demo_step.py --compare threads``, 2-core CPU), so runs go side by side on one
    thread each rather than one after another on all cores."""
    cores = cores or os.cpu_count() or 1
    n = max(1, min(jobs, cores))
    return n, max(1, cores // n)


def run(out: Path, settings: DemoSettings, variants: tuple[str, ...] | None = None) -> dict:
    """The demo: ``variants`` are "full" (full fine-tuning) and/or "lora", each a RecA arm and its
    control over ``settings.seeds``, all evaluated on ``settings.split``; by default the one
    ``settings.lora`` names."""
    variants = variants or (variant_of(settings),)
    check_guardrails()
    free = free_cores()  # before this process starts anything
    torch.set_num_threads(free)
    for sub in ("cache", "stages"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    st, split = out / "stages", settings.split
    prep = prepare(out, settings, free)
    prep["cores"] = {"cpu_count": os.cpu_count() or 1, "free_at_start": free}
    timings = dict(prep["timings"])
    scorer = WorldScorer.load_or_train(out / "cache/scorer.pt")
    before = cached(
        st / f"eval-{split}-before.json",
        lambda: evaluate(out, "before", out / "pretrain/final", settings, scorer),
        eval_key(settings, out / "pretrain/final"),
    )
    timings["eval before"] = before["seconds"]
    results: dict[str, list[dict]] = {"before": [before]}
    runs: dict[str, list[Path]] = {}
    jobs = []
    for variant in variants:
        s = replace(settings, lora=variant == "lora")
        for arm in ("reca", "control"):
            label = ("RecA" if arm == "reca" else "control") + (f" {variant}" if len(variants) > 1 else "")
            results[label], runs[label] = [], []
            jobs += [(label, (out, s, variant, arm, seed)) for seed in s.seeds]
    # all cores, even when one is busy: two runs side by side on one thread each then share the
    # cores with the other process (~1.5x slower each), which still beats one run at a time (2x)
    n, threads = workers_for(len(jobs))
    # a re-run reads finished runs from their records: its wall time is not what they cost
    names = [run_name(variant, arm, seed) for _, (_, _, variant, arm, seed) in jobs]
    all_cached = all((st / f"train-{r}.json").is_file() and (st / f"eval-{split}-{r}.json").is_file() for r in names)
    started = time.time()
    done = map_side_by_side(arm_job, [(*args, threads) for _, args in jobs], n)
    stage = f"fine-tuning and evaluation, {len(jobs)} runs on {n} worker(s) × {threads} thread(s)"
    timings[stage + (" (all read from their records)" if all_cached else "")] = round(time.time() - started, 1)
    for (label, args), job in zip(jobs, done):
        timings[f"train {job['name']}"] = job["train"]["seconds"]
        timings[f"eval {job['name']}"] = job["eval"]["seconds"]
        results[label].append(job["eval"])
        runs[label].append(out / job["name"])
    torch.set_num_threads(free)
    first, seed0 = variants[0], settings.seeds[0]
    probes = {}
    for label, name, ckpt in (
        ("before", "before", out / "pretrain/final"),
        ("RecA", run_name(first, "reca", seed0), out / run_name(first, "reca", seed0) / "final"),
        ("control", run_name(first, "control", seed0), out / run_name(first, "control", seed0) / "final"),
    ):
        s = replace(settings, lora=first == "lora")
        record = st / f"entropy-{name}.json"  # not the earlier "probe-…" records, whose keys named the side
        probes[label] = cached(record, lambda: probe(out, name, ckpt, s), probe_key(s, ckpt))["json"]
    return write_report(out, settings, variants, results, runs, probes, prep, timings)


def write_report(out, settings, variants, results, runs, probes, prep, timings) -> dict:
    from eval.probe import compare as probe_compare
    from eval.probe import load_json
    from eval.probe import plot as probe_plot

    probe_results = {k: load_json(v) for k, v in probes.items()}
    probe_plot(probe_results, out / "probe.png")
    table = report.summarise(results)
    side = side_suffix(settings.split)
    images = {"rare": len(pairs(settings.split)), "canonical": len(pairs("canonical"))}
    has_curves = report.curves(
        runs,
        out / f"curves{side}.png",
        f"{settings.split} side, evaluation during fine-tuning ({settings.curve_images} images a prompt; "
        "bands: Wilson 95 % over all seeds' images)",
        {tag: n * settings.curve_images for tag, n in images.items()},
    )
    stages = prep["stages"]
    summary = {
        "settings": asdict(settings),
        "variants": list(variants),
        "split": {"side": settings.split, "rare_pairs": [f"a {c} {sh}" for sh, c in pairs(settings.split)]},
        "scorer_accuracy": stages["scorer"]["accuracy"],
        "encoder_zero_shot": stages["encoder"]["zero_shot_36way"],
        "guardrails": stages["data"]["audit"],
        "table": table,
        "per_pair": report.per_pair(results),
        "timings": timings,
        "cores": prep["cores"],
    }
    atomic_write_json(out / f"report{side}.json", summary, sort_keys=False)
    s = settings
    note = (
        f"Side: **{s.split}** ({len(pairs(s.split))} rare pairs, {s.samples} images each per seed; the 6 canonical "
        f"pairs, {s.samples} images each). Cell: pooled accuracy [Wilson 95% over all samples]; over several seeds "
        f"also the 95% t-interval of the per-seed values (seeds [lo, hi]). Before = the pretrained model; RecA and "
        f"control: {s.reca_steps} steps each, seeds {list(s.seeds)}; understanding and reconstruction on "
        f"{s.renders} real renders per pair. Per-seed values: report{side}.json."
    )
    md = (
        f"## The demo ({settings.split} side)\n\n"
        + report.markdown(table, note)
        + "\n### Every rare pair of this side, and per shape\n\n"
        + report.per_pair_markdown(results)
        + (f"\n![curves](curves{side}.png)\n" if has_curves else "")
        + "\n### Entropy probe (seed-0 checkpoints; probe.png)\n\n"
        + probe_compare(probe_results)
        + f"\nCores: {prep['cores']['cpu_count']}, free at start {prep['cores']['free_at_start']}. Stage timings (s): "
        + ", ".join(f"{k} {v}" for k, v in timings.items())
        + "\n"
    )
    atomic_write_text(out / f"report{side}.md", md)
    seed0 = settings.seeds[0]
    images = out / "eval" / settings.split
    columns = {"before": images / "before"}
    for variant in variants:
        suffix = f" {variant}" if len(variants) > 1 else ""
        columns[f"RecA{suffix} (seed {seed0})"] = images / run_name(variant, "reca", seed0)
        columns[f"control{suffix} (seed {seed0})"] = images / run_name(variant, "control", seed0)
    headline = {f"a {c} {sh}" for sh, c in pairs("headline")}
    prompts = [p for p in eval_prompts(settings.split) if p.prompt in headline] or [
        p for p in eval_prompts(settings.split) if p.tag == "rare"
    ][:6]
    report.picture(columns, prompts, out / f"rare_pairs{side}.png", per_cell=min(4, settings.samples))
    print(md)
    return summary


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
    how = p.add_mutually_exclusive_group()
    how.add_argument("--full", action="store_true", help="RecA and control with full fine-tuning instead of LoRA")
    how.add_argument(
        "--compare",
        action="store_true",
        help="the wider comparison: full fine-tuning and LoRA side by side, with curves over fine-tuning steps",
    )
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="test",
        help="the side of the rare pairs to score: dev for choosing settings, test (default) for the result",
    )
    a = p.parse_args(argv)
    settings = DemoSettings.quick() if a.quick else DemoSettings()
    settings = replace(settings, split=a.split, lora=not a.full)
    if a.compare and not a.quick:
        settings = replace(settings, curve_every=CURVE_EVERY)
    variants = ("full", "lora") if a.compare else None
    try:
        run(a.out, settings, variants)
    except ConfigError as e:  # bad input: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
