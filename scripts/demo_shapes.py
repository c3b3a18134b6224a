"""Which shapes a finished demo run confuses, and where the confusion starts: in the frozen encoder,
or in what fine-tuning did to the generator.

    python scripts/demo_shapes.py --out runs/demo [--runs lora-reca-seed0,lora-control-seed0] [--renders 16]

On ``--renders`` fresh renders of each of the 36 pairs (their own seed range, ``shapes_renders``
in demo/seeds.py), it prints and writes to ``<out>/shapes.json``:

- **encoder**: each held-out image's nearest image centroid (centroids from the other half of the
  renders), as a shape confusion table, and for each caption the pair whose image centroid is
  nearest — does the pooled embedding, the demo's reconstruction condition, separate the shapes?
- **one table per run**: the run's reconstructions from those embeddings (the demo's default
  condition and sampler, as its evaluation uses them), shape as the world scorer sees it, rare
  and canonical pairs apart. A control never trained on reconstruction reads an image embedding
  as it reads a caption.

Rows are the shape rendered, columns the shape seen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from demo import run as demo
from demo.scorer import WorldScorer
from demo.seeds import SEEDS
from demo.world import SHAPES, dense_caption, is_canonical, pairs, render
from reca.build import load_trained
from reca.config import ConfigError
from reca.io import atomic_write_json


def confusion(true: list[str], seen: list[str]) -> dict[str, dict[str, int]]:
    """{shape rendered: {shape seen: count}}, every shape a row and a column."""
    table = {a: dict.fromkeys(SHAPES, 0) for a in SHAPES}
    for a, b in zip(true, seen):
        table[a][b] += 1
    return table


def encoder_tables(pooled: torch.Tensor, captions: torch.Tensor, labels: list[int], renders: int) -> dict:
    """Nearest image centroid of each image of the second half of every pair's renders (centroids
    from the first half), and each caption's nearest image centroid."""
    all_pairs = pairs("all")
    first = torch.tensor([i % renders < renders // 2 for i in range(len(labels))])
    lab = torch.tensor(labels)
    centroids = torch.nn.functional.normalize(
        torch.stack([pooled[first & (lab == k)].mean(0) for k in range(len(all_pairs))]), dim=-1
    )
    nearest = (pooled[~first] @ centroids.T).argmax(1).tolist()
    shapes = [all_pairs[k][0] for k in lab[~first].tolist()]
    caption_nearest = (captions @ centroids.T).argmax(1).tolist()
    return {
        "nearest_image_centroid": confusion(shapes, [all_pairs[k][0] for k in nearest]),
        "captions_nearest_another_pair": {
            dense_caption(sh, c): dense_caption(*all_pairs[k])
            for (sh, c), k in zip(all_pairs, caption_nearest)
            if all_pairs[k] != (sh, c)
        },
    }


def print_table(title: str, table: dict[str, dict[str, int]]) -> None:
    print(f"\n{title}\n{'':>10}" + "".join(f"{b:>9}" for b in SHAPES))
    for a, row in table.items():
        print(f"{a:>10}" + "".join(f"{row[b]:>9}" for b in SHAPES))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="a finished demo run")
    p.add_argument("--runs", default="lora-reca-seed0,lora-control-seed0", help="run folders under --out")
    p.add_argument("--renders", type=int, default=16, help="renders per pair (even, >= 2)")
    a = p.parse_args(argv)
    try:
        runs = [r for r in a.runs.split(",") if r]
        if not runs:
            raise ConfigError("--runs: name at least one run folder, e.g. lora-reca-seed0")
        for run in runs:
            if not (a.out / run / "final").is_dir():
                raise ConfigError(f"{a.out / run}/final is missing: name finished runs of {a.out} in --runs")
        if a.renders < 2 or a.renders % 2:
            raise ConfigError(f"--renders: {a.renders} must be even and >= 2 (half for centroids, half to test)")
    except ConfigError as e:  # bad input: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = demo.DemoSettings()  # the demo's reconstruction condition and sampler
    scorer = WorldScorer.load_or_train(a.out / "cache/scorer.pt")
    all_pairs = pairs("all")
    seeds = SEEDS["shapes_renders"]
    items = [
        (sh, c, seed) for k, (sh, c) in enumerate(all_pairs) for seed in seeds[k * a.renders : (k + 1) * a.renders]
    ]
    labels = [k for k in range(len(all_pairs)) for _ in range(a.renders)]
    result: dict = {"renders_per_pair": a.renders}
    for run in runs:
        # an adapter is loaded onto the pretrained model where the run saved one (LoRA), else the full model
        adapter, encoder = load_trained(*demo.eval_config(a.out, a.out / run / "final", True))
        with torch.no_grad():
            sem = encoder.encode([render(sh, c, seed).image for sh, c, seed in items])
            if "encoder" not in result:  # the encoder is frozen: the same in every run
                captions = encoder.encode_text([dense_caption(sh, c) for sh, c in all_pairs])[:, 0]
                result["encoder"] = encoder_tables(sem[:, 0], captions, labels, a.renders)
            recons = adapter.generate(
                demo._recon_condition(sem, s),
                seeds=[seed for *_, seed in items],
                guidance_scale=s.guidance,
                num_steps=s.sample_steps,
            )
        seen = [j["shape"] for j in scorer.judge(recons, [sh for sh, *_ in items], [c for _, c, _ in items])]
        result[run] = {
            group: confusion(
                [sh for (sh, c, _) in items if is_canonical(sh, c) == (group == "canonical")],
                [x for (sh, c, _), x in zip(items, seen) if is_canonical(sh, c) == (group == "canonical")],
            )
            for group in ("rare", "canonical")
        }
    print_table("encoder: each held-out image's nearest image centroid", result["encoder"]["nearest_image_centroid"])
    print(f"captions nearest another pair's images: {result['encoder']['captions_nearest_another_pair'] or 'none'}")
    for run in runs:
        for group in ("rare", "canonical"):
            print_table(f"{run}: reconstructions of {group} pairs, shape seen", result[run][group])
    atomic_write_json(a.out / "shapes.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
