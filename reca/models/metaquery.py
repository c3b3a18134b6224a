"""Reference UMM in the MetaQuery / OpenUni style: a causal LM reads text or projected semantic
image tokens, N learnable queries are appended, a connector maps the queries' last hidden states to
the conditioning sequence of a diffusers transformer (Sana, or PixArt) that denoises in a diffusers
VAE's latent space with rectified flow.

Understanding (image → text) runs through the LM head on the same projected semantic tokens, so
image-to-text data keeps the shared projector and LM honest while RecA trains generation.

Every part loads real weights by hub id or local dir (``lm``, ``transformer``, ``vae``, ``heads``),
or is built randomly from a ``*_config`` mapping for tests.
"""

from __future__ import annotations

import copy
import dataclasses
import json
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
from reca.flow import flow_matching_loss, guided, noisy_latents, sample_sigmas, velocity_from_x0, x0_loss
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
from reca.seeds import dropped, per_sample_noise


@dataclass
class MetaQueryConfig:
    pretrained: str = field(
        default="", metadata={"help": "a directory written by save_pretrained; fills lm, transformer, vae and heads"}
    )
    lm: str = field(
        default="", metadata={"help": "transformers causal LM: hub id or local dir; empty = random from lm_config"}
    )
    lm_config: dict = field(default_factory=dict, metadata={"help": "LlamaConfig fields for a random LM (tests)"})
    tokenizer: str = field(
        default="", metadata={"help": "tokenizer hub id or dir; empty = the LM's, or a byte-level one for random LMs"}
    )
    transformer: str = field(
        default="",
        metadata={"help": "diffusers transformer: hub id or local dir; empty = random from transformer_config"},
    )
    transformer_subfolder: str = field(
        default="", metadata={"help": "subfolder inside the transformer repo (e.g. 'transformer')"}
    )
    transformer_class: Literal["SanaTransformer2DModel", "PixArtTransformer2DModel"] = field(
        default="SanaTransformer2DModel", metadata={"help": "diffusers transformer class"}
    )
    transformer_config: dict = field(
        default_factory=dict, metadata={"help": "constructor fields for a random transformer (tests)"}
    )
    vae: str = field(
        default="", metadata={"help": "diffusers VAE: hub id or local dir; empty = random from vae_config"}
    )
    vae_subfolder: str = field(default="", metadata={"help": "subfolder inside the VAE repo (e.g. 'vae')"})
    vae_class: Literal["AutoencoderKL", "AutoencoderDC", "none"] = field(
        default="AutoencoderKL",
        metadata={
            "help": "diffusers VAE class (Sana ships AutoencoderDC); none = denoise pixels directly (small images)"
        },
    )
    vae_config: dict = field(default_factory=dict, metadata={"help": "constructor fields for a random VAE (tests)"})
    heads: str = field(
        default="",
        metadata={"help": "safetensors file with reca's projector, queries and connector; empty = random init"},
    )
    num_queries: int = field(default=64, metadata={"help": "learnable query tokens appended after the prompt"})
    semantic_dim: int = field(
        default=0, metadata={"help": "width of the frozen encoder's tokens; 0 = taken from the encoder"}
    )
    resolution: int = field(default=256, metadata={"help": "generation resolution in pixels"})
    max_text_tokens: int = field(default=128, metadata={"help": "prompts are truncated to this many tokens"})
    cond_dropout: float = field(
        default=0.1, metadata={"help": "probability of training on the empty condition (classifier-free guidance)"}
    )
    weighting_scheme: Literal["logit_normal", "uniform", "mode", "sigma_sqrt", "cosmap"] = field(
        default="logit_normal", metadata={"help": "timestep density / loss weighting (diffusers.training_utils)"}
    )
    logit_mean: float = field(default=0.0, metadata={"help": "logit-normal mean"})
    logit_std: float = field(default=1.0, metadata={"help": "logit-normal std"})
    flow_shift: float = field(default=1.0, metadata={"help": "FlowMatchEulerDiscreteScheduler shift"})
    prediction: Literal["velocity", "x0"] = field(
        default="velocity",
        metadata={"help": "what the DiT predicts: the flow velocity (diffusers' scripts) or the clean sample x0"},
    )
    text_path: Literal["lm", "encoder"] = field(
        default="lm",
        metadata={
            "help": (
                "text prompts enter as LM tokens, or as the frozen encoder's text embedding through the same "
                "projector as image tokens (needs encoder.space=joint)"
            )
        },
    )


def _load(cls, ref: str, subfolder: str, config: dict, what: str):
    if ref:
        try:
            return cls.from_pretrained(ref, **({"subfolder": subfolder} if subfolder else {}))
        except (OSError, ValueError) as e:
            raise ValueError(
                f"model.args.{what}: cannot load '{ref}' (hub id or local dir): {str(e).splitlines()[0]}"
            ) from None
    if not config:
        raise ValueError(
            f"model.args.{what}: give a hub id / local dir, or model.args.{what}_config for a random model"
        )
    return cls(**config)


class MetaQueryAdapter(nn.Module):
    Config: ClassVar[type] = MetaQueryConfig
    # LoRA on the LM's attention; on the DiT's attention (output projection included), feed-forward
    # and caption projection; and on reca's own projector and connector layers. Attention alone
    # (q/k/v) moved rare prompts much less on the demo's dev side (docs/demo.md, "LoRA targets").
    # Sana's feed-forward is convolutional (GLUMBConv) and not a default target: peft's PiSSA and
    # OLoRA initialisations (lora.init) refuse Conv2d layers; lora.target_modules can add them.
    default_lora_targets: ClassVar[str] = (
        r"(lm\..*\.(q_proj|k_proj|v_proj|o_proj))"
        r"|(transformer\..*\.(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2))"
        r"|(transformer\.caption_projection\.linear_(1|2))|(sem_proj\.(1|3))|(connector\.(0|2))"
    )
    # OpenUni trains the connector and the DiT with the LMM frozen (official RecA repo, OpenUni/
    # configs); the semantic
    # projector is trained too and kept honest by image-to-text mixing.
    default_trainable: ClassVar[list[str]] = ["sem_proj", "queries", "connector", "transformer"]

    def __init__(self, cfg: MetaQueryConfig, lm: nn.Module, tokenizer, transformer: nn.Module, vae: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.resolution = cfg.resolution
        self.lm, self.tokenizer, self.transformer, self.vae = lm, tokenizer, transformer, vae
        if vae is not None:
            self.vae.requires_grad_(False).eval()  # the latent space is fixed; never trained
        hidden = lm.config.hidden_size
        cond_dim = transformer.config.caption_channels
        if cfg.semantic_dim <= 0:
            raise ValueError(
                "model.args.semantic_dim: must be > 0 (build through reca.build, which takes it from the encoder)"
            )
        # LayerNorm first: encoder tokens (and pooled vs patch tokens) differ widely in scale
        self.sem_proj = nn.Sequential(
            nn.LayerNorm(cfg.semantic_dim), nn.Linear(cfg.semantic_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, hidden) * hidden**-0.5)
        self.connector = nn.Sequential(nn.Linear(hidden, cond_dim), nn.GELU(), nn.Linear(cond_dim, cond_dim))
        self.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift)
        self.train_sigmas = self.scheduler.sigmas.clone()  # a copy: set_timesteps overwrites them
        if vae is None:  # pixel space
            self.latent_size, self.latent_channels = cfg.resolution, 3
        else:
            vc = vae.config
            blocks = vc.get("encoder_block_out_channels") or vc.get("block_out_channels")
            self.latent_size = cfg.resolution // 2 ** (len(blocks) - 1)
            self.latent_channels = vc.latent_channels
        # the VAE halves the side len(blocks) - 1 times and the transformer cuts p×p patches: any
        # other size would be floored (a cropped target) or fail deep inside the forward pass
        multiple = (1 if vae is None else 2 ** (len(blocks) - 1)) * (transformer.config.get("patch_size") or 1)
        if cfg.resolution <= 0 or cfg.resolution % multiple:
            raise ValueError(
                f"model.args.resolution: {cfg.resolution} must be a positive multiple of {multiple} "
                "(VAE downsampling × transformer patch size)"
            )
        self._encoder = None  # the frozen semantic encoder, for text_path=encoder (never a submodule)
        if cfg.heads:
            self.load_heads(cfg.heads)

    # ------------------------------------------------------------------ build / save

    @classmethod
    def from_config(cls, args: MetaQueryConfig) -> "MetaQueryAdapter":
        if args.pretrained:
            root = Path(args.pretrained)
            args = dataclasses.replace(
                args,
                lm=str(root / "lm"),
                tokenizer=str(root / "lm"),
                transformer=str(root / "transformer"),
                transformer_subfolder="",
                vae=str(root / "vae"),
                vae_subfolder="",
                heads=str(root / "heads.safetensors"),
            )
        if args.lm:
            lm = _load(transformers.AutoModelForCausalLM, args.lm, "", {}, "lm")
        elif args.lm_config:
            lm = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**args.lm_config))
        else:
            raise ValueError("model.args.lm: give a hub id / local dir, or model.args.lm_config for a random LM")
        if args.tokenizer or args.lm:
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.lm)
        else:
            tokenizer = byte_tokenizer()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
            raise ValueError(f"model.args.lm_config: vocab_size must be >= {len(tokenizer)} (the tokenizer's size)")
        transformer = _load(
            getattr(diffusers, args.transformer_class),
            args.transformer,
            args.transformer_subfolder,
            args.transformer_config,
            "transformer",
        )
        vae = (
            None
            if args.vae_class == "none"
            else _load(getattr(diffusers, args.vae_class), args.vae, args.vae_subfolder, args.vae_config, "vae")
        )
        return cls(args, lm, tokenizer, transformer, vae)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.lm.save_pretrained(path / "lm")
        self.tokenizer.save_pretrained(path / "lm")
        self.transformer.save_pretrained(path / "transformer")
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae")
        save_file({k: v.detach().contiguous().cpu() for k, v in self._heads().items()}, str(path / "heads.safetensors"))
        # "pretrained" is filled in with the folder's path when it is loaded (it may be moved)
        args = asdict(self.cfg) | {
            "pretrained": "",
            "lm": "",
            "tokenizer": "",
            "transformer": "",
            "vae": "",
            "heads": "",
        }
        (path / "reca_adapter.json").write_text(
            json.dumps({"adapter": f"{__name__}:{type(self).__name__}", "args": args}, indent=2)
        )

    def _heads(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in ("sem_proj", "queries", "connector")}

    def load_heads(self, path: str) -> None:
        try:
            state = load_file(path)
        except (OSError, FileNotFoundError) as e:
            raise ValueError(f"model.args.heads: cannot read '{path}': {e}") from None
        missing = set(self._heads()) - set(state)
        if missing:
            raise ValueError(f"model.args.heads: '{path}' lacks {sorted(missing)[:3]}")
        self.load_state_dict(state, strict=False)

    def enable_gradient_checkpointing(self) -> None:
        self.lm.activation_checkpointing_enable({"use_reentrant": False})
        self.transformer.enable_gradient_checkpointing()

    def compile_modules(self) -> None:
        self.lm.compile()
        self.transformer.compile()

    def train(self, mode: bool = True) -> "MetaQueryAdapter":
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    def attach_encoder(self, encoder) -> None:
        """reca.build hands over the frozen encoder; used for text prompts when text_path=encoder."""
        self._encoder = encoder

    # ------------------------------------------------------------------ conditioning

    def _token_ids(self, texts: Sequence[str]) -> dict[str, list[int]]:
        """Token ids of each distinct text, from one tokenizer call. A batch repeats a few strings
        (the empty prompt, the instruction, the question): a call per sample and per piece cost
        ~0.3 ms each, ~15 % of the demo model's training step (cProfile of 10 steps)."""
        distinct = list(dict.fromkeys(texts))
        ids = self.tokenizer(
            distinct, add_special_tokens=False, truncation=True, max_length=self.cfg.max_text_tokens
        ).input_ids
        return dict(zip(distinct, ids))

    def _embed_texts(self, texts: Sequence[str], bos: bool) -> list[torch.Tensor]:
        """Token embeddings ``(T_i, d)`` of each text, BOS first when ``bos``; each distinct text once."""
        head = [self.tokenizer.bos_token_id] if bos and self.tokenizer.bos_token_id is not None else []
        emb = self.lm.get_input_embeddings()
        by_text = {
            text: emb(torch.tensor(head + ids, dtype=torch.long, device=emb.weight.device))
            for text, ids in self._token_ids(texts).items()
        }
        return [by_text[t] for t in texts]

    def _prompt_pieces(self, cond: Condition, drop: Sequence[bool]) -> list[torch.Tensor]:
        """Per sample, the prompt embeddings before the queries: text, or [semantic ; instruction]."""
        n = len(cond)
        (bos,) = self._embed_texts([""], bos=True)
        if cond.texts is not None and self.cfg.text_path == "encoder":
            if self._encoder is None:
                raise ValueError(
                    "model.args.text_path: 'encoder' needs the frozen encoder attached (build through reca.build)"
                )
            text_tokens = self.sem_proj(self._encoder.encode_text(cond.texts).to(self.queries))
            return [bos if drop[i] else torch.cat([bos, text_tokens[i]]) for i in range(n)]
        if cond.texts is not None:
            texts = self._embed_texts(cond.texts, bos=True)
            return [bos if drop[i] else texts[i] for i in range(n)]
        sem = self.sem_proj(cond.semantic.to(self.queries))  # every sample's tokens in one call
        instructions = self._embed_texts(cond.instructions, bos=False)
        return [
            bos if drop[i] else torch.cat([bos, sem[i]] + ([instructions[i]] if cond.instructions[i] else []))
            for i in range(n)
        ]

    def _run_lm(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """Left-pads the pieces so every sequence ends with its own tokens; returns last hidden states."""
        embeds, mask = left_pad(pieces)
        return self._base()(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask)
        ).last_hidden_state

    def _base(self) -> nn.Module:
        """The LM without its head (hidden states only)."""
        return getattr(self.lm, self.lm.base_model_prefix)

    def condition(self, cond: Condition, drop: Sequence[bool] | None = None) -> torch.Tensor:
        """The DiT's conditioning sequence ``(B, num_queries, caption_channels)``."""
        drop = drop if drop is not None else [False] * len(cond)
        queries = self.queries
        pieces = [torch.cat([p, queries.to(p.dtype)]) for p in self._prompt_pieces(cond, drop)]
        hidden = self._run_lm(pieces)[:, -self.cfg.num_queries :]
        return self.connector(hidden.to(self.connector[0].weight.dtype))

    # ------------------------------------------------------------------ losses

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        if vae is None:
            return images.float()
        out = vae.encode(images.to(vae.device, vae.dtype))
        # the distribution's mean, not a sample: deterministic, and the latent noise is negligible
        # next to the flow-matching noise (Sana's DC-AE has no distribution at all).
        lat = out.latent if hasattr(out, "latent") else out.latent_dist.mode()
        shift = vae.config.get("shift_factor") or 0.0
        return ((lat - shift) * vae.config.scaling_factor).float()

    def generation_loss(self, images: torch.Tensor, cond: Condition, seeds: Sequence[int]) -> torch.Tensor:
        x0 = self.encode_latents(images)
        enc = self.condition(cond, dropped(seeds, self.cfg.cond_dropout))
        noise = per_sample_noise(seeds, tuple(x0.shape[1:])).to(x0)
        sigmas = sample_sigmas(
            seeds, self.train_sigmas, self.cfg.weighting_scheme, self.cfg.logit_mean, self.cfg.logit_std
        ).to(x0.device)
        xt = noisy_latents(x0, noise, sigmas)
        dtype = self.transformer.dtype
        pred = self.transformer(
            xt.to(dtype),
            encoder_hidden_states=enc.to(dtype),
            timestep=(sigmas * self.scheduler.config.num_train_timesteps).to(dtype),
            encoder_attention_mask=torch.ones(enc.shape[:2], device=enc.device),
        ).sample
        if pred.shape[1] != x0.shape[1]:  # PixArt also predicts variance: keep the mean channels
            pred = pred[:, : x0.shape[1]]
        if self.cfg.prediction == "x0":
            return x0_loss(pred, x0, sigmas, self.cfg.weighting_scheme)
        return flow_matching_loss(pred, x0, noise, sigmas, self.cfg.weighting_scheme)

    def _understanding_batch(self, semantic: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]):
        embed = self.lm.get_input_embeddings()
        (bos,) = self._embed_texts([""], bos=True)
        sem = self.sem_proj(semantic.to(self.queries)).to(embed.weight.dtype)
        questions = self._embed_texts(prompts, bos=False)
        answer_ids = self._token_ids(answers)
        rows, targets = [], []
        for i, answer in enumerate(answers):
            head = torch.cat([bos, sem[i], questions[i]])
            ans_t = torch.tensor(answer_ids[answer] + [self.tokenizer.eos_token_id], device=embed.weight.device)
            rows.append(torch.cat([head, embed(ans_t)]))
            targets.append(torch.cat([torch.full((head.shape[0],), IGNORE, device=ans_t.device), ans_t]))
        return right_pad(rows, targets)

    def _answer_token_logprobs(self, semantic, prompts, answers) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask, labels = self._understanding_batch(semantic, prompts, answers)
        hidden = self._base()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return answer_logprobs(hidden, labels, self.lm.get_output_embeddings())

    def understanding_loss(
        self, semantic: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]
    ) -> torch.Tensor:
        return sequence_nll(*self._answer_token_logprobs(semantic, prompts, answers))

    def answer_logprob(self, semantic: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        logp, _ = self._answer_token_logprobs(semantic, prompts, answers)
        return logp.sum(1)

    # ------------------------------------------------------------------ probe

    @torch.no_grad()
    def hidden_states(
        self, cond: Condition, answers: Sequence[str] | None = None
    ) -> list[tuple[list[torch.Tensor], int]]:
        """Per sample: the LM's hidden states ``(T, d)`` at every layer (embeddings first) over
        [prompt ; response], and the prompt length. The response is the answer's tokens when
        ``answers`` is given (text generation; ``cond.instructions`` are the questions), else the
        learnable queries — in this architecture they are what carries the image to the DiT, so
        they are the image response (reca.adapter.Traceable)."""
        if answers is None:
            pieces = self._prompt_pieces(cond, [False] * len(cond))
            seqs = [(torch.cat([p, self.queries.to(p.dtype)]), p.shape[0]) for p in pieces]
        else:
            if cond.semantic is None:
                raise ValueError(
                    "text responses are traced for image prompts (captioning): give Condition(semantic=...)"
                )
            embeds, mask, labels = self._understanding_batch(cond.semantic, cond.instructions, answers)
            seqs = answer_sequences(embeds, mask, labels)
        return layer_states(self._base(), seqs)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(
        self, cond: Condition, *, seeds: Sequence[int], guidance_scale: float = 3.0, num_steps: int = 20
    ) -> list[Image.Image]:
        n = len(cond)
        enc = self.condition(cond)
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            enc = torch.cat([self.condition(cond, [True] * n), enc])
        shape = (self.latent_channels, self.latent_size, self.latent_size)
        dtype = self.transformer.dtype
        latents = per_sample_noise(seeds, shape).to(enc.device)
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(num_steps, device=enc.device)
        for t in scheduler.timesteps:
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            pred = self.transformer(
                model_in.to(dtype),
                encoder_hidden_states=enc.to(dtype),
                timestep=t.expand(model_in.shape[0]).to(dtype),
                encoder_attention_mask=torch.ones(enc.shape[:2], device=enc.device),
            ).sample.float()
            pred = pred[:, : self.latent_channels]
            if use_cfg:
                pred = guided(*pred.chunk(2), guidance_scale)
            if self.cfg.prediction == "x0":
                pred = velocity_from_x0(latents, pred, t / self.scheduler.config.num_train_timesteps)
            latents = scheduler.step(pred, t, latents).prev_sample
        vae = self.vae
        if vae is None:
            return to_pil(latents)
        shift = vae.config.get("shift_factor") or 0.0
        return to_pil(vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample)
