"""``reca-eval``: generate → score → compare, plus the understanding-vs-generation gap.

    reca-eval prompts  --prompts builtin
    reca-eval generate --config configs/tiny.yaml [--checkpoint runs/tiny/final] --prompts builtin \\
                       --out runs/eval/after --n 4 --seed 0 [--guidance 3 --steps 20] [key=value ...]
    reca-eval score    --run runs/eval/after --scorer clip --clip-model ViT-L-14 --clip-pretrained openai
    reca-eval score    --run runs/eval/after --scorer vqa --config CFG [--checkpoint DIR]
    reca-eval score    --run runs/eval/dpg --scorer hf-vqa --vqa-model DIR   (a run of --prompts dpg_bench.csv)
    reca-eval score    --run runs/eval/after --scorer my_pkg.scorers:MyScorer --scorer-arg key=value
    reca-eval compare  --before runs/eval/before --after runs/eval/after --out runs/eval/compare
    reca-eval gap      --labels labels.jsonl --generation runs/eval/after --config CFG [--checkpoint DIR]

Models are loaded with reca's own config loader and ``reca.build.load_trained`` (imported only when
needed, so the scoring and comparison commands work without any model code). Errors print one line
and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from eval.prompts import EvalError, load_prompts, prompt_source_files

log = logging.getLogger("reca-eval")


# --------------------------------------------------------------------------- model building


def model_from_args(args: argparse.Namespace, device: str) -> tuple[str, Any, Any, Any]:
    """(config path, cfg, adapter, encoder) for ``--config`` (default: the config ``--checkpoint``
    stores, ``reca.build.checkpoint_config``) with the dotted overrides, and ``--checkpoint`` loaded
    on top by ``reca.build.load_trained``, in eval mode on ``device``."""
    from reca.build import checkpoint_config, load_trained
    from reca.config import load_config

    if args.config:
        config = str(args.config)
    elif args.checkpoint:
        config = str(checkpoint_config(args.checkpoint))
    else:
        raise EvalError("--config is required (or a --checkpoint holding its config.json)")
    cfg = load_config(config, list(args.overrides))
    adapter, encoder = load_trained(cfg, args.checkpoint, device, weights=args.weights)
    return config, cfg, adapter, encoder


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _kv(items: Sequence[str], flag: str) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON when they are JSON (numbers, bools, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EvalError(f"{flag} {item}: expected key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# --------------------------------------------------------------------------- commands


def cmd_prompts(args: argparse.Namespace) -> int:
    prompts = load_prompts(args.prompts)
    counts = Counter(p.tag for p in prompts)
    for tag in sorted(counts):
        print(f"{tag}\t{counts[tag]}")
    print(f"total\t{len(prompts)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from eval.runner import describe_model, generate
    from reca.config import to_dict
    from reca.io import sha256_file

    prompts = load_prompts(args.prompts)
    config, cfg, adapter, _ = model_from_args(args, args.device or _default_device())
    info = describe_model(
        adapter,
        args.checkpoint,
        config=config,
        config_sha256=sha256_file(config),
        overrides=list(args.overrides),
        weights=args.weights,
        resolved_config=to_dict(cfg),
    )
    files = [f for f in prompt_source_files(args.prompts) if f.is_file()]
    source = {"spec": str(args.prompts), "files": {str(f): sha256_file(f) for f in files}}
    guidance = args.guidance if args.guidance is not None else cfg.train.guidance_scale
    steps = args.steps if args.steps is not None else cfg.train.sample_steps
    with torch.inference_mode():
        stats = generate(
            adapter,
            prompts,
            args.out,
            n_images=args.n,
            seed=args.seed,
            guidance_scale=guidance,
            num_steps=steps,
            batch_size=args.batch_size,
            model_info=info,
            prompts_source=source,
            progress=lambda msg: log.info(msg),
        )
    print(f"{args.out}: {stats.written} images written, {stats.skipped} already there ({stats.prompts} prompts)")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from eval.report import log_wandb, score_run
    from eval.scorers import build_scorer

    kwargs = _kv(args.scorer_arg, "--scorer-arg")
    device = args.device or _default_device()
    if args.scorer == "clip":
        kwargs = {
            "name": args.clip_model,
            "pretrained": args.clip_pretrained,
            "device": device,
            "mask_background": args.mask_background,
            **kwargs,
        }
    elif args.scorer == "vqa":
        _, _, adapter, encoder = model_from_args(args, device)
        kwargs = {"adapter": adapter, "encoder": encoder, **kwargs}
    elif args.scorer == "hf-vqa":
        if not args.vqa_model:
            raise EvalError("--scorer hf-vqa needs --vqa-model (a BLIP VQA dir or cached hub id)")
        kwargs = {"path": args.vqa_model, "device": device, **kwargs}
    scorer = build_scorer(args.scorer, **kwargs)
    results = score_run(args.run, scorer, out_dir=args.out, n_boot=args.bootstrap, seed=args.seed)
    if args.wandb:
        import wandb

        run = wandb.init(
            project=args.wandb_project, job_type="eval", config={"run": str(args.run), "scorer": scorer.name}
        )
        log_wandb(results, run)
        run.finish()
    for tag, c in results["categories"].items():
        print(f"{tag}\t{100 * c['accuracy']:.1f}\t[{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}]")
    for tag, c in results.get("unverified", {}).items():
        print(f"{tag}\tunverified ({c['n_images']} images this scorer cannot check; not in overall)")
    o = results["overall"]
    print(f"overall\t{100 * o['accuracy']:.1f}\t[{100 * o['ci95'][0]:.1f}, {100 * o['ci95'][1]:.1f}]")
    if "dpg" in results:
        d = results["dpg"]
        for name, c in [*d["categories"].items(), ("overall", d["overall"])]:
            print(f"dpg {name}\t{100 * c['score']:.1f}\t[{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}]")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from eval.report import compare

    result = compare(
        args.before,
        args.after,
        args.out,
        scorer=args.scorer,
        n_boot=args.bootstrap,
        seed=args.seed,
        grids=not args.no_grids,
    )
    for tag, c in result["categories"].items():
        print(f"{tag}\t{100 * c['before']:.1f} → {100 * c['after']:.1f}\t{100 * c['delta']:+.1f}")
    print(f"summary: {Path(args.out) / 'compare.md'}")
    return 0


def cmd_gap(args: argparse.Namespace) -> int:
    from eval.report import understanding_gap
    from eval.scorers import VQAScorer

    _, _, adapter, encoder = model_from_args(args, args.device or _default_device())
    result = understanding_gap(
        args.labels,
        VQAScorer(adapter, encoder),
        args.generation,
        out_dir=args.out,
        n_boot=args.bootstrap,
        seed=args.seed,
    )
    for cat, c in result["categories"].items():
        u = "-" if c["understanding"] is None else f"{100 * c['understanding']:.1f}"
        g = "-" if c["generation"] is None else f"{100 * c['generation']:.1f}"
        print(f"{cat}\tunderstanding {u}\tgeneration {g}")
    return 0


# --------------------------------------------------------------------------- parser


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reca-eval", description="attribute-binding evaluation for unified multimodal models"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="reca YAML config (default: <checkpoint>/config.json)")
        sp.add_argument("--checkpoint", help="trained checkpoint dir (LoRA adapter or full model.safetensors)")
        sp.add_argument("--device", help="cuda or cpu (default: cuda when available)")
        sp.add_argument(
            "--weights",
            choices=("raw", "ema"),
            default="raw",
            help="the trained weights or their EMA (<checkpoint>/ema)",
        )
        sp.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.dtype=bfloat16")

    def stats_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for CIs")
        sp.add_argument("--seed", type=int, default=0, help="bootstrap seed")

    sp = sub.add_parser("prompts", help="list a prompt set's categories and sizes")
    sp.add_argument(
        "--prompts", default="builtin", help="builtin, a GenEval .jsonl, a T2I-CompBench .txt or dir, a DPG-Bench .csv"
    )
    sp.set_defaults(func=cmd_prompts)

    sp = sub.add_parser("generate", help="draw N images per prompt in GenEval's folder layout (resumable)")
    sp.add_argument(
        "--prompts", default="builtin", help="builtin, a GenEval .jsonl, a T2I-CompBench .txt or dir, a DPG-Bench .csv"
    )
    sp.add_argument("--out", required=True, help="run directory")
    sp.add_argument("--n", type=int, default=4, help="images per prompt (GenEval: 4, RecA paper: 12)")
    sp.add_argument("--seed", type=int, default=0, help="base seed; image seeds derive from (seed, prompt, image)")
    sp.add_argument("--guidance", type=float, help="classifier-free guidance (default: train.guidance_scale)")
    sp.add_argument("--steps", type=int, help="sampling steps (default: train.sample_steps)")
    sp.add_argument("--batch-size", type=int, default=8, help="images per generate() call")
    model_args(sp)
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser(
        "score", help="score a run; writes <run>/scores/<scorer>/{scores.jsonl,results.json,results.md}"
    )
    sp.add_argument("--run", required=True, help="run directory (GenEval layout)")
    sp.add_argument("--scorer", required=True, help="clip, vqa, hf-vqa, palette or package.module:Factory")
    sp.add_argument("--vqa-model", help="hf-vqa: BlipForQuestionAnswering dir or cached hub id")
    sp.add_argument(
        "--scorer-arg", action="append", default=[], help="key=value passed to the scorer factory (repeatable)"
    )
    sp.add_argument("--clip-model", default="ViT-L-14", help="open_clip model name (GenEval: ViT-L-14)")
    sp.add_argument("--clip-pretrained", default="openai", help="open_clip pretrained tag or local weights file")
    sp.add_argument(
        "--mask-background", action="store_true", help="clip: judge colour on the foreground pasted on #999"
    )
    sp.add_argument("--out", help="output dir (default <run>/scores/<scorer>)")
    sp.add_argument("--wandb", action="store_true", help="log a wandb.Table (offline without an API key)")
    sp.add_argument("--wandb-project", default="reca", help="wandb project")
    stats_args(sp)
    model_args(sp)
    sp.set_defaults(func=cmd_score)

    sp = sub.add_parser("compare", help="before vs after: deltas per category, side-by-side grids, summary")
    sp.add_argument("--before", required=True, help="scored run directory")
    sp.add_argument("--after", required=True, help="scored run directory")
    sp.add_argument("--out", required=True, help="output dir")
    sp.add_argument("--scorer", help="which scorer's results (needed when a run has several)")
    sp.add_argument("--no-grids", action="store_true", help="skip the per-prompt PNGs")
    stats_args(sp)
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("gap", help="understanding (VQA on labelled images) vs generation accuracy per category")
    sp.add_argument("--labels", required=True, help="jsonl: image, color (or attribute), object, category[, wrong]")
    sp.add_argument("--generation", required=True, help="scored run dir or its results.json")
    sp.add_argument("--out", help="output dir for gap.json / gap.md")
    stats_args(sp)
    model_args(sp)
    sp.set_defaults(func=cmd_gap)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (EvalError, FileNotFoundError) as e:
        print(f"reca-eval: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # reca.config.ConfigError is a ValueError with a one-line message
        if any(c.__name__ == "ConfigError" for c in type(e).__mro__):  # and its subclasses (reca.data)
            print(f"reca-eval: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
