"""Training-step time of the demo's UMM (demo/config.yaml, random weights) for its three batch
kinds — pretraining, RecA, control — under two variants of one choice, measured in one run on
small freshly rendered pools. Prints median seconds per step and the ratio B/A.

    python scripts/bench_demo_step.py [--compare NAME] [--steps 25]

NAME (default tokenizer) is one of:

tokenizer: byte-level fallback (A) vs the word-level tokenizer (B), 2 threads; patch: the DiT's
patch size 4 (A) vs 8 (B, the demo's), 2 threads; threads: the demo's config on 2 torch threads
(A) vs 1 (B) — with B/A below 2, two runs side by side on one thread each beat one run on two;
umm: an earlier UMM, 4-layer LM and 6-block DiT (A), vs the next one's 2 and 4 (B), one thread;
smaller: that 2-layer LM and 4-block DiT (A) vs the demo's 1 and 3 (B), one thread;
mixture: fine-tuning at Harmon's 2 : 2 : 0 × 64 (A) vs the demo's 4 : 1 : 0 × 40 (B), one thread;
lora: fine-tuning in full (A) vs with LoRA as the demo's LoRA arm runs it (B), one thread
(pretraining is the same in both);
compile: the demo's config (A) vs with ``train.compile`` (B: torch.compile of the LM and the DiT),
one thread — the medians leave out the first steps, so compiling's own time is printed apart;
cache: the demo's config (A) vs with ``train.embedding_cache`` (B), one thread, each arm's cache
warmed by a first run of B that is not timed.
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


def _without_tokenizer(cfg, arm):  # no tokenizer configured: the byte-level fallback for random LMs
    return derive(cfg, model={"args": {k: v for k, v in cfg.model.args.items() if k != "tokenizer"}})


def _patch(size: int):
    def change(cfg, arm):
        args = cfg.model.args
        return derive(
            cfg, model={"args": {**args, "transformer_config": {**args["transformer_config"], "patch_size": size}}}
        )

    return change


def _same(cfg, arm):
    return cfg


def _layers(lm: int, dit: int):
    def change(cfg, arm):
        args = cfg.model.args
        return derive(
            cfg,
            model={
                "args": {
                    **args,
                    "lm_config": {**args["lm_config"], "num_hidden_layers": lm},
                    "transformer_config": {**args["transformer_config"], "num_layers": dit},
                }
            },
        )

    return change


def _harmon_mixture(cfg, arm):  # fine-tuning at Harmon's 2 : 2 : 0, 64 a step (32 + 32)
    if arm == "pretrain":
        return cfg
    harmon = demo.DemoSettings(reca_batch=64, reca_shares={"recon": 0.5, "t2i": 0.0, "i2t": 0.5})
    return derive(demo.with_shares(cfg, demo.arm_shares(harmon, arm)), train={"batch_size": harmon.reca_batch})


def _compile(cfg, arm):
    return derive(cfg, train={"compile": True})


def _cache(cfg, arm):
    return derive(cfg, train={"embedding_cache": str(Path(cfg.train.output_dir).parent / f"embeddings-{arm}")})


def _lora(cfg, arm):  # the demo's LoRA arm (demo.run.finetune_config); pretraining stays full
    if arm == "pretrain":
        return cfg
    return demo.with_lora(cfg, S)


VARIANTS = {  # --compare: {label: (torch threads, config change)}, A then B
    "tokenizer": {"byte": (2, _without_tokenizer), "word": (2, _same)},
    "patch": {"patch4": (2, _patch(4)), "patch8": (2, _patch(8))},
    "threads": {"2threads": (2, _same), "1thread": (1, _same)},
    # earlier UMMs (4-layer LM and 6-block DiT, then 2 and 4) against the next; one thread, as the runs
    "umm": {"lm4-dit6": (1, _layers(4, 6)), "lm2-dit4": (1, _layers(2, 4))},
    "smaller": {"lm2-dit4": (1, _layers(2, 4)), "lm1-dit3": (1, _same)},
    # fine-tuning at Harmon's 2 : 2 : 0 × 64 against the demo's 4 : 1 : 0 × 40 (32 + 8); one thread
    "mixture": {"harmon-64": (1, _harmon_mixture), "demo-40": (1, _same)},
    "lora": {"full": (1, _same), "lora": (1, _lora)},
    "compile": {"eager": (1, _same), "compiled": (1, _compile)},
    "cache": {"encoder": (1, _same), "cached": (1, _cache)},
}
WARM = {"cache": "cached"}  # variants run once untimed first (their cache filled)


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
    first_steps: dict[tuple[str, str], float] = {}
    variants = VARIANTS[a.compare]
    for label, (threads, change) in variants.items():
        torch.set_num_threads(threads)
        for arm, (batch, shares) in ARMS.items():
            run = a.out / f"run-{a.compare}-{label}-{arm}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(a.out / f"embeddings-{arm}", ignore_errors=True)
            cfg = derive(
                demo.base_config(a.out),
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
            cfg = change(demo.with_shares(cfg, shares), arm)
            validate(cfg)
            if WARM.get(a.compare) == label:
                fit(derive(cfg, train={"output_dir": f"{run}-warm"}))
            fit(cfg)
            steps = [json.loads(line)["time/step"] for line in (run / "log.jsonl").read_text().splitlines()]
            times[label, arm] = statistics.median(steps[5:])  # the first steps warm up allocators
            first_steps[label, arm] = sum(steps[:5])
    (la, lb) = variants
    print(f"\nmedian s/step ({a.compare})     {la:>8} {lb:>8}   B/A   (first 5 steps, s: A, B)")
    for arm in ARMS:
        ta, tb = times[la, arm], times[lb, arm]
        fa, fb = first_steps[la, arm], first_steps[lb, arm]
        print(f"  {arm:<26} {ta:8.3f} {tb:8.3f}   {tb / ta:.2f}   ({fa:.1f}, {fb:.1f})")


if __name__ == "__main__":
    main()
