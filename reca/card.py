"""The model card every ``final/`` gets: a README.md in the Hugging Face Hub's format (YAML front
matter + Markdown), written with ``huggingface_hub.ModelCard`` and ``ModelCardData``."""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from reca.config import Config, active_objectives

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
BASE_KEYS = ("model", "pretrained", "lm")  # adapter args that name the base model (Janus, MetaQuery)


def base_model(cfg: Config) -> str | None:
    """The base model's hub id, when the adapter's args name one (a local folder is no hub id)."""
    for key in BASE_KEYS:
        value = cfg.model.args.get(key)
        if isinstance(value, str) and HUB_ID.match(value) and not Path(value).exists():
            return value
    return None


def evaluations(log_path: Path) -> list[dict]:
    """The log lines of the evaluations during training (``eval.every``), oldest first."""
    if not log_path.is_file():
        return []
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval/overall" in r]


def model_card(cfg: Config, *, resolution: int | None, steps: int, evals: list[dict]) -> ModelCard:
    lora = cfg.lora.enabled
    tags = ["reca", "reconstruction-alignment", "unified-multimodal-model", "text-to-image"]
    data = ModelCardData(
        base_model=base_model(cfg),
        library_name="peft" if lora else "reca",
        license="other",  # a placeholder: set the licence the base model and the data allow
        tags=tags + (["lora"] if lora else []),
    )
    e = cfg.encoder
    if lora:
        trained = f"LoRA rank {cfg.lora.rank}" + (", DoRA" if cfg.lora.use_dora else "")
        trained += f", init {cfg.lora.init}" if cfg.lora.init != "default" else ""
    else:
        trained = f"full fine-tuning of {', '.join(cfg.train.trainable) or 'the adapter default modules'}"
    seen = e.input_size or "its native resolution"
    lines = [
        "# RecA post-training of a unified multimodal model",
        "",
        "Trained with [reca](https://arxiv.org/abs/2509.07295) (Reconstruction Alignment): a frozen semantic encoder "
        "turns each image into dense tokens, and the model is trained to regenerate the image from them.",
        "",
        f"- **Model**: `{cfg.model.adapter}`" + (f", base `{base_model(cfg)}`" if base_model(cfg) else ""),
        f"- **Trained**: {trained}",
        f"- **Steps**: {steps} of {cfg.train.max_steps}, batch {cfg.train.batch_size} per process × "
        f"{cfg.train.grad_accum} accumulation, learning rate {cfg.optim.lr} ({cfg.optim.schedule})",
        f"- **Encoder**: {e.kind} `{e.name}` layer {e.layer}, sees {seen} px; the model generates at "
        f"{resolution or '?'} px (the information bottleneck, RecA §3.3)",
        f"- **EMA**: decay {cfg.train.ema_decay}, weights in `ema/`" if cfg.train.ema_decay else "- **EMA**: off",
        "",
        "## Mixture",
        "",
        "| objective | share | weight | data |",
        "|---|---|---|---|",
    ]
    for name, obj in active_objectives(cfg.objectives).items():
        lines.append(f"| {name} | {obj.share} | {obj.weight} | `{obj.data.path}` |")
    if evals:
        cats = sorted({k.removeprefix("eval/") for r in evals for k in r if k.startswith("eval/")} - {"overall"})
        lines += [
            "",
            "## Evaluation during training",
            "",
            f"`{cfg.eval.prompts}`, scorer `{cfg.eval.scorer}`, {cfg.eval.n_images} images per prompt; accuracy in %.",
            "",
            "| step | " + " | ".join(cats) + " | overall |",
            "|---|" + "---|" * (len(cats) + 1),
        ]
        for r in evals:
            cells = [f"{100 * r[f'eval/{c}']:.1f}" if f"eval/{c}" in r else "-" for c in cats]
            lines.append(f"| {r['step']} | " + " | ".join(cells) + f" | {100 * r['eval/overall']:.1f} |")
    lines += ["", "## Licence", "", "Not set: replace `license: other` with the terms of the base model and data."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
