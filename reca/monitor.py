"""Watching a run while it trains: the evaluation hook and the collapse watch.

RecA's known failure modes show in numbers the loop can read: reconstruction collapses (the model
learns to copy the image through the semantic tokens and the loss falls towards 0), or
text-to-image degrades while the reconstruction loss looks fine. The loop calls an
:class:`Evaluator` every ``eval.every`` steps; the library only defines its shape, the evaluation
suite implements it (``eval.during.TrainingEvaluator``, wired by ``train.py``), so the library never
imports the suite. :class:`CollapseWatch` reads those accuracies and the losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from reca.config import WatchConfig

EVAL_PREFIX = "eval/"


@dataclass
class EvalResult:
    """One evaluation: accuracy per category in [0, 1], their unweighted mean, the images drawn."""

    accuracy: dict[str, float]
    overall: float
    images: list[tuple[str, str, Path]] = field(default_factory=list)  # (category, prompt, image file)

    def metrics(self) -> dict[str, float]:
        return {f"{EVAL_PREFIX}{k}": v for k, v in self.accuracy.items()} | {f"{EVAL_PREFIX}overall": self.overall}


class Evaluator(Protocol):
    def __call__(self, umm: Any, encoder: Any, step: int) -> EvalResult:
        """Generate with ``umm`` as it is at ``step`` (in eval mode, no grad) and score the images."""
        ...


class CollapseWatch:
    """Alarms from the losses (``recon`` below ``watch.recon_floor``) and from the evaluation (a
    watched category more than ``watch.max_drop`` points below its first evaluation, at step 0).

    ``good_step`` is the last step known healthy: every check passed, and when ``max_drop`` is on,
    an evaluation ran at that step — so a checkpoint at or before it was verified. Saved with every
    checkpoint (accelerate ``register_for_checkpointing``), so a resumed run keeps its step-0 baseline."""

    def __init__(self, cfg: WatchConfig) -> None:
        self.cfg = cfg
        self.baseline: dict[str, float] = {}
        self.good_step = 0
        self.fired: list[str] = []

    def state_dict(self) -> dict:
        return {"baseline": dict(self.baseline), "good_step": self.good_step, "fired": list(self.fired)}

    def load_state_dict(self, state: dict) -> None:
        self.baseline, self.good_step, self.fired = dict(state["baseline"]), state["good_step"], list(state["fired"])

    def observe(self, step: int, metrics: dict[str, float]) -> list[str]:
        """This step's new alarms (each reason — the loss, or one category — is reported once per run)."""
        alarms: dict[str, str] = {}
        floor = self.cfg.recon_floor
        if floor > 0 and "recon" in metrics and metrics["recon"] < floor:
            alarms["recon"] = (
                f"reconstruction loss {metrics['recon']:.4f} is below watch.recon_floor={floor} "
                "(the model may be copying its input; lower encoder.input_size or mix in text-to-image)"
            )
        accuracy = {k.removeprefix(EVAL_PREFIX): v for k, v in metrics.items() if k.startswith(EVAL_PREFIX)}
        accuracy.pop("overall", None)
        if accuracy and not self.baseline:
            self.baseline = dict(accuracy)
        if self.cfg.max_drop > 0:
            for cat in self.cfg.categories or sorted(self.baseline):
                if cat in accuracy and cat in self.baseline:
                    drop = 100 * (self.baseline[cat] - accuracy[cat])
                    if drop > self.cfg.max_drop:
                        alarms[cat] = (
                            f"{cat} accuracy {100 * accuracy[cat]:.1f}% is {drop:.1f} points below its step-0 value "
                            f"{100 * self.baseline[cat]:.1f}% (watch.max_drop={self.cfg.max_drop})"
                        )
        if not alarms and (accuracy or self.cfg.max_drop == 0):
            self.good_step = step
        new = {k: m for k, m in alarms.items() if k not in self.fired}
        self.fired += list(new)
        return list(new.values())


def missing_categories(watch: WatchConfig, result: EvalResult) -> list[str]:
    """Watched categories the evaluation does not report (a typo would watch nothing, silently)."""
    return [c for c in watch.categories if c not in result.accuracy]


def wandb_table(result: EvalResult, step: int) -> Any:
    """The evaluation's images as a ``wandb.Table`` (step, category, prompt, image)."""
    import wandb

    rows = [[step, cat, prompt, wandb.Image(str(path))] for cat, prompt, path in result.images]
    return wandb.Table(columns=["step", "category", "prompt", "image"], data=rows)
