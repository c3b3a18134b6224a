"""Training-step time of the demo's UMM (demo/config.yaml, random weights) for its three batch
kinds — pretraining, RecA, control — under two variants of one choice, measured in one run on
small freshly rendered pools. Prints median seconds per step and the ratio B/A.

    python scripts/bench_demo_step.py [--compare tokenizer|patch|threads] [--steps 25]

tokenizer: byte-level fallback (A) vs the word-level tokenizer (B), 2 threads; patch: the DiT's
patch size 4 (A) vs 8 (B, the demo's), 2 threads; threads: the demo's config on 2 torch threads
(A) vs 1 (B) — with B/A below 2, two runs side by side on one thread each beat one run on two.
The reconstruction arm uses the demo's condition (``DemoSettings.keep_tokens``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import torch

from demo import encoder as demo_encoder
from demo import run as demo
from reca.config import derive, validate
from reca.models.tokenizer import save_word_tokenizer
from reca.trainer import fit

S = demo.DemoSettings()
ARMS = {  # name: (batch, shares) as demo/run.py sets them
    "pretrain": (S.pretrain_batch, S.pretrain_shares),
    "reca": (S.reca_batch, demo.arm_shares(S, "reca")),
    "control": (S.reca_batch, demo.arm_shares(S, "control")),
}


def _without_tokenizer(cfg):  # no tokenizer configured: the byte-level fallback for random LMs
    return derive(cfg, model={"args": {k: v for k, v in cfg.model.args.items() if k != "tokenizer"}})


def _patch(size: int):
    def change(cfg):
        args = cfg.model.args
        return derive(
            cfg, model={"args": {**args, "transformer_config": {**args["transformer_config"], "patch_size": size}}}
        )

    return change


def _same(cfg):
    return cfg


VARIANTS = {  # --compare: {label: (torch threads, config change)}, A then B
    "tokenizer": {"byte": (2, _without_tokenizer), "word": (2, _same)},
    "patch": {"patch4": (2, _patch(4)), "patch8": (2, _patch(8))},
    "threads": {"2threads": (2, _same), "1thread": (1, _same)},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", type=Path, default=Path("/tmp/reca-bench-demo"))
    p.add_argument("--compare", choices=list(VARIANTS), default="tokenizer")
    a = p.parse_args()
    (a.out / "cache").mkdir(parents=True, exist_ok=True)
    model, _, _ = demo_encoder.build()  # random weights: the step costs the same
    torch.save(model.state_dict(), a.out / "cache/encoder.pt")
    for kind in ("t2i", "i2t", "recon"):
        demo.write_pool(a.out / "data" / kind, kind, 512)
    save_word_tokenizer(demo.world_vocabulary(), a.out / "cache/tokenizer")
    times: dict[tuple[str, str], float] = {}
    variants = VARIANTS[a.compare]
    for label, (threads, change) in variants.items():
        torch.set_num_threads(threads)
        for arm, (batch, shares) in ARMS.items():
            run = a.out / f"run-{a.compare}-{label}-{arm}"
            shutil.rmtree(run, ignore_errors=True)
            cfg = change(demo.base_config(a.out))
            cfg = derive(
                cfg,
                optim={"warmup_steps": 1},
                objectives={"recon": {"keep_tokens": S.keep_tokens, "instruction_dropout": S.instruction_dropout}},
                train={
                    "max_steps": a.steps,
                    "batch_size": batch,
                    "log_every": 1,
                    "save_every": a.steps,
                    "sample_every": 0,
                    "output_dir": str(run),
                },
            )
            cfg = demo.with_shares(cfg, shares)
            validate(cfg)
            fit(cfg)
            steps = [json.loads(line)["time/step"] for line in (run / "log.jsonl").read_text().splitlines()]
            times[label, arm] = statistics.median(steps[5:])  # the first steps warm up allocators
    (la, lb) = variants
    print(f"\nmedian s/step ({a.compare})     {la:>8} {lb:>8}   B/A")
    for arm in ARMS:
        ta, tb = times[la, arm], times[lb, arm]
        print(f"  {arm:<26} {ta:8.3f} {tb:8.3f}   {tb / ta:.2f}")


if __name__ == "__main__":
    main()
