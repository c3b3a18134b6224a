"""Sample grids written during training: input | reconstruction for a few training images, then
the configured text prompts — what a user looks at to see that RecA is doing something."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from reca.adapter import Condition
from reca.config import Config
from reca.images import rows_grid, to_pil
from reca.io import atomic_write_bytes
from reca.objectives import Batch


@torch.no_grad()
def write_samples(umm, recon: Batch | None, cfg: Config, path: Path, accelerator) -> None:
    t = cfg.train
    was_training = umm.training
    umm.eval()
    rows: list[list[Image.Image]] = []
    with accelerator.autocast():
        if recon is not None:
            k = min(4, recon.target.shape[0])
            cond = Condition(semantic=recon.semantic[:k], instructions=[cfg.objectives.recon.fixed_instruction] * k)
            recons = umm.generate(cond, seeds=list(range(k)), guidance_scale=t.guidance_scale, num_steps=t.sample_steps)
            rows += [[a, b] for a, b in zip(to_pil(recon.target[:k]), recons)]
        if t.sample_prompts:
            prompts = list(t.sample_prompts)
            rows.append(
                umm.generate(
                    Condition(texts=prompts),
                    seeds=list(range(len(prompts))),
                    guidance_scale=t.guidance_scale,
                    num_steps=t.sample_steps,
                )
            )
    umm.train(was_training)
    grid = rows_grid(rows)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    if accelerator.log_with:
        try:
            import wandb

            accelerator.log({"samples": wandb.Image(grid)}, step=int(path.stem.split("-")[-1]))
        except ImportError:
            pass
