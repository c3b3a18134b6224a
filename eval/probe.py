"""The pseudo-unification entropy probe over *traces* (arXiv 2604.10949): per-layer entropy curves per
modality, scalar summaries with bootstrap CIs, JSON, plots and a before/after table.

A :class:`Trace` is one prompt's hidden states through a model; this module never runs a model, so
whatever extracts hidden states only has to build two lists of traces and call :func:`analyse`::

    result = analyse(encoding_traces, response_traces, drop_first=1)   # entropy options: eval.entropy
    save_json(result, "probe.json")
    python -m eval.probe plot --inputs before=a.json after=b.json --out probe.png

* Encoding: H_α of the prompt tokens at every layer, one curve per prompt modality over depth
  normalised to [0, 1] (embeddings = 0, last layer = 1).
* Response: per layer Ĥ(Z_r | Z_p) (:func:`eval.entropy.conditional_entropy`), one curve per
  generated modality.
* Length control (entropy grows with token count, H ≤ log n): every gap is also reported on curves
  divided per prompt by log n (n = prompt tokens used for encoding, prompt + response tokens for the
  response proxy — the bound of the joint entropy), and length-matched: prompts are binned by token
  count in powers of two (n = prompt tokens for encoding, response tokens for the response), the gap
  is taken within each bin holding both modalities, and bins are averaged weighted by their prompts.
* Summaries: encoding gap = mean over normalised depth of |H_img − H_txt|; response gap = mean over
  depth of (Ĥ_text − Ĥ_img); final-layer values. Curves with different layer counts are linearly
  interpolated onto a common evenly spaced depth grid. CIs: percentile bootstrap over prompts,
  resampling each modality (and length bin) independently, seeded.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch import Tensor

from eval.entropy import conditional_entropy, renyi_entropy
from eval.stats import bootstrap_ci, bootstrap_means, percentile_interval
from reca.io import atomic_write, atomic_write_text

MODALITIES = ("text", "image")
LEVEL = 0.95


@dataclass
class Trace:
    """One prompt's hidden states through a model."""

    layers: list[Tensor]  # per layer (embeddings first), each (T, d) for this one sample
    prompt_len: int  # the first prompt_len positions are the prompt, the rest the response (may be 0 tokens)
    modality: str  # "text" or "image": the prompt's modality (encoding) / which generation the response is (response)


# --------------------------------------------------------------------------- trajectories


def entropy_settings(**kw: Any) -> dict[str, Any]:
    """The entropy options with :func:`renyi_entropy`'s defaults filled in (recorded in every
    result, so checkpoints measured differently can be spotted); unknown keys are errors."""
    defaults = {k: p.default for k, p in inspect.signature(renyi_entropy).parameters.items() if k != "z"}
    unknown = set(kw) - set(defaults)
    if unknown:
        raise TypeError(f"unknown entropy option(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **kw}


def _n_used(n: int, drop_first: int, max_tokens: int | None) -> int:
    n = max(n - drop_first, 0)
    return min(n, max_tokens) if max_tokens is not None else n


def _group(traces: Sequence[Trace], kind: str) -> dict[str, list[Trace]]:
    groups: dict[str, list[Trace]] = {}
    for i, t in enumerate(traces):
        if t.modality not in MODALITIES:
            raise ValueError(f"trace {i}: modality must be one of {MODALITIES}, got {t.modality!r}")
        T = t.layers[0].shape[0] if t.layers else 0
        if not t.layers or any(layer.shape[0] != T for layer in t.layers):
            raise ValueError(f"trace {i}: needs ≥1 layer, all with the same number of positions")
        if not 1 <= t.prompt_len <= (T - 1 if kind == "response" else T):
            need = "≥1 prompt and ≥1 response token" if kind == "response" else "≥1 prompt token"
            raise ValueError(f"trace {i}: prompt_len={t.prompt_len} of {T} positions; {kind} traces need {need}")
        groups.setdefault(t.modality, []).append(t)
    for m, ts in groups.items():
        if len({len(t.layers) for t in ts}) > 1:
            raise ValueError(f"{m} traces have different layer counts: {sorted({len(t.layers) for t in ts})}")
    return {m: groups[m] for m in MODALITIES if m in groups}


def _curves(rows: list[list[float]], n_tokens: list[int], normaliser: list[float], n_resamples: int, seed: int) -> dict:
    """Per-layer mean and bootstrap CI (raw and divided by log n) plus the per-prompt values."""
    v = np.asarray(rows, dtype=np.float64)
    norm = np.asarray(normaliser, dtype=np.float64)
    vn = np.divide(v, norm[:, None], out=np.zeros_like(v), where=norm[:, None] > 0)
    out: dict[str, Any] = {"depth": np.linspace(0.0, 1.0, v.shape[1]).tolist(), "n_prompts": len(v)}
    for suffix, x in (("", v), ("_normalised", vn)):
        lo, hi = percentile_interval(bootstrap_means(x, n_resamples, seed), LEVEL)
        out |= {f"mean{suffix}": x.mean(0).tolist(), f"lo{suffix}": lo.tolist(), f"hi{suffix}": hi.tolist()}
    return out | {"per_prompt": v.tolist(), "n_tokens": list(n_tokens), "normaliser": norm.tolist()}


def _trajectory(kind: str, traces: Sequence[Trace], n_resamples: int, ci_seed: int, entropy_kw: dict) -> dict:
    s = entropy_settings(**entropy_kw)
    log_base = math.log(s["base"])
    modalities = {}
    for k, (m, ts) in enumerate(_group(traces, kind).items()):
        rows, n_tokens, normaliser = [], [], []
        for t in ts:
            n_p = _n_used(t.prompt_len, s["drop_first"], s["max_tokens"])
            if kind == "encoding":
                rows.append([renyi_entropy(layer[: t.prompt_len], **s) for layer in t.layers])
                n, n_all = n_p, n_p
            else:
                rows.append(
                    [conditional_entropy(layer[: t.prompt_len], layer[t.prompt_len :], **s) for layer in t.layers]
                )
                n = _n_used(t.layers[0].shape[0] - t.prompt_len, 0, s["max_tokens"])
                n_all = n_p + n
            n_tokens.append(n)
            normaliser.append(math.log(n_all) / log_base if n_all > 1 else 0.0)
        modalities[m] = _curves(rows, n_tokens, normaliser, n_resamples, ci_seed + k)
    settings = s | {"n_resamples": n_resamples, "ci_seed": ci_seed, "level": LEVEL}
    return {"kind": kind, "settings": settings, "modalities": modalities}


def encoding_trajectory(
    traces: Sequence[Trace], *, n_resamples: int = 1000, ci_seed: int = 0, **entropy_kw: Any
) -> dict:
    """H_α of each trace's prompt tokens at every layer, grouped by prompt modality:
    ``{"kind", "settings", "modalities": {m: {"depth", "mean", "lo", "hi", "mean_normalised", ...,
    "per_prompt" (prompts × layers), "n_tokens", "normaliser" (log n per prompt)}}}``.
    ``entropy_kw`` go to :func:`eval.entropy.renyi_entropy` (alpha, sigma, base, drop_first, ...)."""
    return _trajectory("encoding", traces, n_resamples, ci_seed, entropy_kw)


def response_trajectory(
    traces: Sequence[Trace], *, n_resamples: int = 1000, ci_seed: int = 0, **entropy_kw: Any
) -> dict:
    """Ĥ(Z_r | Z_p) at every layer (:func:`eval.entropy.conditional_entropy`), grouped by the
    generated modality; same layout as :func:`encoding_trajectory` (``n_tokens`` = response tokens,
    ``normaliser`` = log of prompt + response tokens). Every trace needs ≥1 response token."""
    return _trajectory("response", traces, n_resamples, ci_seed, entropy_kw)


# --------------------------------------------------------------------------- summaries


def _interp_matrix(src: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """M with curve_on_grid = curve_on_src @ M (linear interpolation)."""
    return np.stack([np.interp(grid, src, e) for e in np.eye(len(src))])


def _gap(text: np.ndarray, image: np.ndarray, signed: bool) -> np.ndarray:
    """Mean over a common depth grid of |image − text| (signed=False) or text − image (signed=True);
    curves on the last axis, each on its own evenly spaced depth grid over [0, 1]."""
    L = max(text.shape[-1], image.shape[-1])
    grid = np.linspace(0.0, 1.0, L)
    t = text @ _interp_matrix(np.linspace(0.0, 1.0, text.shape[-1]), grid)
    i = image @ _interp_matrix(np.linspace(0.0, 1.0, image.shape[-1]), grid)
    return (t - i if signed else np.abs(i - t)).mean(-1)


def _ci(value: float, replicates: np.ndarray, **extra: Any) -> dict:
    lo, hi = percentile_interval(replicates, LEVEL)
    return {"value": float(value), "lo": float(lo), "hi": float(hi), **extra}


def _gap_ci(text: np.ndarray, image: np.ndarray, signed: bool, B: int, rng: np.random.Generator) -> dict:
    reps = _gap(bootstrap_means(text, B, rng), bootstrap_means(image, B, rng), signed)
    return _ci(_gap(text.mean(0), image.mean(0), signed), reps, n_text=len(text), n_image=len(image))


def _length_matched(
    text: np.ndarray, image: np.ndarray, nt: np.ndarray, ni: np.ndarray, signed: bool, B: int, rng: np.random.Generator
) -> dict | None:
    """Gap within power-of-two token-count bins holding both modalities, averaged weighted by the
    bin's prompts; None when no bin holds both."""
    bt, bi = np.floor(np.log2(np.maximum(nt, 1))), np.floor(np.log2(np.maximum(ni, 1)))
    common = sorted(set(bt.tolist()) & set(bi.tolist()))
    if not common:
        return None
    value, reps, total, bins = 0.0, np.zeros(B), 0, []
    for b in common:
        t, i = text[bt == b], image[bi == b]
        w = len(t) + len(i)
        value += w * _gap(t.mean(0), i.mean(0), signed)
        reps += w * _gap(bootstrap_means(t, B, rng), bootstrap_means(i, B, rng), signed)
        total += w
        bins.append({"tokens": [2 ** int(b), 2 ** int(b + 1)], "text": len(t), "image": len(i)})
    return _ci(value / total, reps / total, bins=bins)


def _summary(traj: Mapping[str, Any], signed: bool, B: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    raw, normed, n = {}, {}, {}
    for m, c in traj["modalities"].items():
        raw[m] = np.asarray(c["per_prompt"], dtype=np.float64)
        norm = np.asarray(c["normaliser"], dtype=np.float64)[:, None]
        normed[m] = np.divide(raw[m], norm, out=np.zeros_like(raw[m]), where=norm > 0)
        n[m] = np.asarray(c["n_tokens"])
    out: dict[str, Any] = {}
    for suffix, v in (("", raw), ("_normalised", normed)):
        out[f"final{suffix}"] = {
            m: dict(zip(("value", "lo", "hi"), bootstrap_ci(x[:, -1], B, LEVEL, int(rng.integers(2**31)))))
            for m, x in v.items()
        }
    both = all(m in raw for m in MODALITIES)
    out["gap"] = _gap_ci(raw["text"], raw["image"], signed, B, rng) if both else None
    out["gap_normalised"] = _gap_ci(normed["text"], normed["image"], signed, B, rng) if both else None
    out["gap_length_matched"] = (
        _length_matched(raw["text"], raw["image"], n["text"], n["image"], signed, B, rng) if both else None
    )
    return out


def summarise(
    encoding: Mapping[str, Any] | None, response: Mapping[str, Any] | None, *, n_resamples: int = 1000, seed: int = 0
) -> dict:
    """Scalar summaries with percentile-bootstrap 95% CIs over prompts:
    ``{"encoding": {"gap", "gap_normalised", "gap_length_matched", "final", "final_normalised"},
    "response": {...}, "ci": {...}}``. Encoding gap = mean over depth of |H_img − H_txt|; response
    gap = mean over depth of Ĥ_text − Ĥ_img (signed: > 0 is the pattern-split response). A gap is
    None when a modality is missing; each gap is ``{"value", "lo", "hi", ...}``."""
    return {
        "encoding": _summary(encoding, False, n_resamples, seed) if encoding else None,
        "response": _summary(response, True, n_resamples, seed + 1) if response else None,
        "ci": {"level": LEVEL, "n_resamples": n_resamples, "seed": seed, "unit": "prompt", "method": "percentile"},
    }


def analyse(
    encoding_traces: Sequence[Trace],
    response_traces: Sequence[Trace] = (),
    *,
    n_resamples: int = 1000,
    ci_seed: int = 0,
    **entropy_kw: Any,
) -> dict:
    """Both trajectories (either list may be empty → None) and their :func:`summarise`; the dict
    :func:`save_json`, :func:`plot` and :func:`compare` take."""
    kw = {"n_resamples": n_resamples, "ci_seed": ci_seed, **entropy_kw}
    enc = encoding_trajectory(encoding_traces, **kw) if encoding_traces else None
    resp = response_trajectory(response_traces, **kw) if response_traces else None
    return {"encoding": enc, "response": resp, "summary": summarise(enc, resp, n_resamples=n_resamples, seed=ci_seed)}


# --------------------------------------------------------------------------- files, plots, tables


def save_json(result: Mapping[str, Any], path: str | Path) -> None:
    """Write ``result`` as strict JSON (no NaN), atomically (temporary file beside it, ``os.replace``)."""
    atomic_write_text(path, json.dumps(result, indent=1, sort_keys=True, allow_nan=False) + "\n")


def load_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _unit(results: Mapping[str, Mapping[str, Any]]) -> str:
    for r in results.values():
        for part in ("encoding", "response"):
            if r.get(part):
                base = r[part]["settings"]["base"]
                return "nats" if math.isclose(base, math.e) else "bits" if base == 2 else f"log base {base:g}"
    return "nats"


def plot(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> None:
    """Overlay several checkpoints' :func:`analyse` results ({"before": r1, "after": r2}) in a PNG:
    left encoding entropy, right response proxy, vs normalised depth; one colour per checkpoint,
    solid = text, dashed = image, shaded = 95% CI over prompts. Written atomically, Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    unit = _unit(results)
    panels = (
        ("encoding", f"prompt entropy $H_\\alpha$ ({unit})", "Encoding"),
        ("response", f"response proxy $\\hat H(Z_r|Z_p)$ ({unit})", "Response"),
    )
    for ax, (part, ylabel, title) in zip(fig.subplots(1, 2), panels):
        drawn = False
        for k, (name, result) in enumerate(results.items()):
            traj = result.get(part)
            for m, style in (("text", "-"), ("image", "--")):
                c = (traj or {}).get("modalities", {}).get(m)
                if c is None:
                    continue
                ax.plot(c["depth"], c["mean"], style, color=f"C{k}", lw=1.8, marker=".", label=f"{name} · {m}")
                ax.fill_between(c["depth"], c["lo"], c["hi"], color=f"C{k}", alpha=0.15, lw=0)
                drawn = True
        if drawn:
            ax.legend(fontsize=8, handlelength=3.5)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="normalised depth (0 = embeddings, 1 = last layer)", ylabel=ylabel, title=title, xlim=(0, 1))
        ax.grid(alpha=0.3)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def _cell(x: Mapping[str, Any] | None) -> str:
    return "—" if not x else f"{x['value']:.3f} [{x['lo']:.3f}, {x['hi']:.3f}]"


def compare(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of the summaries, one column per checkpoint (value [95% CI])."""
    rows = [
        ("encoding", "gap", "encoding gap mean\\|H_img − H_txt\\|"),
        ("encoding", "gap_normalised", "encoding gap, H / log n"),
        ("encoding", "gap_length_matched", "encoding gap, length-matched"),
        ("encoding", "final.text", "final-layer H, text prompts"),
        ("encoding", "final.image", "final-layer H, image prompts"),
        ("response", "gap", "response gap mean(Ĥ_text − Ĥ_img)"),
        ("response", "gap_normalised", "response gap, Ĥ / log n"),
        ("response", "gap_length_matched", "response gap, length-matched"),
        ("response", "final.text", "final-layer Ĥ, text generation"),
        ("response", "final.image", "final-layer Ĥ, image generation"),
    ]
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for part, key, label in rows:
        cells = []
        for name in names:
            x = (results[name].get("summary") or {}).get(part)
            for k in key.split("."):
                x = x.get(k) if x else None
            cells.append(_cell(x))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Entropies in {_unit(results)}; 95% percentile bootstrap CIs over prompts."]
    settings = {n: {p: r[p]["settings"] for p in ("encoding", "response") if r.get(p)} for n, r in results.items()}
    if len({json.dumps(s, sort_keys=True) for s in settings.values() if s}) > 1:
        lines.append("**Warning: the checkpoints were probed with different settings; values are not comparable.**")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- traces from a model


def collect_traces(
    adapter: Any,
    encoder: Any,
    texts: Sequence[str],
    images: Sequence[Any],
    captions: Sequence[str],
    question: str = "Describe the image.",
) -> tuple[list[Trace], list[Trace]]:
    """(encoding traces, response traces) from an adapter with ``hidden_states`` (reca.adapter.Traceable).

    Encoding: text prompts ``texts``; image prompts = the frozen encoder's tokens of ``images`` with
    no instruction. Response: image generation from each text prompt (the positions that carry the
    image — for the reference UMM its learnable queries, for an AR model its image tokens); text
    generation = each image captioned with its ``captions`` entry, teacher-forced after ``question``.
    """
    from reca.adapter import Condition, Traceable

    if not isinstance(adapter, Traceable):
        raise TypeError(f"{type(adapter).__name__} has no hidden_states(); the probe needs reca.adapter.Traceable")
    if len(images) != len(captions):
        raise ValueError("collect_traces: one caption per image")
    semantic = encoder.encode(list(images))
    text_runs = adapter.hidden_states(Condition(texts=list(texts)))
    image_runs = adapter.hidden_states(Condition(semantic=semantic, instructions=[""] * len(images)))
    caption_runs = adapter.hidden_states(
        Condition(semantic=semantic, instructions=[question] * len(images)), answers=list(captions)
    )
    encoding = [Trace([h[:n] for h in layers], n, "text") for layers, n in text_runs]
    encoding += [Trace([h[:n] for h in layers], n, "image") for layers, n in image_runs]
    response = [Trace(layers, n, "image") for layers, n in text_runs]
    response += [Trace(layers, n, "text") for layers, n in caption_runs]
    return encoding, response


def _manifest_images(path: Path, n: int) -> tuple[list[Any], list[str]]:
    from PIL import Image

    from eval.prompts import read_jsonl

    rows = [row for _, row in read_jsonl(path)][:n]
    if not rows or any("image" not in r or "caption" not in r for r in rows):
        raise ValueError(f"{path}: --images needs a jsonl manifest with 'image' and 'caption' on every line")
    images = []
    for r in rows:
        with Image.open(path.parent / r["image"]) as im:
            images.append(im.convert("RGB"))
    return images, [str(r["caption"]) for r in rows]


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from eval.prompts import load_prompts
    from reca.build import load_trained
    from reca.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    adapter, encoder = load_trained(cfg, args.checkpoint, "cuda" if torch.cuda.is_available() else "cpu")
    texts = [p.prompt for p in load_prompts(args.texts)][: args.n]
    images, captions = _manifest_images(Path(args.images), args.n)
    with torch.no_grad():
        encoding, response = collect_traces(adapter, encoder, texts, images, captions, args.question)
    result = analyse(encoding, response, drop_first=args.drop_first, max_tokens=args.max_tokens)
    save_json(result, args.out)
    sys.stdout.write(compare({Path(args.out).stem: result}))
    return 0


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.probe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plot", help="overlay saved probe JSONs in one PNG and print a comparison table")
    p.add_argument("--inputs", nargs="+", required=True, metavar="NAME=JSON", help="e.g. before=a.json after=b.json")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--md", help="also write the comparison table to this Markdown file")
    r = sub.add_parser("run", help="probe a model: text prompts and captioned images → JSON")
    r.add_argument("--config", required=True)
    r.add_argument("--checkpoint")
    r.add_argument("--texts", default="builtin", help="prompt set for text prompts (builtin, a GenEval jsonl, ...)")
    r.add_argument("--images", required=True, help="jsonl manifest: image (relative path) and caption per line")
    r.add_argument("--n", type=int, default=32, help="prompts of each modality")
    r.add_argument("--question", default="Describe the image.")
    r.add_argument("--drop-first", type=int, default=1, help="tokens dropped from each prompt (BOS / attention sink)")
    r.add_argument("--max-tokens", type=int, default=None)
    r.add_argument("--out", required=True)
    r.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)

    results = {}
    for item in args.inputs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--inputs wants NAME=JSON, got {item!r}")
        results[name] = load_json(path)
    plot(results, args.out)
    table = compare(results)
    if args.md:
        atomic_write_text(args.md, table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
