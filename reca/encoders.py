"""Frozen semantic encoders: image → dense patch tokens ``(B, N, D)`` (never pooled).

RecA conditions reconstruction on the understanding encoder's patch tokens of a middle-late layer
(penultimate for CLIP and SigLIP, ``select_layer=-2`` in the official configs). The encoder is
frozen for real: eval mode, ``requires_grad=False``, called under ``torch.no_grad`` and kept outside
the trained module, so it can never reach the optimizer.

``encoder.input_size`` sets the encoder's input resolution apart from the generation resolution:
feeding the lowest resolution the model accepts is the information bottleneck that stops the
model from learning to copy its input (RecA paper, §3.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from reca.config import ConfigError, EncoderConfig
from reca.images import square_crop


@dataclass(frozen=True)
class Preprocess:
    """Shorter side to ``size`` (bicubic), centre crop, scale to [0, 1], normalise by mean/std."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        # numpy, not torch: the same float32 operations (the same bits, tests/test_encoders.py); two
        # torch.tensor() calls and three small torch ops cost more than the crop itself per image
        x = np.asarray(square_crop(image, self.size), dtype=np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(x.transpose(2, 0, 1))


@dataclass
class FrozenEncoder:
    """A frozen image encoder plus its own preprocessing."""

    module: torch.nn.Module
    features: Callable[[torch.Tensor], torch.Tensor]  # normalised pixels → (B, N, D)
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    width: int
    identity: str  # names the encoder, its weights, layer and resolution (cache keys, manifests)
    text: Callable[[Sequence[str]], torch.Tensor] | None = None  # text prompts → tokens in the same space

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        if self.text is None:
            raise ConfigError(
                "model.args.text_path: 'encoder' needs encoder.space=joint (an encoder with a text tower)"
            )
        return self.text(texts)

    def __post_init__(self) -> None:
        self.module.eval().requires_grad_(False)

    @property
    def preprocess(self) -> "Preprocess":
        """The encoder's own preprocessing, as a small picklable callable (data-loader workers)."""
        return Preprocess(self.input_size, self.mean, self.std)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        param = next(self.module.parameters())
        return self.features(pixels.to(param.device, param.dtype)).float()

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self(torch.stack([self.preprocess(im) for im in images]))

    def to(self, device: torch.device | str) -> "FrozenEncoder":
        self.module.to(device)
        return self


def build_encoder(cfg: EncoderConfig, adapter: object | None = None) -> FrozenEncoder:
    if cfg.kind == "open_clip":
        return _open_clip(cfg)
    if cfg.kind == "hf":
        return _hf(cfg)
    own = getattr(adapter, "semantic_encoder", None)
    if own is None:
        raise ConfigError(
            f"encoder.kind: 'umm' needs an adapter with semantic_encoder(); {type(adapter).__name__} has none — use "
            "open_clip or hf"
        )
    return own(layer=cfg.layer, input_size=cfg.input_size)


def _drop_cls(cfg: EncoderConfig, is_siglip: bool) -> bool:
    return (not is_siglip) if cfg.drop_cls == "auto" else cfg.drop_cls == "yes"


def _open_clip(cfg: EncoderConfig) -> FrozenEncoder:
    import open_clip

    if cfg.name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if cfg.name.lower() in m.lower()][:5]
        raise ConfigError(
            f"encoder.name: '{cfg.name}' is not an open_clip model; close: "
            f"{', '.join(close) or 'see open_clip.list_models()'}"
        )
    kwargs = dict(cfg.overrides)
    if cfg.input_size and "vision_cfg" in kwargs:
        kwargs["vision_cfg"] = {**kwargs["vision_cfg"], "image_size": cfg.input_size}
    elif cfg.input_size:
        # open_clip resamples the position embedding when a checkpoint of another size is loaded.
        kwargs["force_image_size"] = cfg.input_size
    model = open_clip.create_model(cfg.name, pretrained=cfg.pretrained or None, **kwargs)
    if cfg.space == "joint":
        return _open_clip_joint(cfg, model, open_clip)
    visual = model.visual
    pp = visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    layers = _num_layers(visual)
    if not -layers <= cfg.layer < layers:  # a modulo would silently wrap 12 to 0 on a 12-block model
        raise ConfigError(
            f"encoder.layer: {cfg.layer} is out of range for {cfg.name} with {layers} blocks "
            f"(use {-layers}..{layers - 1}; -2 = penultimate)"
        )
    index = cfg.layer % layers  # forward_intermediates counts blocks from 0
    is_siglip = "siglip" in cfg.name.lower()
    keep_prefix = not _drop_cls(cfg, is_siglip)

    def features(x: torch.Tensor) -> torch.Tensor:
        out = visual.forward_intermediates(
            x, indices=[index], intermediates_only=True, output_fmt="NLC", output_extra_tokens=keep_prefix
        )
        tokens = out["image_intermediates"][0]
        if keep_prefix and out.get("image_intermediates_prefix"):
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)
        return tokens

    with torch.no_grad():
        width = features(torch.zeros(1, 3, size, size)).shape[-1]
    return FrozenEncoder(
        visual,
        features,
        size,
        tuple(pp["mean"]),
        tuple(pp["std"]),
        width,
        identity=f"open_clip:{cfg.name}:{cfg.pretrained or 'random'}:layer{cfg.layer}:{size}px",
    )


def _open_clip_joint(cfg: EncoderConfig, model, open_clip) -> FrozenEncoder:
    """Tokens in the contrastive space: the pooled image embedding, then the last layer's patch
    tokens through the model's own ln_post + projection; text prompts get the pooled text embedding
    of the same model. Pooled image and text embeddings are aligned by contrastive training, which
    is what lets reconstruction learned from images transfer to text prompts (in an early prototype
    of the demo, nothing transferred without it)."""
    visual = model.visual
    if getattr(visual, "proj", None) is None or not hasattr(visual, "ln_post"):
        raise ConfigError("encoder.space: 'joint' needs an open_clip ViT with ln_post and proj; use space=hidden")
    pp = visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    tokenizer = open_clip.get_tokenizer(cfg.name, context_length=model.context_length)

    last = _num_layers(visual) - 1

    def features(x: torch.Tensor) -> torch.Tensor:
        # one pass through the tower gives both the last block's patch tokens and the pooled embedding
        out = visual.forward_intermediates(x, indices=[last], intermediates_only=False, output_fmt="NLC")
        pooled = torch.nn.functional.normalize(out["image_features"], dim=-1)
        return torch.cat([pooled[:, None], visual.ln_post(out["image_intermediates"][0]) @ visual.proj], dim=1)

    def text(texts: Sequence[str]) -> torch.Tensor:
        device = next(model.parameters()).device
        return model.encode_text(tokenizer(list(texts)).to(device), normalize=True)[:, None].float()

    width = model.visual.output_dim
    return FrozenEncoder(
        model,
        features,
        size,
        tuple(pp["mean"]),
        tuple(pp["std"]),
        width,
        identity=f"open_clip:{cfg.name}:{cfg.pretrained or 'random'}:joint:{size}px",
        text=text,
    )


def _num_layers(visual: torch.nn.Module) -> int:
    for path in ("transformer.resblocks", "trunk.blocks", "blocks"):
        node = visual
        try:
            for part in path.split("."):
                node = getattr(node, part)
            return len(node)
        except AttributeError:
            continue
    raise ConfigError("encoder.layer: cannot find the transformer blocks of this open_clip model; use encoder.kind=hf")


def _hf(cfg: EncoderConfig) -> FrozenEncoder:
    import transformers

    model = _load_hf_vision(cfg, transformers)
    depth = model.config.num_hidden_layers  # hidden_states has depth + 1 entries (0 = embeddings)
    if not -(depth + 1) <= cfg.layer <= depth:
        raise ConfigError(
            f"encoder.layer: {cfg.layer} is out of range for {cfg.name} with {depth} layers "
            f"(use {-(depth + 1)}..{depth}; -2 = penultimate)"
        )
    size = cfg.input_size or model.config.image_size
    is_siglip = "siglip" in model.config.model_type
    drop = _drop_cls(cfg, is_siglip)
    mean, std = (
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        if is_siglip
        else ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    )
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(cfg.name)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError):
        pass  # random-init encoders have no processor; the model family's defaults above apply

    def features(x: torch.Tensor) -> torch.Tensor:
        out = model(
            pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=x.shape[-1] != model.config.image_size
        )
        tokens = out.hidden_states[cfg.layer]  # hidden_states[0] is the embedding output
        return tokens[:, 1:] if drop else tokens

    with torch.no_grad():
        width = features(torch.zeros(1, 3, size, size)).shape[-1]
    return FrozenEncoder(model, features, size, mean, std, width, identity=f"hf:{cfg.name}:layer{cfg.layer}:{size}px")


def _load_hf_vision(cfg: EncoderConfig, transformers) -> torch.nn.Module:
    families = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "siglip2": "Siglip2VisionModel"}
    if cfg.overrides:  # random init from a config: tests and smoke runs
        family = cfg.overrides.get("model_type", "clip")
        if family not in families:
            raise ConfigError(f"encoder.overrides.model_type: '{family}' is not one of {', '.join(families)}")
        config_cls = getattr(transformers, families[family].replace("VisionModel", "VisionConfig"))
        fields = {k: v for k, v in cfg.overrides.items() if k != "model_type"}
        return getattr(transformers, families[family])(config_cls(**fields))
    try:
        config = transformers.AutoConfig.from_pretrained(cfg.name)
    except OSError as e:
        raise ConfigError(
            f"encoder.name: cannot load '{cfg.name}' (hub id or local dir): {str(e).splitlines()[0]}"
        ) from None
    family = config.model_type.removesuffix("_vision_model")
    if family not in families:
        raise ConfigError(f"encoder.name: model type '{config.model_type}' is not CLIP/SigLIP/SigLIP2")
    return getattr(transformers, families[family]).from_pretrained(cfg.name)


def bottleneck_check(encoder: FrozenEncoder, resolution: int) -> str | None:
    """A warning when the encoder sees the image at generation resolution or above (copy risk)."""
    if encoder.input_size >= resolution:
        return (
            f"encoder input {encoder.input_size}px >= generation {resolution}px: no information bottleneck; "
            "RecA may learn to copy (paper §3.3) — lower encoder.input_size"
        )
    return None
