"""Convert Harmon's public files (a Qwen2.5 config/tokenizer, harmon_*.pth, MAR's kl16.ckpt — as a reca
config names them under model.args) into reca's save_pretrained folder, loadable by
``model.args.pretrained`` or ``--checkpoint``.

    python scripts/convert_harmon.py configs/harmon_1.5b_lora.yaml checkpoints/harmon_1.5b_reca [key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from reca.build import adapter_args, import_adapter
from reca.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. model.args.harmon_weights=checkpoints/harmon_0.5b.pth"
    )
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cls = import_adapter(cfg.model.adapter)
        adapter = cls.from_config(adapter_args(cfg, cls, None))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    adapter.save_pretrained(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
