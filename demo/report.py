"""The demo's report: the tables (pooled, per seed, per pair and per shape of the test side),
the curves over fine-tuning steps, the picture of the headline prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from demo.world import SHAPES
from eval.stats import t_interval, wilson_interval
from reca.io import atomic_write

METRICS = [
    ("rare: colour+shape", ("generation", "rare", "both")),
    ("rare: right colour", ("generation", "rare", "colour")),
    ("rare: right shape", ("generation", "rare", "shape")),
    ("rare: drawn in canonical colour", ("generation", "rare", "drawn_canonical_colour")),
    ("canonical: colour+shape", ("generation", "canonical", "both")),
    ("understanding, rare (36-way)", ("understanding", "rare", "correct")),
    ("understanding, canonical (36-way)", ("understanding", "canonical", "correct")),
    ("reconstruction from semantics, rare", ("reconstruction", "rare", "both")),
]


def summarise(results: dict[str, list[dict]]) -> dict:
    table = {}
    for arm, runs in results.items():
        table[arm] = {}
        for label, (a, b, c) in METRICS:
            ks = [r[a][b][c] for r in runs]
            ns = [r[a][b]["n"] for r in runs]
            lo, hi = wilson_interval(sum(ks), sum(ns))
            mean, slo, shi = t_interval([k / n for k, n in zip(ks, ns)])
            table[arm][label] = {
                "pooled": sum(ks) / sum(ns),
                "wilson95": [lo, hi],
                "seed_mean": mean,
                "seed_t95": [slo, shi],
                "per_seed": [k / n for k, n in zip(ks, ns)],
                "n": sum(ns),
            }
    return table


def markdown(table: dict, note: str) -> str:
    """One row per metric, one column per arm: pooled % [Wilson 95 %] and, over several seeds,
    the 95 % t-interval of the per-seed values."""
    arms = list(table)
    lines = ["| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for label, _ in METRICS:
        cells = []
        for arm in arms:
            m = table[arm][label]
            w = m["wilson95"]
            cell = f"{100 * m['pooled']:.1f}% [{100 * w[0]:.0f}, {100 * w[1]:.0f}]"
            if len(m["per_seed"]) > 1:
                t = m["seed_t95"]
                cell += f" seeds [{100 * t[0]:.0f}, {100 * t[1]:.0f}]"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + note + "\n"


def per_pair(results: dict[str, list[dict]], tag: str = "rare") -> dict[str, dict[str, list[int]]]:
    """{prompt: {arm: [colour+shape, right colour, n]}} pooled over each arm's seeds."""
    table: dict[str, dict[str, list[int]]] = {}
    for arm, runs in results.items():
        for r in runs:
            for prompt, c in r["generation"][tag]["per_prompt"].items():
                cell = table.setdefault(prompt, {}).setdefault(arm, [0, 0, 0])
                cell[0], cell[1], cell[2] = cell[0] + c["both"], cell[1] + c["colour"], cell[2] + c["n"]
    return table


def per_pair_markdown(results: dict[str, list[dict]]) -> str:
    """Every rare pair of the evaluated side, then each shape pooled over its pairs:
    colour+shape % (right colour %) per arm, pooled over seeds."""
    pairs = per_pair(results)
    arms = list(results)
    head = ["| rare prompt | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    fmt = lambda c: f"{100 * c[0] / c[2]:.0f}% ({100 * c[1] / c[2]:.0f}%)" if c[2] else "–"  # noqa: E731
    rows = [f"| {p} | " + " | ".join(fmt(cells.get(a, [0, 0, 0])) for a in arms) + " |" for p, cells in pairs.items()]
    for shape in SHAPES:
        pooled = [
            [sum(cells.get(a, [0, 0, 0])[k] for p, cells in pairs.items() if p.endswith(f" {shape}")) for k in range(3)]
            for a in arms
        ]
        rows.append(f"| **{shape}** (all its pairs) | " + " | ".join(fmt(c) for c in pooled) + " |")
    return "\n".join(head + rows) + "\n\nCell: colour+shape (right colour), pooled over the arm's seeds.\n"


def pooled_interval(per_seed: list[float], images_per_seed: int) -> tuple[float, float]:
    """Wilson 95 % interval of the images of all seeds pooled, from each seed's accuracy over
    ``images_per_seed`` images."""
    k = round(sum(per_seed) * images_per_seed)
    return wilson_interval(k, images_per_seed * len(per_seed))


def curves(runs: dict[str, list[Path]], path: Path, title: str, images: dict[str, int] | None = None) -> bool:
    """Rare and canonical colour+shape over fine-tuning steps, from each run's evaluations during
    training (``eval/rare``, ``eval/canonical`` in its log.jsonl): one thin line per seed, the
    mean over seeds thick; with ``images`` (images per seed at each point, per tag) the mean's
    Wilson 95 % band over the pooled images, which a few images per prompt make wide. False (and
    no file) when no run has evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reca.card import evaluations

    logs = {
        label: [rows for rows in (evaluations(d / "log.jsonl") for d in dirs) if rows] for label, dirs in runs.items()
    }
    if not any(logs.values()):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    colours = ["tab:red", "tab:gray", "tab:blue", "tab:olive", "tab:purple", "tab:green"]
    for (label, seeds), colour in zip(logs.items(), colours):
        if not seeds:
            continue
        n = min(len(rows) for rows in seeds)
        steps = [r["step"] for r in seeds[0][:n]]
        for ax, tag in zip(axes, ("rare", "canonical")):
            for rows in seeds:
                ys = [100 * r[f"eval/{tag}"] for r in rows]
                ax.plot([r["step"] for r in rows], ys, color=colour, lw=0.6, alpha=0.4)
            mean = [100 * float(np.mean([rows[i][f"eval/{tag}"] for rows in seeds])) for i in range(n)]
            ax.plot(steps, mean, color=colour, lw=2, label=f"{label} ({len(seeds)} seeds)")
            if images:
                band = [pooled_interval([rows[i][f"eval/{tag}"] for rows in seeds], images[tag]) for i in range(n)]
                ax.fill_between(steps, *(100 * np.array(band)).T, color=colour, alpha=0.12, lw=0)
    for ax, name in zip(axes, ("rare prompts", "canonical prompts")):
        ax.set_title(f"{name}: colour+shape", fontsize=9)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of images")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


def picture(run_dirs: dict[str, Path], prompts: list, path: Path, per_cell: int = 4) -> None:
    """Rows: ``prompts``; column groups: one evaluation run folder each, ``per_cell`` samples."""
    from eval.runner import sample_path, save_png

    cell, pad, label_w, head = 32, 2, 120, 18
    width = label_w + len(run_dirs) * (per_cell * (cell + pad) + 8)
    canvas = Image.new("RGB", (width, head + len(prompts) * (cell + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(run_dirs):
        draw.text((label_w + j * (per_cell * (cell + pad) + 8), 2), label, fill=(0, 0, 0))
    for i, p in enumerate(prompts):
        y = head + i * (cell + pad)
        draw.text((4, y + 10), p.prompt, fill=(0, 0, 0))
        for j, run in enumerate(run_dirs.values()):
            for k in range(per_cell):
                with Image.open(sample_path(run, p.index, k)) as im:
                    canvas.paste(im.convert("RGB"), (label_w + j * (per_cell * (cell + pad) + 8) + k * (cell + pad), y))
    save_png(path, canvas.resize((canvas.width * 3, canvas.height * 3), Image.NEAREST))
