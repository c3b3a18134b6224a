"""RecA post-training entry point.

accelerate launch train.py --config configs/tiny.yaml [key=value ...] [--resume latest|PATH]
python train.py --help-config        # every config key with its default and help
"""

from __future__ import annotations

import argparse
import sys

from reca.config import ConfigError, help_lines, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 lora.rank=16")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --resume
    if args.help_config:
        print("\n".join(help_lines()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        from reca.trainer import TrainingFailed, fit  # heavy imports only once the config is known to be good

        evaluator = None
        if cfg.eval.every:  # the library never imports the evaluation suite; the entry point wires it
            from eval.during import TrainingEvaluator

            evaluator = TrainingEvaluator(cfg)
        try:
            fit(cfg, resume=args.resume, evaluator=evaluator)
        except TrainingFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
