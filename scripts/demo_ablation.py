"""One-seed ablation on a finished demo run: RecA and its control arm with other fine-tuning
settings, from the same pretrained model, evaluated like the main arms. Results go to
``<out>/stages/eval-abl-<tag>-{reca,control}-seed<seed>.json``; a one-line summary is printed.

    python scripts/demo_ablation.py --steps 600 --seed 0
    python scripts/demo_ablation.py --lr 2e-4 --shares recon=0.4,t2i=0.1,i2t=0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from demo import run as demo
from demo.scorer import WorldScorer
from reca.objectives import OBJECTIVES


def parse_shares(text: str) -> dict[str, float]:
    shares = {k: float(v) for k, v in (item.split("=") for item in text.split(","))}
    if set(shares) != set(OBJECTIVES) or abs(sum(shares.values()) - 1) > 1e-6:
        raise SystemExit(f"--shares {text!r}: give recon=…,t2i=…,i2t=… summing to 1")
    return shares


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="fine-tuning steps (default: the demo's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the demo's)")
    p.add_argument(
        "--shares", type=parse_shares, help="RecA's mixture, e.g. recon=0.5,t2i=0,i2t=0.5 (default: the demo's)"
    )
    a = p.parse_args()
    if not (a.out / "pretrain/final").is_dir():
        raise SystemExit(f"{a.out}: run `make demo` first (needs {a.out}/pretrain/final)")
    base = demo.DemoSettings()
    settings = dataclasses.replace(
        base,
        reca_steps=a.steps or base.reca_steps,
        reca_lr=a.lr or base.reca_lr,
        reca_shares=a.shares or base.reca_shares,
    )
    shares = ",".join(f"{k}{v:g}" for k, v in settings.reca_shares.items())
    tag = f"steps{settings.reca_steps}-lr{settings.reca_lr:g}-{shares}"
    scorer = WorldScorer.load_or_train(a.out / "cache/scorer.pt")
    for arm in ("reca", "control"):
        name = f"abl-{tag}-{arm}-seed{a.seed}"
        demo.cached(
            a.out / "stages" / f"train-{name}.json",
            lambda: demo.train(a.out / name, demo.finetune_config(a.out, settings, arm, a.seed)),
        )
        result = demo.cached(
            a.out / "stages" / f"eval-{name}.json",
            lambda: demo.evaluate(a.out, name, a.out / name / "final", settings, scorer),
        )
        g, r, u = result["generation"], result["reconstruction"]["rare"], result["understanding"]["rare"]
        print(
            f"{name}: rare right colour {g['rare']['colour']}/{g['rare']['n']}, "
            f"rare colour+shape {g['rare']['both']}/{g['rare']['n']}, "
            f"rare drawn canonical {g['rare']['drawn_canonical_colour']}/{g['rare']['n']}, "
            f"canonical colour+shape {g['canonical']['both']}/{g['canonical']['n']}, "
            f"understanding rare {u['correct']}/{u['n']}, "
            f"reconstruction rare {r['both']}/{r['n']}"
        )
        print(json.dumps(result))


if __name__ == "__main__":
    main()
