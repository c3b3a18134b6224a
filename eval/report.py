"""Scores → accuracy with confidence intervals, run-vs-run comparison, and the understanding-vs-
generation gap.

* :func:`score_run` scores every image of a run (``<run>/scores/<scorer>/scores.jsonl``, one row per
  image) and aggregates (``results.json`` + ``results.md``).
* Accuracy per category (= prompt tag, always labelled by name) is correct images / images;
  overall is the unweighted mean over categories, as GenEval reports it. Intervals (:mod:`eval.stats`): a percentile
  bootstrap over *prompts* (seeded; the images of one prompt are not independent, so prompts are
  the unit) and a Wilson interval over images per category (exact enough, but it treats images as
  independent — read it as a lower bound on the uncertainty).
* :func:`compare` pairs two scored runs prompt by prompt: deltas per category with a paired
  bootstrap, a before/after PNG per prompt and a Markdown summary.
* :func:`understanding_gap`: VQA accuracy on labelled real images next to generation accuracy.

Everything is sorted explicitly (prompt index, image name, category name), so nothing depends on
directory listing order; every file is written atomically.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from eval import dpg
from eval.prompts import COLORS, EvalError, read_jsonl
from eval.runner import iter_images, load_run, read_manifest, save_png
from eval.scorers import Scorer, VQAScorer, article
from eval.stats import bootstrap_indices, percentile_interval, resampled_accuracy, wilson_interval
from reca.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SCORES_DIR = "scores"


# --------------------------------------------------------------------------- aggregation


def _plain(value: Any) -> Any:
    """numpy/torch scalars → Python (json-serialisable, and bools stay bools)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, str)):
        return value
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(type(value).__name__)


def _as_json(obj: Any) -> Any:
    """What the caller gets back equals what was written to disk (tuples become lists)."""
    return json.loads(json.dumps(obj))


def per_prompt(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-image rows → one row per prompt (index, tag, prompt, images, correct, unverified).

    ``n_images``/``n_correct``/``accuracy`` count only the images the scorer could verify;
    ``n_unverified`` the others (``accuracy`` is None when no image was verified)."""
    groups: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[int(r["index"])].append(r)
    out = []
    for index in sorted(groups):
        g = groups[index]
        verified = [r for r in g if not r.get("unverified", False)]
        n_correct = sum(bool(r["correct"]) for r in verified)
        out.append(
            {
                "index": index,
                "tag": g[0]["tag"],
                "prompt": g[0]["prompt"],
                "n_images": len(verified),
                "n_correct": n_correct,
                "accuracy": n_correct / len(verified) if verified else None,
                "n_unverified": len(g) - len(verified),
            }
        )
    return out


def _by_tag(prompts: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for p in sorted(prompts, key=lambda p: p["index"]):
        groups[p["tag"]].append(p)
    return {tag: groups[tag] for tag in sorted(groups)}


def aggregate(rows: Iterable[Mapping[str, Any]], *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-image rows (``index``, ``tag``, ``prompt``, ``correct``, ``unverified``...) → per-category
    and overall accuracy with bootstrap and Wilson 95% intervals, plus the per-prompt rows.

    Images the scorer marked ``unverified`` never enter an accuracy: they are counted per category
    (``n_unverified``), prompts with no verified image are listed under ``unverified_prompts`` and
    categories with none under ``unverified`` — reported apart and left out of ``overall``."""
    all_prompts = per_prompt(rows)
    if not all_prompts:
        raise EvalError("no scored images to aggregate")
    prompts = [p for p in all_prompts if p["n_images"] > 0]
    unverified_prompts = [p for p in all_prompts if p["n_images"] == 0]
    if not prompts:
        raise EvalError(
            f"the scorer could verify none of the {sum(p['n_unverified'] for p in all_prompts)} images "
            "(every prompt asks for something it cannot check); use a scorer that checks these prompts"
        )
    unverified_by_tag = _by_tag(all_prompts)
    groups = _by_tag(prompts)
    idx = bootstrap_indices({t: len(g) for t, g in groups.items()}, n_boot, seed)
    categories: dict[str, Any] = {}
    replicates = []
    for tag, g in groups.items():
        correct = np.array([p["n_correct"] for p in g], dtype=float)
        total = np.array([p["n_images"] for p in g], dtype=float)
        boot = resampled_accuracy(correct, total, idx[tag])
        replicates.append(boot)
        k, n = int(correct.sum()), int(total.sum())
        categories[tag] = {
            "accuracy": k / n,
            "ci95": percentile_interval(boot),
            "wilson95": wilson_interval(k, n),
            "n_prompts": len(g),
            "n_images": n,
            "n_correct": k,
            "n_unverified": sum(p["n_unverified"] for p in unverified_by_tag[tag]),
        }
    unverified = {
        tag: {"n_prompts": len(g), "n_images": sum(p["n_unverified"] for p in g)}
        for tag, g in unverified_by_tag.items()
        if tag not in categories
    }
    overall_boot = np.mean(replicates, axis=0)
    overall = {
        "accuracy": float(np.mean([c["accuracy"] for c in categories.values()])),
        "ci95": percentile_interval(overall_boot),
        "definition": "unweighted mean over the categories with verified images",
        "n_prompts": len(prompts),
        "n_images": sum(p["n_images"] for p in prompts),
        "n_unverified": sum(p["n_unverified"] for p in all_prompts),
    }
    return {
        "categories": categories,
        "overall": overall,
        "unverified": unverified,
        "prompts": prompts,
        "unverified_prompts": unverified_prompts,
        "bootstrap": {"n": n_boot, "seed": seed, "unit": "prompt", "level": 0.95},
    }


# --------------------------------------------------------------------------- scoring a run


def scores_dir(run_dir: str | Path, scorer_name: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in scorer_name)
    return Path(run_dir) / SCORES_DIR / safe


def score_run(
    run_dir: str | Path, scorer: Scorer, *, out_dir: str | Path | None = None, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Score every image of a GenEval-layout run; write ``scores.jsonl``, ``results.json`` and
    ``results.md`` to ``out_dir`` (default ``<run>/scores/<scorer.name>/``) and return the results.

    Fails before scoring anything if an image is missing or unreadable (listing the paths)."""
    run = Path(run_dir)
    prompts = load_run(run)
    ignored = [p.relative_to(run).as_posix() for rp in prompts for p in rp.ignored]
    if ignored:
        more = f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""
        log.warning(f"{run}: {len(ignored)} file(s) outside the layout not scored: {', '.join(ignored[:5])}{more}")
    rows = []
    for prompt, path in iter_images(prompts):
        with Image.open(path) as im:
            image = im.convert("RGB")
        checks = scorer.score(image, prompt)
        if not isinstance(checks.get("correct"), (bool, np.bool_)):
            raise EvalError(f"scorer '{scorer.name}': score() for {path} returned no boolean 'correct'")
        row = {
            "index": prompt.index,
            "tag": prompt.tag,
            "prompt": prompt.prompt,
            "image": path.relative_to(run).as_posix(),
        }
        try:
            row.update({k: _plain(v) for k, v in sorted(checks.items())})
        except TypeError as e:
            raise EvalError(
                f"scorer '{scorer.name}': score() for {path} returned a {e} value; use bool, float or str"
            ) from None
        rows.append(row)
    results = aggregate(rows, n_boot=n_boot, seed=seed)
    if any("dpg_score" in r for r in rows):  # DPG-Bench prompts: its own score next to the accuracy
        results["dpg"] = dpg.aggregate(rows, {rp.prompt.index: rp.prompt for rp in prompts}, n_boot=n_boot, seed=seed)
    manifest = read_manifest(run)
    results["scorer"] = scorer.name
    results["run"] = str(run)
    results["ignored_files"] = ignored
    keys = ("model", "n_images", "seed", "guidance_scale", "num_steps", "prompts")
    results["generation"] = {k: manifest.get(k) for k in keys}
    out = Path(out_dir) if out_dir is not None else scores_dir(run, scorer.name)
    atomic_write_text(out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_markdown(results))
    return _as_json(results)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(ci: Sequence[float]) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def results_markdown(results: Mapping[str, Any]) -> str:
    gen = results.get("generation") or {}
    model = gen.get("model") or {}
    lines = [
        f"# reca-eval: {results.get('run', '')}",
        "",
        f"Scorer `{results.get('scorer', '?')}`; model `{model.get('adapter', '?')}`"
        + (f", checkpoint `{model['checkpoint']}`" if model.get("checkpoint") else "")
        + f"; {gen.get('n_images', '?')} images per prompt, seed {gen.get('seed', '?')}, "
        f"guidance {gen.get('guidance_scale', '?')}, {gen.get('num_steps', '?')} steps.",
        "",
        "Accuracy in %. CI: 95% bootstrap over prompts; Wilson: 95% over images (treats images as independent).",
        "",
        "| category | accuracy | CI | Wilson | prompts | images | unverified |",
        "|---|---|---|---|---|---|---|",
    ]
    for tag, c in results["categories"].items():
        lines.append(
            f"| {tag} | {_pct(c['accuracy'])} | {_ci(c['ci95'])} | {_ci(c['wilson95'])} | {c['n_prompts']} "
            f"| {c['n_images']} | {c['n_unverified']} |"
        )
    o = results["overall"]
    lines += [
        f"| **overall** (mean of categories) | **{_pct(o['accuracy'])}** | {_ci(o['ci95'])} | "
        f"| {o['n_prompts']} | {o['n_images']} | |",
        "",
        "`unverified`: images whose prompt asks for something this scorer cannot check (count, position, "
        "exclusion, an attribute or field it has no check for); they are in no accuracy, overall included.",
        "",
    ]
    if results.get("dpg"):
        d = results["dpg"]
        lines += [
            "## DPG-Bench",
            "",
            "Score in %: a question counts only if its parent questions were answered yes; overall = mean over "
            "prompts of the mean over images; categories = mean of the raw answers over their questions "
            "(as DPG-Bench's compute_dpg_bench.py). CI: 95% bootstrap over prompts.",
            "",
            "| category | score | CI | questions |",
            "|---|---|---|---|",
        ]
        for name, c in d["categories"].items():
            lines.append(f"| {name} | {_pct(c['score'])} | {_ci(c['ci95'])} | {c['n_questions']} |")
        o = d["overall"]
        lines += [f"| **overall** | **{_pct(o['score'])}** | {_ci(o['ci95'])} | |", ""]
    if results.get("unverified"):
        lines += ["## Categories this scorer cannot verify (not in overall)", "", "| category | prompts | images |"]
        lines.append("|---|---|---|")
        for tag, c in results["unverified"].items():
            lines.append(f"| {tag} | {c['n_prompts']} | {c['n_images']} |")
        lines.append("")
    lines += [
        "## Per prompt",
        "",
        "| # | category | prompt | correct |",
        "|---|---|---|---|",
    ]
    for p in results["prompts"]:
        lines.append(f"| {p['index']} | {p['tag']} | {p['prompt']} | {p['n_correct']}/{p['n_images']} |")
    return "\n".join(lines) + "\n"


def find_results(run_dir: str | Path, scorer: str | None = None) -> Path:
    """``<run>/scores/<scorer>/results.json``; with ``scorer=None`` the run must have exactly one."""
    run = Path(run_dir)
    if scorer is not None:
        path = scores_dir(run, scorer) / "results.json"
        if not path.is_file():
            raise EvalError(f"{path}: not found; run `reca-eval score --run {run} --scorer {scorer}` first")
        return path
    found = sorted((run / SCORES_DIR).glob("*/results.json"))
    if len(found) != 1:
        names = [p.parent.name for p in found]
        raise EvalError(
            f"{run}: {'no scored results' if not names else 'several scorers ' + str(names)}; "
            f"{'score it first' if not names else 'pick one with --scorer'}"
        )
    return found[0]


def load_results(path: str | Path) -> dict[str, Any]:
    """A ``results.json``, or the single one of a run directory."""
    path = Path(path)
    if path.is_dir():
        path = find_results(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"{path}: cannot read results ({e})") from None


# --------------------------------------------------------------------------- wandb


def log_wandb(results: Mapping[str, Any], run: Any = None, *, prefix: str = "eval") -> bool:
    """Log accuracies and a per-prompt ``wandb.Table`` to ``run`` (default: the active wandb run).

    Returns False, with an INFO log line, when wandb is not installed or no run is active: evaluation
    must never fail because tracking is off."""
    try:
        import wandb
    except ImportError:
        log.info("wandb is not installed; evaluation results not logged to wandb")
        return False
    run = run if run is not None else wandb.run
    if run is None:
        log.info("no active wandb run (call wandb.init or pass --wandb); evaluation results not logged to wandb")
        return False
    columns = ["index", "category", "prompt", "n_correct", "n_images", "accuracy"]
    rows = [
        [p["index"], p["tag"], p["prompt"], p["n_correct"], p["n_images"], p["accuracy"]] for p in results["prompts"]
    ]
    table = wandb.Table(columns=columns, data=rows)
    data: dict[str, Any] = {f"{prefix}/{tag}": c["accuracy"] for tag, c in results["categories"].items()}
    data[f"{prefix}/overall"] = results["overall"]["accuracy"]
    data[f"{prefix}/prompts"] = table
    run.log(data)
    return True


# --------------------------------------------------------------------------- compare


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return lines + ([line] if line else [])


def side_by_side(
    before: Sequence[Path],
    after: Sequence[Path],
    title: str,
    labels: tuple[str, str] = ("before", "after"),
    tile: int = 128,
) -> Image.Image:
    """Before row | after row, the prompt as title, each row labelled on the left."""
    cols = max(len(before), len(after), 1)
    label_w, font = 70, _font(12)
    title_lines = _wrap(title, max(20, (label_w + cols * tile) // 7))
    title_h = 8 + 16 * len(title_lines)
    canvas = Image.new("RGB", (label_w + cols * tile, title_h + 2 * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((6, 4 + 16 * i), line, fill="black", font=font)
    for r, (label, paths) in enumerate(zip(labels, (before, after))):
        y = title_h + r * tile
        draw.text((6, y + tile // 2 - 6), label, fill="black", font=font)
        for c, path in enumerate(paths):
            with Image.open(path) as im:
                canvas.paste(im.convert("RGB").resize((tile, tile)), (label_w + c * tile, y))
    return canvas


def compare(
    run_a: str | Path,
    run_b: str | Path,
    out_dir: str | Path,
    *,
    scorer: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    grids: bool = True,
) -> dict[str, Any]:
    """Before (``run_a``) vs after (``run_b``): per-category deltas with paired-bootstrap 95% CIs
    over the prompts both runs share, a side-by-side PNG per prompt, ``compare.md``/``compare.json``."""
    before_path, after_path = find_results(run_a, scorer), find_results(run_b, scorer)
    before, after = load_results(before_path), load_results(after_path)
    if before.get("scorer") != after.get("scorer"):
        raise EvalError(
            f"{before_path} and {after_path}: scored by different scorers "
            f"({before.get('scorer')} vs {after.get('scorer')}); deltas would be meaningless"
        )
    pa = {p["index"]: p for p in before["prompts"]}
    pb = {p["index"]: p for p in after["prompts"]}
    common = sorted(set(pa) & set(pb))
    for i in common:
        if pa[i]["prompt"] != pb[i]["prompt"] or pa[i]["tag"] != pb[i]["tag"]:
            raise EvalError(
                f"prompt {i}: '{pa[i]['prompt']}' in {run_a} but '{pb[i]['prompt']}' in {run_b}; "
                "not the same prompt set"
            )
    if not common:
        raise EvalError(f"{run_a} and {run_b} share no prompts")
    groups: dict[str, list[int]] = defaultdict(list)
    for i in common:
        groups[pa[i]["tag"]].append(i)
    groups = {t: groups[t] for t in sorted(groups)}
    idx = bootstrap_indices({t: len(g) for t, g in groups.items()}, n_boot, seed)
    categories: dict[str, Any] = {}
    deltas = []
    for tag, members in groups.items():
        stats = []
        for side in (pa, pb):
            correct = np.array([side[i]["n_correct"] for i in members], dtype=float)
            total = np.array([side[i]["n_images"] for i in members], dtype=float)
            stats.append((correct.sum() / total.sum(), resampled_accuracy(correct, total, idx[tag])))
        delta_boot = stats[1][1] - stats[0][1]
        deltas.append(delta_boot)
        categories[tag] = {
            "before": float(stats[0][0]),
            "after": float(stats[1][0]),
            "delta": float(stats[1][0] - stats[0][0]),
            "delta_ci95": percentile_interval(delta_boot),
            "n_prompts": len(members),
        }
    overall = {
        "before": float(np.mean([c["before"] for c in categories.values()])),
        "after": float(np.mean([c["after"] for c in categories.values()])),
    }
    overall["delta"] = overall["after"] - overall["before"]
    overall["delta_ci95"] = percentile_interval(np.mean(deltas, axis=0))
    result = {
        "before": str(run_a),
        "after": str(run_b),
        "scorer": before.get("scorer"),
        "categories": categories,
        "overall": overall,
        "only_before": sorted(set(pa) - set(pb)),
        "only_after": sorted(set(pb) - set(pa)),
        "prompts": [
            {
                "index": i,
                "tag": pa[i]["tag"],
                "prompt": pa[i]["prompt"],
                "before": pa[i]["accuracy"],
                "after": pb[i]["accuracy"],
            }
            for i in common
        ],
        "bootstrap": {"n": n_boot, "seed": seed, "unit": "prompt", "paired": True, "level": 0.95},
    }
    out = Path(out_dir)
    if grids:
        runs = {
            str(run_a): {rp.prompt.index: rp for rp in load_run(run_a)},
            str(run_b): {rp.prompt.index: rp for rp in load_run(run_b)},
        }
        for i in common:
            labels = (
                f"before {pa[i]['n_correct']}/{pa[i]['n_images']}",
                f"after {pb[i]['n_correct']}/{pb[i]['n_images']}",
            )
            img = side_by_side(
                runs[str(run_a)][i].images,
                runs[str(run_b)][i].images,
                f"[{pa[i]['tag']}] {pa[i]['prompt']}",
                labels=labels,
            )
            save_png(out / "grids" / f"{i:05d}.png", img)
    atomic_write_json(out / "compare.json", result)
    atomic_write_text(out / "compare.md", compare_markdown(result))
    return _as_json(result)


def compare_markdown(result: Mapping[str, Any]) -> str:
    lines = [
        f"# reca-eval compare (scorer `{result['scorer']}`)",
        "",
        f"- before: `{result['before']}`",
        f"- after: `{result['after']}`",
        "",
        "Accuracy in %; delta CI: 95% paired bootstrap over prompts.",
        "",
        "| category | before | after | delta | delta CI | prompts |",
        "|---|---|---|---|---|---|",
    ]
    for tag, c in result["categories"].items():
        lines.append(
            f"| {tag} | {_pct(c['before'])} | {_pct(c['after'])} | {100 * c['delta']:+.1f} "
            f"| {_ci(c['delta_ci95'])} | {c['n_prompts']} |"
        )
    o = result["overall"]
    lines.append(
        f"| **overall** | {_pct(o['before'])} | {_pct(o['after'])} | **{100 * o['delta']:+.1f}** "
        f"| {_ci(o['delta_ci95'])} | |"
    )
    if result["only_before"] or result["only_after"]:
        lines += ["", f"Not compared (in one run only): before {result['only_before']}, after {result['only_after']}."]
    changed = [p for p in result["prompts"] if p["after"] != p["before"]]
    lines += [
        "",
        "## Prompts that changed",
        "",
        "| # | category | prompt | before | after | grid |",
        "|---|---|---|---|---|---|",
    ]
    for p in sorted(changed, key=lambda p: (p["before"] - p["after"], p["index"])):
        lines.append(
            f"| {p['index']} | {p['tag']} | {p['prompt']} | {_pct(p['before'])} | {_pct(p['after'])} "
            f"| grids/{p['index']:05d}.png |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- understanding vs generation


def read_labels(path: str | Path) -> list[dict[str, Any]]:
    """Labelled images, one JSON object a line: ``image`` (path, relative to the labels file),
    ``color`` (or ``attribute``), ``object``, ``category``; optional ``wrong`` (the attribute to
    contrast with). Sorted by (category, image) so file order does not matter."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such labels file")
    rows = []
    for lineno, row in read_jsonl(path):
        row = dict(row)
        if "attribute" not in row and "color" in row:
            row["attribute"] = row["color"]
        for key in ("image", "attribute", "object", "category"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise EvalError(
                    f"{path}:{lineno}: field '{key}' (or 'color' for the attribute) must be a non-empty string"
                )
        row["path"] = (path.parent / row["image"]).resolve()
        rows.append(row)
    if not rows:
        raise EvalError(f"{path}: no labelled images")
    return sorted(rows, key=lambda r: (r["category"], r["image"]))


def understanding_rows(
    labels: Sequence[Mapping[str, Any]], vqa: VQAScorer, *, contrast: Sequence[str] = COLORS, threshold: float = 0.5
) -> list[dict[str, Any]]:
    """Per labelled image: P(yes) for the true attribute and for the wrong one(s); ``understood``
    when P(yes | true) > ``threshold`` and > P(yes | wrong). Wrong = the label's ``wrong`` field,
    else every other attribute of ``contrast`` (the strictest reading; GenEval's colours)."""
    missing = [str(r["path"]) for r in labels if not Path(r["path"]).is_file()]
    if missing:
        raise EvalError(f"{len(missing)} labelled image(s) missing: {'; '.join(missing[:20])}")
    out = []
    for r in labels:
        wrong = [r["wrong"]] if r.get("wrong") else [c for c in contrast if c != r["attribute"]]
        phrases = [f"{a} {r['object']}" for a in [r["attribute"], *wrong]]
        questions = [vqa.template.format(article=article(p), phrase=p) for p in phrases]
        with Image.open(r["path"]) as im:
            probs = vqa.p_yes(vqa.encode(im.convert("RGB")), questions)
        p_true, p_wrong = probs[0], max(probs[1:])
        out.append(
            {
                "image": r["image"],
                "category": r["category"],
                "attribute": r["attribute"],
                "object": r["object"],
                "p_yes_true": p_true,
                "p_yes_wrong": p_wrong,
                "understood": bool(p_true > threshold and p_true > p_wrong),
            }
        )
    return out


def understanding_gap(
    labels_path: str | Path,
    vqa: VQAScorer,
    generation: Mapping[str, Any] | str | Path,
    *,
    out_dir: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Understanding accuracy per category (labelled images, the UMM as VQA judge) next to
    generation accuracy per category (a scored run's ``results.json`` or run dir), with CIs."""
    gen = dict(generation) if isinstance(generation, Mapping) else load_results(generation)
    rows = understanding_rows(read_labels(labels_path), vqa, threshold=threshold)
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r["understood"])
    idx = bootstrap_indices({c: len(v) for c, v in by_cat.items()}, n_boot, seed)
    categories: dict[str, Any] = {}
    for cat in sorted(set(by_cat) | set(gen["categories"])):
        entry: dict[str, Any] = {"understanding": None, "generation": None, "gap": None}
        if cat in by_cat:
            ok = np.array(by_cat[cat], dtype=float)
            k, n = int(ok.sum()), len(ok)
            boot = resampled_accuracy(ok, np.ones_like(ok), idx[cat])
            entry.update(
                understanding=k / n,
                understanding_ci95=percentile_interval(boot),
                understanding_wilson95=wilson_interval(k, n),
                n_labelled=n,
            )
        if cat in gen["categories"]:
            g = gen["categories"][cat]
            entry.update(generation=g["accuracy"], generation_ci95=g["ci95"], n_generated=g["n_images"])
        if entry["understanding"] is not None and entry["generation"] is not None:
            entry["gap"] = entry["understanding"] - entry["generation"]
        categories[cat] = entry
    result = {
        "categories": categories,
        "rows": rows,
        "threshold": threshold,
        "generation_run": gen.get("run"),
        "scorer": gen.get("scorer"),
        "bootstrap": {"n": n_boot, "seed": seed, "unit": "image"},
    }
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(out / "gap.json", result)
        atomic_write_text(out / "gap.md", gap_markdown(result))
    return _as_json(result)


def gap_markdown(result: Mapping[str, Any]) -> str:
    def cell(value: float | None, ci: Sequence[float] | None) -> str:
        return "–" if value is None else f"{_pct(value)} {_ci(ci) if ci else ''}".strip()

    lines = [
        "# Understanding vs generation",
        "",
        f"Understanding: the UMM's P(yes) for the true attribute > {result['threshold']} and > P(yes) for the "
        f"wrong one(s), on labelled images. Generation: scorer `{result.get('scorer')}` on "
        f"`{result.get('generation_run')}`. Accuracy in %, 95% bootstrap CIs.",
        "",
        "| category | understanding | generation | gap (pts) | labelled | generated |",
        "|---|---|---|---|---|---|",
    ]
    for cat, c in result["categories"].items():
        gap = "–" if c["gap"] is None else f"{100 * c['gap']:+.1f}"
        lines.append(
            f"| {cat} | {cell(c['understanding'], c.get('understanding_ci95'))} "
            f"| {cell(c['generation'], c.get('generation_ci95'))} "
            f"| {gap} | {c.get('n_labelled', 0)} | {c.get('n_generated', 0)} |"
        )
    return "\n".join(lines) + "\n"
