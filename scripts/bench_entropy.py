"""Wall time of the entropy probe's maths on one sequence (eval/entropy.py).

    python scripts/bench_entropy.py [--out bench_entropy.json] [--runs 5] [--device cpu]

Cases: H_α of 2048 tokens at d = 2048 and d = 64, and the response proxy Ĥ(Z_r | Z_p) on 1024 prompt
+ 1024 response tokens (two eigendecompositions: 2048² joint and 1024² prompt block). Inputs are
float32 random normals, as hidden states arrive; everything inside is float64. Median (and min) of
``--runs`` timed calls after one warm-up. One layer of one prompt costs this; a probe over P prompts
and L layers costs about P · L times it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.entropy import conditional_entropy, renyi_entropy  # noqa: E402


def _time(fn, runs: int, device: torch.device) -> list[float]:
    fn()  # warm-up (allocator, BLAS/LAPACK workspaces)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()  # returns a Python float, which syncs on its own
        times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results as JSON here (default: stdout table only)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per case (after one warm-up)")
    parser.add_argument("--device", default="cpu", help="torch device for the inputs")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    cases = []
    for d in (2048, 64):
        z = torch.randn(2048, d, generator=g).to(device)
        cases.append((f"renyi_entropy 2048 tok, d={d}", lambda z=z: renyi_entropy(z)))
    for d in (2048, 64):
        p, r = torch.randn(1024, d, generator=g).to(device), torch.randn(1024, d, generator=g).to(device)
        cases.append((f"conditional_entropy 1024+1024 tok, d={d}", lambda p=p, r=r: conditional_entropy(p, r)))

    rows = []
    for name, fn in cases:
        t = _time(fn, args.runs, device)
        rows.append({"case": name, "median_s": statistics.median(t), "min_s": min(t), "runs": args.runs})

    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    width = max(len(r["case"]) for r in rows)
    print(f"{'case':<{width}}  median s   min s   ({env['device']}, {env['threads']} threads, torch {env['torch']})")
    for r in rows:
        print(f"{r['case']:<{width}}  {r['median_s']:8.3f}  {r['min_s']:6.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
