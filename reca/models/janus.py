"""Janus / Janus-Pro (DeepSeek) through transformers' ``JanusForConditionalGeneration``: RecA over
discrete VQ tokens.

Janus decouples its two image pathways around one shared LLM (Llama): understanding sees SigLIP
patch features through an MLP *aligner*; generation predicts the tokens of a frozen VQ tokenizer
through a separate *generation head*, one token at a time. RecA (arXiv 2509.07295) conditions the
generation pathway on the understanding pathway's view of the same image:

* condition: the frozen SigLIP tokens of the image (``semantic_encoder()``, the last layer as
  Janus's own ``get_image_features`` uses it) → aligner → placed, as Janus places images for
  understanding (``<begin_of_image>`` + tokens + ``<end_of_image>``), in the user turn with the
  reconstruction instruction;
* target: the image's VQ token ids (``vqmodel.encode``), teacher-forced cross-entropy through the
  generation head on the image-token positions (transformers' ``forward`` only has the text loss,
  so it is assembled here by hand).

SigLIP in, VQ out is already the information bottleneck RecA needs (paper §3.3: input and target
never share one representation, so there is no copy path). Because the LLM
is shared, mix in image-to-text data (``understanding_loss``) or understanding degrades.

Sampling is reca's own loop rather than ``generate(generation_mode="image")``, which (transformers
5.23) takes ``input_ids`` only — no ``inputs_embeds``, so no semantic conditions — and draws every
token of the batch from the global RNG, so an image would depend on its batch neighbours. The loop
reproduces transformers' (and DeepSeek's) recipe exactly: classifier-free guidance by batch
doubling, the unconditional prompt = the conditional one with every token but BOS and the final
BOI replaced by pad, temperature 1, no top-k; tests/test_janus.py checks it token for token
against ``generate`` on text prompts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
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
from reca.models.tokenizer import byte_tokenizer
from reca.seeds import dropped, generator

# Janus's special tokens (tokenizer_config of deepseek-community/Janus-Pro-*: image_token, boi_token, eoi_token)
IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
SIGLIP_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# LoRA only inside the LLM: SigLIP has q_proj/k_proj/v_proj too, and a plain name list would put
# adapters into the (frozen) vision tower. peft full-matches the regex on names.
LM_LORA = (
    r"model\.model\.language_model\.layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)


@dataclass
class JanusConfig:
    model: str = field(
        default="",
        metadata={
            "help": (
                "Janus checkpoint: hub id (deepseek-community/Janus-Pro-1B, -7B) or local dir (a transformers "
                "Janus folder, or a folder written by save_pretrained); empty = random from model_config"
            )
        },
    )
    pretrained: str = field(
        default="",
        metadata={
            "help": (
                "a folder written by save_pretrained (same as model=<folder>; the key reca.build.load_checkpoint fills)"
            )
        },
    )
    model_config: dict = field(
        default_factory=dict,
        metadata={
            "help": (
                "transformers JanusConfig fields (text_config, vision_config, vq_config mappings) for a random "
                "model (tests)"
            )
        },
    )
    processor: str = field(
        default="",
        metadata={
            "help": (
                "JanusProcessor or tokenizer: hub id or dir; empty = the model's own, or a byte-level tokenizer "
                "for random models"
            )
        },
    )
    semantic_dim: int = field(
        default=0,
        metadata={
            "help": (
                "0 = semantic tokens are Janus's own SigLIP features (encoder.kind=umm) through its aligner; >0 "
                "= width of an external encoder's tokens, mapped by a new trainable projector (reca.build fills "
                "it)"
            )
        },
    )
    train_generation_head: bool = field(
        default=True,
        metadata={
            "help": (
                "full fine-tuning also trains the image-token path: generation_head, generation_embeddings, "
                "generation_aligner"
            )
        },
    )
    train_aligner: bool = field(
        default=False,
        metadata={
            "help": (
                "full fine-tuning also trains the understanding aligner (SigLIP → LLM); keep image-to-text data "
                "on if so"
            )
        },
    )
    cond_dropout: float = field(
        default=0.1,
        metadata={
            "help": (
                "probability of training a sample on the unconditional prompt (classifier-free guidance), drawn "
                "from the sample's seed"
            )
        },
    )
    resolution: int = field(
        default=384, metadata={"help": "image side in pixels; must equal the VQ model's image size (384 for Janus-Pro)"}
    )
    max_text_tokens: int = field(
        default=128,
        metadata={"help": "user texts (prompts, instructions, questions, answers) are truncated to this many tokens"},
    )
    generation_template: str = field(
        default="<|User|>: {prompt}\n\n<|Assistant|>:",
        metadata={"help": "text-to-image prompt; BOS before and <begin_of_image> after are added (Janus's SFT format)"},
    )
    understanding_template: str = field(
        default="<|User|>: {image}\n{prompt}\n\n<|Assistant|>:",
        metadata={"help": "image-to-text prompt; the answer follows after one space, then EOS"},
    )
    recon_prompt: str = field(
        default="{image}\n{instruction}",
        metadata={
            "help": (
                "the user turn of a reconstruction condition, put into generation_template's {prompt}; {image} = "
                "the semantic tokens between <begin_of_image> and <end_of_image>"
            )
        },
    )
    generate_batch_size: int = field(
        default=1,
        metadata={
            "help": (
                "images sampled together by generate(); 1 makes each image a function of its condition and seed "
                "alone; larger is faster on GPU, but padding and batch shape change float rounding, which can "
                "flip a rare token"
            )
        },
    )


def _load(fn, ref: str, key: str):
    try:
        return fn(ref)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model.args.{key}: cannot load '{ref}' (hub id or local dir): {str(e).splitlines()[0]}"
        ) from None


def _load_processor(ref: str, key: str):
    """(processor or None, tokenizer): a JanusProcessor when the folder has one, else a tokenizer."""
    try:
        proc = transformers.AutoProcessor.from_pretrained(ref)
        if isinstance(proc, transformers.ProcessorMixin) and hasattr(proc, "tokenizer"):
            return proc, proc.tokenizer
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass  # no processor files (tiny test models): the tokenizer alone
    return None, _load(transformers.AutoTokenizer.from_pretrained, ref, key)


class JanusAdapter(nn.Module):
    Config: ClassVar[type] = JanusConfig
    default_lora_targets: ClassVar[str] = LM_LORA
    # The shared LLM (and its untied lm_head, where there is one); the generation/aligner parts are
    # added per flag in __init__. SigLIP and the VQ model are never trained.
    default_trainable: ClassVar[list[str]] = ["model.model.language_model", "model.lm_head"]
    #: why no encoder.input_size bottleneck is needed (a trainer may print it instead of its copy warning)
    bottleneck_by_design: ClassVar[str] = "SigLIP features in, VQ tokens out: no copy path"

    def __init__(
        self,
        cfg: JanusConfig,
        model: transformers.JanusForConditionalGeneration,
        tokenizer,
        processor=None,
        source: str = "random",
    ):
        super().__init__()
        self.cfg, self.model, self.tokenizer, self.processor, self.source = cfg, model, tokenizer, processor, source
        self.resolution = cfg.resolution
        mc = model.config
        vq, vision = mc.vq_config, mc.vision_config
        factor = 2 ** (len(vq.channel_multiplier) - 1)
        native = vq.num_patches * factor
        if cfg.resolution != native:
            raise ValueError(
                f"model.args.resolution: {cfg.resolution} does not match this Janus model's image size {native} "
                f"(VQ grid {vq.num_patches}x{vq.num_patches}, downsampling {factor}); set "
                f"model.args.resolution={native}"
            )
        self.num_image_tokens = vq.num_patches**2
        if vision.num_image_tokens != self.num_image_tokens:
            raise ValueError(
                f"model.args.model_config: vision_config.num_image_tokens={vision.num_image_tokens} must be "
                f"(image_size/patch_size)^2 = {self.num_image_tokens}, the VQ grid"
            )
        if not 0 <= cfg.cond_dropout <= 1:
            raise ValueError("model.args.cond_dropout: must be a probability in [0, 1]")
        for key, slots in (
            ("generation_template", ["{prompt}"]),
            ("understanding_template", ["{image}", "{prompt}"]),
            ("recon_prompt", ["{image}"]),
        ):
            missing = [s for s in slots if s not in getattr(cfg, key)]
            if missing:
                raise ValueError(f"model.args.{key}: needs {' and '.join(missing)}")

        ids = tokenizer.convert_tokens_to_ids
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.boi_token = getattr(tokenizer, "boi_token", None) or BOI_TOKEN
        self.eoi_token = getattr(tokenizer, "eoi_token", None) or EOI_TOKEN
        self.image_id, self.boi_id, self.eoi_id = ids(self.image_token), ids(self.boi_token), ids(self.eoi_token)
        gc = model.generation_config
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else gc.bos_token_id
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else gc.eos_token_id
        self.pad_id = gc.pad_token_id if gc.pad_token_id is not None else tokenizer.pad_token_id
        special = {
            "image": self.image_id,
            "boi": self.boi_id,
            "eoi": self.eoi_id,
            "bos": self.bos_id,
            "eos": self.eos_id,
            "pad": self.pad_id,
        }
        bad = [k for k, v in special.items() if v is None or v == tokenizer.unk_token_id]
        if bad:
            raise ValueError(f"model.args.processor: the tokenizer lacks Janus's {', '.join(bad)} token(s)")
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"model.args.model_config: text_config.vocab_size must be >= {len(tokenizer)} (the tokenizer's size)"
            )
        # what transformers' own generate(generation_mode="image") needs, for users who call it directly
        mc.image_token_id = self.image_id
        gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = self.bos_id, self.eos_id, self.pad_id
        gc.generation_kwargs = {**(getattr(gc, "generation_kwargs", None) or {}), "boi_token_id": self.boi_id}

        hidden = mc.text_config.hidden_size
        self.projector = None
        if cfg.semantic_dim > 0:  # an external encoder: LayerNorm first, encoders' scales differ widely
            self.projector = nn.Sequential(
                nn.LayerNorm(cfg.semantic_dim),
                nn.Linear(cfg.semantic_dim, hidden),
                nn.GELU(),
                nn.Linear(hidden, hidden),
            )
        trainable = list(self.default_trainable)
        if cfg.train_generation_head:
            trainable += [
                "model.model.generation_head",
                "model.model.generation_embeddings",
                "model.model.generation_aligner",
            ]
        if cfg.train_aligner:
            trainable.append("model.model.aligner")
        if self.projector is not None:
            trainable.append("projector")
        self.default_trainable = trainable  # the instance's list overrides the class default
        if (
            self.projector is not None
        ):  # a new projector is random: LoRA on it too (or lora.modules_to_save: [projector])
            self.default_lora_targets = rf"({LM_LORA})|(projector\.(1|3))"
        self.model.model.vqmodel.requires_grad_(False).eval()
        self.model.model.vision_model.requires_grad_(False)

    # ------------------------------------------------------------------ build / save

    @classmethod
    def from_config(cls, args: JanusConfig) -> "JanusAdapter":
        key, ref = ("pretrained", args.pretrained) if args.pretrained else ("model", args.model)
        heads = None
        if ref and (Path(ref) / "reca_adapter.json").is_file():  # a folder written by save_pretrained
            heads = Path(ref) / "heads.safetensors"
            ref = str(Path(ref) / "model")
        if ref:
            model = _load(transformers.JanusForConditionalGeneration.from_pretrained, ref, key)
        elif args.model_config:
            try:
                model = transformers.JanusForConditionalGeneration(transformers.JanusConfig(**args.model_config))
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"model.args.model_config: not a valid JanusConfig: {str(e).splitlines()[0]}"
                ) from None
        else:
            raise ValueError(
                "model.args.model: give a hub id / local dir, or model.args.model_config for a random model"
            )
        if args.processor or ref:
            processor, tokenizer = _load_processor(args.processor or ref, "processor" if args.processor else key)
        else:
            processor, tokenizer = None, byte_tokenizer(extra_special_tokens=[IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN])
        adapter = cls(args, model, tokenizer, processor, source=args.pretrained or args.model or "random")
        if heads is not None and adapter.projector is not None:
            if not heads.is_file():
                raise ValueError(
                    f"model.args.{key}: '{heads.parent}' has no heads.safetensors for the semantic projector "
                    f"(semantic_dim={args.semantic_dim})"
                )
            adapter.projector.load_state_dict(
                {k.removeprefix("projector."): v for k, v in load_file(str(heads)).items()}
            )
        return adapter

    def save_pretrained(self, path: str | Path) -> None:
        """``path/model``: a transformers Janus folder (weights, processor or tokenizer), loadable
        by ``JanusForConditionalGeneration.from_pretrained`` too; ``heads.safetensors``: the
        projector of an external encoder; ``reca_adapter.json``: how to rebuild the adapter.
        (The trainer writes its own ``config.json`` beside them, hence the subfolder.)"""
        path = Path(path)
        self.model.save_pretrained(path / "model")
        (self.processor or self.tokenizer).save_pretrained(path / "model")
        if self.projector is not None:
            save_file(
                {f"projector.{k}": v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()},
                str(path / "heads.safetensors"),
            )
        # "pretrained" is filled with the folder's path when it is loaded (it may have moved)
        args = asdict(self.cfg) | {"model": "", "pretrained": "", "processor": "", "model_config": {}}
        (path / "reca_adapter.json").write_text(
            json.dumps({"adapter": f"{__name__}:{type(self).__name__}", "args": args}, indent=2)
        )

    def enable_gradient_checkpointing(self) -> None:
        self.model.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )

    def compile_modules(self) -> None:
        self.model.model.language_model.compile()

    def train(self, mode: bool = True) -> "JanusAdapter":
        super().train(mode)
        self.model.model.vqmodel.eval()  # frozen tokenizer: its __init__ calls eval() as well
        self.model.model.vision_model.eval()  # frozen semantic encoder
        return self

    def semantic_encoder(self, layer: int = -1, input_size: int = 0):
        """Janus's own frozen SigLIP as reca's semantic encoder (``encoder.kind: umm``).

        ``layer=-1``: the last hidden state after SigLIP's final LayerNorm, which is exactly what
        Janus's ``get_image_features`` feeds its aligner. Other layers: ``hidden_states[layer]``
        (``0`` = patch embeddings), without that LayerNorm. ``input_size`` other than the native
        size interpolates SigLIP's position embeddings (bicubic)."""
        from reca.encoders import FrozenEncoder

        vm = self.model.model.vision_model
        vc = vm.config
        native, patch, depth = vc.image_size, vc.patch_size, vc.num_hidden_layers
        size = input_size or native
        if size % patch:
            raise ConfigError(
                f"encoder.input_size: {size} must be a multiple of Janus's SigLIP patch size {patch} (native {native})"
            )
        if not -(depth + 1) <= layer <= depth:
            raise ConfigError(
                f"encoder.layer: {layer} is out of range for Janus's SigLIP with {depth} layers (-1 = last, as Janus "
                "uses it)"
            )
        mean, std = SIGLIP_MEAN_STD
        ip = getattr(self.processor, "image_processor", None)
        if ip is not None and getattr(ip, "image_mean", None) is not None:
            mean, std = tuple(ip.image_mean), tuple(ip.image_std)

        def features(x: torch.Tensor) -> torch.Tensor:
            out = vm(pixel_values=x, output_hidden_states=layer != -1, interpolate_pos_encoding=x.shape[-1] != native)
            return out.last_hidden_state if layer == -1 else out.hidden_states[layer]

        return FrozenEncoder(
            vm, features, size, mean, std, vc.hidden_size, identity=f"janus:{self.source}:siglip:layer{layer}:{size}px"
        )

    # ------------------------------------------------------------------ prompts

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _clip(self, text: str) -> str:
        """A user text truncated to max_text_tokens (the template around it never is)."""
        ids = self._encode(text)
        return text if len(ids) <= self.cfg.max_text_tokens else self.tokenizer.decode(ids[: self.cfg.max_text_tokens])

    def _image_block(self, n: int) -> str:
        # as JanusProcessor expands an image: BOI, one placeholder per token, EOI
        return self.boi_token + self.image_token * n + self.eoi_token

    def generation_ids(self, cond: Condition, i: int) -> list[int]:
        """Token ids of sample ``i``'s generation prompt: BOS … BOI (image placeholders for semantic tokens)."""
        if cond.texts is not None:
            user = self._clip(cond.texts[i])
        else:
            instruction = self._clip(cond.instructions[i]) if cond.instructions[i] else ""
            user = self.cfg.recon_prompt.format(
                image=self._image_block(cond.semantic.shape[1]), instruction=instruction
            ).strip()
        return [self.bos_id] + self._encode(self.cfg.generation_template.format(prompt=user)) + [self.boi_id]

    def unconditional_ids(self, ids: list[int]) -> list[int]:
        # DeepSeek's generation_inference.py and transformers' generate: every token but BOS and the
        # final BOI becomes pad (same length, attended)
        return [ids[0]] + [self.pad_id] * (len(ids) - 2) + [ids[-1]]

    def _semantic_embeds(self, semantic: torch.Tensor) -> torch.Tensor:
        """(N, D) semantic tokens → (N, hidden): Janus's aligner, or the projector of an external encoder."""
        mod = self.projector if self.projector is not None else self.model.model.aligner
        width = mod[0].normalized_shape[0] if self.projector is not None else mod.fc1.in_features
        if semantic.shape[-1] != width:
            raise ValueError(
                f"semantic tokens have width {semantic.shape[-1]} but the "
                f"{'projector' if self.projector is not None else 'Janus aligner'} "
                f"takes {width}: use encoder.kind=umm (Janus's SigLIP), or set model.args.semantic_dim to the "
                "encoder's width"
            )
        param = next(mod.parameters())
        return mod(semantic.to(param.device, param.dtype))

    def _embed(self, ids: list[int], semantic: torch.Tensor | None) -> torch.Tensor:
        """Embeddings of ``ids`` with the semantic tokens placed at the image placeholders
        (``JanusModel.forward``'s masked_scatter, per sample)."""
        emb = self.model.get_input_embeddings()
        t = torch.tensor(ids, dtype=torch.long, device=emb.weight.device)
        x = emb(t)
        if semantic is not None:
            pos = (t == self.image_id).nonzero()[:, 0]
            if len(pos) != semantic.shape[0]:
                raise ValueError(
                    f"prompt has {len(pos)} image placeholders for {semantic.shape[0]} semantic tokens (a text "
                    f"contains '{self.image_token}'?)"
                )
            x = x.index_put((pos,), self._semantic_embeds(semantic).to(x.dtype))
        return x

    def _prompt_rows(self, cond: Condition, drop: Sequence[bool]) -> list[torch.Tensor]:
        rows = []
        for i in range(len(cond)):
            ids = self.generation_ids(cond, i)
            if drop[i]:
                rows.append(self._embed(self.unconditional_ids(ids), None))
            else:
                rows.append(self._embed(ids, None if cond.semantic is None else cond.semantic[i]))
        return rows

    # ------------------------------------------------------------------ losses

    @torch.no_grad()
    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] → the frozen VQ model's token ids ``(B, N)``, raster order."""
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            raise ValueError(
                f"images are {tuple(images.shape[-2:])}, the Janus VQ model takes {self.resolution}x{self.resolution}"
            )
        vq = self.model.model.vqmodel
        param = next(vq.parameters())
        with torch.autocast(param.device.type, enabled=False):  # nearest-code argmin in the VQ's own precision
            tokens = vq.encode(images.to(param.device, param.dtype)).image_tokens
        return tokens.view(images.shape[0], -1)

    def image_logits(
        self, images: torch.Tensor, cond: Condition, drop: Sequence[bool] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced generation-head logits ``(B, N, codebook)`` and the VQ target tokens ``(B, N)``.

        [left-padded prompt … BOI] + image-token embeddings through the LLM; the hidden state at
        position P-1+k predicts image token k."""
        drop = drop if drop is not None else [False] * len(cond)
        tokens = self.encode_image_tokens(images)
        prompt, pmask = left_pad(self._prompt_rows(cond, drop))
        image = self.model.prepare_embeddings_for_image_generation(tokens.to(prompt.device))
        embeds = torch.cat([prompt, image.to(prompt.dtype)], 1)
        mask = torch.cat([pmask, torch.ones(tokens.shape, dtype=pmask.dtype, device=pmask.device)], 1)
        hidden = self.model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask)
        ).last_hidden_state
        p = prompt.shape[1]
        return self.model.model.generation_head(hidden[:, p - 1 : -1]), tokens

    def generation_loss(self, images: torch.Tensor, cond: Condition, seeds: Sequence[int]) -> torch.Tensor:
        logits, tokens = self.image_logits(images, cond, dropped(seeds, self.cfg.cond_dropout))
        ce = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten().to(logits.device), reduction="none")
        # per-sample token mean, then mean over samples (every sample has N tokens: one plain mean)
        return ce.view(tokens.shape).mean(1).mean()

    def _understanding_batch(self, semantic, prompts, answers):
        rows, labels = [], []
        for sem, prompt, answer in zip(semantic, prompts, answers):
            head = [self.bos_id] + self._encode(
                self.cfg.understanding_template.format(image=self._image_block(sem.shape[0]), prompt=self._clip(prompt))
            )
            ans = self._encode(" " + self._clip(answer)) + [self.eos_id]  # Janus SFT: "<|Assistant|>: answer<eos>"
            rows.append(self._embed(head + ans, sem))
            labels.append(torch.tensor([IGNORE] * len(head) + ans))
        return right_pad(rows, labels)

    def _answer_token_logprobs(self, semantic, prompts, answers) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask, labels = self._understanding_batch(semantic, prompts, answers)
        hidden = self.model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask)
        ).last_hidden_state
        return answer_logprobs(hidden, labels, self.model.lm_head)

    def understanding_loss(
        self, semantic: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]
    ) -> torch.Tensor:
        return sequence_nll(*self._answer_token_logprobs(semantic, prompts, answers))

    def answer_logprob(self, semantic: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        logp, _ = self._answer_token_logprobs(semantic, prompts, answers)
        return logp.sum(1)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample_tokens(self, cond: Condition, seeds: Sequence[int], guidance_scale: float) -> torch.Tensor:
        """Image tokens ``(B, N)``: autoregressive sampling from the generation head, temperature 1,
        CFG by batch doubling; sample ``i`` draws only from its own generator seeded with ``seeds[i]``
        (on the model's device). On CPU these are the very draws transformers' ``generate`` makes
        for a batch of one after ``torch.manual_seed(seed)`` (tested)."""
        n = len(cond)
        use_cfg = guidance_scale != 1.0
        rows = self._prompt_rows(cond, [False] * n)
        if use_cfg:
            rows += self._prompt_rows(cond, [True] * n)
        x, mask = left_pad(rows)
        positions = position_ids(mask)
        device = x.device
        generators = [generator(s, "noise", device=device) for s in seeds]
        lm, head = self.model.model.language_model, self.model.model.generation_head
        tokens = torch.zeros(n, self.num_image_tokens, dtype=torch.long, device=device)
        cache = None
        for k in range(self.num_image_tokens):
            out = lm(
                inputs_embeds=x, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
            )
            cache = out.past_key_values
            logits = head(out.last_hidden_state[:, -1])
            if use_cfg:
                cond_logits, uncond_logits = logits.split(n)
                logits = uncond_logits + (cond_logits - uncond_logits) * guidance_scale
            probs = torch.softmax(logits, dim=-1)
            tokens[:, k] = torch.cat(
                [torch.multinomial(probs[i : i + 1], 1, generator=generators[i])[:, 0] for i in range(n)]
            )
            step = torch.cat([tokens[:, k], tokens[:, k]]) if use_cfg else tokens[:, k]
            x = self.model.prepare_embeddings_for_image_generation(step[:, None]).to(x.dtype)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            positions = positions[:, -1:] + 1
        return tokens

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> list[Image.Image]:
        vq = self.model.model.vqmodel
        with torch.autocast(tokens.device.type, enabled=False):
            pixels = self.model.decode_image_tokens(tokens.to(next(vq.parameters()).device))  # (B, H, W, C) in [-1, 1]
        images = to_pil(pixels, channels_last=True)
        return [
            im if im.size == (self.resolution, self.resolution) else im.resize((self.resolution,) * 2, Image.BICUBIC)
            for im in images
        ]

    def _sample_in_chunks(self, cond: Condition, seeds: Sequence[int], guidance_scale: float) -> list[torch.Tensor]:
        if len(seeds) != len(cond):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(cond)} conditions")
        chunks = []
        bs = max(1, self.cfg.generate_batch_size)
        for start in range(0, len(cond), bs):
            sl = slice(start, start + bs)
            if cond.texts is not None:
                part = Condition(texts=cond.texts[sl])
            else:
                part = Condition(semantic=cond.semantic[sl], instructions=cond.instructions[sl])
            chunks.append(self.sample_tokens(part, list(seeds[sl]), guidance_scale))
        return chunks

    @torch.no_grad()
    def generate(
        self, cond: Condition, *, seeds: Sequence[int], guidance_scale: float = 5.0, num_steps: int = 0
    ) -> list[Image.Image]:
        """One image per condition entry. ``num_steps`` is ignored: autoregressive sampling always
        takes one step per VQ token (576 for Janus-Pro). Janus-Pro's default guidance is 5."""
        return [
            im for tokens in self._sample_in_chunks(cond, seeds, guidance_scale) for im in self.decode_tokens(tokens)
        ]

    @torch.no_grad()
    def hidden_states(
        self, cond: Condition, answers: Sequence[str] | None = None
    ) -> list[tuple[list[torch.Tensor], int]]:
        """Per sample: the LLM's hidden states ``(T, d)`` at every layer (embeddings first) over
        [prompt ; response], and the prompt length (reca.adapter.Traceable, for eval/probe.py).
        With ``answers``: the response is the answer's tokens + EOS after the image and the question
        (``cond.instructions``), teacher-forced. Without: the response is the image-token positions
        of an image the model samples for the prompt (seed = the sample's index, guidance 5 —
        Janus-Pro's default), teacher-forced."""
        if answers is None:
            tokens = torch.cat(self._sample_in_chunks(cond, list(range(len(cond))), 5.0))
            rows = self._prompt_rows(cond, [False] * len(cond))
            seqs = [
                (
                    torch.cat([r, self.model.prepare_embeddings_for_image_generation(t.to(r.device)).to(r.dtype)]),
                    r.shape[0],
                )
                for r, t in zip(rows, tokens)
            ]
        else:
            if cond.semantic is None:
                raise ValueError(
                    "text responses are traced for image prompts (captioning): give Condition(semantic=...)"
                )
            embeds, mask, labels = self._understanding_batch(cond.semantic, cond.instructions, answers)
            seqs = answer_sequences(embeds, mask, labels)
        return layer_states(self.model.model.language_model, seqs)
