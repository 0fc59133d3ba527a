"""How the cost grows: the batched sweep for k = 4, 8, 16, 32 layer sets at batch sizes 8..64, and the properties
experiment's one generation per space for growing row counts; time per injected (or perturbed) row.

Run from the repository root::

    python benchmarks/bench_growth.py [--steps 10] [--repeats 2] [--figure benchmarks/growth.png]

Sweep: zoo:unet (26 layers; k = 32 adds 6 two-layer combinations), O and E two held-out prompts, seeds (0, 1),
guidance on. For each k and ``max_batch`` B in 8, 16, 32, 64, ``injection_sweep(..., max_batch=B)`` runs
ceil(k / (B - 2)) generations of at most B rows (each with O and E again); the table prints seconds per injected row
(median of the repeats). Linear growth shows as a flat line per B. Properties: zoo:unet's ``text_embeds`` space
scored with n = 4, 8, 16 samples (pairs = n/2): the whole run's seconds (its base generation included) per row of the
space's generation (the row count it records).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import CpuShare, cpu_model, git_head, n_cpus  # noqa: E402

import layerscope as ls
from layerscope.experiments import properties as pr
from layerscope.world.factors import sample_factors
from layerscope.world.text import prompts_for

KS = (4, 8, 16, 32)
BATCHES = (8, 16, 32, 64)


def timed(f, repeats: int) -> float:
    f()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--figure", default=None, help="write the figure (PNG) here")
    args = ap.parse_args()
    torch.set_num_threads(n_cpus())
    print("layerscope growth benchmark")
    print(f"  torch {torch.__version__}, {n_cpus()} CPUs ({cpu_model()}), commit {git_head()}")
    model = ls.load("zoo:unet")
    o, e = prompts_for(sample_factors(2, 0, split="test"))
    layers = [x.name for x in model.layer_map().layers]
    combos = [(layers[i], layers[i + 1]) for i in range(0, 12, 2)]
    sets_all = [(n,) for n in layers] + combos  # 32 sets
    g = dict(num_inference_steps=args.steps)
    sweep: dict[tuple[int, int], float] = {}
    with CpuShare() as load:
        for k in KS:
            sets = sets_all[:k]
            for b in BATCHES:
                t = timed(lambda: ls.injection_sweep(model, o, e, sets, seeds=(0, 1), max_batch=b, **g), args.repeats)
                sweep[(k, b)] = t / k
                print(f"  sweep k={k:2d} max_batch={b:2d}: {t:6.2f} s, {1000 * t / k:6.1f} ms per injected row")
        props: dict[int, float] = {}
        for n in (4, 8, 16):
            st = pr.Settings(spaces=("text_embeds",), n=n, pairs=n // 2, steps=args.steps, n_boot=20)
            det = pr.run(model, st).tables[pr.DETAILS]
            rows = int(det[det["metric"] == "rows"]["value"].iloc[0])  # the space's generation, as it recorded
            t = timed(lambda: pr.run(model, st), args.repeats)
            props[n] = t / rows
            print(
                f"  properties n={n:2d} ({rows} rows; base generation {n} rows): {t:6.2f} s, {1000 * t / rows:6.1f} ms per row"
            )
    print(f"  other processes kept {load.other:.2f} cores busy on average" if load.other is not None else "")
    print("\nms per injected row (rows: k, columns: max_batch)")
    print("   k " + "".join(f"{b:>8d}" for b in BATCHES))
    for k in KS:
        print(f"  {k:2d} " + "".join(f"{1000 * sweep[(k, b)]:8.1f}" for b in BATCHES))
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
        for b in BATCHES:
            ax[0].plot(KS, [1000 * sweep[(k, b)] for k in KS], marker="o", label=f"max_batch {b}")
        ax[0].set(xlabel="layer sets k", ylabel="ms per injected row", title=f"sweep, zoo:unet, {args.steps} steps")
        ax[0].set_xscale("log", base=2)
        ax[0].legend(fontsize=7)
        ax[0].set_ylim(bottom=0)
        ax[1].plot(list(props), [1000 * v for v in props.values()], marker="o")
        ax[1].set(xlabel="samples n", ylabel="ms per row", title="properties, one space")
        ax[1].set_ylim(bottom=0)
        fig.tight_layout()
        fig.savefig(args.figure, dpi=110)
        print(f"  figure: {args.figure}")


if __name__ == "__main__":
    main()
