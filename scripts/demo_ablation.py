"""One-seed ablation on a finished demo run: RecA and control with another number of steps, from the
same pretrained model, evaluated like the main arms (results in runs/demo/stages/eval-abl*.json).

    python scripts/demo_ablation.py --steps 900 --seed 0 [--out runs/demo]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from reca.demo import run as demo
from reca.demo.scorer import WorldScorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if not (a.out / "pretrain/final").is_dir():
        raise SystemExit(f"{a.out}: run `make demo` first (needs {a.out}/pretrain/final)")
    settings = dataclasses.replace(demo.DemoSettings(), reca_steps=a.steps)
    scorer = WorldScorer.load_or_train(a.out / "cache/scorer.pt")
    for arm in ("reca", "control"):
        name = f"abl{a.steps}-{arm}-seed{a.seed}"
        demo.cached(a.out / "stages" / f"train-{name}.json", lambda: demo.train(a.out / name, demo.finetune_overrides(a.out, settings, arm, a.seed)))
        result = demo.cached(a.out / "stages" / f"eval-{name}.json", lambda: demo.evaluate(a.out, name, a.out / name / "final", settings, scorer))
        g = result["generation"]
        print(f"{arm}: rare right colour {g['rare']['colour']}/{g['rare']['n']}, rare colour+shape {g['rare']['both']}/{g['rare']['n']}, "
              f"canonical colour+shape {g['canonical']['both']}/{g['canonical']['n']}, "
              f"reconstruction rare {result['reconstruction']['rare']['both']}/{result['reconstruction']['rare']['n']}")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
