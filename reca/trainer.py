"""The RecA training loop on accelerate, called directly (no Trainer subclass).

:func:`setup` builds everything a run needs (accelerator, model, freezing or LoRA, optimizer,
resume state, data streams); :func:`fit` is the loop and reads top to bottom.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from reca import checkpoint as ckpt
from reca.adapter import BottleneckByDesign, Compilable, GradientCheckpointing
from reca.build import apply_lora, build, mutates_base, trainable_parameters
from reca.cache import EmbeddingCache
from reca.card import evaluations, model_card
from reca.config import OBJECTIVES, Config, ConfigError, active_objectives, split_batch
from reca.data import batches, open_source
from reca.encoders import FrozenEncoder, bottleneck_check
from reca.io import atomic_dir, atomic_write_json, atomic_write_text
from reca.monitor import CollapseWatch, Evaluator, missing_categories, wandb_table
from reca.objectives import Batch, RecATask, transform_for
from reca.samples import write_samples
from reca.seeds import data_seed, sample_seed

log = logging.getLogger("reca")
EMA_FILE = "ema.safetensors"  # a checkpoint's EMA weights, in the order of the trained parameters


@dataclass
class Run:
    """Everything the loop touches, built once by :func:`setup`."""

    cfg: Config
    accelerator: Accelerator
    task: torch.nn.Module  # RecATask around the adapter (PEFT-wrapped under LoRA), prepared
    encoder: FrozenEncoder
    cache: EmbeddingCache | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]
    state: ckpt.TrainState
    streams: dict[str, Iterator[dict]]
    out: Path
    watch: CollapseWatch
    ema: EMAModel | None = None  # of the trained parameters (train.ema_decay)
    stopped: bool = False  # by the collapse watch

    @property
    def umm(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.task).umm


def fit(cfg: Config, resume: str | None = None, evaluator: Evaluator | None = None) -> dict:
    """Train; returns the last logged metrics. ``evaluator`` runs every ``eval.every`` steps."""
    r = setup(cfg, resume)
    t, acc, state = cfg.train, r.accelerator, r.state
    bar = tqdm(total=t.max_steps, initial=state.step, disable=not acc.is_main_process, desc="reca", dynamic_ncols=True)
    metrics: dict = {}
    if state.step == 0 and cfg.eval.every:  # the evaluation's step-0 baseline
        watch_step(r, evaluator, baseline := {"step": 0})
        write_log(r, baseline)
    while state.step < t.max_steps:
        started, timings = time.perf_counter(), {"time/data": 0.0, "time/encode": 0.0}
        sums: dict[str, torch.Tensor] = {}
        bad = False
        for micro in range(t.grad_accum):
            micro_batches = {name: next_batch(r, name, micro, timings) for name in r.streams}
            with acc.accumulate(r.task):
                losses = r.task(micro_batches)
                # all ranks must agree on skipping, or DDP's all-reduce would hang or diverge
                finite = bool(acc.gather(torch.isfinite(losses["loss"].detach())[None]).all())
                if finite:
                    acc.backward(losses["loss"])  # divided by grad_accum inside accelerate
                bad |= not finite
                if acc.sync_gradients:  # the last micro-batch: gradients are all-reduced now
                    if not bad:
                        if cfg.optim.max_grad_norm > 0:
                            acc.clip_grad_norm_(r.params, cfg.optim.max_grad_norm)
                        r.optimizer.step()
                        if r.ema is not None:
                            r.ema.step(r.params)
                    r.optimizer.zero_grad(set_to_none=True)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / t.grad_accum
        r.lr_scheduler.step()  # a skipped update still advances the schedule: steps stay aligned
        state.step += 1
        count_nonfinite(state, bad, t.max_nonfinite)
        metrics = {k: acc.reduce(v, "mean").item() for k, v in sums.items()}
        metrics |= step_info(r, time.perf_counter() - started, timings)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k in r.streams or k == "loss"})
        r.stopped = watch_step(r, evaluator, metrics)  # evaluation every eval.every steps, collapse watch
        last = state.step == t.max_steps
        if acc.is_main_process and (state.step % t.log_every == 0 or last or r.stopped or "eval/overall" in metrics):
            write_log(r, metrics)
        if (state.step % t.save_every == 0 or last) and not r.stopped:
            exporter = lora_exporter(acc, r.task, lora_init_dir(cfg)) if cfg.lora.enabled else None
            ckpt.save(acc, r.out / "checkpoints", state.step, asdict(cfg), loop_state(r), extra_files(r, exporter))
            if acc.is_main_process:
                ckpt.prune(r.out / "checkpoints", t.keep_last, protect=r.watch.good_step)
        if acc.is_main_process and ((t.sample_every and state.step % t.sample_every == 0) or last):
            path = r.out / "samples" / f"step-{state.step:07d}.png"
            write_samples(r.umm, micro_batches.get("recon"), cfg, path, acc)
        acc.wait_for_everyone()
        if r.stopped:
            break
    bar.close()
    check_finite_end(r)
    finish(r)
    return metrics


# --------------------------------------------------------------------------- one step's pieces


def next_batch(r: Run, name: str, micro: int, timings: dict[str, float]) -> Batch:
    """The next micro-batch of one objective, its per-sample seeds, and its frozen-encoder tokens."""
    t, state, acc = r.cfg.train, r.state, r.accelerator
    t0 = time.perf_counter()
    raw = next(r.streams[name])
    timings["time/data"] += time.perf_counter() - t0
    for kind in ("skipped", "converted"):
        for reason, count in raw.get(kind, {}).items():
            state.data_counts[f"{kind}/{reason}"] = state.data_counts.get(f"{kind}/{reason}", 0) + count
    n = len(raw["target"] if "target" in raw else raw["enc"])
    # sample j of this rank sits at rank + world·j of the global batch (data shards interleave
    # ranks), so its noise is the same under any process count
    rank, world = acc.process_index, acc.num_processes
    seeds = [sample_seed(t.seed, name, state.step * t.grad_accum + micro, rank + world * j) for j in range(n)]
    semantic = None
    if "enc" in raw:  # frozen encoder, outside the trained module: no grad, no optimiser
        t0 = time.perf_counter()
        semantic = r.cache.encode(raw["enc"], r.encoder) if r.cache else r.encoder(raw["enc"])
        timings["time/encode"] += time.perf_counter() - t0
    return Batch(seeds, raw.get("target"), semantic, raw.get("caption")).to(acc.device)


def watch_step(r: Run, evaluator: Evaluator | None, metrics: dict) -> bool:
    """Evaluate every ``eval.every`` steps on the main process (its numbers join ``metrics``), then
    let the collapse watch read them and the losses. True when the run must stop (``watch.stop``)."""
    cfg, acc, step = r.cfg, r.accelerator, r.state.step
    stop = False
    if acc.is_main_process:
        if cfg.eval.every and step % cfg.eval.every == 0:
            if evaluator is None:
                raise ConfigError("eval.every: fit() was given no evaluator; run train.py (it builds eval.during's)")
            metrics |= evaluate(r, evaluator)
        alarms = r.watch.observe(step, metrics)
        for alarm in alarms:
            log.warning(f"step {step}: collapse watch: {alarm}")
        if alarms and cfg.watch.stop:
            stop = True
            kept = [
                p
                for p in ckpt.checkpoints(r.out / "checkpoints")
                if int(p.name[len(ckpt.PREFIX) :]) <= r.watch.good_step
            ]
            report = {"step": step, "alarms": alarms, "last_good_step": r.watch.good_step}
            report["checkpoint"] = str(kept[-1]) if kept else None
            atomic_write_json(r.out / "collapse.json", report)
            print(f"collapse watch: stopped at step {step}; last checkpoint before it: {report['checkpoint']}")
    if acc.num_processes > 1:  # every rank must leave the loop together
        stop = bool(broadcast_object_list([stop])[0])
    return stop


def evaluate(r: Run, evaluator: Evaluator) -> dict:
    """The evaluator on the unwrapped model in eval mode; training's RNG state is left untouched,
    so a run with evaluation draws the same noise as one without (and resumes exactly)."""
    acc, umm, step = r.accelerator, r.umm, r.state.step
    started, was_training = time.perf_counter(), umm.training
    umm.eval()
    with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
        with torch.no_grad(), acc.autocast():
            result = evaluator(umm, r.encoder, step)
    umm.train(was_training)
    if missing := missing_categories(r.cfg.watch, result):
        raise ConfigError(f"watch.categories: {missing} not evaluated; the evaluation has {sorted(result.accuracy)}")
    if acc.log_with:
        try:
            acc.log({"eval/images": wandb_table(result, step)}, step=step)
        except ImportError:
            pass
    return result.metrics() | {"time/eval": time.perf_counter() - started}


def write_log(r: Run, metrics: dict) -> None:
    if r.accelerator.is_main_process:
        with open(r.out / "log.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        r.accelerator.log(metrics, step=metrics["step"])


class TrainingFailed(RuntimeError):
    """The run cannot produce a usable model (train.py prints the one-line message, exit code 1)."""


def check_finite_end(r: Run) -> None:
    """Never export a model from a run that ends non-finite: the last step's loss was NaN/inf (its
    update skipped, so the weights are those of an earlier step) or a trained weight is."""
    if r.state.nonfinite_in_a_row:
        raise TrainingFailed(
            f"the last {r.state.nonfinite_in_a_row} step(s) had a non-finite loss; no final model exported "
            "(checkpoints are kept; lower optim.lr or check the data, then --resume latest)"
        )
    if bad := [n for n, p in r.task.named_parameters() if p.requires_grad and not torch.isfinite(p).all()][:3]:
        raise TrainingFailed(f"non-finite trained weights ({', '.join(bad)}); no final model exported")


def count_nonfinite(state: ckpt.TrainState, bad: bool, limit: int) -> None:
    if not bad:
        state.nonfinite_in_a_row = 0
        return
    state.nonfinite_in_a_row += 1
    log.warning(f"step {state.step}: non-finite loss, update skipped ({state.nonfinite_in_a_row} in a row)")
    if state.nonfinite_in_a_row >= limit:
        raise TrainingFailed(
            f"{state.nonfinite_in_a_row} non-finite losses in a row (train.max_nonfinite={limit}); "
            "lower optim.lr or check the data"
        )


def step_info(r: Run, seconds: float, timings: dict[str, float]) -> dict:
    info = {"lr": r.lr_scheduler.get_last_lr()[0], "step": r.state.step, "time/step": seconds, **timings}
    if r.cache:
        info |= {"cache/hits": r.cache.hits, "cache/misses": r.cache.misses}
    return info | {f"data/{k}": v for k, v in r.state.data_counts.items()}


# --------------------------------------------------------------------------- setup and the end


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
    on_cpu = t.cpu or not torch.cuda.is_available()
    # accelerate quietly runs fp32 when the device cannot autocast to the requested precision
    if t.mixed_precision == "fp16" and on_cpu:
        raise ConfigError("train.mixed_precision: fp16 needs a CUDA GPU (this run is on the CPU); use bf16 or no")
    if t.mixed_precision == "bf16" and not on_cpu and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.mixed_precision: this GPU has no bfloat16 support; use fp16 or no")
    # cpu=True when CUDA is absent: without it, `accelerate launch --multi_gpu` on a CPU machine
    # starts processes that each believe they are alone (measured with accelerate 1.15).
    return Accelerator(
        cpu=on_cpu,
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        log_with=log_with,
        project_dir=t.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=t.find_unused_parameters)],
    )


def setup(cfg: Config, resume: str | None = None) -> Run:
    """Accelerator, model (frozen parts, LoRA), optimizer and schedule, resume state, data streams."""
    t = cfg.train
    out = Path(t.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} is a file, not a folder; name another path")
    acc = make_accelerator(cfg)
    resolved = asdict(cfg)
    print(f"rank {acc.process_index}: processes: {acc.num_processes} ({acc.distributed_type.value}) on {acc.device}")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(resolved, indent=2))
    set_seed(t.seed)

    adapter, encoder = build(cfg)
    encoder.to("cpu" if t.offload_encoder else acc.device)
    cache = (
        EmbeddingCache(t.embedding_cache, encoder.identity, t.cache_dtype, acc.process_index)
        if t.embedding_cache
        else None
    )
    enable_options(adapter, cfg)
    if warning := bottleneck_check(encoder, adapter.resolution):
        if isinstance(adapter, BottleneckByDesign):
            print(f"no encoder.input_size bottleneck needed: {adapter.bottleneck_by_design}")
        else:
            log.warning(warning)
    if cfg.lora.enabled:
        umm = apply_lora(adapter, cfg)
        if mutates_base(cfg):
            plugin = acc.state.deepspeed_plugin
            if plugin is not None and plugin.zero_stage == 3:
                raise ConfigError(f"lora.init: {cfg.lora.init} is not supported under DeepSpeed ZeRO-3; use default")
            if acc.is_main_process:  # the reference every export is converted against
                save_initial_adapter(umm, lora_init_dir(cfg))
    else:
        trainable_parameters(adapter, t.trainable or adapter.default_trainable, t.frozen)
        umm = adapter
    encoder.module.requires_grad_(False)  # also when it lives inside the adapter (encoder.kind=umm)
    task = RecATask(umm, cfg.objectives)
    params = [p for p in task.parameters() if p.requires_grad]
    frozen_ids = {id(p) for p in encoder.module.parameters()}
    assert not any(id(p) in frozen_ids for p in params), "the semantic encoder must never be optimised"
    optimizer = make_optimizer(cfg, params, acc.num_processes)
    # Not prepared by accelerate on purpose: prepared schedulers step once per process.
    lr_scheduler = get_scheduler(
        cfg.optim.schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=t.max_steps
    )
    state = ckpt.TrainState()
    task, optimizer = acc.prepare(task, optimizer)
    # TrainState, the schedule, the collapse watch and the EMA are saved by reca.checkpoint as JSON
    # and safetensors, not registered with accelerate, which would pickle them
    # (custom_checkpoint_*.pkl, loaded with weights_only=False)
    watch = CollapseWatch(cfg.watch)
    ema = EMAModel(params, decay=t.ema_decay) if t.ema_decay else None

    if resume_from := ckpt.resolve_resume(out / "checkpoints", resume):
        acc.load_state(str(resume_from))
        restore_loop_state(ckpt.read_state(resume_from), state, lr_scheduler, watch)
        if ema is not None:
            restore_ema(ema, resume_from, acc.device)
        print(f"resumed from {resume_from} at step {state.step}")
        if acc.is_main_process:
            report_config_changes(resume_from, resolved)
    if acc.is_main_process:
        truncate_log(out / "log.jsonl", state.step)
    streams = open_streams(cfg, adapter.resolution, encoder, state.step, acc.process_index, acc.num_processes)
    if cfg.log.wandb and acc.log_with:
        acc.init_trackers(
            cfg.log.project, config=resolved, init_kwargs={"wandb": {"name": cfg.log.run_name or None, "dir": str(out)}}
        )
    return Run(cfg, acc, task, encoder, cache, optimizer, lr_scheduler, params, state, streams, out, watch, ema)


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], world: int) -> torch.optim.Optimizer:
    """``optim.name``: torch AdamW, bitsandbytes AdamW8bit (8-bit states, Dettmers et al. 2022), or any
    optimizer class by import path; ``optim.scale_lr`` scales the rate by the global batch."""
    o, t = cfg.optim, cfg.train
    lr = o.lr * (world * t.grad_accum * t.batch_size if o.scale_lr else 1)
    if o.scale_lr:
        print(f"optim.scale_lr: lr = {o.lr} × {world} processes × {t.grad_accum} × {t.batch_size} = {lr:g}")
    if o.name == "adamw":
        cls = torch.optim.AdamW
    elif o.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optim.name: adamw8bit needs bitsandbytes; pip install 'reca[bnb]'") from None
        cls = bnb.optim.AdamW8bit
    else:
        module, _, attr = o.name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"optim.name: cannot import '{o.name}' ({e})") from None
    fused = {"fused": True} if o.fused else {}
    return cls(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **fused)


def loop_state(r: Run) -> dict:
    """What the loop needs besides model, optimizer and RNG: JSON only (see reca.checkpoint). The
    EMA's numbers are here too; its weights go to ``ema.safetensors`` (:func:`extra_files`)."""
    state = {**r.state.state_dict(), "lr_scheduler": r.lr_scheduler.state_dict(), "watch": r.watch.state_dict()}
    if r.ema is not None:
        state["ema"] = {k: v for k, v in r.ema.state_dict().items() if k != "shadow_params"}
    return state


def restore_loop_state(saved: dict, state: ckpt.TrainState, lr_scheduler, watch: CollapseWatch) -> None:
    state.load_state_dict(saved)
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if "watch" in saved:
        watch.load_state_dict(saved["watch"])


def extra_files(r: Run, lora_export) -> Callable[[Path], None] | None:
    """A checkpoint's files beyond accelerate's: the LoRA adapter folder, the EMA weights."""
    if lora_export is None and r.ema is None:
        return None

    def write(folder: Path) -> None:
        if lora_export is not None:
            lora_export(folder / "adapter")
        if r.ema is not None:
            shadow = {f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(r.ema.shadow_params)}
            save_file(shadow, str(folder / EMA_FILE))

    return write


def restore_ema(ema: EMAModel, checkpoint: Path, device: torch.device) -> None:
    path = checkpoint / EMA_FILE
    if not path.is_file():
        raise ConfigError(f"train.ema_decay: {checkpoint} holds no {EMA_FILE} (saved without EMA); set it to 0")
    shadow = load_file(str(path))
    meta = ckpt.read_state(checkpoint).get("ema", {})
    ema.load_state_dict({**meta, "shadow_params": [shadow[f"shadow.{i}"] for i in range(len(shadow))]})
    ema.to(device)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old → new`` for every leaf that differs between two resolved configs."""
    lines = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"  {prefix}{key}: {a!r} -> {b!r}")
    return lines


def report_config_changes(checkpoint: Path, resolved: dict) -> None:
    """Resuming with other settings is allowed (a longer run, a new output dir) but never silent:
    a changed train.max_steps, for one, re-plans the LR schedule from this step on."""
    path = checkpoint / "config.yaml"
    if not path.is_file():
        return
    saved = yaml.safe_load(path.read_text()) or {}
    if lines := config_changes(saved, json.loads(json.dumps(resolved))):
        log.warning(f"resuming with settings that differ from {path}:\n" + "\n".join(lines))


def enable_options(adapter, cfg: Config) -> None:
    """``train.gradient_checkpointing`` / ``train.compile``, through the adapter's optional hooks."""
    for flag, protocol, method in (
        ("gradient_checkpointing", GradientCheckpointing, "enable_gradient_checkpointing"),
        ("compile", Compilable, "compile_modules"),
    ):
        if getattr(cfg.train, flag):
            if not isinstance(adapter, protocol):
                raise ConfigError(f"train.{flag}: {type(adapter).__name__} has no {method}(); set it to false")
            getattr(adapter, method)()


def open_streams(
    cfg: Config, resolution: int, encoder: FrozenEncoder, step: int, rank: int, world: int
) -> dict[str, Iterator[dict]]:
    """One endless batch stream per active objective, positioned at ``step`` (exact resume)."""
    t = cfg.train
    active = active_objectives(cfg.objectives)
    sizes = split_batch(t.batch_size, {k: v.share for k, v in active.items()})
    streams = {}
    for name, n in sizes.items():
        src = active[name].data
        captions = OBJECTIVES[name].needs_captions
        ds = open_source(src, need_captions=captions, key=f"objectives.{name}.data")
        if src.max_samples:  # the first N rows, before shuffling and sharding
            ds = ds.select(range(min(src.max_samples, len(ds)))) if hasattr(ds, "__len__") else ds.take(src.max_samples)
        streams[name] = batches(
            ds,
            batch_size=n,
            transform=transform_for(name, resolution, encoder.preprocess),
            caption_column=src.caption_column if captions else None,
            seed=data_seed(t.seed, name),
            rank=rank,
            world_size=world,
            start_batch=step * t.grad_accum,
            num_workers=t.num_workers,
            image_column=src.image_column,
            min_side=src.min_side,
            key=f"objectives.{name}.data",
        )
    return streams


def finish(r: Run) -> None:
    if r.cache:
        r.cache.flush()
        print(
            f"embedding cache: {r.cache.hits} hits, {r.cache.misses} misses, {r.cache.disk_bytes() / 2**20:.1f} MiB "
            f"in {r.cache.dir}"
        )
    if r.accelerator.is_main_process and not r.stopped:  # a collapsed model is not the result
        export_final(r.umm, r.cfg, r.out / "final", r.ema, r.params, r.state.step)
    r.accelerator.end_training()


def lora_exporter(accelerator: Accelerator, task, init: Path | None = None):
    """Every rank gathers the full state (under ZeRO-3 the unwrapped model holds empty partitions
    and would save an empty adapter, peft#2500); the main process writes the PEFT folder."""
    state = accelerator.get_state_dict(task)
    umm = accelerator.unwrap_model(task).umm
    state = {k.removeprefix("umm."): v for k, v in state.items()}
    return lambda path: save_model(umm, path, init, state_dict=state)


LORA_INIT = "lora_init"  # PiSSA/OLoRA: the adapter as initialised, in the output folder


def save_initial_adapter(umm, path: Path) -> None:
    """peft's recipe for PiSSA/OLoRA: save the adapter before training, marked as a plain init so that
    loading it never runs the SVD again."""
    config = umm.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    with atomic_dir(path) as tmp:
        umm.save_pretrained(tmp)
    config.init_lora_weights = init


def lora_init_dir(cfg: Config) -> Path | None:
    return Path(cfg.train.output_dir) / LORA_INIT if mutates_base(cfg) else None


def save_model(umm, path: Path, init: Path | None = None, **kwargs) -> None:
    """``save_pretrained``; after PiSSA/OLoRA (``init`` = the initial adapter) the LoRA is converted to
    a plain LoRA of the original base (rank doubled), so ``PeftModel.from_pretrained`` on the untouched
    base reproduces the trained model."""
    if init is not None:
        # peft's conversion reads the live adapter and would misread a passed state_dict (its keys
        # differ); the live model holds whole weights everywhere but under ZeRO-3, refused in setup
        kwargs.pop("state_dict", None)
        kwargs["path_initial_model_for_weight_conversion"] = str(init)
    umm.save_pretrained(path, **kwargs)


def truncate_log(path: Path, step: int) -> None:
    """On resume, forget log lines written after the checkpoint (they will be written again)."""
    if path.is_file():
        keep = []
        for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill, or not ours
                if line.strip():
                    log.warning(f"{path}: dropping an unreadable line ({line[:40]!r}...)")
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def export_final(
    umm,
    cfg: Config,
    path: Path,
    ema: EMAModel | None = None,
    params: list[torch.nn.Parameter] | None = None,
    steps: int = 0,
) -> None:
    """LoRA → a PEFT adapter dir (PeftModel.from_pretrained loads it); full → save_pretrained.
    With EMA, the averaged weights go beside the raw ones in the same format, in ``ema/``."""
    with atomic_dir(path) as tmp:
        save_model(umm, tmp, lora_init_dir(cfg))
        (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        evals = evaluations(path.parent / "log.jsonl")
        card = model_card(cfg, resolution=getattr(umm, "resolution", None), steps=steps, evals=evals)
        card.save(tmp / "README.md")  # after save_pretrained: peft writes a README of its own
        if ema is not None:
            ema.store(params)  # diffusers' store → copy_to → restore: the live weights are untouched
            ema.copy_to(params)
            save_model(umm, tmp / "ema", lora_init_dir(cfg))
            ema.restore(params)
