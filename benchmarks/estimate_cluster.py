"""An ESTIMATE of a full six-model Fig.-5 injection study on an 8-GPU node, from the arch: dry runs.

Run from the repository root (CPU only, nothing is generated; about a minute)::

    python benchmarks/estimate_cluster.py [--gpus 8] [--tflops 989] [--utilisation 0.4] [--disk-gbps 2]

What is measured, exactly, on the meta device: each model's study plan (``injection.plan``: cells, denoiser calls,
rows, images) and the FLOPs of one denoiser row and of one VAE decode at native size (torch's FlopCounterMode over
the shape-trace generation). What is assumed, and printed as such: the GPU's dense bfloat16 peak (``--tflops``,
989 for an H100 SXM), the share of it the denoiser reaches (``--utilisation``), and the disk bandwidth that model
loads read at. The study, per model: every layer and candidate space as its own layer set, the four windows (all,
early, middle, late), 4 prompt pairs x 4 seeds, 50 steps for the U-Nets and 28 for SD 3.5 and FLUX.1-dev, CFG as
each model runs it, at most 16 rows per denoiser call. Cells are spread over the GPUs by the Ray executor (one worker
per GPU); the models run one after another.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import layerscope as ls
from layerscope.engine import trace_shapes
from layerscope.experiments import injection as inj

MODELS = (("sd14", 50), ("sd21", 50), ("sdxl", 50), ("kandinsky22", 50), ("sd35-large", 28), ("flux-dev", 28))
PAIRS = (("a cat on a sofa", "a dog in a garden"),) * 4


def flops_per_row(model: ls.Generator) -> tuple[float, float]:
    """FLOPs of one denoiser row (one call, batch 1) and of one VAE decode, counted on the meta device."""
    cfg = model.config(num_inference_steps=2, guidance_scale=1.0)
    with FlopCounterMode(display=False) as fc, model.trace_context():
        trace_shapes(model, model.build_map(), cfg)
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    den = counts[type(model.denoiser).__name__] / 2  # two steps of one row
    vae = getattr(model.pipe, "vae", None) or model.pipe.movq
    return den, counts.get(type(vae.decoder).__name__, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--tflops", type=float, default=989.0, help="assumed dense bf16 peak per GPU (H100 SXM: 989)")
    ap.add_argument("--utilisation", type=float, default=0.4, help="assumed share of the peak reached")
    ap.add_argument("--disk-gbps", type=float, default=2.0, help="assumed read bandwidth for model loads, GB/s")
    args = ap.parse_args()
    eff = args.tflops * 1e12 * args.utilisation
    print(f"ESTIMATE: {args.gpus} GPUs at {args.utilisation:.0%} of {args.tflops:g} TFLOP/s bf16 (assumed), "
          f"model loads at {args.disk_gbps:g} GB/s (assumed)\n")  # fmt: skip
    hdr = ("model", "sets", "cells", "calls", "rows", "images", "TFLOP/row", "TFLOP/decode", "GPU-h", "wall h")
    print("  ".join(f"{h:>12}" for h in hdr))
    total_gpu_h = total_wall = 0.0
    for name, steps in MODELS:
        model = ls.load(f"arch:{name}", dtype=torch.bfloat16)
        embeds = model.capabilities.conditioning == "image_embeds"
        if embeds:  # Kandinsky's decoder takes CLIP image embeddings: rows of an embedding file stand for prompts
            emb = Path(tempfile.mkdtemp()) / "emb.npy"
            np.save(emb, np.random.default_rng(0).standard_normal((8, model.layer_map()["image_embeds"].shape[0])))
            pairs = tuple((f"{emb}#{2 * k}", f"{emb}#{2 * k + 1}") for k in range(4))
        else:
            pairs = PAIRS
        st = inj.Settings(pairs=pairs, seeds=(0, 1, 2, 3), spaces=True, windows=("all", "early", "middle", "late"),
                          steps=steps, max_batch=16)  # fmt: skip
        plan = inj.plan(model, st)
        g = plan.rows[0]
        _, pairs_, kw = inj._plan_kw(model, st)
        ip = inj.plan_injection(model, pairs_, **kw)
        sets, cells = len(ip.layer_sets), len(ip.cells())
        row_f, dec_f = flops_per_row(model)
        rows = g.images * g.steps * g.branches  # every image is one row through every step, in each CFG branch
        flops = rows * row_f + g.images * dec_f
        gpu_s = flops / eff
        weights_s = plan.weights / (args.disk_gbps * 1e9)
        per_cell = gpu_s / cells
        wall = math.ceil(cells / args.gpus) * per_cell + weights_s  # rounds of cells, each worker loads once
        total_gpu_h += gpu_s / 3600
        total_wall += wall / 3600
        vals = (name, sets, cells, g.calls, rows, g.images, f"{row_f / 1e12:.2f}", f"{dec_f / 1e12:.2f}",
                f"{gpu_s / 3600:.2f}", f"{wall / 3600:.2f}")  # fmt: skip
        print("  ".join(f"{v:>12}" for v in vals))
    print(
        f"\n  total: {total_gpu_h:.1f} GPU-hours, about {total_wall:.1f} h of wall time on {args.gpus} GPUs (ESTIMATE)"
    )


if __name__ == "__main__":
    main()
