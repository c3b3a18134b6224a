"""Harmon (Wu et al. 2025, arXiv 2503.21979): one Qwen2.5 LLM between the encoder and the decoder of a
MAR (masked autoregressive, arXiv 2406.11838) over continuous KL-16 VAE tokens.

Written for reca from the papers and from reading wusize/Harmon ``src/models/harmon.py`` and the
official RecA code (HorizonWind2004/reconstruction-alignment ``Harmon/src/models/harmon_dev.py``):

* image tokens: the frozen VAE's latent mode × ``vae_scale`` (0.2325), one token per latent pixel;
* understanding features of an image (``visual_features``): the MAR encoder over *all* its tokens
  → ``proj_in`` → LLM width, the 64 buffer tokens moved after the image tokens (Harmon's
  ``extract_visual_feature``); they enter the LLM in the user turn like text;
* generation: the MAR encoder over the visible tokens → ``proj_in`` → appended after the prompt →
  LLM → ``proj_out`` added back (residual) → MAR decoder → per-token diffusion loss on the masked
  tokens (Harmon's ``forward_mae_encoder`` + MAR's ``forward_mae_decoder`` / ``forward_loss``);
* RecA (``encoder.kind: umm``): the condition is Harmon's own understanding features of the image,
  their gradient scaled by 0.1 (harmon_dev.py ``recon_loss``, ``grad_scale=0.1``). reca's frozen
  encoder here is only the VAE (``semantic_encoder``: pixels → latent tokens); the MAR encoder and
  ``proj_in`` on top are trained with the rest, as in the official code. ``encoder.input_size``
  below the generation resolution gives fewer feature tokens (the information bottleneck); the
  official recipe feeds the full 512px (1,088 tokens).

Randomness: every draw of a training sample (condition dropout, masking order, mask ratio,
timesteps, noise) comes from its seed; sampling draws image ``i``'s order and noise from ``seeds[i]``
alone (CPU generators, so images do not depend on the device or on batch neighbours).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Sequence

import diffusers
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from reca.adapter import Condition
from reca.config import ConfigError
from reca.images import to_pil
from reca.models.common import (
    IGNORE,
    answer_logprobs,
    answer_sequences,
    layer_states,
    left_pad,
    position_ids,
    right_pad,
    sequence_nll,
)
from reca.models.mar import MAR, MARConfig, truncated_mask_ratio
from reca.models.tokenizer import byte_tokenizer
from reca.seeds import dropped, generator

IMAGE = "<image>"  # where image features go in a template (split out before tokenising, never a token)
HEADS = ("mar", "proj_in", "proj_out", "projector")  # what harmon.safetensors holds
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]

# LoRA only inside the LLM's decoder layers: the MAR ViT blocks have their own qkv/proj/fc linears and
# the VAE has attention projections too; peft full-matches the regex on module names.
LLM_LORA = r"llm\.model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"

# MAR's KL-16 VAE (LDM AutoencoderKL, ch 128, ch_mult (1,1,2,2,4); wusize/Harmon src/models/mar/vae.py:
# the encoder has attention at 16px, attn_resolutions=(16,), the decoder none) as diffusers' AutoencoderKL.
KL16_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 128, 256, 256, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 256,
}


@dataclass
class HarmonConfig:
    pretrained: str = field(
        default="",
        metadata={
            "help": (
                "a folder written by save_pretrained (llm/, vae/, harmon.safetensors); fills llm, "
                "vae and harmon_weights"
            )
        },
    )
    llm: str = field(
        default="",
        metadata={
            "help": (
                "Qwen2.5 hub id or local dir (Qwen/Qwen2.5-1.5B-Instruct for Harmon-1.5B): its "
                "config and tokenizer; its weights too unless harmon_weights are given"
            )
        },
    )
    llm_config: dict = field(
        default_factory=dict, metadata={"help": "transformers Qwen2Config fields for a random LLM (tests)"}
    )
    tokenizer: str = field(
        default="", metadata={"help": "tokenizer hub id or dir; empty = the LLM's, or a byte-level one for random LLMs"}
    )
    harmon_weights: str = field(
        default="",
        metadata={
            "help": (
                "Harmon's public state dict (harmon_1.5b.pth / harmon_0.5b.pth, or .safetensors): "
                "llm.*, mar.*, proj_in.*, proj_out.*"
            )
        },
    )
    vae: str = field(
        default="", metadata={"help": "diffusers AutoencoderKL dir; empty = vae_ckpt or random from vae_config"}
    )
    vae_ckpt: str = field(
        default="",
        metadata={
            "help": (
                "MAR's LDM-format KL-16 file (kl16.ckpt, {'model': state dict}), converted to "
                "diffusers' AutoencoderKL on load"
            )
        },
    )
    vae_config: dict = field(
        default_factory=dict,
        metadata={
            "help": (
                "diffusers AutoencoderKL fields (random VAE, or the architecture of vae_ckpt); "
                "empty with vae_ckpt = MAR's KL-16"
            )
        },
    )
    vae_scale: float = field(default=0.2325, metadata={"help": "latent scale (Harmon configs: vae_scale=0.2325)"})
    mar: MARConfig = field(default_factory=MARConfig, metadata={"help": "MAR sizes (defaults: Harmon-1.5B's mar_huge)"})
    semantic_dim: int = field(
        default=0,
        metadata={
            "help": (
                "0 = semantic tokens are VAE latents for Harmon's own understanding path "
                "(encoder.kind=umm); >0 = width of an external encoder's tokens, mapped by a new "
                "trainable projector (reca.build fills it)"
            )
        },
    )
    resolution: int = field(
        default=512, metadata={"help": "generation resolution in pixels (Harmon trains and samples at 512)"}
    )
    grad_scale: float = field(
        default=0.1,
        metadata={
            "help": (
                "gradient scale on Harmon's own image features, in both RecA and image-to-text "
                "(harmon_dev.py grad_scale)"
            )
        },
    )
    cond_dropout: float = field(
        default=0.1,
        metadata={
            "help": (
                "probability that a generation sample's instruction or caption becomes cfg_prompt "
                "(Harmon datasets: unconditional=0.1); drawn from the sample's seed"
            )
        },
    )
    cfg_prompt: str = field(
        default="Generate an image.",
        metadata={"help": "the unconditional prompt (training dropout and the CFG branch at sampling)"},
    )
    t2i_prompt: str = field(
        default="Generate an image: {prompt}",
        metadata={"help": "user turn of text-to-image (Harmon Text2ImageDataset)"},
    )
    recon_prompt: str = field(
        default="\n<image>{instruction}",
        metadata={
            "help": (
                "user turn of a reconstruction condition (harmon_dev / "
                "MidjourneyReconstructionDataset: the image right after 'user\\n\\n')"
            )
        },
    )
    recon_dropped_prompt: str = field(
        default="<image>{cfg_prompt}",
        metadata={
            "help": (
                "user turn of a dropped reconstruction condition: the image stays, the "
                "instruction becomes cfg_prompt (as the official dataset does)"
            )
        },
    )
    template: str = field(
        default="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        metadata={"help": "chat turn around every user text (xtuner qwen_chat INSTRUCTION)"},
    )
    i2t_prompt: str = field(
        default="<image>\n{prompt}", metadata={"help": "user turn of image-to-text (Harmon caption datasets)"}
    )
    answer_suffix: str = field(default="<|im_end|>", metadata={"help": "ends every answer (qwen_chat SUFFIX_AS_EOS)"})
    cfg_schedule: Literal["constant", "linear"] = field(
        default="constant",
        metadata={"help": "guidance over MAR iterations: constant (Harmon's scripts) or linear (MUSE)"},
    )
    max_text_tokens: int = field(
        default=128, metadata={"help": "user texts are truncated to this many tokens (Harmon datasets: max_length=128)"}
    )
    generate_batch_size: int = field(
        default=1,
        metadata={
            "help": (
                "images sampled together by generate(); 1 makes each image a function of its "
                "condition and seed alone; larger is faster on GPU (each image still draws only "
                "from its own seed), but padding and batch shape change float rounding, which can "
                "move a pixel"
            )
        },
    )
    train_mar: bool = field(
        default=True,
        metadata={
            "help": (
                "full fine-tuning also trains the MAR encoder, decoder, diffusion head and "
                "proj_in/proj_out (official RecA: everything but the VAE)"
            )
        },
    )
    train_llm: bool = field(default=True, metadata={"help": "full fine-tuning trains the LLM"})


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient × scale backward (harmon_dev.py _ScaleGradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _mlp(i: int, hidden: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, hidden), nn.SiLU(), nn.Linear(hidden, o))


def _torch_state(path: str, key: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file, tensors only (``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"model.args.{key}: no such file '{path}'")
    try:
        state = (
            load_file(str(p))
            if p.suffix == ".safetensors"
            else torch.load(str(p), map_location="cpu", weights_only=True)
        )
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same config error
        raise ValueError(f"model.args.{key}: cannot read '{path}': {str(e).splitlines()[0]}") from None
    for wrapper in ("model", "state_dict", "module"):  # kl16.ckpt is {"model": ...}; trainer files wrap too
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.args.{key}: '{path}' is not a state dict of tensors")
    return state


def _keys_error(key: str, path: str, missing: Sequence[str], unexpected: Sequence[str]) -> ValueError:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys (e.g. {', '.join(sorted(missing)[:3])})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(sorted(unexpected)[:3])})")
    return ValueError(f"model.args.{key}: '{path}' does not fit this model: {'; '.join(parts)}")


def convert_ldm_vae(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """An LDM/MAR KL VAE state dict → diffusers ``AutoencoderKL`` names. diffusers' converter maps
    everything but attention inside the encoder's levels (SD's VAE has none; KL-16 has it at 16px),
    which is mapped here with diffusers' own attention renamer."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, update_vae_attentions_ldm_to_diffusers

    out = {k: v for k, v in convert_ldm_vae_checkpoint(state, config).items() if not k.startswith("encoder.down.")}
    for i in range(len(config["down_block_types"])):
        keys = [k for k in state if k.startswith(f"encoder.down.{i}.attn.")]
        update_vae_attentions_ldm_to_diffusers(
            keys, out, state, {"old": f"down.{i}.attn", "new": f"down_blocks.{i}.attentions"}
        )
    return out


def _load_vae(args: HarmonConfig) -> diffusers.AutoencoderKL:
    if args.vae:
        try:
            return diffusers.AutoencoderKL.from_pretrained(args.vae)
        except (OSError, ValueError) as e:
            raise ValueError(f"model.args.vae: cannot load '{args.vae}': {str(e).splitlines()[0]}") from None
    config = args.vae_config or (KL16_CONFIG if args.vae_ckpt else {})
    if not config:
        raise ValueError(
            "model.args.vae: give a diffusers dir, vae_ckpt (MAR's kl16.ckpt) or vae_config for a random VAE"
        )
    try:
        vae = diffusers.AutoencoderKL(**config)
    except TypeError as e:
        raise ValueError(f"model.args.vae_config: {str(e).splitlines()[0]}") from None
    if args.vae_ckpt:
        state = convert_ldm_vae(_torch_state(args.vae_ckpt, "vae_ckpt"), dict(vae.config))
        missing, unexpected = vae.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise _keys_error("vae_ckpt", args.vae_ckpt, missing, unexpected)
    return vae


class HarmonAdapter(nn.Module):
    Config: ClassVar[type] = HarmonConfig
    default_lora_targets: ClassVar[str] = LLM_LORA
    # the official RecA run trains everything but the VAE (harmon_dev.py: freeze_llm=False); the
    # instance list follows train_mar / train_llm
    default_trainable: ClassVar[list[str]] = ["llm", "mar", "proj_in", "proj_out"]

    def __init__(
        self,
        cfg: HarmonConfig,
        llm: transformers.PreTrainedModel,
        tokenizer,
        vae: diffusers.AutoencoderKL,
        source: str = "random",
    ):
        super().__init__()
        self.cfg, self.llm, self.tokenizer, self.vae, self.source = cfg, llm, tokenizer, vae, source
        self.resolution = cfg.resolution
        self.vae.requires_grad_(False).eval()
        m = cfg.mar
        stride = 2 ** (len(vae.config.block_out_channels) - 1)
        if stride != m.vae_stride or vae.config.latent_channels != m.vae_embed_dim:
            raise ValueError(
                f"model.args.mar: vae_stride={m.vae_stride}, vae_embed_dim={m.vae_embed_dim} do not match the VAE "
                f"(downsampling {stride}, {vae.config.latent_channels} latent channels)"
            )
        if cfg.resolution % (m.vae_stride * m.patch_size):
            raise ValueError(
                f"model.args.resolution: {cfg.resolution} must be a multiple of vae_stride x patch_size = "
                f"{m.vae_stride * m.patch_size}"
            )
        if not 0 <= cfg.cond_dropout <= 1:
            raise ValueError("model.args.cond_dropout: must be a probability in [0, 1]")
        for key, slots in (
            ("template", ["{input}"]),
            ("t2i_prompt", ["{prompt}"]),
            ("recon_prompt", [IMAGE, "{instruction}"]),
            ("recon_dropped_prompt", [IMAGE]),
            ("i2t_prompt", [IMAGE, "{prompt}"]),
        ):
            missing = [s for s in slots if s not in getattr(cfg, key)]
            if missing:
                raise ValueError(f"model.args.{key}: needs {' and '.join(missing)}")
        self.mar = MAR(m)
        hidden = llm.config.hidden_size
        self.proj_in = _mlp(m.encoder_embed_dim, hidden, hidden)
        self.proj_out = _mlp(hidden, hidden, m.encoder_embed_dim)
        self.projector = None
        if cfg.semantic_dim > 0:  # an external encoder's tokens: a new trainable projector into the LLM
            self.projector = nn.Sequential(
                nn.LayerNorm(cfg.semantic_dim),
                nn.Linear(cfg.semantic_dim, hidden),
                nn.GELU(),
                nn.Linear(hidden, hidden),
            )
        trainable = (["llm"] if cfg.train_llm else []) + (["mar", "proj_in", "proj_out"] if cfg.train_mar else [])
        if self.projector is not None:
            trainable.append("projector")
            self.default_lora_targets = (
                rf"({LLM_LORA})|(projector\.(1|3))"  # the new projector is random: LoRA on it too
            )
        self.default_trainable = trainable
        self.eos_id = (
            tokenizer.convert_tokens_to_ids(cfg.answer_suffix)
            if cfg.answer_suffix in tokenizer.get_vocab()
            else tokenizer.eos_token_id
        )

    # ------------------------------------------------------------------ build / save

    @classmethod
    def from_config(cls, args: HarmonConfig) -> "HarmonAdapter":
        weights, key = args.harmon_weights, "harmon_weights"
        if args.pretrained:
            root = Path(args.pretrained)
            if not (root / "reca_adapter.json").is_file():
                raise ValueError(
                    f"model.args.pretrained: '{root}' is not a folder written by save_pretrained (no reca_adapter.json)"
                )
            saved = json.loads((root / "reca_adapter.json").read_text())["args"]
            # the architecture is the saved one (it must fit the weights); prompts and sampling stay the caller's
            arch = {
                "mar": MARConfig(**saved["mar"]),
                "vae_scale": saved["vae_scale"],
                "semantic_dim": saved["semantic_dim"],
            }
            args = dataclasses.replace(
                args,
                llm=str(root / "llm"),
                tokenizer=str(root / "llm"),
                vae=str(root / "vae"),
                vae_ckpt="",
                vae_config={},
                **arch,
            )
            weights, key = str(root / "harmon.safetensors"), "pretrained"
        if args.llm:
            try:
                if (
                    args.harmon_weights and not args.pretrained
                ):  # the weights come from Harmon's file: architecture only
                    llm = transformers.AutoModelForCausalLM.from_config(
                        transformers.AutoConfig.from_pretrained(args.llm)
                    )
                else:
                    llm = transformers.AutoModelForCausalLM.from_pretrained(args.llm)
            except (OSError, ValueError) as e:
                raise ValueError(
                    f"model.args.llm: cannot load '{args.llm}' (hub id or local dir): {str(e).splitlines()[0]}"
                ) from None
        elif args.llm_config:
            try:
                llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**args.llm_config))
            except (TypeError, ValueError) as e:
                raise ValueError(f"model.args.llm_config: not a valid Qwen2Config: {str(e).splitlines()[0]}") from None
        else:
            raise ValueError(
                "model.args.llm: give a Qwen2.5 hub id / local dir, or model.args.llm_config for a random LLM"
            )
        if args.tokenizer or args.llm:
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.llm)
        else:
            tokenizer = byte_tokenizer(extra_special_tokens=QWEN_SPECIALS)
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            raise ValueError(f"model.args.llm_config: vocab_size must be >= {len(tokenizer)} (the tokenizer's size)")
        adapter = cls(args, llm, tokenizer, _load_vae(args), source=args.pretrained or weights or args.llm or "random")
        if weights:
            adapter.load_harmon_weights(weights, key)
        return adapter

    def _own_state_keys(self) -> set[str]:
        return {k for k in self.state_dict() if not k.startswith("vae.")}

    def load_harmon_weights(self, path: str, key: str = "harmon_weights") -> None:
        """Harmon's public state dict (or reca's harmon.safetensors): names as in wusize/Harmon's
        ``Harmon`` module, so they load as they are. Ignored: the VAE (loaded on its own) and MAR's
        class embedding (Harmon has no classes)."""
        state = {
            k: v for k, v in _torch_state(path, key).items() if not k.startswith("vae.") and k != "mar.class_emb.weight"
        }
        own = self._own_state_keys()
        if key == "pretrained":  # reca's harmon.safetensors: the LLM and the VAE are in their own folders
            own = {k for k in own if k.split(".")[0] in HEADS}
        optional = {k for k in own if k.startswith("projector.")} if key == "harmon_weights" else set()
        if getattr(self.llm.config, "tie_word_embeddings", False):
            optional.add("llm.lm_head.weight")  # tied to the input embeddings: often not stored
        missing = sorted(own - set(state) - optional)
        unexpected = sorted(set(state) - own)
        if missing or unexpected:
            raise _keys_error(key, path, missing, unexpected)
        self.load_state_dict(state, strict=False)

    def save_pretrained(self, path: str | Path) -> None:
        """``llm/`` (transformers Qwen2 + tokenizer), ``vae/`` (diffusers), ``harmon.safetensors``
        (MAR, projections, the external-encoder projector), ``reca_adapter.json``."""
        path = Path(path)
        self.llm.save_pretrained(path / "llm")
        self.tokenizer.save_pretrained(path / "llm")
        self.vae.save_pretrained(path / "vae")
        heads = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k.split(".")[0] in HEADS}
        save_file(heads, str(path / "harmon.safetensors"))
        args = asdict(self.cfg) | {
            "pretrained": "",
            "llm": "",
            "llm_config": {},
            "tokenizer": "",
            "harmon_weights": "",
            "vae": "",
            "vae_ckpt": "",
            "vae_config": {},
        }
        (path / "reca_adapter.json").write_text(
            json.dumps({"adapter": f"{__name__}:{type(self).__name__}", "args": args}, indent=2)
        )

    def enable_gradient_checkpointing(self) -> None:
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.mar.set_gradient_checkpointing(True)

    def compile_modules(self) -> None:
        self.llm.model.compile()

    def train(self, mode: bool = True) -> "HarmonAdapter":
        super().train(mode)
        self.vae.eval()
        return self

    def semantic_encoder(self, layer: int = -1, input_size: int = 0):
        """reca's frozen encoder for ``encoder.kind: umm``: the frozen VAE, pixels → latent tokens.
        The rest of Harmon's understanding path (MAR encoder → proj_in) is trained and runs inside
        the adapter, so it is not part of the frozen encoder (harmon_dev.py computes it with the
        gradient scaled by ``grad_scale``). ``layer`` must be -1: Harmon reads the MAR encoder's
        output. ``input_size`` below ``resolution``: fewer feature tokens (the bottleneck)."""
        from reca.encoders import FrozenEncoder

        m = self.cfg.mar
        size = input_size or self.resolution
        if layer != -1:
            raise ConfigError(
                f"encoder.layer: {layer}; Harmon's understanding features are the MAR encoder's output: "
                "set encoder.layer=-1"
            )
        if size % (m.vae_stride * m.patch_size):
            raise ConfigError(
                f"encoder.input_size: {size} must be a multiple of vae_stride x patch_size = "
                f"{m.vae_stride * m.patch_size}"
            )

        def features(x: torch.Tensor) -> torch.Tensor:
            return self.encode_tokens(x)

        return FrozenEncoder(
            self.vae,
            features,
            size,
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
            m.token_dim,
            identity=f"harmon:{self.source}:vae-tokens:{size}px",
        )

    # ------------------------------------------------------------------ tokens

    @torch.no_grad()
    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] → VAE tokens ``(B, h·w, C·p²)``: the posterior mode × vae_scale (Harmon ``encode``)."""
        vae = self.vae
        with torch.autocast(pixels.device.type, enabled=False):
            z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode() * self.cfg.vae_scale
        p = self.cfg.mar.patch_size
        b, c, h, w = z.shape
        z = z.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return z.reshape(b, (h // p) * (w // p), c * p * p).float()

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, grid: int) -> list[Image.Image]:
        p, c = self.cfg.mar.patch_size, self.cfg.mar.vae_embed_dim
        b = tokens.shape[0]
        z = (
            (tokens / self.cfg.vae_scale)
            .view(b, grid, grid, c, p, p)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(b, c, grid * p, grid * p)
        )
        vae = self.vae
        with torch.autocast(tokens.device.type, enabled=False):
            pixels = vae.decode(z.to(vae.device, vae.dtype)).sample
        return to_pil(pixels)

    @staticmethod
    def _grid(n: int) -> tuple[int, int]:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} image tokens are not a square grid")
        return side, side

    def visual_features(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MAR encoder output, its LLM-width projection with the buffer tokens last) — Harmon's
        ``extract_visual_feature``; ``mask`` 1 = hidden token (dropped), None = all visible."""
        x_enc = self.mar.encode(tokens, mask, self._grid(tokens.shape[1]))
        z = self.proj_in(x_enc)
        nb = self.mar.buffer_size
        return x_enc, torch.cat([z[:, nb:], z[:, :nb]], 1)

    def semantic_embeds(self, semantic: torch.Tensor) -> torch.Tensor:
        """Condition tokens → LLM inputs ``(B, N', hidden)``: Harmon's own features (gradient × grad_scale)
        of VAE tokens, or the projector of an external encoder's tokens."""
        if self.projector is not None:
            width = self.projector[0].normalized_shape[0]
            if semantic.shape[-1] != width:
                raise ValueError(
                    f"semantic tokens have width {semantic.shape[-1]}, the projector takes {width} "
                    "(model.args.semantic_dim)"
                )
            return self.projector(semantic.to(self.proj_in[0].weight))
        if semantic.shape[-1] != self.cfg.mar.token_dim:
            raise ValueError(
                f"semantic tokens have width {semantic.shape[-1]} but Harmon's own path takes VAE tokens of width "
                f"{self.cfg.mar.token_dim}: use encoder.kind=umm, or set model.args.semantic_dim to the encoder's width"
            )
        z = self.visual_features(semantic.to(self.proj_in[0].weight))[1]
        return _ScaleGrad.apply(z, self.cfg.grad_scale) if torch.is_grad_enabled() else z

    # ------------------------------------------------------------------ prompts

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _clip(self, text: str) -> str:
        ids = self._ids(text)
        return text if len(ids) <= self.cfg.max_text_tokens else self.tokenizer.decode(ids[: self.cfg.max_text_tokens])

    def _embed(self, text: str, image: torch.Tensor | None) -> torch.Tensor:
        """Embeddings of ``text`` with ``image`` (N, hidden) at its ``<image>`` mark; the text on either
        side is tokenised on its own (as Harmon splices image tokens into tokenised prompts)."""
        emb = self.llm.get_input_embeddings()
        parts = text.split(IMAGE)
        if len(parts) != (1 if image is None else 2):
            raise ValueError(
                f"a prompt has {len(parts) - 1} '{IMAGE}' marks for {0 if image is None else 1} image(s) "
                f"(a text contains '{IMAGE}'?)"
            )
        pieces = []
        for j, part in enumerate(parts):
            if j:
                pieces.append(image.to(emb.weight.dtype))
            if part:
                pieces.append(emb(torch.tensor(self._ids(part), dtype=torch.long, device=emb.weight.device)))
        return torch.cat(pieces)

    def prompt_text(self, cond: Condition, i: int, drop: bool) -> str:
        """Sample ``i``'s whole prompt (chat turn included); ``<image>`` marks the semantic tokens."""
        c = self.cfg
        if cond.texts is not None:
            user = c.cfg_prompt if drop else c.t2i_prompt.format(prompt=self._clip(cond.texts[i]))
        elif drop:
            user = c.recon_dropped_prompt.replace("{cfg_prompt}", c.cfg_prompt)
        else:
            instruction = self._clip(cond.instructions[i]) if cond.instructions[i] else ""
            user = c.recon_prompt.replace("{instruction}", instruction)
        return c.template.replace("{input}", user)

    def _prompt_rows(self, cond: Condition, drop: Sequence[bool]) -> list[torch.Tensor]:
        images = self.semantic_embeds(cond.semantic) if cond.semantic is not None else None
        return [
            self._embed(self.prompt_text(cond, i, drop[i]), None if images is None else images[i])
            for i in range(len(cond))
        ]

    def _unconditional_rows(self, n: int) -> list[torch.Tensor]:
        # the CFG branch: the generic prompt, no image (Harmon text2image.py / sample_recon)
        return [self._embed(self.cfg.template.replace("{input}", self.cfg.cfg_prompt), None)] * n

    def _llm_suffix(self, prompts: Sequence[torch.Tensor], images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Left-padded [prompt ; image features] through the LLM; the last hidden states of each image part."""
        x, mask = left_pad([torch.cat([p, z.to(p.dtype)]) for p, z in zip(prompts, images)])
        hidden = self.llm.model(inputs_embeds=x, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        return [hidden[i, hidden.shape[1] - z.shape[0] :] for i, z in enumerate(images)]

    def _through_llm(
        self, prompts: Sequence[torch.Tensor], tokens: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Per sample: visible tokens → MAR encoder → LLM after the prompt → residual → MAR decoder
        conditions ``(L, D_dec)`` (Harmon ``forward_mae_encoder`` + ``forward_mae_decoder``)."""
        enc, feats = zip(*(self.visual_features(t[None], m[None]) for t, m in zip(tokens, masks)))
        outs = self._llm_suffix(prompts, [f[0] for f in feats])
        nb = self.mar.buffer_size
        result = []
        for x_enc, z, t, m in zip(enc, outs, tokens, masks):
            z = torch.cat([z[-nb:], z[:-nb]])  # buffers back to the front
            x = x_enc + self.proj_out(z.to(self.proj_out[0].weight.dtype))[None]
            result.append(self.mar.decode(x, m[None], self._grid(t.shape[0]))[0])
        return result

    # ------------------------------------------------------------------ losses

    def draw(self, seed: int, n_tokens: int) -> dict[str, torch.Tensor | bool]:
        """Every random choice of one training sample, each kind from its own stream of the sample's
        seed (reca.seeds): condition dropout, masking order and ratio, timesteps, noise. MAR draws
        one mask ratio per batch; here each sample draws its own (same distribution), so a sample's
        loss does not depend on its batch."""
        m = self.cfg.mar
        drop = dropped([seed], self.cfg.cond_dropout)[0]
        g = generator(seed, "mask")
        order = torch.randperm(n_tokens, generator=g)
        ratio = truncated_mask_ratio(torch.rand((), generator=g, dtype=torch.float64), m.mask_ratio_min)
        masked = math.ceil(n_tokens * ratio.item())
        mask = torch.zeros(n_tokens)
        mask[order[:masked]] = 1.0
        t = torch.randint(
            0, m.num_train_timesteps, (m.diffusion_batch_mul, n_tokens), generator=generator(seed, "timestep")
        )
        noise = torch.randn((m.diffusion_batch_mul, n_tokens, m.token_dim), generator=generator(seed, "noise"))
        return {"drop": drop, "mask": mask, "t": t, "noise": noise}

    def mar_loss(self, tokens: torch.Tensor, cond: Condition, draws: Sequence[dict]) -> torch.Tensor:
        """MAR's diffusion loss over the masked tokens, per sample, then mean over samples.
        ``tokens`` (B, L, C) targets; ``draws`` from :meth:`draw` (explicit, so tests can pin them)."""
        device = tokens.device
        masks = [d["mask"].to(device) for d in draws]
        prompts = self._prompt_rows(cond, [bool(d["drop"]) for d in draws])
        z = self._through_llm(prompts, list(tokens), masks)
        losses = []
        for zi, target, d, mask in zip(z, tokens, draws, masks):
            k = self.cfg.mar.diffusion_batch_mul
            rows = self.mar.diffloss.loss(
                target.repeat(k, 1), zi.repeat(k, 1), d["t"].to(device).flatten(), d["noise"].to(device).flatten(0, 1)
            )
            weight = mask.repeat(k)
            losses.append((rows * weight).sum() / weight.sum())
        return torch.stack(losses).mean()

    def generation_loss(self, images: torch.Tensor, cond: Condition, seeds: Sequence[int]) -> torch.Tensor:
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])}, this Harmon adapter generates "
                f"{self.resolution}x{self.resolution}"
            )
        tokens = self.encode_tokens(images)
        return self.mar_loss(tokens, cond, [self.draw(s, tokens.shape[1]) for s in seeds])

    def _understanding_batch(self, semantic, prompts, answers):
        images = self.semantic_embeds(semantic)
        emb = self.llm.get_input_embeddings()
        rows, labels = [], []
        for img, prompt, answer in zip(images, prompts, answers):
            user = self.cfg.i2t_prompt.replace("{prompt}", self._clip(prompt))
            head = self._embed(self.cfg.template.replace("{input}", user), img)
            ans = self._ids(self._clip(answer)) + [self.eos_id]
            rows.append(torch.cat([head, emb(torch.tensor(ans, device=emb.weight.device))]))
            labels.append(torch.tensor([IGNORE] * head.shape[0] + ans))
        return right_pad(rows, labels)

    def _answer_token_logprobs(self, semantic, prompts, answers) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask, labels = self._understanding_batch(semantic, prompts, answers)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return answer_logprobs(hidden, labels, self.llm.lm_head)

    def understanding_loss(
        self, semantic: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]
    ) -> torch.Tensor:
        return sequence_nll(*self._answer_token_logprobs(semantic, prompts, answers))

    def answer_logprob(self, semantic: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        return self._answer_token_logprobs(semantic, prompts, answers)[0].sum(1)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample_tokens(
        self, cond: Condition, seeds: Sequence[int], guidance_scale: float, num_iter: int
    ) -> torch.Tensor:
        """MAR's iterative sampling (Harmon ``sample``): start fully masked; at step k predict the
        tokens that the cosine schedule unmasks, in image ``i``'s random order from ``seeds[i]``;
        CFG against the generic prompt. Returns tokens ``(B, L, C)``."""
        n, m = len(cond), self.cfg.mar
        side = self.resolution // (m.vae_stride * m.patch_size)
        seq_len = side * side
        device = self.proj_in[0].weight.device
        gens = [generator(s, "noise") for s in seeds]  # CPU generators: images do not depend on the device
        orders = torch.stack([torch.randperm(seq_len, generator=generator(s, "mask")) for s in seeds]).to(device)
        use_cfg = guidance_scale != 1.0
        prompts = self._prompt_rows(cond, [False] * n) + (self._unconditional_rows(n) if use_cfg else [])
        tokens = torch.zeros(n, seq_len, m.token_dim, device=device)
        mask = torch.ones(n, seq_len, device=device)
        for step in range(num_iter):
            rep = 2 if use_cfg else 1
            z = torch.stack(self._through_llm(prompts, list(tokens.repeat(rep, 1, 1)), list(mask.repeat(rep, 1))))
            # mask ratio for the next round: cosine (MaskGIT), at least one token per step, all at the end
            remaining = int(mask[0].sum().item())
            mask_len = max(1, min(remaining - 1, math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))))
            mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :mask_len], 1.0)
            to_pred = mask.bool() if step >= num_iter - 1 or remaining == 1 else mask.bool() & ~mask_next.bool()
            where = to_pred.nonzero(as_tuple=True)
            scale = guidance_scale
            if self.cfg.cfg_schedule == "linear":
                scale = 1 + (guidance_scale - 1) * (seq_len - mask_len) / seq_len
            row_gens = [gens[i] for i in where[0].tolist()]  # each token row draws from its image's generator
            sampled = self.mar.diffloss.sample(z[:n][where], z[n:][where] if use_cfg else None, scale, row_gens)
            tokens[where] = sampled.to(tokens.dtype)
            mask = mask_next if not (step >= num_iter - 1 or remaining == 1) else torch.zeros_like(mask)
            if not mask.any():
                break
        return tokens

    def _chunks(self, cond: Condition, seeds: Sequence[int]):
        if len(seeds) != len(cond):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(cond)} conditions")
        bs = max(1, self.cfg.generate_batch_size)
        for start in range(0, len(cond), bs):
            sl = slice(start, start + bs)
            part = (
                Condition(texts=cond.texts[sl])
                if cond.texts is not None
                else Condition(semantic=cond.semantic[sl], instructions=cond.instructions[sl])
            )
            yield part, list(seeds[sl])

    @torch.no_grad()
    def generate(
        self, cond: Condition, *, seeds: Sequence[int], guidance_scale: float = 3.0, num_steps: int = 64
    ) -> list[Image.Image]:
        """``num_steps`` = MAR iterations (Harmon's default 64); the diffusion head takes
        ``mar.num_sampling_steps`` steps each. Harmon's default guidance is 3."""
        side = self.resolution // (self.cfg.mar.vae_stride * self.cfg.mar.patch_size)
        out = []
        for part, s in self._chunks(cond, seeds):
            out += self.decode_tokens(self.sample_tokens(part, s, guidance_scale, max(1, num_steps)), side)
        return out

    @torch.no_grad()
    def hidden_states(
        self, cond: Condition, answers: Sequence[str] | None = None
    ) -> list[tuple[list[torch.Tensor], int]]:
        """Per sample: the LLM's hidden states ``(T, d)`` at every layer (embeddings first) over
        [prompt ; response] and the prompt length (reca.adapter.Traceable). With ``answers``: the
        answer tokens after the image and the question (``cond.instructions``). Without: the image
        positions (MAR encoder features of an image sampled for the prompt, seed = index,
        guidance 3, 16 iterations), all tokens visible."""
        if answers is None:
            tokens = torch.cat(
                [self.sample_tokens(p, s, 3.0, 16) for p, s in self._chunks(cond, list(range(len(cond))))]
            )
            prompts = self._prompt_rows(cond, [False] * len(cond))
            feats = self.visual_features(tokens)[1]
            seqs = [(torch.cat([p, f.to(p.dtype)]), p.shape[0]) for p, f in zip(prompts, feats)]
        else:
            if cond.semantic is None:
                raise ValueError(
                    "text responses are traced for image prompts (captioning): give Condition(semantic=...)"
                )
            embeds, mask, labels = self._understanding_batch(cond.semantic, cond.instructions, answers)
            seqs = answer_sequences(embeds, mask, labels)
        return layer_states(self.llm.model, seqs)
