"""The engine at full size: SD 1.x's U-Net (arch:sd14's published config) with random weights, on the CPU.

Run from the repository root::

    python benchmarks/bench_realsize.py [--size 256] [--steps 4] [--repeats 3] [--sweep-repeats 2] [--parts a,b]

The tiny test models' overhead ratios understate per-layer hook costs on a real U-Net (their layers are cheap,
so hooks weigh more) or overstate them (the Python overhead per layer is fixed while real layers cost more): this
measures them on the real architecture, 860 M U-Net parameters, at a reduced resolution that fits a laptop CPU.
Random weights: the images mean nothing, the arithmetic per step is the real one. Medians after one warm-up, the
variants' order rotated between repeats.

(a) per-step time of a plain generation (1 prompt, CFG on: 2 rows), and the capture of every layer x step x branch
    (full tensors) into memory: ratio to plain.
(b) a batched injection sweep over k = 8 layer sets (the blocks, one generation of batch k + 2) vs a plain
    generation of batch k + 2: ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, median_time, n_cpus  # noqa: E402

import layerscope as ls
from layerscope.arch import build


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep-repeats", type=int, default=2)
    ap.add_argument("--parts", default="a,b", help="which measurements: a (capture), b (sweep)")
    args = ap.parse_args()
    torch.set_num_threads(n_cpus())
    t0 = time.perf_counter()
    model = ls.load(build("sd14", device="cpu"))
    params = sum(p.numel() for p in model.denoiser.parameters())
    gen = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size)
    lmap = model.layer_map(args.size, args.size)
    print(f"machine: {cpu_model()}, {n_cpus()} threads; torch {torch.__version__}")
    print(
        f"arch:sd14 with random weights: U-Net {params / 1e6:.0f} M parameters, built in {time.perf_counter() - t0:.0f} s"
    )
    print(
        f"{args.size}x{args.size} px ({lmap['noise'].shape[1]}x{lmap['noise'].shape[2]} latent), {args.steps} steps, CFG"
    )
    parts = args.parts.split(",")
    if "a" in parts:
        cap = ls.Capture(layers=[e.name for e in lmap.layers])
        size_mb = model.capture_bytes(cap, **gen) / 2**20
        t = median_time(
            {
                "plain": lambda: model.generate(["a red cube"], seeds=[0], **gen),
                "capture": lambda: model.generate(["a red cube"], seeds=[0], capture=cap, **gen),
            },
            args.repeats,
        )
        print(
            f"(a) plain {t['plain']:.2f} s ({t['plain'] / args.steps:.2f} s/step); capture of {len(lmap.layers)} "
            f"layers x {args.steps} steps x 2 branches ({size_mb:.0f} MiB) {t['capture']:.2f} s: "
            f"ratio {t['capture'] / t['plain']:.3f}",
            flush=True,
        )
    if "b" in parts:
        sets = [e.name for e in lmap.layers if e.kind == "block"]
        k = len(sets)
        s = median_time(
            {
                "sweep": lambda: ls.injection_sweep(
                    model, "a red cube", "a blue ball", sets, seeds=0, max_batch=k + 2, **gen
                ),
                "plain": lambda: model.generate(["a red cube"] * (k + 2), seeds=[0] * (k + 2), max_batch=k + 2, **gen),
            },
            args.sweep_repeats,
        )
        print(
            f"(b) batched sweep over k={k} blocks {s['sweep']:.1f} s vs plain batch of k+2 {s['plain']:.1f} s: "
            f"ratio {s['sweep'] / s['plain']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
