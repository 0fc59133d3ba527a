"""What attention maps cost: capture of softmax maps at every attention layer x step vs a plain generation.

Run from the repository root::

    python benchmarks/bench_attention.py [--models tiny:sd,zoo:ldm] [--steps 20] [--repeats 7]

Per model (one prompt, CFG on, each model's own size), in one run, medians after one warm-up with the variants'
order rotated between repeats:

- ``cross_mean``: the head-mean map of every cross-attention layer (keys: the text tokens) at every step and
  branch (issue 17's target: <= 1.5 x plain);
- ``all_mean``: the head-mean map of every attention layer, self-attention included;
- ``self_heads``: per-head self-attention maps of every self-attention layer x step x branch (reported with bytes).

Maps are formed at each module's own call of torch's scaled-dot-product attention (an extra q k^T and softmax per
mapped layer); the generation itself is unchanged (its output bitwise equal, checked here too).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import CpuShare, cpu_model, git_head, median_time, n_cpus  # noqa: E402

import layerscope as ls
from layerscope.engine import fmt_bytes


def bench(spec: str, steps: int, repeats: int) -> list[tuple[str, float, float, int | None]]:
    model = ls.load(spec)
    lmap = model.layer_map()
    maps = [e for e in lmap.all() if e.kind == "attention_map"]
    cross = [e.name for e in maps if e.keys == "text"]
    self_ = [e.name for e in maps if e.keys == "image"]
    gen = dict(num_inference_steps=steps, guidance_scale=4.0)
    caps = {
        "cross_mean": ls.Capture(cross, heads="mean"),
        "all_mean": ls.Capture([e.name for e in maps], heads="mean"),
        "self_heads": ls.Capture(self_, budget_bytes=16 * 2**30),
    }
    print(
        f"\n{spec}: {model.family}, {len(maps)} attention layers ({len(cross)} cross, {len(self_)} self), {steps} steps"
    )
    for e in maps[:1] + maps[-1:]:
        print(f"  e.g. {e.name}: {'x'.join(map(str, e.shape))} ({e.keys} keys)")
    plain = model.generate(["a red cube"], seeds=[0], **gen).images
    for name, cap in caps.items():
        got = model.generate(["a red cube"], seeds=[0], capture=cap, **gen).images
        assert torch.equal(got, plain), f"{name}: capturing maps changed the images"
    fns: dict[str, Callable[[], object]] = {"plain": lambda: model.generate(["a red cube"], seeds=[0], **gen)}
    for name, cap in caps.items():
        fns[name] = lambda cap=cap: model.generate(["a red cube"], seeds=[0], capture=cap, **gen)
    with CpuShare() as load:
        t = median_time(fns, repeats)
    print(
        f"  other processes kept {load.other:.2f} cores busy on average during the timing"
        if load.other is not None
        else ""
    )
    rows = [("plain", t["plain"], 1.0, None)]
    for name, cap in caps.items():
        rows.append((name, t[name], t[name] / t["plain"], model.capture_bytes(cap, **gen)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny:sd,zoo:ldm")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(n_cpus())
    print("layerscope attention-map benchmark")
    print(f"  torch {torch.__version__}, {n_cpus()} CPUs ({cpu_model()}), commit {git_head()}")
    print(f"  {args.repeats} repeats, medians; one prompt, CFG on (2 branches)")
    results = {m: bench(m, args.steps, args.repeats) for m in args.models.split(",")}
    print("\nresults (seconds, median)")
    print(f"  {'model':<10} {'what':<12} {'time s':>8} {'ratio':>6} {'bytes':>12}  target")
    for m, rows in results.items():
        for name, sec, ratio, nbytes in rows:
            target = ("PASS" if ratio <= 1.5 else "MISS") + " (<= 1.50)" if name == "cross_mean" else ""
            size = fmt_bytes(nbytes) if nbytes is not None else ""
            print(f"  {m:<10} {name:<12} {sec:8.3f} {ratio:6.2f} {size:>12}  {target}")


if __name__ == "__main__":
    main()
