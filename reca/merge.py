"""Merge a trained LoRA adapter into its base model and save the whole model.

    python -m reca.merge --config configs/x.yaml --adapter runs/x/final --out merged/ [key=value ...]

The result loads like any full model: ``model.args.pretrained=merged/`` for the reference UMM.
"""

from __future__ import annotations

import argparse
import sys

from reca.build import build
from reca.config import ConfigError, load_config
from reca.io import atomic_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the training config (it names the base model)")
    p.add_argument("--adapter", required=True, help="a PEFT adapter folder (runs/<x>/final or a checkpoint's adapter/)")
    p.add_argument("--out", required=True, help="where the merged model is written")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:
        from peft import PeftModel

        adapter, _ = build(load_config(a.config, a.overrides))
        merged = PeftModel.from_pretrained(adapter, a.adapter).merge_and_unload()
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with atomic_dir(a.out) as tmp:  # never a half-written model at --out
        merged.save_pretrained(tmp)
    print(f"merged model written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
