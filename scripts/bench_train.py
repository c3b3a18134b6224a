"""Training throughput and memory, as ratios measured in one run on one machine.

    python scripts/bench_train.py [--out bench.json] [--steps 30]

1. reca's training step vs a bare PyTorch loop computing the identical loss on the identical model
   and batch (data-loading time excluded from both) — goal ≤ 1.10;
2. the encoder's share of a step with vs without cached embeddings (the loop times its encoder
   calls, ``time/encode`` in log.jsonl), as the share saved — goal ≥ 90 %;
3. the data pipeline's images/s vs what the trainer consumes — goal ≥ 2×;
4. activation memory kept for backward with vs without gradient checkpointing (bytes of tensors
   saved by autograd, counted by a saved_tensors_hook — exact on any device; on CUDA the peak
   allocated memory too).

The model is configs/tiny.yaml widened so that the encoder and the DiT cost something.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from reca.adapter import Condition  # noqa: E402
from reca.build import build, trainable_parameters  # noqa: E402
from reca.config import load_config  # noqa: E402
from reca.data import batches, open_source  # noqa: E402
from reca.objectives import instructions_for, transform_for  # noqa: E402
from reca.seeds import sample_seed  # noqa: E402

from toy_images import write  # noqa: E402

BENCH = [
    "model.args.transformer_config.num_layers=4",
    "model.args.transformer_config.num_attention_heads=4",
    "model.args.transformer_config.attention_head_dim=32",
    "model.args.transformer_config.cross_attention_dim=128",
    "model.args.transformer_config.num_cross_attention_heads=4",
    "model.args.transformer_config.cross_attention_head_dim=32",
    "model.args.resolution=64",
    "model.args.num_queries=16",
    "encoder.overrides={embed_dim: 64, vision_cfg: {width: 192, layers: 6, patch_size: 8, image_size: 64, "
    "head_width: 32}, "
    "text_cfg: {width: 32, layers: 1, heads: 2, context_length: 77}}",
    "encoder.input_size=48",
    "objectives.t2i.share=0",
    "objectives.i2t.share=0",
    "train.batch_size=8",
    "train.log_every=1",
    "train.save_every=100000",
    "train.sample_prompts=[]",
    "optim.warmup_steps=0",
]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def run_fit(data: Path, out: Path, steps: int, *extra: str) -> list[dict]:
    from reca.trainer import fit

    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        [f"objectives.recon.data.path={data}", f"train.output_dir={out}", f"train.max_steps={steps}", *BENCH, *extra],
    )
    fit(cfg)
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def step_compute(log: list[dict], warmup: int) -> float:
    return median([r["time/step"] - r["time/data"] for r in log[warmup:]])


def bare_loop(data: Path, steps: int, warmup: int) -> tuple[float, float]:
    """The same loss by hand: encoder → generation_loss → backward → clip → AdamW. Returns the
    median step seconds and the median encoder seconds per batch."""
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"objectives.recon.data.path={data}", *BENCH])
    torch.manual_seed(cfg.train.seed)
    adapter, encoder = build(cfg)
    trainable_parameters(adapter, adapter.default_trainable, [])
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    ds = open_source(cfg.objectives.recon.data, need_captions=False)
    batch = next(
        batches(
            ds,
            batch_size=cfg.train.batch_size,
            transform=transform_for("recon", adapter.resolution, encoder.preprocess),
            caption_column=None,
            seed=0,
        )
    )
    times, enc_times = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        seeds = [sample_seed(0, "recon", step, j) for j in range(len(batch["target"]))]
        t1 = time.perf_counter()
        sem = encoder(batch["enc"])
        enc_times.append(time.perf_counter() - t1)
        loss = adapter.generation_loss(
            batch["target"], Condition(semantic=sem, instructions=instructions_for(seeds, cfg.objectives)), seeds
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return median(times[warmup:]), median(enc_times[warmup:])


def pipeline_rate(data: Path, n_batches: int = 20) -> float:
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"objectives.recon.data.path={data}", *BENCH])
    adapter, encoder = build(cfg)
    ds = open_source(cfg.objectives.recon.data, need_captions=False)
    stream = batches(
        ds,
        batch_size=cfg.train.batch_size,
        transform=transform_for("recon", adapter.resolution, encoder.preprocess),
        caption_column=None,
        seed=0,
    )
    next(stream)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(stream)
    return n_batches * cfg.train.batch_size / (time.perf_counter() - t0)


def saved_activation_bytes(data: Path, checkpointing: bool) -> dict:
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"objectives.recon.data.path={data}", *BENCH])
    torch.manual_seed(0)
    adapter, encoder = build(cfg)
    trainable_parameters(adapter, adapter.default_trainable + ["lm"], [])
    if checkpointing:
        adapter.enable_gradient_checkpointing()
    adapter.train()
    ds = open_source(cfg.objectives.recon.data, need_captions=False)
    batch = next(
        batches(
            ds,
            batch_size=cfg.train.batch_size,
            transform=transform_for("recon", adapter.resolution, encoder.preprocess),
            caption_column=None,
            seed=0,
        )
    )
    seeds = list(range(len(batch["target"])))
    total = {"bytes": 0}

    def pack(t: torch.Tensor):
        total["bytes"] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = adapter.generation_loss(
            batch["target"], Condition(semantic=encoder(batch["enc"]), instructions=["Redraw it."] * len(seeds)), seeds
        )
    loss.backward()
    return {"saved_bytes": total["bytes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    warmup = 5
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write(tmp / "data", n=256, size=64, seed=0)
        ours_log = run_fit(data, tmp / "ours", a.steps)
        ours = step_compute(ours_log, warmup)
        bare, enc = bare_loop(data, a.steps, warmup)
        cache = f"train.embedding_cache={tmp / 'cache'}"
        # 256 images, 8 per step: the cold run fills the cache over 32 steps, the warm run only reads
        run_fit(data, tmp / "cold", 32, cache)
        warm_log = run_fit(data, tmp / "warm", a.steps, cache)
        warm = step_compute(warm_log, warmup)
        rate = pipeline_rate(data)
        plain_mem = saved_activation_bytes(data, False)
        ckpt_mem = saved_activation_bytes(data, True)
    batch = 8
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
        "step_seconds": {"reca": ours, "bare_pytorch": bare, "reca_cached": warm, "encoder_only": enc},
        "ratio_step_reca_over_bare": ours / bare,
        # the loop times its own encoder calls (time/encode): the cache's saving measured where it happens
        "encode_seconds": {
            "uncached": median([r["time/encode"] for r in ours_log[warmup:]]),
            "cached": median([r["time/encode"] for r in warm_log[warmup:]]),
        },
        "encoder_share_saved_by_cache": 1
        - median([r["time/encode"] for r in warm_log[warmup:]]) / median([r["time/encode"] for r in ours_log[warmup:]]),
        "pipeline_images_per_s": rate,
        "trainer_images_per_s": batch / ours,
        "ratio_pipeline_over_consumption": rate / (batch / ours),
        "activation_bytes": {"plain": plain_mem["saved_bytes"], "gradient_checkpointing": ckpt_mem["saved_bytes"]},
        "ratio_activation_memory_checkpointed_over_plain": ckpt_mem["saved_bytes"] / plain_mem["saved_bytes"],
    }
    print(json.dumps(result, indent=2))
    print(f"\n(1) reca step / bare PyTorch step           {result['ratio_step_reca_over_bare']:.3f}   (goal <= 1.10)")
    print(
        f"(2) encoder time saved by the cache          {100 * result['encoder_share_saved_by_cache']:.0f} %  (goal "
        ">= 90 %)"
    )
    print(
        f"(3) data pipeline / trainer consumption      {result['ratio_pipeline_over_consumption']:.1f}x   (goal >= 2x)"
    )
    print(
        f"(4) activation memory, checkpointed / plain  {result['ratio_activation_memory_checkpointed_over_plain']:.3f}"
    )
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
