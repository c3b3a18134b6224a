"""Samples/s and model FLOPs utilisation (MFU) of one RecA training step, for any adapter config.

    python scripts/bench_gpu.py --config configs/bench/metaquery_1b.yaml [--batch 16] [--steps 20] [--peak-tflops 989]
    python scripts/bench_gpu.py --config configs/tiny.yaml --steps 3          # CPU smoke run

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` records every matmul
and convolution of one full step (encoder, forward, backward). MFU = counted FLOPs per second /
the device's peak dense bf16 FLOP/s (``--peak-tflops``; 989 for an H100 SXM). The batch is
synthetic (random pixels at the model's resolution), so the numbers are the model's, not the data
pipeline's (scripts/bench_train.py measures that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from reca.build import build, trainable_parameters
from reca.config import load_config
from reca.objectives import Batch, RecATask
from reca.seeds import sample_seed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s of the device")
    p.add_argument("--out", type=Path)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(a.config, a.overrides)
    torch.manual_seed(0)
    adapter, encoder = build(cfg)
    trainable_parameters(adapter, cfg.train.trainable or adapter.default_trainable, cfg.train.frozen)
    adapter.to(device)
    encoder.to(device)
    task = RecATask(adapter, cfg.objectives).train()
    params = [q for q in task.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    res = adapter.resolution
    target = torch.rand(a.batch, 3, res, res, device=device) * 2 - 1
    enc_in = torch.randn(a.batch, 3, encoder.input_size, encoder.input_size, device=device)
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16" or device.type == "cuda"
    )

    def step(i: int) -> None:
        seeds = [sample_seed(0, "recon", i, j) for j in range(a.batch)]
        with autocast:
            batch = {"recon": Batch(seeds, target=target, semantic=encoder(enc_in))}
            loss = task(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up (allocator, kernels)
    with FlopCounterMode(display=False) as counter:
        step(1)
    flops = counter.get_total_flops()
    times = []
    for i in range(a.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(2 + i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    result = {
        "config": a.config,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "batch": a.batch,
        "resolution": res,
        "params_total": sum(q.numel() for q in adapter.parameters()),
        "params_trained": sum(q.numel() for q in params),
        "step_seconds": sec,
        "samples_per_s": a.batch / sec,
        "tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / sec / 1e12,
        "mfu": flops / sec / (a.peak_tflops * 1e12),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
