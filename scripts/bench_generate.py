"""Generation throughput against the peers, as ratios measured in one run on one machine.

    python scripts/bench_generate.py [--out bench_generate.json] [--md bench_generate.md] [--repeats 7]

Each comparison runs A and B alternately (A B, B A, A B, ...) on one thread after one warm-up call
of each, so that load from other processes falls on both alike; it reports the median seconds of
each, their ratio, and the range of the per-pair ratios (the spread). Every pair also checks that
A and B produced the same output.

1. the reference adapter's ``generate`` (reca/models/metaquery.py) vs diffusers' ``SanaPipeline``
   on the very same transformer, VAE (a DC-AE, Sana's) and scheduler, with ``prompt_embeds`` /
   ``negative_prompt_embeds`` from the adapter's own connector and ``latents=`` the adapter's
   per-sample noise: images/s, goal ≥ 1; pixels must agree within 1/255;
2. Janus ``sample_tokens`` (reca/models/janus.py) vs transformers'
   ``generate(generation_mode="image")`` after ``torch.manual_seed(seed)``, one prompt at a time
   (what ``generate`` does by default, ``generate_batch_size=1``): image tokens/s, goal ≥ 1;
   tokens must be equal;
3. the evaluation runner (eval/runner.py ``generate``: GenEval layout, PNGs, grids, manifest) vs
   calling the adapter's ``generate`` in a bare loop with the same batches and seeds: overhead,
   goal ≤ 5 %; the PNGs must equal the loop's images. The same overhead is also measured inside each
   runner call (its seconds outside ``generate`` over those inside), which other processes' load
   disturbs far less than the A/B ratio.

The process's CPU seconds are compared too (less sensitive to a shared machine, blind to waiting on
the disk). Both UMMs are built randomly from configs/tiny.yaml and configs/janus_tiny.yaml, widened
(``--size bench``) or as they are (``--size smallest``, what tests/test_bench_generate.py runs).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.prompts import Prompt  # noqa: E402
from eval.runner import generate as runner_generate  # noqa: E402
from eval.runner import image_seed, sample_path, save_png  # noqa: E402
from reca.adapter import Condition  # noqa: E402
from reca.build import build  # noqa: E402
from reca.config import load_config  # noqa: E402
from reca.seeds import per_sample_noise  # noqa: E402

# Sana's own VAE class (a DC-AE): SanaPipeline reads its encoder_block_out_channels. Three blocks
# downsample 4x; ResBlocks only (no linear attention), as small as the classes allow.
DC_AE = (
    "model.args.vae_class=AutoencoderDC",
    "model.args.vae_config={in_channels: 3, latent_channels: 4, encoder_block_out_channels: [8, 16, 32], "
    "decoder_block_out_channels: [8, 16, 32], encoder_block_types: [ResBlock, ResBlock, ResBlock], "
    "decoder_block_types: [ResBlock, ResBlock, ResBlock], encoder_layers_per_block: [1, 1, 1], "
    "decoder_layers_per_block: [1, 1, 1], encoder_qkv_multiscales: [[], [], []], "
    "decoder_qkv_multiscales: [[], [], []], downsample_block_type: Conv, upsample_block_type: interpolate}",
)
METAQUERY = {
    "smallest": DC_AE + ("model.args.resolution=32", "model.args.transformer_config.sample_size=8"),
    # 64 px → 16x16 latent, patch 2 → 64 image tokens through a 4-layer, 128-wide DiT
    "bench": DC_AE
    + (
        "model.args.resolution=64",
        "model.args.transformer_config.sample_size=16",
        "model.args.transformer_config.num_layers=4",
        "model.args.transformer_config.num_attention_heads=4",
        "model.args.transformer_config.attention_head_dim=32",
        "model.args.transformer_config.cross_attention_dim=128",
        "model.args.transformer_config.num_cross_attention_heads=4",
        "model.args.transformer_config.cross_attention_head_dim=32",
        "model.args.lm_config.hidden_size=64",
        "model.args.lm_config.intermediate_size=128",
        "model.args.transformer_config.caption_channels=64",
        "model.args.num_queries=16",
    ),
}
_J = "model.args.model_config."
JANUS = {
    "smallest": (),
    # 64 px → an 8x8 VQ grid = 64 image tokens; a 4-layer, 128-wide LLM
    "bench": (
        "model.args.resolution=64",
        _J + "vision_config.image_size=64",
        _J + "vision_config.num_image_tokens=64",
        _J + "text_config.hidden_size=128",
        _J + "text_config.intermediate_size=256",
        _J + "text_config.num_hidden_layers=4",
        _J + "vision_config.projection_dim=128",
        _J + "vq_config.projection_dim=128",
        _J + "vq_config.image_token_embed_dim=128",
    ),
}
PROMPTS = ["a photo of a red cube", "two blue dogs", "a cat left of a green bench", "a yellow clock"]


# --------------------------------------------------------------------------- models


def metaquery(size: str):
    torch.manual_seed(0)
    adapter, _ = build(load_config(ROOT / "configs/tiny.yaml", list(METAQUERY[size])))
    return adapter.eval()


def janus(size: str):
    torch.manual_seed(0)
    adapter, _ = build(load_config(ROOT / "configs/janus_tiny.yaml", list(JANUS[size])))
    return adapter.eval()


# --------------------------------------------------------------------------- timing


def interleaved(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[dict, list[tuple[Any, Any]]]:
    """A and B alternately, ``repeats`` pairs after one warm-up call each; the order flips every
    pair (AB, BA, AB, ...) so neither always runs first. Returns the timings and each pair's outputs.

    Wall-clock seconds decide the ratios; the process's CPU seconds (``time.process_time``, all
    threads) are kept beside them: on a shared machine they move less with other processes' load,
    but they miss time spent waiting on the disk (the runner's fsyncs)."""
    a(), b()
    wall: tuple[list[float], list[float]] = ([], [])
    cpu: tuple[list[float], list[float]] = ([], [])
    outs = []
    for r in range(repeats):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        pair: list[Any] = [None, None]
        for k in order:
            t0, c0 = time.perf_counter(), time.process_time()
            pair[k] = (a, b)[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
        outs.append(tuple(pair))
    ratios = [x / y for x, y in zip(*wall)]
    med = [statistics.median(x) for x in (*wall, *cpu)]
    return {
        "seconds_a": med[0],
        "seconds_b": med[1],
        "a_over_b": med[0] / med[1],
        "pair_ratio_min": min(ratios),
        "pair_ratio_max": max(ratios),
        "cpu_seconds_a": med[2],
        "cpu_seconds_b": med[3],
        "cpu_a_over_b": med[2] / med[3],
        "repeats": repeats,
    }, outs


def max_pixel_diff(xs: Sequence[Image.Image], ys: Sequence[Image.Image]) -> int:
    """Largest difference of one 8-bit channel value over all images (sizes and counts must agree)."""
    if len(xs) != len(ys) or any(x.size != y.size for x, y in zip(xs, ys)):
        return 255
    return max(int(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max()) for x, y in zip(xs, ys))


# --------------------------------------------------------------------------- 1. reference adapter vs diffusers


def sana_pipeline(adapter):
    """diffusers' SanaPipeline around the adapter's own transformer and VAE; no text encoder (the
    adapter's connector supplies the embeddings)."""
    from diffusers import SanaPipeline

    pipe = SanaPipeline(
        tokenizer=None,
        text_encoder=None,
        transformer=adapter.transformer,
        vae=adapter.vae,
        scheduler=copy.deepcopy(adapter.scheduler),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def diffusers_images(pipe, adapter, cond: Condition, seeds: Sequence[int], guidance: float, steps: int):
    """The same images as ``adapter.generate`` through the pipeline: conditioning from the adapter
    (part of the timed work on both sides), the adapter's per-sample noise as ``latents``."""
    n = len(cond)
    embeds = adapter.condition(cond)
    negative = adapter.condition(cond, [True] * n) if guidance != 1.0 else None
    mask = torch.ones(embeds.shape[:2], device=embeds.device)
    latents = per_sample_noise(seeds, (adapter.latent_channels, adapter.latent_size, adapter.latent_size))
    return pipe(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt=None,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=None if negative is None else mask,
        height=adapter.resolution,
        width=adapter.resolution,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=latents.to(embeds.device),
        use_resolution_binning=False,
    ).images


def compare_diffusers(size: str, repeats: int, batch: int = 4, steps: int = 10, guidance: float = 3.0) -> dict:
    adapter = metaquery(size)
    pipe = sana_pipeline(adapter)
    cond = Condition(texts=[PROMPTS[i % len(PROMPTS)] for i in range(batch)])
    seeds = list(range(100, 100 + batch))
    timing, outs = interleaved(
        lambda: adapter.generate(cond, seeds=seeds, guidance_scale=guidance, num_steps=steps),
        lambda: diffusers_images(pipe, adapter, cond, seeds, guidance, steps),
        repeats,
    )
    return {
        "what": "reference adapter generate vs diffusers SanaPipeline (same transformer, VAE, noise)",
        "resolution": adapter.resolution,
        "batch": batch,
        "steps": steps,
        "guidance_scale": guidance,
        "reca_images_per_s": batch / timing["seconds_a"],
        "peer_images_per_s": batch / timing["seconds_b"],
        # throughput ratio reca / peer = peer seconds / reca seconds
        "ratio": 1 / timing["a_over_b"],
        "ratio_min": 1 / timing["pair_ratio_max"],
        "ratio_max": 1 / timing["pair_ratio_min"],
        "ratio_cpu": 1 / timing["cpu_a_over_b"],
        "goal": ">= 1.0",
        "max_pixel_diff": max(max_pixel_diff(a, b) for a, b in outs),
        "tolerance": "max |pixel difference| <= 1 (of 255)",
        "timing": timing,
    }


# --------------------------------------------------------------------------- 2. Janus vs transformers


@torch.no_grad()
def transformers_tokens(adapter, cond: Condition, seeds: Sequence[int], guidance: float) -> torch.Tensor:
    """transformers' own image generation, one prompt at a time after torch.manual_seed(seed) (it
    draws from the global RNG; in a batch the draws of one image would depend on its neighbours)."""
    rows = []
    for i, seed in enumerate(seeds):
        ids = torch.tensor([adapter.generation_ids(cond, i)], device=adapter.model.device)
        torch.manual_seed(seed)
        rows.append(
            adapter.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                generation_mode="image",
                do_sample=True,
                guidance_scale=guidance,
            )
        )
    return torch.cat(rows)


@torch.no_grad()
def reca_tokens(adapter, cond: Condition, seeds: Sequence[int], guidance: float) -> torch.Tensor:
    """reca's sampler exactly as its ``generate`` calls it with the default ``generate_batch_size=1``."""
    return torch.cat([adapter.sample_tokens(Condition(texts=[t]), [s], guidance) for t, s in zip(cond.texts, seeds)])


def compare_transformers(size: str, repeats: int, prompts: int = 2, guidance: float = 5.0) -> dict:
    adapter = janus(size)
    cond = Condition(texts=PROMPTS[:prompts])
    seeds = list(range(7, 7 + prompts))
    timing, outs = interleaved(
        lambda: reca_tokens(adapter, cond, seeds, guidance),
        lambda: transformers_tokens(adapter, cond, seeds, guidance),
        repeats,
    )
    tokens = prompts * adapter.num_image_tokens
    return {
        "what": "Janus sample_tokens vs transformers generate(generation_mode='image'), one prompt at a time",
        "image_tokens_per_image": adapter.num_image_tokens,
        "images": prompts,
        "guidance_scale": guidance,
        "reca_tokens_per_s": tokens / timing["seconds_a"],
        "peer_tokens_per_s": tokens / timing["seconds_b"],
        "ratio": 1 / timing["a_over_b"],
        "ratio_min": 1 / timing["pair_ratio_max"],
        "ratio_max": 1 / timing["pair_ratio_min"],
        "ratio_cpu": 1 / timing["cpu_a_over_b"],
        "goal": ">= 1.0",
        "tokens_equal": all(torch.equal(a, b) for a, b in outs),
        "tolerance": "token ids equal",
        "timing": timing,
    }


# --------------------------------------------------------------------------- 3. eval runner vs bare loop


def bare_loop(adapter, prompts: Sequence[Prompt], n_images: int, batch_size: int, guidance: float, steps: int):
    """The runner's jobs (prompt-major, image index minor), batches and seeds, generate only."""
    jobs = [(p, i) for p in prompts for i in range(n_images)]
    images = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        images += adapter.generate(
            Condition(texts=[p.prompt for p, _ in batch]),
            seeds=[image_seed(0, p.index, i) for p, i in batch],
            guidance_scale=guidance,
            num_steps=steps,
        )
    return images


def read_run(out: Path, prompts: Sequence[Prompt], n_images: int) -> list[Image.Image]:
    images = []
    for p in prompts:
        for i in range(n_images):
            with Image.open(sample_path(out, p.index, i)) as im:
                images.append(im.convert("RGB"))
    return images


class TimedAdapter:
    """The adapter with its ``generate`` timed: the runner's seconds outside it are its own work,
    measured inside the same call (so other processes' load falls on both parts alike)."""

    def __init__(self, adapter) -> None:
        self.adapter, self.resolution, self.seconds = adapter, adapter.resolution, 0.0

    def generate(self, cond, **kw):
        t0 = time.perf_counter()
        try:
            return self.adapter.generate(cond, **kw)
        finally:
            self.seconds += time.perf_counter() - t0


def compare_runner(
    size: str, repeats: int, n_prompts: int = 4, n_images: int = 4, batch_size: int = 4, steps: int = 10
) -> dict:
    guidance = 3.0
    adapter = metaquery(size)
    prompts = [Prompt(index=i, prompt=PROMPTS[i % len(PROMPTS)], tag="single_object") for i in range(n_prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(10**6))  # a fresh folder per call: a resumed run would skip every image
        own: list[float] = []  # per runner call: seconds outside generate / seconds inside

        def runner() -> Path:
            out = Path(tmp) / f"run{next(runs)}"
            timed = TimedAdapter(adapter)
            t0 = time.perf_counter()
            runner_generate(
                timed,
                prompts,
                out,
                n_images=n_images,
                seed=0,
                guidance_scale=guidance,
                num_steps=steps,
                batch_size=batch_size,
                model_info={"adapter": "bench"},
            )
            own.append((time.perf_counter() - t0 - timed.seconds) / timed.seconds)
            return out  # the PNGs are read back for the comparison outside the timed call

        timing, outs = interleaved(
            runner, lambda: bare_loop(adapter, prompts, n_images, batch_size, guidance, steps), repeats
        )
        diffs = [max_pixel_diff(read_run(out, prompts, n_images), loop) for out, loop in outs]
        # what one atomic PNG write (encode, fsync, rename) costs here: the runner's own work per image
        image = outs[0][1][0]
        writes = []
        for k in range(5):
            t0 = time.perf_counter()
            save_png(Path(tmp) / f"png{k}.png", image)
            writes.append(time.perf_counter() - t0)
    images = n_prompts * n_images
    return {
        "what": "eval runner generate (PNGs, grids, manifest) vs a bare loop of adapter.generate, same batches",
        "images": images,
        "batch_size": batch_size,
        "steps": steps,
        "runner_images_per_s": images / timing["seconds_a"],
        "bare_images_per_s": images / timing["seconds_b"],
        "overhead": timing["a_over_b"] - 1,
        "overhead_min": timing["pair_ratio_min"] - 1,
        "overhead_max": timing["pair_ratio_max"] - 1,
        "overhead_cpu": timing["cpu_a_over_b"] - 1,
        # the same overhead measured within each runner call (warm-up call excluded)
        "overhead_in_call": statistics.median(own[1:]),
        "overhead_in_call_min": min(own[1:]),
        "overhead_in_call_max": max(own[1:]),
        "goal": "<= 0.05",
        "png_write_seconds": statistics.median(writes),
        "max_pixel_diff": max(diffs),
        "tolerance": "PNG pixels equal the loop's images (max difference 0)",
        "timing": timing,
    }


# --------------------------------------------------------------------------- report


def machine() -> str:
    device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}, {device}"
    )


def markdown(result: dict) -> str:
    d, j, r = result["diffusers"], result["transformers"], result["runner"]
    rows = [
        "| comparison | reca | peer | wall-clock ratio (pair range) | CPU-time ratio | goal | outputs |",
        "|---|---|---|---|---|---|---|",
        f"| (1) reference adapter `generate` / diffusers `SanaPipeline`, {d['resolution']} px, batch {d['batch']}, "
        f"{d['steps']} steps, CFG {d['guidance_scale']} | {d['reca_images_per_s']:.2f} img/s | "
        f"{d['peer_images_per_s']:.2f} img/s | {d['ratio']:.3f} ({d['ratio_min']:.3f}–{d['ratio_max']:.3f}) | "
        f"{d['ratio_cpu']:.3f} | ≥ 1.0 | max pixel diff {d['max_pixel_diff']}/255 |",
        f'| (2) Janus `sample_tokens` / transformers `generate(generation_mode="image")`, '
        f"{j['image_tokens_per_image']} tokens per image, CFG {j['guidance_scale']} | "
        f"{j['reca_tokens_per_s']:.0f} tok/s | {j['peer_tokens_per_s']:.0f} tok/s | "
        f"{j['ratio']:.3f} ({j['ratio_min']:.3f}–{j['ratio_max']:.3f}) | {j['ratio_cpu']:.3f} | ≥ 1.0 | "
        f"tokens {'equal' if j['tokens_equal'] else 'DIFFER'} |",
        f"| (3) eval runner overhead over a bare `generate` loop, {r['images']} images, batch {r['batch_size']} | "
        f"{r['runner_images_per_s']:.2f} img/s | {r['bare_images_per_s']:.2f} img/s | "
        f"{100 * r['overhead']:+.1f} % ({100 * r['overhead_min']:+.1f} to {100 * r['overhead_max']:+.1f} %) | "
        f"{100 * r['overhead_cpu']:+.1f} % | ≤ 5 % | max pixel diff {r['max_pixel_diff']}/255 |",
        f"| (3′) the same, as the runner's time outside `generate` / inside it, within each call | | | "
        f"{100 * r['overhead_in_call']:+.1f} % ({100 * r['overhead_in_call_min']:+.1f} to "
        f"{100 * r['overhead_in_call_max']:+.1f} %) | | ≤ 5 % | |",
    ]
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the JSON here too")
    p.add_argument("--md", type=Path, help="write the Markdown table here too")
    p.add_argument("--repeats", type=int, default=7, help="A/B pairs per comparison (after one warm-up each)")
    p.add_argument("--size", choices=sorted(METAQUERY), default="bench")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by other processes)")
    a = p.parse_args()
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    result = {
        "machine": machine(),
        "size": a.size,
        "diffusers": compare_diffusers(a.size, a.repeats),
        "transformers": compare_transformers(a.size, a.repeats),
        "runner": compare_runner(a.size, a.repeats),
    }
    result["wall_seconds"] = time.perf_counter() - t0
    text = json.dumps(result, indent=2)
    table = markdown(result)
    print(text)
    print()
    print(table)
    if a.out:
        a.out.write_text(text + "\n")
    if a.md:
        a.md.write_text(table)
    ok = (
        result["diffusers"]["max_pixel_diff"] <= 1
        and result["transformers"]["tokens_equal"]
        and result["runner"]["max_pixel_diff"] == 0
    )
    if not ok:
        print("outputs differ between reca and its peer: the ratios above compare different work", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
