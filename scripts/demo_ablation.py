"""Fine-tuning settings compared on the demo's **dev** side: a RecA arm and its control, several
seeds, from the pretrained model of a finished demo run, evaluated on the dev pairs with the dev
sample seeds (the test side is never touched, so nothing chosen here is chosen on the test pairs).

    python scripts/demo_ablation.py --out runs/demo --tag lr4e-3 lora_lr=4e-3
    python scripts/demo_ablation.py --tag full lora=false --seeds 0,1,2
    python scripts/demo_ablation.py --tag gen-side lora=false "reca_trainable=['connector','transformer']" \\
        "reca_shares={'recon': 1.0, 't2i': 0.0, 'i2t': 0.0}"

Every ``key=value`` sets a field of ``demo.run.DemoSettings`` (values are YAML), whose defaults are
the demo's: LoRA unless ``lora=false``. Runs go to
``<out>/ablations/<tag>/``; their results to ``<out>/ablations/<tag>/summary.json``; one line per
arm is printed: pooled counts, Wilson 95 % intervals and per-seed values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

from demo import run as demo
from demo.report import summarise
from reca.config import ConfigError
from reca.io import atomic_write_json

KEYS = [("rare colour+shape", "rare: colour+shape"), ("rare colour", "rare: right colour")]
KEYS += [("canonical colour+shape", "canonical: colour+shape"), ("understanding", "understanding, rare (36-way)")]


def settings_from(pairs: list[str], seeds: tuple[int, ...]) -> demo.DemoSettings:
    fields = {f.name: f for f in dataclasses.fields(demo.DemoSettings)}
    values = {}
    for item in pairs:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"{item!r}: expected key=value with a key of DemoSettings ({', '.join(fields)})")
        if key in ("split", "seeds"):
            why = "this script scores the dev side only" if key == "split" else "use --seeds"
            raise ConfigError(f"{item!r}: {key} is not set here ({why})")
        value = yaml.safe_load(raw)
        value = tuple(value) if isinstance(value, list) else value
        default = getattr(demo.DemoSettings(), key)
        if isinstance(default, float) and isinstance(value, str):
            try:  # YAML 1.1 reads "2e-3" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        # a typo must not become another setting: "lora=fasle" is a string, and strings are truthy
        expected = (int, float) if isinstance(default, float) else type(default)
        if isinstance(value, bool) is not isinstance(default, bool) or not isinstance(value, expected):
            raise ConfigError(f"{item!r}: {key} must be of type {type(default).__name__}, like its default {default!r}")
        values[key] = value
    return dataclasses.replace(demo.DemoSettings(), split="dev", seeds=seeds, **values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="a finished demo run (its pretrained model)")
    p.add_argument("--tag", required=True, help="name of this setting (its folder under <out>/ablations)")
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds, comma-separated")
    p.add_argument("--arms", default="reca,control", help="reca, control or both")
    p.add_argument("settings", nargs="*", help="DemoSettings overrides, key=value")
    a = p.parse_args(argv)
    try:
        if not (a.out / "pretrain/final").is_dir():
            raise ConfigError(f"{a.out}/pretrain/final is missing: run `make demo` (or python -m demo) first")
        s = settings_from(a.settings, tuple(int(x) for x in a.seeds.split(",")))
        return sweep(a, s)
    except ConfigError as e:  # bad input: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2


def sweep(a: argparse.Namespace, s: demo.DemoSettings) -> int:
    root = demo.ablation_dir(a.out, a.tag)
    jobs = [(arm, seed) for arm in a.arms.split(",") for seed in s.seeds]
    n, threads = demo.workers_for(len(jobs))  # side by side on one thread each, as the demo's runs
    args = [(a.out, s, demo.variant_of(s), arm, seed, threads, a.tag) for arm, seed in jobs]
    done = demo.map_side_by_side(demo.arm_job, args, n)
    results: dict[str, list[dict]] = {}
    for (arm, _), job in zip(jobs, done):
        results.setdefault(arm, []).append(job["eval"])
    table = summarise(results)
    atomic_write_json(root / "summary.json", {"settings": dataclasses.asdict(s), "table": table}, sort_keys=False)
    for arm, metrics in table.items():
        cells = []
        for short, key in KEYS:
            m = metrics[key]
            seeds = "/".join(f"{100 * v:.0f}" for v in m["per_seed"])
            lo, hi = (100 * v for v in m["wilson95"])
            cells.append(f"{short} {100 * m['pooled']:.1f}% [{lo:.0f}, {hi:.0f}] ({seeds})")
        print(f"{a.tag} {arm}: " + "; ".join(cells))
    print(json.dumps({"tag": a.tag, "root": str(root)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
