"""Training-step time of the demo's UMM (demo/config.yaml, random weights) for its three batch
kinds — pretraining, RecA, control — with the byte-level and the word-level tokenizer, measured
in one run on small freshly rendered pools. Prints median seconds per step and the ratios.

    python scripts/bench_demo_step.py [--steps 25] [--out /tmp/reca-bench-demo]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", type=Path, default=Path("/tmp/reca-bench-demo"))
    a = p.parse_args()
    torch.set_num_threads(2)
    (a.out / "cache").mkdir(parents=True, exist_ok=True)
    model, _, _ = demo_encoder.build()  # random weights: the step costs the same
    torch.save(model.state_dict(), a.out / "cache/encoder.pt")
    for kind in ("t2i", "i2t", "recon"):
        demo.write_pool(a.out / "data" / kind, kind, 512)
    save_word_tokenizer(demo.world_vocabulary(), a.out / "cache/tokenizer")
    times: dict[tuple[str, str], float] = {}
    for tok in ("byte", "word"):
        for arm, (batch, shares) in ARMS.items():
            run = a.out / f"run-{tok}-{arm}"
            shutil.rmtree(run, ignore_errors=True)
            cfg = demo.base_config(a.out)
            if tok == "byte":  # no tokenizer configured: the byte-level fallback for random LMs
                cfg = derive(cfg, model={"args": {k: v for k, v in cfg.model.args.items() if k != "tokenizer"}})
            cfg = derive(
                cfg,
                optim={"warmup_steps": 1},
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
            times[tok, arm] = statistics.median(steps[5:])  # the first steps warm up allocators
    print("\nmedian s/step (2 threads)     byte    word   word/byte")
    for arm in ARMS:
        byte, word = times["byte", arm], times["word", arm]
        print(f"  {arm:<26} {byte:6.3f}  {word:6.3f}   {word / byte:.2f}")


if __name__ == "__main__":
    main()
