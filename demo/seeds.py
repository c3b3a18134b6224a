"""Every seed rule of the demo, in one place.

Renders are pure functions of their seed (:func:`demo.world.render`), so each pool owns a range of
render seeds, and the ranges are disjoint (the guardrail: evaluation never sees a training render or
a training seed, :func:`check_guardrails`). The few derived rules below the ranges say how the
evaluation and the fine-tuning arms pick their seeds from them.
"""

from __future__ import annotations

# Render seeds of each pool: the i-th image of a pool is rendered with seed POOL[i].
ENCODER_SEEDS = range(40_000_000, 40_008_000)  # the frozen encoder's contrastive training renders
ENCODER_TEST_SEEDS = range(41_000_000, 41_001_080)  # its held-out zero-shot check
SCORER_TRAIN_SEEDS = range(50_000_000, 50_006_000)  # the shape classifier's training renders
SCORER_TEST_SEEDS = range(51_000_000, 51_003_000)  # its held-out >= 99% check
SEEDS = {
    "t2i": range(1_000_000, 1_000_000 + 100_000),
    "i2t": range(2_000_000, 2_000_000 + 100_000),
    "recon": range(3_000_000, 3_000_000 + 100_000),
    "encoder": ENCODER_SEEDS,
    "encoder_test": ENCODER_TEST_SEEDS,
    "scorer": SCORER_TRAIN_SEEDS,
    "scorer_test": SCORER_TEST_SEEDS,
    # Real renders for understanding and reconstruction, one range per side of the split
    # (demo.world.SPLITS), and the entropy probe's captioned renders.
    "dev_renders": range(60_000_000, 60_100_000),
    "test_renders": range(61_000_000, 61_100_000),
    "probe_renders": range(62_000_000, 62_000_100),
    "shapes_renders": range(63_000_000, 63_010_000),  # scripts/demo_shapes.py's diagnostic renders
}

# Derived rules.
ENCODER_TRAIN_SEED = 0  # torch.manual_seed and the batch-order numpy generator of the encoder's training
SCORER_TRAIN_SEED = 0  # torch.manual_seed and the batch-order torch.Generator of the scorer's training
# Generated sample i of prompt p on one side of the split: eval.runner.image_seed(EVAL_SAMPLE_SEED[side], p, i).
EVAL_SAMPLE_SEED = {"dev": 80_000, "test": 90_000}
FINETUNE_SEED_BASE = 1000  # RecA / control arm with seed s trains with train.seed = FINETUNE_SEED_BASE + s
CANONICAL_RENDER_OFFSET = 50_000  # canonical pairs' understanding renders: the rare pairs' seeds + this


def caption_seed(kind: str) -> int:
    """Seed of the numpy generator that drops colour words from a pool's captions (its first render seed)."""
    return SEEDS[kind].start


def finetune_seed(seed: int) -> int:
    """``train.seed`` of a RecA or control run with fine-tuning seed ``seed``."""
    return FINETUNE_SEED_BASE + seed


def understanding_seeds(side: str, tag: str, pair_index: int, renders: int) -> list[int]:
    """Render seeds of the ``renders`` real images of pair ``pair_index`` of the ``tag`` group
    ("rare" or "canonical") on one side of the split, for understanding; for rare pairs they are
    also the reconstruction renders and their sampling seeds."""
    seeds = SEEDS[f"{side}_renders"][pair_index * renders : (pair_index + 1) * renders]
    return [seed + CANONICAL_RENDER_OFFSET if tag == "canonical" else seed for seed in seeds]


def probe_seeds(n: int) -> range:
    """Render seeds of the entropy probe's ``n`` captioned images."""
    return SEEDS["probe_renders"][:n]


def check_guardrails() -> None:
    ranges = sorted((r.start, r.stop, k) for k, r in SEEDS.items())
    for (a0, a1, ka), (b0, b1, kb) in zip(ranges, ranges[1:]):
        if a1 > b0:
            raise AssertionError(f"seed ranges {ka} and {kb} overlap")
