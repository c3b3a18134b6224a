"""A complete reca adapter for a small in-house UMM: the worked example of docs/adapters.md.

``tests/test_readme.py`` imports this file and trains it through reca for 40 steps. To train it
yourself on the toy data (from the repository root):

    python scripts/toy_images.py runs/toy
    PYTHONPATH=docs/examples accelerate launch train.py --config docs/examples/my_umm.yaml
"""

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from reca.adapter import Condition
from reca.flow import flow_matching_loss, noisy_latents, sample_sigmas
from reca.seeds import per_sample_noise


@dataclass
class MyUMMConfig:  # every field is a YAML key under model.args
    semantic_dim: int = 0  # filled in from the frozen encoder
    width: int = 64
    resolution: int = 16
    pretrained: str = ""  # a folder written by save_pretrained; empty = random init


class MyUMM(nn.Module):
    """An in-house UMM: bytes or semantic tokens → a condition vector → a pixel-space flow model."""

    Config: ClassVar[type] = MyUMMConfig
    default_lora_targets: ClassVar[list[str]] = ["velocity.0", "velocity.2"]
    default_trainable: ClassVar[list[str]] = ["text", "semantic", "velocity", "caption_head"]

    def __init__(self, cfg: MyUMMConfig):
        super().__init__()
        self.cfg, self.resolution, w = cfg, cfg.resolution, cfg.width
        self.text = nn.EmbeddingBag(256, w)
        self.semantic = nn.Linear(cfg.semantic_dim, w)
        pixels = 3 * cfg.resolution**2
        self.velocity = nn.Sequential(nn.Linear(pixels + w + 1, 256), nn.SiLU(), nn.Linear(256, pixels))
        self.caption_head = nn.Linear(w, 256)  # bag-of-bytes captioner

    @classmethod
    def from_config(cls, args: MyUMMConfig) -> "MyUMM":
        model = cls(args)
        if args.pretrained:  # safetensors: loading weights never runs code (a pickle could)
            model.load_state_dict(load_file(os.path.join(args.pretrained, "my_umm.safetensors")))
        return model

    def save_pretrained(self, path) -> None:
        """reca's convention: weights plus reca_adapter.json naming the class and its args; reca
        rebuilds the model from that file with ``pretrained`` set to the folder. ``path`` is a
        temporary folder renamed to final/ afterwards, so nothing saved may hold its absolute path."""
        os.makedirs(path, exist_ok=True)
        save_file(self.state_dict(), os.path.join(path, "my_umm.safetensors"))
        args = {**asdict(self.cfg), "pretrained": ""}
        with open(os.path.join(path, "reca_adapter.json"), "w") as f:
            json.dump({"adapter": f"{type(self).__module__}:{type(self).__name__}", "args": args}, f)

    def _bytes(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text(*self._bag(texts))

    def _bag(self, texts):
        ids = [torch.tensor(list(t.encode()) or [0]) for t in texts]
        return torch.cat(ids), torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)

    def _cond(self, cond: Condition) -> torch.Tensor:
        if cond.texts is not None:
            return self._bytes(cond.texts)
        return self.semantic(cond.semantic.mean(1)) + self._bytes(cond.instructions)

    def _v(self, x, c, sigmas):
        return self.velocity(torch.cat([x.flatten(1), c, sigmas[:, None]], 1)).view_as(x)

    def generation_loss(self, images, cond, seeds):
        noise = per_sample_noise(seeds, tuple(images.shape[1:]))
        sigmas = sample_sigmas(seeds, torch.linspace(1, 0, 1001))
        pred = self._v(noisy_latents(images, noise, sigmas), self._cond(cond), sigmas)
        return flow_matching_loss(pred, images, noise, sigmas)

    def answer_logprob(self, semantic, prompts, answers):
        logp = torch.log_softmax(self.caption_head(self.semantic(semantic.mean(1))), -1)
        return torch.stack([logp[i, list(a.encode())].sum() for i, a in enumerate(answers)])

    def understanding_loss(self, semantic, prompts, answers):
        return -(
            self.answer_logprob(semantic, prompts, answers) / torch.tensor([len(a.encode()) for a in answers])
        ).mean()

    @torch.no_grad()
    def generate(self, cond, *, seeds, guidance_scale=1.0, num_steps=20):
        c = self._cond(cond)
        x = per_sample_noise(seeds, (3, self.resolution, self.resolution))
        for s, s_next in zip(torch.linspace(1, 0, num_steps + 1)[:-1], torch.linspace(1, 0, num_steps + 1)[1:]):
            x = x + (s_next - s) * self._v(x, c, s.expand(len(x)))  # Euler step on dx/dσ = v
        return [Image.fromarray(((im.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()) for im in x]
