"""Renderer throughput: images per second of the Shapes world renderer on ONE CPU thread.

Target (issue 3): >= 5,000 images/s at 32x32. Prints the rate at 32x32 and 64x64 (median of 5 runs of
``--n`` random combinations each, after one warm-up run) and the ratio to the target.

    python benchmarks/bench_world.py [--n 20000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from layerscope.world import render, sample_factors

TARGET = 5000.0


def rate(n: int, size: int, repeats: int = 5) -> float:
    f = sample_factors(n, 0)
    render(f[:2000], size)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        render(f, size)
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    r32 = rate(args.n, 32)
    r64 = rate(args.n // 4, 64)
    print(f"torch {torch.__version__}, 1 thread, {args.n} images per run, median of 5")
    print(
        f"32x32: {r32:,.0f} images/s  ({r32 / TARGET:.2f}x the 5,000/s target: {'PASS' if r32 >= TARGET else 'MISS'})"
    )
    print(f"64x64: {r64:,.0f} images/s")


if __name__ == "__main__":
    main()
