"""A small CLIP for the demo world, trained contrastively with open_clip on dense captions, then
frozen — it stands in for the pretrained CLIP/SigLIP a real UMM already has.

It sees the world at 16×16 (the information bottleneck: the UMM must generate 32×32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss

from demo.seeds import ENCODER_SEEDS, ENCODER_TEST_SEEDS, ENCODER_TRAIN_SEED
from demo.world import COLOURS, SHAPES, dense_caption, render
from reca.io import atomic_write

NAME = "ViT-B-32"  # only the architecture family; every size below overrides it
OVERRIDES = {
    "embed_dim": 64,
    "vision_cfg": {"width": 64, "layers": 3, "patch_size": 4, "image_size": 16, "head_width": 32},
    "text_cfg": {"width": 64, "layers": 2, "heads": 4, "context_length": 8},
}
ALL_PAIRS = [(s, c) for s in SHAPES for c in COLOURS]


def build() -> tuple[torch.nn.Module, object, object]:
    model = open_clip.create_model(NAME, pretrained=None, **OVERRIDES)
    tokenizer = open_clip.get_tokenizer(NAME, context_length=OVERRIDES["text_cfg"]["context_length"])
    return model, tokenizer, _preprocess(model)


def _preprocess(model):
    from reca.encoders import Preprocess

    pp = model.visual.preprocess_cfg
    return Preprocess(OVERRIDES["vision_cfg"]["image_size"], tuple(pp["mean"]), tuple(pp["std"]))


def _pool(seeds: range) -> tuple[torch.Tensor, list[int]]:
    pre = _preprocess(open_clip.create_model(NAME, pretrained=None, **OVERRIDES))
    labels = [i % len(ALL_PAIRS) for i in range(len(seeds))]
    images = torch.stack([pre(render(*ALL_PAIRS[k], seed=seed).image) for k, seed in zip(labels, seeds)])
    return images, labels


def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, labels: list[int]) -> float:
    """36-way: the caption whose embedding is closest to the image's."""
    model.eval()
    with torch.no_grad():
        text = model.encode_text(tokenizer([dense_caption(s, c) for s, c in ALL_PAIRS]), normalize=True)
        img = model.encode_image(images, normalize=True)
    return float(((img @ text.T).argmax(1) == torch.tensor(labels)).float().mean())


def pretrain(
    out: Path, steps: int = 400, batch: int = 128, seed: int = ENCODER_TRAIN_SEED, align: float = 0.0
) -> float:
    """Train, check, save the state dict atomically to ``out``; returns the held-out zero-shot accuracy.

    ``align`` weighs an alignment term beside the contrastive loss: the mean ``1 − cos`` between
    each image and its own caption (Wang & Isola, ICML 2020, "alignment"). The contrastive loss
    alone leaves every caption at the centre of its images' cluster, away from every image;
    the term pulls the images onto their caption (docs/demo.md, "The encoder's alignment")."""
    torch.manual_seed(seed)
    model, tokenizer, _ = build()
    images, labels = _pool(ENCODER_SEEDS)
    captions = tokenizer([dense_caption(*ALL_PAIRS[k]) for k in labels])
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(images), batch, replace=False))
        img, txt, scale = model(images[idx], captions[idx])
        loss = loss_fn(img, txt, scale)
        if align:
            loss = loss + align * (1 - (img * txt).sum(-1)).mean()  # both are unit vectors
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    test_images, test_labels = _pool(ENCODER_TEST_SEEDS)
    accuracy = zero_shot_accuracy(model, tokenizer, test_images, test_labels)
    atomic_write(out, lambda f: torch.save(model.state_dict(), f))
    return accuracy
