"""Evaluation during training: the :class:`reca.monitor.Evaluator` that ``train.py`` hands to
``reca.trainer.fit`` when ``eval.every`` is set.

Each call draws ``eval.n_images`` images per prompt with the model as it is at that step through
the very runner and scorer of ``reca-eval`` (:func:`eval.runner.generate`, :func:`eval.report.score_run`),
into ``<output_dir>/evals/step-N/`` — a run folder ``reca-eval compare`` reads like any other.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from eval.prompts import EvalError, Prompt, load_prompts
from eval.report import score_run
from eval.runner import adapter_import_path, generate, iter_images, load_run
from eval.scorers import Scorer, build_scorer
from reca.config import Config, ConfigError
from reca.monitor import EvalResult

N_BOOT = 200  # bootstrap replicates of the intervals in results.json; the watch reads only accuracies


def select_prompts(spec: str) -> list[Prompt]:
    """``eval.prompts``: a set as ``reca-eval --prompts`` takes it, optionally ``SET:tag,tag`` to
    keep only those categories (``builtin:color_rare,color_canonical``). Indices stay the set's, so
    the folders match a full ``reca-eval generate`` of the same set."""
    source, sep, tags = spec.rpartition(":") if ":" in spec else (spec, "", "")
    try:
        prompts = load_prompts(source)
    except EvalError as e:
        raise ConfigError(f"eval.prompts: {e}") from None
    if not sep:
        return prompts
    wanted = [t.strip() for t in tags.split(",") if t.strip()]
    have = sorted({p.tag for p in prompts})
    if unknown := [t for t in wanted if t not in have]:
        raise ConfigError(f"eval.prompts: {source} has no categories {unknown}; it has {have}")
    return [p for p in prompts if p.tag in wanted]


class TrainingEvaluator:
    """Generate, score, aggregate: ``reca-eval generate`` + ``score`` on the live model."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.prompts = select_prompts(cfg.eval.prompts)
        self.root = Path(cfg.train.output_dir) / "evals"
        self._scorer: Scorer | None = None
        if cfg.eval.scorer != "vqa":  # vqa judges with the live model, so it is rebuilt at each call
            try:
                self._scorer = build_scorer(cfg.eval.scorer, **cfg.eval.scorer_args)
            except (EvalError, TypeError) as e:
                raise ConfigError(f"eval.scorer: {e}") from None

    def scorer(self, umm: Any, encoder: Any) -> Scorer:
        if self._scorer is not None:
            return self._scorer
        return build_scorer("vqa", adapter=umm, encoder=encoder, **self.cfg.eval.scorer_args)

    def __call__(self, umm: Any, encoder: Any, step: int) -> EvalResult:
        e, t = self.cfg.eval, self.cfg.train
        run = self.root / f"step-{step:07d}"
        shutil.rmtree(run, ignore_errors=True)  # images of an earlier, different run must never be reused
        generate(
            umm,
            self.prompts,
            run,
            n_images=e.n_images,
            seed=e.seed,
            guidance_scale=t.guidance_scale,
            num_steps=t.sample_steps,
            batch_size=e.batch_size,
            model_info={"adapter": adapter_import_path(umm), "training_run": t.output_dir, "step": step},
            prompts_source={"spec": e.prompts},
        )
        results = score_run(run, self.scorer(umm, encoder), n_boot=N_BOOT)
        images = [(p.tag, p.prompt, path) for p, path in iter_images(load_run(run))]
        accuracy = {tag: c["accuracy"] for tag, c in results["categories"].items()}
        return EvalResult(accuracy=accuracy, overall=results["overall"]["accuracy"], images=images)
