"""From a :class:`~reca.config.Config` to live objects: the adapter (by import path, no registry),
the frozen encoder, LoRA, and trained checkpoints loaded back for evaluation."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reca.adapter import AttachesEncoder, UMMAdapter, missing_members
from reca.config import Config, ConfigError, from_dict
from reca.encoders import FrozenEncoder, build_encoder


def import_adapter(path: str) -> type:
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.adapter: cannot import '{path}' ({e}); expected 'package.module:Class'") from None
    if missing := missing_members(cls, UMMAdapter):
        raise ConfigError(
            f"model.adapter: {path} does not implement reca.adapter.UMMAdapter (missing {', '.join(missing)})"
        )
    return cls


def _instantiate(cls: type, args: Any, where: str) -> UMMAdapter:
    """``cls.from_config(args)``, checked against the Protocol once more: instance attributes such
    as ``resolution`` exist only now."""
    try:
        adapter = cls.from_config(args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if missing := missing_members(adapter, UMMAdapter):
        raise ConfigError(
            f"{where}: {cls.__module__}:{cls.__name__} does not implement reca.adapter.UMMAdapter "
            f"(its instances lack {', '.join(missing)})"
        )
    return adapter


def adapter_args(cfg: Config, cls: type, encoder: FrozenEncoder | None) -> Any:
    args = from_dict(cls.Config, cfg.model.args, "model.args")
    if (
        encoder is not None
        and any(f.name == "semantic_dim" for f in dataclasses.fields(args))
        and not args.semantic_dim
    ):
        args = dataclasses.replace(args, semantic_dim=encoder.width)
    return args


def build(cfg: Config) -> tuple[UMMAdapter, FrozenEncoder]:
    """The adapter and its frozen semantic encoder (built first unless it is the UMM's own)."""
    cls = import_adapter(cfg.model.adapter)
    encoder = None if cfg.encoder.kind == "umm" else build_encoder(cfg.encoder)
    adapter = _instantiate(cls, adapter_args(cfg, cls, encoder), "model.adapter")
    if encoder is None:
        encoder = build_encoder(cfg.encoder, adapter)
    if isinstance(adapter, AttachesEncoder):
        adapter.attach_encoder(encoder)
    adapter.to(getattr(torch, cfg.model.dtype))
    return adapter, encoder


def trainable_parameters(model: nn.Module, trainable: list[str], frozen: list[str]) -> list[str]:
    """Full fine-tuning: set requires_grad by name prefix; returns the trained names."""
    names = []
    for name, p in model.named_parameters():
        train = any(name == t or name.startswith(t + ".") for t in trainable) and not any(
            name == f or name.startswith(f + ".") for f in frozen
        )
        p.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise ConfigError(
            f"train.trainable: {trainable} matches no parameter; top-level modules are "
            f"{sorted({n.split('.')[0] for n, _ in model.named_parameters()})}"
        )
    return names


def apply_lora(adapter: nn.Module, cfg: Config) -> nn.Module:
    """Wrap with peft LoRA; only adapter weights (and ``modules_to_save``) stay trainable."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora.target_modules or adapter.default_lora_targets
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        modules_to_save=cfg.lora.modules_to_save or None,
        use_dora=cfg.lora.use_dora,
        init_lora_weights=True if cfg.lora.init == "default" else cfg.lora.init,
        rank_pattern=dict(cfg.lora.rank_pattern),
        alpha_pattern=dict(cfg.lora.alpha_pattern),
    )
    try:
        return get_peft_model(adapter, lora)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules: {str(e).splitlines()[0]}") from None


def mutates_base(cfg: Config) -> bool:
    """PiSSA and OLoRA move the principal part of each base weight into the adapter at init, so the
    trained adapter fits only that changed base; reca saves the initial adapter and exports the
    difference as a plain LoRA of the original base (peft's ``path_initial_model_for_weight_conversion``)."""
    return cfg.lora.enabled and cfg.lora.init.startswith(("pissa", "olora"))


def load_checkpoint(adapter: nn.Module, path: str | Path, encoder: FrozenEncoder | None = None) -> nn.Module:
    """A trained result, for evaluation: a PEFT adapter folder (merged into ``adapter``), a full
    model written by the adapter's ``save_pretrained`` (``reca_adapter.json``, rebuilt from it), or a
    trainer checkpoint (``checkpoint-N/``: its LoRA ``adapter/`` or its ``model.safetensors``)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(adapter, str(path)).merge_and_unload()
    if (path / "reca_adapter.json").is_file():
        saved = json.loads((path / "reca_adapter.json").read_text())
        cls = import_adapter(saved["adapter"])
        args = saved["args"]
        if "pretrained" in {f.name for f in dataclasses.fields(cls.Config)}:
            args = {**args, "pretrained": str(path)}  # the convention: a save_pretrained folder is loaded by this key
        rebuilt = _instantiate(
            cls, from_dict(cls.Config, args, f"{path}/reca_adapter.json: args"), f"{path}/reca_adapter.json"
        )
        if encoder is not None and isinstance(rebuilt, AttachesEncoder):
            rebuilt.attach_encoder(encoder)
        return rebuilt.to(next(adapter.parameters()).dtype)
    if (path / "adapter" / "adapter_config.json").is_file():
        return load_checkpoint(adapter, path / "adapter", encoder)
    weights = path / "model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        # the trainer saves RecATask, whose state names start with "umm."
        state = {k.removeprefix("umm."): v for k, v in load_file(str(weights)).items()}
        _, unexpected = adapter.load_state_dict(state, strict=False)
        if unexpected:
            raise ConfigError(f"--checkpoint {path}: weights do not fit this adapter (e.g. {unexpected[0]})")
        return adapter
    raise ConfigError(
        f"--checkpoint {path}: not a PEFT adapter (adapter_config.json), a saved model (reca_adapter.json) or a "
        "trainer checkpoint (model.safetensors)"
    )


def checkpoint_config(checkpoint: str | Path) -> Path:
    """The resolved config every reca output stores: ``final/config.json`` or ``checkpoint-N/config.yaml``."""
    for name in ("config.json", "config.yaml"):
        if (Path(checkpoint) / name).is_file():
            return Path(checkpoint) / name
    raise ConfigError(f"--checkpoint {checkpoint}: holds no config.json or config.yaml; pass --config")


def load_trained(
    cfg: Config, checkpoint: str | Path | None = None, device: str | torch.device = "cpu", weights: str = "raw"
) -> tuple[UMMAdapter, FrozenEncoder]:
    """The one way a trained model is loaded for evaluation (CLI, probe, demo): built from ``cfg``
    as the trainer builds it, ``checkpoint`` loaded on top (a PEFT folder, a ``save_pretrained``
    folder or a trainer checkpoint, see :func:`load_checkpoint`), in eval mode on ``device``.
    ``weights="ema"`` loads the moving average exported beside the raw weights (``<checkpoint>/ema``)."""
    from accelerate.utils import set_seed

    if weights not in ("raw", "ema"):
        raise ConfigError(f"--weights {weights}: expected raw or ema")
    if weights == "ema":
        if not checkpoint or not (Path(checkpoint) / "ema").is_dir():
            raise ConfigError(
                f"--weights ema: {checkpoint or 'no --checkpoint'} holds no ema/ folder; train with "
                "train.ema_decay > 0 and pass its final/ folder"
            )
        checkpoint = Path(checkpoint) / "ema"

    # Seed exactly as the trainer does before building, so weights a checkpoint does not supply
    # (an untrained baseline, tiny random models) are the same in every process.
    set_seed(cfg.train.seed)
    adapter, encoder = build(cfg)
    if checkpoint:
        adapter = load_checkpoint(adapter, checkpoint, encoder)
    adapter.to(device).eval()
    encoder.to(device)
    return adapter, encoder
