"""Masked autoregressive generation over continuous tokens (MAR, Li et al. 2024, arXiv 2406.11838), as
Harmon uses it: a MAE-style ViT encoder over the visible VAE tokens, a ViT decoder that fills the
masked positions with a learned mask token, and a small per-token diffusion head ("diffusion loss")
conditioned on the decoder's output.

Written for reca from the MAR paper and from reading wusize/Harmon ``src/models/mar/`` (mar.py,
diffloss.py, diffusion/). Parameter names follow that code's state dict (``mar.*`` in Harmon's public
checkpoints), so the public weights load without renaming. Everything random comes from explicit
``torch.Generator`` objects: masking orders, mask ratios, timesteps and noise are drawn per sample
by the caller (reca.models.harmon), never from the global RNG.

The diffusion head's noise schedule and its sampling steps are diffusers' ``DDPMScheduler``
(``squaredcos_cap_v2`` = iDDPM's cosine betas, ``learned_range`` variances, ``linspace`` respacing
— the same timesteps as iDDPM's ``space_timesteps(1000, "100")``). The training loss is iDDPM's
hybrid objective, which MAR keeps: ε-MSE plus the variational-bound term that trains the learned
variance (mean detached), computed here from the scheduler's own tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from timm.models.vision_transformer import Block
from torch import nn


@dataclass
class MARConfig:
    """Sizes of Harmon's MAR (wusize/Harmon configs/models/qwen2_5_{0_5b,1_5b}_kl16_mar_{b,h}.py)."""

    img_size: int = field(
        default=256,
        metadata={
            "help": (
                "image size the learned position embeddings were made for (Harmon: 256, i.e. a "
                "16x16 grid; other sizes interpolate them)"
            )
        },
    )
    vae_stride: int = field(default=16, metadata={"help": "VAE downsampling factor (KL-16: 16)"})
    patch_size: int = field(default=1, metadata={"help": "VAE latents per MAR token side (Harmon: 1)"})
    vae_embed_dim: int = field(default=16, metadata={"help": "VAE latent channels (KL-16: 16)"})
    encoder_embed_dim: int = field(default=1280, metadata={"help": "MAR encoder width (mar_huge 1280, mar_base 768)"})
    encoder_depth: int = field(default=20, metadata={"help": "MAR encoder blocks (mar_huge 20, mar_base 12)"})
    encoder_num_heads: int = field(default=16, metadata={"help": "MAR encoder heads (mar_huge 16, mar_base 12)"})
    decoder_embed_dim: int = field(default=1280, metadata={"help": "MAR decoder width"})
    decoder_depth: int = field(default=20, metadata={"help": "MAR decoder blocks"})
    decoder_num_heads: int = field(default=16, metadata={"help": "MAR decoder heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "ViT block MLP ratio"})
    buffer_size: int = field(
        default=64, metadata={"help": "learned buffer tokens before the image tokens (MAR's class-token slots)"}
    )
    dropout: float = field(
        default=0.0,
        metadata={
            "help": (
                "attention and projection dropout in the MAR blocks; Harmon trains with 0.1, reca "
                "defaults to 0 because dropout draws from the global RNG (resume and DDP would no "
                "longer be exact)"
            )
        },
    )
    diffloss_d: int = field(default=12, metadata={"help": "diffusion head residual blocks (Harmon-1.5B 12, -0.5B 6)"})
    diffloss_w: int = field(default=1536, metadata={"help": "diffusion head width (Harmon-1.5B 1536, -0.5B 1024)"})
    num_sampling_steps: int = field(
        default=100, metadata={"help": "diffusion head denoising steps per MAR iteration at sampling (Harmon: 100)"}
    )
    diffusion_batch_mul: int = field(
        default=4, metadata={"help": "each target token is trained at this many timesteps per step (MAR: 4)"}
    )
    mask_ratio_min: float = field(
        default=0.7,
        metadata={"help": "mask ratios are drawn from a normal(1, 0.25) truncated to [mask_ratio_min, 1] (MAR)"},
    )
    noise_schedule: Literal["cosine", "linear"] = field(
        default="cosine", metadata={"help": "diffusion head betas: cosine (iDDPM, MAR's choice) or linear"}
    )
    num_train_timesteps: int = field(default=1000, metadata={"help": "diffusion head training timesteps"})

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size**2

    @property
    def grid(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size


def make_scheduler(cfg: MARConfig) -> DDPMScheduler:
    betas = {
        "cosine": {"beta_schedule": "squaredcos_cap_v2"},
        # iDDPM's linear schedule: 1e-4 … 0.02 for 1000 steps, scaled by 1000 / T
        "linear": {
            "beta_schedule": "linear",
            "beta_start": 1e-4 * 1000 / cfg.num_train_timesteps,
            "beta_end": 0.02 * 1000 / cfg.num_train_timesteps,
        },
    }[cfg.noise_schedule]
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        variance_type="learned_range",
        clip_sample=False,
        timestep_spacing="linspace",
        **betas,
    )


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # DiT/GLIDE sinusoids, cos half first (diffusers: flip_sin_to_cos=True, no frequency shift)
        freq = get_timestep_embedding(t, self.frequencies, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class AdaLNMLP(nn.Module):
    """MAR's denoiser: an MLP of adaLN residual blocks on one token, conditioned on timestep + z.
    Outputs ε and the learned-variance interpolation value (2 x channels)."""

    def __init__(self, channels: int, width: int, z_channels: int, depth: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, 2 * channels)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        dtype = self.input_proj.weight.dtype
        x = self.input_proj(x.to(dtype))
        y = self.time_embed(t) + self.cond_embed(c.to(dtype))
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """iDDPM's decoder NLL L_0 (nats): a Gaussian integrated over the 1/255-wide bin around x, with
    the outermost bins open (Ho et al. 2020 eq. 13)."""
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return -torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DiffusionHead(nn.Module):
    """MAR's per-token diffusion loss and sampler around :class:`AdaLNMLP` (``net``)."""

    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.channels = cfg.token_dim
        self.net = AdaLNMLP(cfg.token_dim, cfg.diffloss_w, cfg.decoder_embed_dim, cfg.diffloss_d)
        self.scheduler = make_scheduler(cfg)
        self.num_sampling_steps = cfg.num_sampling_steps
        # float64 posterior tables of the training process (q(x_{t-1} | x_t, x_0)), from the scheduler's betas
        betas = self.scheduler.betas.double()
        ac = torch.cumprod(1 - betas, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)
        self._tables = {
            "sqrt_ac": ac.sqrt(),
            "sqrt_1m_ac": (1 - ac).sqrt(),
            "sqrt_recip_ac": (1 / ac).sqrt(),
            "sqrt_recipm1_ac": (1 / ac - 1).sqrt(),
            "coef_x0": betas * ac_prev.sqrt() / (1 - ac),
            "coef_xt": (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
            # the posterior variance is 0 at t = 0: its log is clipped to the t = 1 value (iDDPM)
            "post_logvar": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "log_beta": betas.log(),
        }

    def _table(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._tables[name].to(t.device)[t].to(like.dtype)[:, None]

    def loss(self, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-row hybrid loss ``(N,)``: ε-MSE + the variational-bound term (in bits, mean over
        channels) that trains the variance; ``target`` (N, C) clean tokens, ``z`` (N, D) conditions,
        ``t`` (N,) timesteps, ``noise`` (N, C)."""
        x0 = target.float()
        tab = partial(self._table, t=t, like=x0)
        # q(x_t | x_0) from float64 tables: the scheduler's float32 alphas_cumprod loses 1 - ᾱ_t to
        # cancellation at small t (ᾱ_0 ≈ 1 - 4e-5), which the variance term, divided by σ² ≈ 1e-5, amplifies
        x_t = tab("sqrt_ac") * x0 + tab("sqrt_1m_ac") * noise.to(x0)
        eps, v = self.net(x_t, t, z).float().split(self.channels, dim=-1)
        mse = (noise.to(x0) - eps).pow(2).mean(-1)
        true_mean = tab("coef_x0") * x0 + tab("coef_xt") * x_t
        true_logvar = tab("post_logvar")
        # the variance term must not move the mean: ε is detached here (iDDPM, "hybrid" loss)
        x0_pred = tab("sqrt_recip_ac") * x_t - tab("sqrt_recipm1_ac") * eps.detach()
        model_mean = tab("coef_x0") * x0_pred + tab("coef_xt") * x_t
        frac = (v + 1) / 2
        model_logvar = frac * tab("log_beta") + (1 - frac) * true_logvar
        kl = 0.5 * (
            -1.0
            + model_logvar
            - true_logvar
            + torch.exp(true_logvar - model_logvar)
            + (true_mean - model_mean).pow(2) * torch.exp(-model_logvar)
        )
        nll = _discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar)
        vb = torch.where(t[:, None] == 0, nll, kl).mean(-1) / math.log(2.0)
        return mse + vb

    @torch.no_grad()
    def sample(
        self, z: torch.Tensor, z_uncond: torch.Tensor | None, guidance: float, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        """One token per row of ``z`` (N, D), ancestral DDPM sampling over the respaced timesteps.

        With ``z_uncond``, classifier-free guidance on ε (``ε_u + s·(ε_c − ε_u)``), the variance from
        the conditional pass (MAR's ``forward_with_cfg``). Row ``r`` draws its noise only from
        ``generators[r]`` (one row at a time), so a token depends on its own image's generator alone."""
        scheduler = DDPMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(self.num_sampling_steps)
        gens = list(generators)
        x = torch.cat([torch.randn((1, self.channels), generator=g) for g in gens]).to(z.device, torch.float32)
        for t in scheduler.timesteps:
            tt = t.to(z.device).expand(x.shape[0])
            if z_uncond is None:
                out = self.net(x, tt, z).float()
            else:
                both = self.net(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([z, z_uncond])).float()
                cond, uncond = both.chunk(2)
                eps = uncond[:, : self.channels] + guidance * (cond[:, : self.channels] - uncond[:, : self.channels])
                out = torch.cat([eps, cond[:, self.channels :]], -1)
            x = scheduler.step(out, t, x, generator=gens if len(gens) > 1 else gens[0]).prev_sample
        return x


class MAR(nn.Module):
    """MAR's encoder, decoder and diffusion head (Harmon's ``mar`` module; class embedding unused)."""

    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.cfg = cfg
        self.buffer_size, self.seq_h = cfg.buffer_size, cfg.grid
        seq_len, enc, dec = cfg.grid**2, cfg.encoder_embed_dim, cfg.decoder_embed_dim
        norm = partial(nn.LayerNorm, eps=1e-6)

        def blocks(dim: int, depth: int, heads: int) -> nn.ModuleList:
            return nn.ModuleList(
                [
                    Block(
                        dim,
                        heads,
                        cfg.mlp_ratio,
                        qkv_bias=True,
                        norm_layer=norm,
                        proj_drop=cfg.dropout,
                        attn_drop=cfg.dropout,
                    )
                    for _ in range(depth)
                ]
            )

        # Harmon has no classes: every buffer slot holds this one learned "null class" latent
        self.fake_latent = nn.Parameter(torch.zeros(1, enc))
        self.z_proj = nn.Linear(cfg.token_dim, enc)
        self.z_proj_ln = nn.LayerNorm(enc, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + cfg.buffer_size, enc))
        self.encoder_blocks = blocks(enc, cfg.encoder_depth, cfg.encoder_num_heads)
        self.encoder_norm = norm(enc)
        self.decoder_embed = nn.Linear(enc, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + cfg.buffer_size, dec))
        self.decoder_blocks = blocks(dec, cfg.decoder_depth, cfg.decoder_num_heads)
        self.decoder_norm = norm(dec)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, dec))
        self._init_weights()
        self.diffloss = DiffusionHead(cfg)
        self._init_head()
        self.grad_checkpointing = False

    def _init_weights(self) -> None:
        # MAR's initialisation: N(0, 0.02) embeddings, xavier-uniform linears (JAX ViT), unit LayerNorms
        for p in (
            self.fake_latent,
            self.mask_token,
            self.encoder_pos_embed_learned,
            self.decoder_pos_embed_learned,
            self.diffusion_pos_embed_learned,
        ):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _init_head(self) -> None:
        net = self.diffloss.net
        for m in net.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(net.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(net.time_embed.mlp[2].weight, std=0.02)
        # adaLN-zero (DiT): every modulation and the output start at zero
        for layer in [b.adaLN_modulation[-1] for b in net.res_blocks] + [
            net.final_layer.adaLN_modulation[-1],
            net.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def set_gradient_checkpointing(self, on: bool) -> None:
        self.grad_checkpointing = on
        self.diffloss.net.grad_checkpointing = on

    # ------------------------------------------------------------------ position embeddings

    def _pos(self, table: torch.Tensor, grid: tuple[int, int], buffer: bool) -> torch.Tensor:
        """The learned table at another grid: image part resized bilinearly (as Harmon does for 512px)."""
        if grid == (self.seq_h, self.seq_h):
            return table
        head, image = table.split([self.buffer_size, self.seq_h**2], dim=1) if buffer else (None, table)
        image = image.transpose(1, 2).reshape(1, -1, self.seq_h, self.seq_h)
        image = F.interpolate(image, size=grid, mode="bilinear").flatten(2).transpose(1, 2)
        return torch.cat([head, image], 1) if buffer else image

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    # ------------------------------------------------------------------ encoder / decoder

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        """Visible tokens ``(B, L, C)`` (``mask`` 1 = masked, dropped; every row must keep as many) →
        ``(B, buffer + visible, D)``."""
        b = tokens.shape[0]
        x = self.z_proj(tokens.to(self.z_proj.weight.dtype))
        x = torch.cat([self.fake_latent.expand(b, self.buffer_size, -1).to(x.dtype), x], 1)
        x = self.z_proj_ln(x + self._pos(self.encoder_pos_embed_learned, grid, True).to(x.dtype))
        if mask is not None:
            keep = torch.cat([mask.new_zeros(b, self.buffer_size), mask], 1) == 0
            x = x[keep].view(b, -1, x.shape[-1])
        return self.encoder_norm(self._run(self.encoder_blocks, x))

    def decode(self, x: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Encoder output of the visible tokens → per-position conditions ``(B, L, D_dec)`` for the head."""
        b, n = mask.shape
        x = self.decoder_embed(x)
        keep = torch.cat([mask.new_zeros(b, self.buffer_size), mask], 1) == 0
        full = self.mask_token.to(x.dtype).expand(b, self.buffer_size + n, -1).clone()
        full[keep] = x.flatten(0, 1)
        full = full + self._pos(self.decoder_pos_embed_learned, grid, True).to(x.dtype)
        x = self.decoder_norm(self._run(self.decoder_blocks, full))[:, self.buffer_size :]
        return x + self._pos(self.diffusion_pos_embed_learned, grid, False).to(x.dtype)


def truncated_mask_ratio(u: torch.Tensor, ratio_min: float) -> torch.Tensor:
    """MAR's mask ratio: normal(1, 0.25) truncated to [ratio_min, 1], by inverse CDF of ``u`` ∈ [0, 1)."""
    lo, hi = (
        torch.special.ndtr(torch.tensor((ratio_min - 1.0) / 0.25, dtype=torch.float64)),
        torch.tensor(0.5, dtype=torch.float64),
    )
    return 1.0 + 0.25 * torch.special.ndtri(lo + u.double() * (hi - lo))
