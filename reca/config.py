"""Typed configuration: one dataclass per component under :class:`Config`, loaded from YAML with
dotted command-line overrides (``optim.lr=1e-5 lora.rank=16``).

Unknown keys, wrong types and contradictory settings fail at start with one line naming the key
(litgpt-style strictness; torchtune's silent ``cfg.get`` typos are the counter-example).
Every field carries its help text in ``metadata["help"]``; ``python train.py --help-config`` prints
them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key and how to fix it."""


def _f(default: Any, help: str) -> Any:
    """A dataclass field with help text (mutable defaults handled)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------- the objectives table


@dataclass(frozen=True)
class Objective:
    """What one objective of the mixture is; the config validation and the training loop read this
    table, so a new objective is one row here (plus its section in :class:`ObjectivesConfig`)."""

    condition: Literal["semantic", "text"]  # what the generation / understanding is conditioned on
    loss: Literal["generation", "understanding"]  # which adapter loss it trains
    needs_captions: bool
    views: tuple[str, ...]  # "target" = pixels at the generation resolution, "enc" = the encoder's input


OBJECTIVES: dict[str, Objective] = {
    # reconstruction: both views — that the two resolutions differ is RecA's bottleneck (paper §3.3)
    "recon": Objective(condition="semantic", loss="generation", needs_captions=False, views=("target", "enc")),
    "t2i": Objective(condition="text", loss="generation", needs_captions=True, views=("target",)),
    "i2t": Objective(condition="semantic", loss="understanding", needs_captions=True, views=("enc",)),
}


# --------------------------------------------------------------------------- sections


@dataclass
class DataSource:
    path: str = _f(
        "",
        "folder of images, a .jsonl/.csv manifest (columns: image path, optional caption), "
        "WebDataset .tar shards (a file, a glob or a brace pattern like shards/train-{000000..000009}.tar; "
        "columns are member extensions), or a dataset name/dir loadable offline by datasets.load_dataset",
    )
    split: str = _f("train", "dataset split (datasets and save_to_disk dicts)")
    image_column: str = _f(
        "image", "image column in manifests and datasets; for .tar shards the image's extension (jpg)"
    )
    caption_column: str = _f(
        "caption",
        "caption column; for .tar shards the caption's extension (txt); empty = none (reconstruction needs none)",
    )
    streaming: bool = _f(False, "stream instead of indexing (datasets IterableDataset), for sets too large to index")
    min_side: int = _f(16, "images whose shorter side is below this are skipped as tiny")
    max_samples: int = _f(0, "use only the first N rows (quick runs); 0 = all")
    allow_outside_root: bool = _f(
        False, "accept manifest image paths outside the manifest's folder (absolute, or with ../)"
    )


@dataclass
class ModelConfig:
    adapter: str = _f("reca.models.metaquery:MetaQueryAdapter", "import path 'package.module:Class' of the UMM adapter")
    args: dict = _f({}, "the adapter's own settings, checked against its Config dataclass")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype the weights are loaded in")


@dataclass
class EncoderConfig:
    kind: Literal["open_clip", "hf", "umm"] = _f(
        "open_clip",
        "frozen semantic encoder: open_clip, transformers (hf) CLIP/SigLIP vision model, or the UMM's own "
        "understanding encoder (umm)",
    )
    name: str = _f("ViT-B-16", "open_clip model name, or hf hub id / local dir")
    pretrained: str = _f("", "open_clip pretrained tag or local checkpoint file; empty = random init (tests only)")
    overrides: dict = _f(
        {}, "extra model-constructor settings (open_clip create_model kwargs, or hf config fields for random init)"
    )
    layer: int = _f(-2, "hidden layer whose patch tokens are used (-2 = penultimate, as the RecA configs do)")
    drop_cls: Literal["auto", "yes", "no"] = _f(
        "auto", "drop the class token: auto drops it for CLIP, keeps all tokens for SigLIP"
    )
    space: Literal["hidden", "joint"] = _f(
        "hidden",
        "hidden: patch tokens of encoder.layer; joint (open_clip): pooled image embedding + last-layer patch tokens "
        "projected into the contrastive space, with a text tower for text prompts",
    )
    input_size: int = _f(
        0,
        "encoder input resolution; 0 = the encoder's native size. Lower it for the information bottleneck (RecA §3.3)",
    )


@dataclass
class ObjectiveConfig:
    share: float = _f(0.0, "fraction of each step's batch given to this objective (0 = off)")
    weight: float = _f(1.0, "loss coefficient")
    data: DataSource = field(default_factory=DataSource, metadata={"help": "where this objective's images come from"})


@dataclass
class ReconConfig(ObjectiveConfig):
    share: float = _f(1.0, "fraction of each step's batch given to reconstruction (0 = off)")
    instructions: Literal["bank", "fixed"] = _f(
        "bank", "draw the reconstruction instruction from reca's bank, or always use fixed_instruction"
    )
    fixed_instruction: str = _f("Reconstruct this image.", "the instruction when instructions=fixed")
    instruction_dropout: float = _f(0.0, "probability of giving no instruction at all")
    keep_tokens: int = _f(
        0,
        "condition on only the first N semantic tokens (1 with encoder.space=joint: the pooled image embedding, "
        "the form of a text prompt's condition); 0 = all",
    )
    feature_noise: float = _f(
        0.0,
        "LAFITE perturbation of each condition token: add Gaussian noise of this fraction of the token's norm, "
        "then restore the norm, so the generator also covers where text features fall (arXiv 2111.13792 §3.2); 0 = off",
    )


@dataclass
class ObjectivesConfig:
    recon: ReconConfig = field(
        default_factory=ReconConfig,
        metadata={"help": "RecA: reconstruct the image from its frozen semantic tokens; needs no captions"},
    )
    t2i: ObjectiveConfig = field(
        default_factory=ObjectiveConfig, metadata={"help": "text-to-image on captioned images"}
    )
    i2t: ObjectiveConfig = field(
        default_factory=ObjectiveConfig,
        metadata={"help": "image-to-text (captioning) to keep understanding; needed where parameters are shared"},
    )
    i2t_prompt: str = _f("Describe the image.", "the question asked before each caption in image-to-text")


@dataclass
class OptimConfig:
    lr: float = _f(1e-5, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.02, "AdamW weight decay")
    betas: list = _f([0.9, 0.95], "AdamW betas")
    warmup_steps: int = _f(0, "linear warm-up steps")
    schedule: Literal["cosine", "constant", "linear"] = _f("cosine", "learning-rate schedule after warm-up")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    name: str = _f(
        "adamw",
        "adamw (torch), adamw8bit (bitsandbytes AdamW8bit: 8-bit optimizer states; pip install 'reca[bnb]'), or an "
        "import path 'package.module:Class' called as Class(params, lr=, betas=, weight_decay=)",
    )
    scale_lr: bool = _f(
        False, "multiply lr by processes × grad_accum × batch_size (diffusers' --scale_lr); lr is then per sample"
    )
    fused: bool = _f(
        False,
        "torch AdamW's fused implementation (torch.optim.AdamW(fused=True)): one kernel over all parameters, "
        "much faster for many small tensors (docs/training.md)",
    )


@dataclass
class LoraConfig:
    enabled: bool = _f(False, "train LoRA adapters (peft) instead of full fine-tuning")
    rank: int = _f(16, "LoRA rank r")
    alpha: int = _f(32, "LoRA alpha")
    dropout: float = _f(0.0, "LoRA dropout")
    target_modules: list = _f([], "peft target_modules; empty = the adapter's default_lora_targets")
    modules_to_save: list = _f([], "modules trained fully next to LoRA (peft modules_to_save)")
    use_dora: bool = _f(False, "DoRA: weight-decomposed LoRA (peft use_dora)")
    init: str = _f(
        "default",
        "peft init_lora_weights: default, gaussian, pissa, pissa_niter_<n> or olora (pissa/olora change the base "
        "weights; reca exports the adapter converted back to plain LoRA on the original base)",
    )
    rank_pattern: dict = _f({}, "per-module ranks, module-name regex → r (peft rank_pattern)")
    alpha_pattern: dict = _f({}, "per-module alphas, module-name regex → alpha (peft alpha_pattern)")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/reca", "where checkpoints, logs and samples go")
    max_steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(8, "samples per step per process, split over objectives by their shares")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    mixed_precision: Literal["no", "bf16", "fp16"] = _f("no", "autocast precision (accelerate)")
    seed: int = _f(0, "seed for data order, noise and instruction choice")
    trainable: list = _f(
        [], "full fine-tuning: parameter-name prefixes to train; empty = the adapter's default_trainable"
    )
    frozen: list = _f([], "parameter-name prefixes frozen even if listed as trainable")
    save_every: int = _f(500, "save a checkpoint every N steps (and at the end)")
    keep_last: int = _f(3, "checkpoints kept")
    log_every: int = _f(10, "log losses every N steps")
    sample_every: int = _f(0, "write a PNG sample grid every N steps (0 = only at the end)")
    sample_prompts: list = _f(
        ["a photo of a yellow broccoli", "a photo of a blue banana"], "text prompts drawn in sample grids"
    )
    sample_steps: int = _f(20, "sampling steps for sample grids")
    guidance_scale: float = _f(3.0, "classifier-free guidance for sample grids")
    max_nonfinite: int = _f(5, "abort after this many non-finite losses in a row (each is skipped with a warning)")
    num_workers: int = _f(0, "data-loading worker processes per objective")
    find_unused_parameters: bool = _f(False, "DDP: set when some trainable parameters get no gradient in a step")
    cpu: bool = _f(False, "force CPU even when CUDA is present")
    embedding_cache: str = _f(
        "", "folder for cached frozen-encoder outputs (computed once, reused every epoch); empty = off"
    )
    cache_dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "storage dtype of cached embeddings")
    gradient_checkpointing: bool = _f(
        False, "recompute activations in backward (adapter's enable_gradient_checkpointing)"
    )
    compile: bool = _f(False, "torch.compile the adapter's heavy modules (adapter's compile_modules)")
    offload_encoder: bool = _f(
        False, "keep the frozen encoder on the CPU (with a warm embedding_cache it is rarely called)"
    )
    ema_decay: float = _f(
        0.0,
        "keep an exponential moving average of the trained weights (diffusers EMAModel; BAGEL uses 0.9999), saved "
        "with checkpoints and exported to final/ema; 0 = off",
    )


@dataclass
class LogConfig:
    wandb: bool = _f(False, "also log to Weights & Biases (offline when no API key)")
    project: str = _f("reca", "wandb project")
    run_name: str = _f("", "wandb run name")


@dataclass
class EvalConfig:
    every: int = _f(0, "evaluate every N steps (and at step 0) on the main process with reca-eval's runner; 0 = off")
    prompts: str = _f(
        "builtin:color_rare,color_canonical",
        "prompt set as reca-eval --prompts takes it, optionally ':tag,tag' to keep only those categories",
    )
    scorer: str = _f("palette", "clip, vqa, palette or an import path 'package.module:Factory' (as reca-eval score)")
    scorer_args: dict = _f({}, "keyword arguments of the scorer (as reca-eval --scorer-arg)")
    n_images: int = _f(2, "images per prompt")
    seed: int = _f(0, "base seed of the evaluation images (the same images at every evaluation)")
    batch_size: int = _f(8, "images per generate() call")


@dataclass
class WatchConfig:
    recon_floor: float = _f(
        0.0, "warn when the reconstruction loss falls below this (the model learns to copy); 0 = off"
    )
    max_drop: float = _f(
        0.0, "warn when a watched category's accuracy falls more than this many points below step 0; 0 = off"
    )
    categories: list = _f([], "categories watched for max_drop; empty = every evaluated category")
    stop: bool = _f(False, "stop the run when the watch fires, keeping the last checkpoint before it")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the UMM"})
    encoder: EncoderConfig = field(default_factory=EncoderConfig, metadata={"help": "the frozen semantic encoder"})
    objectives: ObjectivesConfig = field(
        default_factory=ObjectivesConfig, metadata={"help": "what is trained and on which data"}
    )
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer and schedule"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "the loop"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "logging"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation during training"})
    watch: WatchConfig = field(
        default_factory=WatchConfig, metadata={"help": "collapse watch over the losses and the evaluation"}
    )


# --------------------------------------------------------------------------- parsing


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys silently; a config must say each thing once."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"{self.name}:{key_node.start_mark.line + 1}: key '{key}' appears twice in one mapping "
                    f"(first on line {seen[key] + 1}); keep one"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file, refusing duplicate keys; a non-UTF-8 file or invalid YAML is one line naming it."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    finally:
        loader.dispose()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; returns it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads a bare no / off / yes / on as a boolean
            value = next(
                (c for c in (("no", "off", "false") if not value else ("yes", "on", "true")) if c in choices), value
            )
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return coerce(value, arm, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: unexpected {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if not isinstance(value, base):
            raise ConfigError(f"{key}: expected a {base.__name__}, got {value!r}")
        args = typing.get_args(tp)
        if base is list and args:
            return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint}; valid keys: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], dotted)
    return cls(**kwargs)


def derive(obj: T, **changes: Any) -> T:
    """A copy of the dataclass ``obj`` with fields replaced; a dict given for a field that is itself
    a dataclass replaces fields inside it, recursively:
    ``derive(cfg, train={"max_steps": 5}, objectives={"t2i": {"share": 0.5}})``. A dict given for a
    plain dict field (``model.args``) replaces that dict."""
    fields = {}
    for name, value in changes.items():
        current = getattr(obj, name)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            value = derive(current, **value)
        fields[name] = value
    return dataclasses.replace(obj, **fields)


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. optim.lr=1e-5")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict (values parsed as YAML: 1e-5, true, [a, b])."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + dotted overrides → validated :class:`Config`."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    cfg = from_dict(Config, raw)
    validate(cfg)
    return cfg


def check_finite(obj: Any, prefix: str = "") -> None:
    """Every float (and float in a list) of the config is finite: NaN passes every ``x > 0``-style
    range check unnoticed (all comparisons with NaN are false)."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, key + ".")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}: must be a finite number, got {v}")


def check_ranges(cfg: Config) -> None:
    """Numbers outside the range where they mean anything, named by key."""
    t, o, lora = cfg.train, cfg.objectives, cfg.lora
    checks: list[tuple[bool, str]] = [
        (cfg.optim.weight_decay >= 0, "optim.weight_decay: must be >= 0"),
        (cfg.optim.max_grad_norm >= 0, "optim.max_grad_norm: must be >= 0 (0 = no clipping)"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps: must be >= 0"),
        (t.guidance_scale >= 0, "train.guidance_scale: must be >= 0"),
        (t.log_every > 0, "train.log_every: must be > 0"),
        (t.sample_every >= 0, "train.sample_every: must be >= 0 (0 = only at the end)"),
        (t.sample_steps > 0, "train.sample_steps: must be > 0"),
        (t.num_workers >= 0, "train.num_workers: must be >= 0 (0 = load in the main process)"),
        (t.max_nonfinite > 0, "train.max_nonfinite: must be > 0"),
        (bool(t.output_dir.strip()), "train.output_dir: must not be empty (name the folder for checkpoints and logs)"),
        (cfg.encoder.input_size >= 0, "encoder.input_size: must be >= 0 (0 = the encoder's native size)"),
        (0 <= lora.dropout < 1, f"lora.dropout: {lora.dropout} must be in [0, 1)"),
        # the rank before the alpha: an alpha derived from the rank (2 × rank, as the demo does) is 0 with it
        (not (lora.enabled and lora.rank <= 0), "lora.rank: must be > 0 when lora.enabled is true"),
        (not (lora.enabled and lora.alpha <= 0), "lora.alpha: must be > 0 when lora.enabled is true"),
    ]
    for name in OBJECTIVES:
        obj = getattr(o, name)
        checks.append((obj.weight >= 0, f"objectives.{name}.weight: must be >= 0"))
        checks.append((obj.data.min_side >= 0, f"objectives.{name}.data.min_side: must be >= 0"))
    resolution = cfg.model.args.get("resolution")
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        checks.append((resolution > 0, f"model.args.resolution: {resolution} must be > 0"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Contradictions and out-of-range values that a type check cannot see."""
    check_finite(cfg)
    check_ranges(cfg)
    t, o = cfg.train, cfg.objectives
    checks: list[tuple[bool, str]] = [
        (t.max_steps > 0, "train.max_steps: must be > 0"),
        (t.batch_size > 0, "train.batch_size: must be > 0"),
        (t.grad_accum > 0, "train.grad_accum: must be > 0"),
        (t.save_every > 0, "train.save_every: must be > 0"),
        (t.keep_last > 0, "train.keep_last: must be > 0 (older checkpoints are deleted)"),
        (cfg.optim.lr > 0, "optim.lr: must be > 0"),
        (
            cfg.optim.warmup_steps < t.max_steps,
            f"optim.warmup_steps: {cfg.optim.warmup_steps} must be below train.max_steps={t.max_steps}",
        ),
        (
            len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
            "optim.betas: expected two numbers in [0, 1), e.g. [0.9, 0.95]",
        ),
        (
            0 <= o.recon.instruction_dropout <= 1,
            "objectives.recon.instruction_dropout: must be a probability in [0, 1]",
        ),
        (
            o.recon.keep_tokens >= 0,
            "objectives.recon.keep_tokens: must be >= 0 (0 = all tokens)",
        ),
        (o.recon.feature_noise >= 0, "objectives.recon.feature_noise: must be >= 0 (0 = off)"),
        (
            not (cfg.lora.enabled and t.trainable),
            "train.trainable: full-fine-tuning prefixes conflict with lora.enabled=true; use lora.modules_to_save",
        ),
        (
            ":" in cfg.model.adapter,
            f"model.adapter: '{cfg.model.adapter}' must be an import path 'package.module:Class'",
        ),
        (
            cfg.model.dtype == "float32" or t.mixed_precision == "no",
            "model.dtype: load in float32 when train.mixed_precision is set (autocast needs fp32 master weights)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    validate_features(cfg)
    active = active_objectives(o)
    if not active:
        raise ConfigError("objectives: every share is 0; give objectives.recon.share (or t2i/i2t) a value > 0")
    for name, spec in OBJECTIVES.items():
        obj = getattr(o, name)
        if obj.share < 0:
            raise ConfigError(f"objectives.{name}.share: must be >= 0")
        if obj.share > 0 and not obj.data.path:
            raise ConfigError(
                f"objectives.{name}.data.path: objective {name} has share {obj.share} but no data; set a folder, "
                "manifest or dataset name"
            )
        if obj.share > 0 and spec.needs_captions and not obj.data.caption_column:
            raise ConfigError(f"objectives.{name}.data.caption_column: {name} needs captions; name the caption column")
    sizes = split_batch(t.batch_size, {k: v.share for k, v in active.items()})
    for name, n in sizes.items():
        if n == 0:
            raise ConfigError(
                f"objectives.{name}.share: {active[name].share} of train.batch_size={t.batch_size} rounds to 0 "
                "samples; raise the batch size or the share"
            )


def validate_features(cfg: Config) -> None:
    """``eval``, ``watch``, EMA: what they need from each other and from the mixture."""
    e, w = cfg.eval, cfg.watch
    checks: list[tuple[bool, str]] = [
        (
            cfg.optim.name in ("adamw", "adamw8bit") or ":" in cfg.optim.name,
            f"optim.name: '{cfg.optim.name}' is not adamw, adamw8bit or an import path 'package.module:Class'",
        ),
        (not cfg.optim.fused or cfg.optim.name == "adamw", "optim.fused: only for optim.name: adamw (torch's AdamW)"),
        (
            all(getattr(cfg.objectives, n).data.max_samples >= 0 for n in OBJECTIVES),
            "objectives.<name>.data.max_samples: must be >= 0 (0 = all)",
        ),
        (0 <= cfg.train.ema_decay < 1, "train.ema_decay: must be in [0, 1), e.g. 0.9999 (0 = off)"),
        (
            cfg.lora.init in ("default", "gaussian", "pissa", "olora")
            or (cfg.lora.init.startswith("pissa_niter_") and cfg.lora.init.removeprefix("pissa_niter_").isdigit()),
            f"lora.init: '{cfg.lora.init}' is not one of default, gaussian, pissa, pissa_niter_<n>, olora",
        ),
        (
            all(isinstance(v, int) and v > 0 for v in cfg.lora.rank_pattern.values()),
            "lora.rank_pattern: ranks must be integers > 0, e.g. {'lm\\..*': 8}",
        ),
        (e.every >= 0, "eval.every: must be >= 0 (0 = off)"),
        (e.n_images > 0 and e.batch_size > 0, "eval.n_images and eval.batch_size: must be > 0"),
        (w.recon_floor >= 0, "watch.recon_floor: must be >= 0 (0 = off)"),
        (0 <= w.max_drop <= 100, "watch.max_drop: points of accuracy, in [0, 100] (0 = off)"),
        (
            not (w.max_drop > 0 and e.every == 0),
            "watch.max_drop: needs the evaluation during training; set eval.every > 0",
        ),
        (
            not (w.recon_floor > 0 and cfg.objectives.recon.share == 0),
            "watch.recon_floor: reconstruction is off (objectives.recon.share=0); set the floor to 0",
        ),
        (not (w.categories and w.max_drop == 0), "watch.categories: only read with watch.max_drop > 0"),
        (
            not (w.stop and w.recon_floor == 0 and w.max_drop == 0),
            "watch.stop: nothing is watched; set watch.recon_floor or watch.max_drop",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def active_objectives(o: ObjectivesConfig) -> dict[str, ObjectiveConfig]:
    """The objectives with a share > 0, in table order."""
    return {name: getattr(o, name) for name in OBJECTIVES if getattr(o, name).share > 0}


def split_batch(batch_size: int, shares: dict[str, float]) -> dict[str, int]:
    """Per-step samples per objective: largest-remainder rounding of ``batch_size × share/Σshare``.

    The official RecA Harmon config (``Harmon/configs/examples/reca.py``) reaches its 2 : 2 : 0
    recon : I2T : T2I mixture differently: single-source micro-batches repeated [2, 2, 0] times and
    accumulated into one update. Splitting every batch gives each update the same mixture."""
    total = sum(shares.values())
    exact = {k: batch_size * s / total for k, s in shares.items()}
    sizes = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (sizes[k] - exact[k], k))[: batch_size - sum(sizes.values())]:
        sizes[k] += 1
    return sizes


def help_lines(cls: type = Config, prefix: str = "") -> list[str]:
    """``key (type, default): help`` for every field, for --help-config and the README."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{key}: {f.metadata.get('help', '')}")
            lines += help_lines(hints[f.name], key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"{key} = {default!r}  # {f.metadata.get('help', '')}")
    return lines
