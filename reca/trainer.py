"""The RecA training loop on accelerate, called directly (no Trainer subclass)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm

from reca import checkpoint as ckpt
from reca.adapter import Condition
from reca.cache import EmbeddingCache
from reca.build import apply_lora, build, trainable_parameters
from reca.config import Config, ConfigError, split_batch
from reca.data import batches, open_source
from reca.encoders import bottleneck_check
from reca.objectives import OBJECTIVES, RecATask, sample_seed, transform_for

log = logging.getLogger("reca")


def make_accelerator(cfg: Config) -> Accelerator:
    t = cfg.train
    log_with = None
    if cfg.log.wandb:
        try:
            import wandb  # noqa: F401
            log_with = "wandb"
            if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "online":
                os.environ["WANDB_MODE"] = "offline"
                print("wandb: no WANDB_API_KEY — logging offline (upload later with `wandb sync`)")
        except ImportError:
            print("wandb: not installed — log.wandb ignored; losses still go to log.jsonl")
    # cpu=True when CUDA is absent: without it, `accelerate launch --multi_gpu` on a CPU machine
    # starts processes that each believe they are alone (DESIGN.md §2).
    return Accelerator(
        cpu=t.cpu or not torch.cuda.is_available(),
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        log_with=log_with,
        project_dir=t.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=t.find_unused_parameters)],
    )


def fit(cfg: Config, resume: str | None = None) -> dict:
    """Train; returns the last logged metrics."""
    t = cfg.train
    out = Path(t.output_dir)
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    resolved = asdict(cfg)
    print(f"rank {accelerator.process_index}: processes: {accelerator.num_processes} ({accelerator.distributed_type.value}) on {accelerator.device}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(resolved, indent=2))
    set_seed(t.seed)

    adapter, encoder = build(cfg)
    encoder.to("cpu" if t.offload_encoder else accelerator.device)
    cache = EmbeddingCache(t.embedding_cache, encoder.identity, t.cache_dtype, accelerator.process_index) if t.embedding_cache else None
    for flag, method in (("gradient_checkpointing", "enable_gradient_checkpointing"), ("compile", "compile_modules")):
        if getattr(t, flag):
            if not hasattr(adapter, method):
                raise ConfigError(f"train.{flag}: {type(adapter).__name__} has no {method}(); set it to false")
            getattr(adapter, method)()
    if warning := bottleneck_check(encoder, adapter.resolution):
        if reason := getattr(adapter, "bottleneck_by_design", ""):  # e.g. SigLIP in, VQ tokens out (Janus)
            print(f"no encoder.input_size bottleneck needed: {reason}")
        else:
            log.warning(warning)
    if cfg.lora.enabled:
        umm = apply_lora(adapter, cfg)
    else:
        trainable_parameters(adapter, t.trainable or adapter.default_trainable, t.frozen)
        umm = adapter
    encoder.module.requires_grad_(False)  # also when it lives inside the adapter (encoder.kind=umm)
    task = RecATask(umm, cfg.objectives)
    params = [p for p in task.parameters() if p.requires_grad]
    frozen_ids = {id(p) for p in encoder.module.parameters()}
    assert not any(id(p) in frozen_ids for p in params), "the semantic encoder must never be optimised"
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    # Not prepared by accelerate on purpose: prepared schedulers step once per process.
    lr_scheduler = get_scheduler(cfg.optim.schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=t.max_steps)
    state = ckpt.TrainState()
    task, optimizer = accelerator.prepare(task, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler, state)

    root = out / "checkpoints"
    if resume_from := ckpt.resolve_resume(root, resume):
        accelerator.load_state(str(resume_from))
        print(f"resumed from {resume_from} at step {state.step}")
    if main:
        _truncate_log(out / "log.jsonl", state.step)

    o = cfg.objectives
    sizes = split_batch(t.batch_size, {k: getattr(o, k).share for k in OBJECTIVES if getattr(o, k).share > 0})
    rank, world = accelerator.process_index, accelerator.num_processes
    streams = {}
    for name, n in sizes.items():
        src = getattr(o, name).data
        ds = open_source(src, need_captions=name != "recon", key=f"objectives.{name}.data")
        streams[name] = batches(ds, batch_size=n, transform=transform_for(name, adapter.resolution, encoder.preprocess),
                                caption_column=None if name == "recon" else src.caption_column, seed=t.seed + 7919 * OBJECTIVES.index(name),
                                rank=rank, world_size=world, start_batch=state.step * t.grad_accum, num_workers=t.num_workers,
                                image_column=src.image_column, min_side=src.min_side)

    if cfg.log.wandb and accelerator.log_with:
        accelerator.init_trackers(cfg.log.project, config=resolved, init_kwargs={"wandb": {"name": cfg.log.run_name or None, "dir": str(out)}})
    bar = tqdm(total=t.max_steps, initial=state.step, disable=not main, desc="reca", dynamic_ncols=True)
    metrics: dict = {}
    while state.step < t.max_steps:
        step = state.step
        started, waited, encoding = time.perf_counter(), 0.0, 0.0
        sums: dict[str, torch.Tensor] = {}
        bad = False
        for micro in range(t.grad_accum):
            micro_batches = {}
            for name, stream in streams.items():
                t0 = time.perf_counter()
                b = next(stream)
                waited += time.perf_counter() - t0
                for kind in ("skipped", "converted"):
                    for reason, count in b.get(kind, {}).items():
                        state.data_counts[f"{kind}/{reason}"] = state.data_counts.get(f"{kind}/{reason}", 0) + count
                n = len(next(iter(v for v in b.values() if isinstance(v, torch.Tensor))))
                # sample j of this rank sits at rank + world·j of the global batch (data shards
                # interleave ranks), so its noise is the same under any process count
                b["seeds"] = [sample_seed(t.seed, name, step * t.grad_accum + micro, rank + world * j) for j in range(n)]
                if "enc" in b:  # frozen encoder, outside the trained module: no grad, no optimiser
                    t0 = time.perf_counter()
                    b["semantic"] = cache.encode(b["enc"], encoder) if cache else encoder(b["enc"])
                    encoding += time.perf_counter() - t0
                micro_batches[name] = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            with accelerator.accumulate(task):
                losses = task(micro_batches)
                # all ranks must agree on skipping, or DDP's all-reduce would hang or diverge
                finite = bool(accelerator.gather(torch.isfinite(losses["loss"].detach())[None]).all())
                if finite:
                    accelerator.backward(losses["loss"])  # divided by grad_accum inside accelerate
                else:
                    bad = True
                if accelerator.sync_gradients:  # the last micro-batch: gradients are all-reduced now
                    if not bad:
                        if cfg.optim.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / t.grad_accum
        lr_scheduler.step()
        state.step += 1
        if bad:
            state.nonfinite_in_a_row += 1
            log.warning(f"step {state.step}: non-finite loss, update skipped ({state.nonfinite_in_a_row} in a row)")
            if state.nonfinite_in_a_row >= t.max_nonfinite:
                raise RuntimeError(f"{state.nonfinite_in_a_row} non-finite losses in a row (train.max_nonfinite={t.max_nonfinite}); "
                                   "lower optim.lr or check the data")
        else:
            state.nonfinite_in_a_row = 0
        metrics = {k: accelerator.reduce(v, "mean").item() for k, v in sums.items()}
        if cache:
            metrics |= {"cache/hits": cache.hits, "cache/misses": cache.misses}
        metrics |= {"lr": lr_scheduler.get_last_lr()[0], "step": state.step, "time/step": time.perf_counter() - started, "time/data": waited, "time/encode": encoding} | {f"data/{k}": v for k, v in state.data_counts.items()}
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k in sizes or k == "loss"})
        if main and (state.step % t.log_every == 0 or state.step == t.max_steps):
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            accelerator.log(metrics, step=state.step)
        if state.step % t.save_every == 0 or state.step == t.max_steps:
            ckpt.save(accelerator, root, state.step, resolved, lora_exporter(accelerator, task) if cfg.lora.enabled else None)
            if main:
                ckpt.prune(root, t.keep_last)
        if main and ((t.sample_every and state.step % t.sample_every == 0) or state.step == t.max_steps):
            write_samples(accelerator.unwrap_model(task).umm, micro_batches.get("recon"), cfg, out / "samples" / f"step-{state.step:07d}.png", accelerator)
        accelerator.wait_for_everyone()
    bar.close()
    if cache:
        cache.flush()
        print(f"embedding cache: {cache.hits} hits, {cache.misses} misses, {cache.disk_bytes() / 2**20:.1f} MiB in {cache.dir}")
    if main:
        export_final(accelerator.unwrap_model(task).umm, cfg, out / "final")
    accelerator.end_training()
    return metrics


def lora_exporter(accelerator: Accelerator, task):
    """Every rank gathers the full state (under ZeRO-3 the unwrapped model holds empty partitions
    and would save an empty adapter, peft#2500); the main process writes the PEFT folder."""
    state = accelerator.get_state_dict(task)
    umm = accelerator.unwrap_model(task).umm
    return lambda path: umm.save_pretrained(path, state_dict={k.removeprefix("umm."): v for k, v in state.items()})


def _truncate_log(path: Path, step: int) -> None:
    """On resume, forget log lines written after the checkpoint (they will be written again)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def export_final(umm, cfg: Config, path: Path) -> None:
    """LoRA → a PEFT adapter dir (PeftModel.from_pretrained loads it); full → save_pretrained."""
    tmp = path.with_name(".tmp-" + path.name)
    shutil.rmtree(tmp, ignore_errors=True)
    umm.save_pretrained(tmp)
    (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


@torch.no_grad()
def write_samples(umm, recon: dict | None, cfg: Config, path: Path, accelerator) -> None:
    """A PNG grid: input | reconstruction for a few training images, then the fixed prompts."""
    t = cfg.train
    was_training = umm.training
    umm.eval()
    rows: list[list[Image.Image]] = []
    with accelerator.autocast():
        if recon is not None:
            k = min(4, recon["target"].shape[0])
            recons = umm.generate(Condition(semantic=recon["semantic"][:k], instructions=[cfg.objectives.recon.fixed_instruction] * k),
                                  seeds=list(range(k)), guidance_scale=t.guidance_scale, num_steps=t.sample_steps)
            inputs = [_to_pil(x) for x in recon["target"][:k]]
            rows += [[a, b] for a, b in zip(inputs, recons)]
        if t.sample_prompts:
            rows.append(umm.generate(Condition(texts=list(t.sample_prompts)), seeds=list(range(len(t.sample_prompts))),
                                     guidance_scale=t.guidance_scale, num_steps=t.sample_steps))
    umm.train(was_training)
    grid = image_grid(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    ckpt.atomic_write_bytes(path, buf.getvalue())
    if accelerator.log_with:
        try:
            import wandb

            accelerator.log({"samples": wandb.Image(grid)}, step=int(path.stem.split("-")[-1]))
        except ImportError:
            pass


def _to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


def image_grid(rows: list[list[Image.Image]], pad: int = 2) -> Image.Image:
    size = max(im.width for row in rows for im in row)
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (size + pad) + pad, len(rows) * (size + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.resize((size, size)), (pad + j * (size + pad), pad + i * (size + pad)))
    return grid
