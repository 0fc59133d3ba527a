"""Probe-grid benchmark: ``fit_probe_grid`` on every cell vs a scikit-learn ``LogisticRegression`` loop (issue 6).

Run from the repository root (scikit-learn is not a project dependency: ``pip install scikit-learn`` first)::

    python benchmarks/bench_probes.py [--cells-layers 40] [--steps 20] [--n 5000] [--d 64] [--threads 2]
                                      [--sklearn-cells 40] [--write]

Target (issue 6): the probe grid "(e.g. 40 layers x 20 steps x 6 factors, 5,000 samples) >= 10x faster than a
scikit-learn LogisticRegression loop at equal held-out accuracy (within 1 point)".

Features: synthetic, shaped like pooled activations of a denoiser. Per sample, the six Shapes factors (class
counts 10, 10, 10, 8, 4, 15) are coded as smooth 4-d codes (hues on a circle, scale and orientation on a curve,
shape as a random code); per layer, a random linear map with decaying column scales (correlated channels) mixes
the codes, a 16-d nuisance latent (the sample's noise content, the same in every cell) and isotropic noise, then
SiLU and a per-channel scale (0.1..10) and offset. Each factor's code is switched on along the steps by a sigmoid
with its own onset, scaled by a per-layer gain, and the nuisance fades with the step, so held-out accuracies span
chance..1 across the grid.

Timed (each once, after a warm-up):

* **grid**: ``fit_probe_grid`` on all cells (features (C, n, d) float32, default l2 = 1e-3, tol = 1e-4, the 25%
  held-out split of seed 0), including standardization, the split and the held-out scores;
* **grid on the subset**: the same on ``--sklearn-cells`` random cells only;
* **sklearn loop** on that subset: per cell, the same split and standardization (train mean and std), then per
  factor ``LogisticRegression(C=1 / (l2 * n_train), tol=1e-4, max_iter=<--max-iter>)`` (lbfgs, multinomial: the
  same objective and stopping rule as the grid), ``fit`` on float32 features (what the grid solves in) and
  ``predict_log_proba`` on the held-out samples.

The sklearn loop runs on a subset because all C x F fits would take long on a shared 2-core machine; its time for
all cells is **extrapolated** per cell from the subset (time per cell x C), and the like-for-like ratio on the
subset is printed too. Held-out accuracy (points), cross-entropy and the MI bound (bits) are compared on the subset's
cells. Both sides use ``--threads`` threads (torch.set_num_threads, threadpoolctl). Other processes' CPU use during
each timed part is measured from /proc/stat. ``--write`` puts the output and a reading in benchmarks/RESULTS.md
(section "## Probe grid vs scikit-learn (issue 6)", replaced if present).

This is a script that prints a table, not a test.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import CpuShare, combine, cpu_model, git_head, mem_gib, n_cpus, replace_section  # noqa: E402

import layerscope as ls
from layerscope.stats.probes import fit_probe_grid
from layerscope.world.factors import FACTORS, SIZES, sample_factors

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Probe grid vs scikit-learn (issue 6)"
TARGET_RATIO = 10.0
#: issue 20: >= 10x the fastest scikit-learn configuration at held-out accuracy within 0.5 points (issue 6: 1 point,
#: against the plain loop)
TARGET_POINTS = 0.5
#: other processes' mean CPU use (cores) from which the machine counts as shared
SHARED = 0.25
#: step fraction at which each factor's code switches on, and the layer depth where it is strongest
ONSET = {"floor_hue": 0.30, "wall_hue": 0.35, "object_hue": 0.60, "scale": 0.20, "shape": 0.50, "orientation": 0.40}
PREFERRED_DEPTH = {"floor_hue": 0.8, "wall_hue": 0.7, "object_hue": 0.6, "scale": 0.3, "shape": 0.5, "orientation": 0.4}

_lines: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    _lines.append(msg)


# ---------------------------------------------------------------------------------------------------------------------
# machine


# ---------------------------------------------------------------------------------------------------------------------
# data


def make_features(layers: int, steps: int, n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic pooled activations (layers * steps, n, d) float32, cells layer-major, and Shapes labels (n, 6)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.from_numpy(sample_factors(n, seed)).long()
    codes = []
    for f, name in enumerate(FACTORS):
        k = torch.arange(SIZES[name], dtype=torch.float64)
        if name.endswith("hue"):  # a circle
            th = 2 * math.pi * k / SIZES[name]
            e = torch.stack([th.cos(), th.sin(), (2 * th).cos(), (2 * th).sin()], dim=1)
        elif name == "shape":  # categorical
            e = torch.randn(SIZES[name], 4, generator=g, dtype=torch.float64)
        else:  # ordinal: a curve
            v = 2 * k / (SIZES[name] - 1) - 1
            e = torch.stack([v, v * v, (math.pi * v).cos(), (math.pi * v).sin()], dim=1)
        e = (e - e.mean(0)) / e.std(0)
        codes.append(e[y[:, f]].float())
    code = torch.cat(codes, dim=1)  # (n, 24)
    nuisance = torch.randn(n, 16, generator=g)
    x = torch.empty(layers * steps, n, d)
    onset = torch.tensor([ONSET[f] for f in FACTORS])
    pref = torch.tensor([PREFERRED_DEPTH[f] for f in FACTORS])
    for layer in range(layers):
        depth = layer / max(1, layers - 1)
        decay = torch.linspace(1.0, 0.1, d)  # correlated channels with a decaying spectrum
        mix = torch.randn(24, d, generator=g) * decay / math.sqrt(6)
        mix_n = torch.randn(16, d, generator=g) * decay / 2
        gain = 0.35 + 1.3 * torch.exp(-(((depth - pref) / 0.35) ** 2))  # (6,) how much this layer carries
        scale = 10 ** (2 * torch.rand(d, generator=g) - 1)
        offset = torch.randn(d, generator=g)
        for step in range(steps):
            t = step / max(1, steps - 1)
            amp = 2.0 * gain * torch.sigmoid((t - onset) * 12)  # (6,)
            pre = (code * amp.repeat_interleave(4)) @ mix
            pre += (1.5 * (1 - t) + 0.3) * nuisance @ mix_n
            pre += 0.5 * torch.randn(n, d, generator=g)
            x[layer * steps + step] = torch.nn.functional.silu(pre) * scale + offset
    return x, y


# ---------------------------------------------------------------------------------------------------------------------
# the scikit-learn loop


def split(n: int, test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The grid's split: torch.randperm(n) with seed 0, the first round(n * 0.25) held out."""
    n_test = int(round(n * test_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return perm[n_test:], perm[:n_test]


def fastest_sklearn(med: dict[str, float], variants: dict) -> str:
    """The key of the fastest scikit-learn configuration by median time (issue 20's baseline)."""
    return min(variants, key=lambda k: med[k])


def sklearn_cell(
    xc: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray, l2: float, max_iter: int, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One cell: standardize with train statistics; per factor fit LogisticRegression and score the held-out set.

    Returns held-out accuracy (F,), cross-entropy in bits (F,), iterations (F,) and the number of fits that stopped
    at max_iter. ``threads``: a threadpoolctl limit for this call (None: leave as is).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    F = y.shape[1]
    acc, ce, iters, not_conv = np.zeros(F), np.zeros(F), np.zeros(F, dtype=int), 0
    with threadpool_limits(threads):
        mu = xc[tr].mean(0, dtype=np.float64)
        sd = xc[tr].std(0, dtype=np.float64)
        sd[sd == 0] = 1.0
        xs = ((xc - mu) / sd).astype(np.float32)
        for f in range(F):
            clf = LogisticRegression(C=1.0 / (l2 * len(tr)), tol=1e-4, max_iter=max_iter)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                clf.fit(xs[tr], y[tr, f])
            not_conv += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
            logp = clf.predict_log_proba(xs[te])
            col = np.searchsorted(clf.classes_, y[te, f])
            acc[f] = float((clf.classes_[logp.argmax(1)] == y[te, f]).mean())
            ce[f] = float(-logp[np.arange(len(te)), col].mean() / math.log(2))
            iters[f] = int(np.max(clf.n_iter_))
    return acc, ce, iters, not_conv


def sklearn_loop(
    x: torch.Tensor, y: torch.Tensor, cells: list[int], l2: float, max_iter: int, threads: int, jobs: int = 1
) -> dict:
    """The loop over cells x factors: in this process with ``threads`` BLAS/OpenMP threads (jobs = 1), or over
    ``jobs`` joblib worker processes with one thread each."""
    tr, te = split(x.shape[1])
    yn = y.numpy()
    if jobs == 1:
        parts = [sklearn_cell(x[c].numpy(), yn, tr, te, l2, max_iter, threads) for c in cells]
    else:
        from joblib import Parallel, delayed

        parts = Parallel(n_jobs=jobs)(delayed(sklearn_cell)(x[c].numpy(), yn, tr, te, l2, max_iter, 1) for c in cells)
    return {
        "accuracy": np.stack([p[0] for p in parts]),
        "cross_entropy": np.stack([p[1] for p in parts]),
        "n_iter": np.stack([p[2] for p in parts]),
        "not_converged": sum(p[3] for p in parts),
    }


# ---------------------------------------------------------------------------------------------------------------------
# benchmark


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells-layers", type=int, default=40, help="layers (default 40)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps (default 20); cells = layers x steps")
    ap.add_argument("--n", type=int, default=5000, help="samples (default 5000; 25%% held out)")
    ap.add_argument("--d", type=int, default=64, help="pooled feature width (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both sides (default 2)")
    ap.add_argument(
        "--sklearn-cells",
        type=int,
        default=40,
        help="random cells the sklearn loop runs on; its full time is extrapolated (default 40)",
    )
    ap.add_argument("--l2", type=float, default=1e-3, help="L2 strength (default 1e-3; sklearn C = 1/(l2 n_train))")
    ap.add_argument("--max-iter", type=int, default=200, help="iteration cap of both solvers (default 200)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds of the subset comparison, grid and sklearn alternating (default 3; medians)",
    )
    ap.add_argument(
        "--tols",
        type=lambda v: [float(t) for t in v.split(",") if t],
        default=[3e-4, 1e-3],
        help="looser grid tolerances also timed on the subset (default 3e-4,1e-3; '' for none)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic features and the cell subset")
    ap.add_argument("--write", action="store_true", help=f"write the output into {RESULTS.name} ({SECTION!r})")
    ap.add_argument(
        "--note",
        action="append",
        default=[],
        help="a sentence added to the reading in RESULTS.md (e.g. why these options); repeatable",
    )
    args = ap.parse_args(argv)
    try:
        import sklearn
    except ImportError:
        ap.error("scikit-learn is needed for the comparison: pip install scikit-learn")
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    layers, steps = args.cells_layers, args.steps
    C = layers * steps
    ks = [SIZES[f] for f in FACTORS]

    log("layerscope probe-grid benchmark (issue 6)")
    log(
        f"  python {platform.python_version()}, torch {torch.__version__}, scikit-learn {sklearn.__version__}, "
        f"layerscope {ls.__version__}"
    )
    log(f"  CPU: {cpu_model()}, {n_cpus()} CPUs available, threads {args.threads} (torch and threadpoolctl)")
    load0 = os.getloadavg()
    log(f"  load average before the run: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    t0 = time.perf_counter()
    x, y = make_features(layers, steps, args.n, args.d, args.seed)
    log(
        f"  features: {layers} layers x {steps} steps = {C} cells, n = {args.n} (train {args.n - round(args.n / 4)}, "
        f"held out {round(args.n / 4)}), d = {args.d}, float32 ({x.numel() * 4 / 2**30:.2f} GiB), "
        f"made in {time.perf_counter() - t0:.1f}s"
    )
    log(
        f"  factors: {', '.join(f'{f} ({k})' for f, k in zip(FACTORS, ks))}; l2 = {args.l2:g}, tol = 1e-4, "
        f"max_iter = {args.max_iter}"
    )
    rng = np.random.default_rng(args.seed)
    m = min(args.sklearn_cells, C)
    subset = sorted(rng.choice(C, size=m, replace=False).tolist())
    kw = dict(n_classes=ks, factor_names=list(FACTORS), l2=args.l2, max_iter=args.max_iter)

    # the sklearn variants: the plain loop with --threads threads (what sklearn does by default on this machine),
    # and, when that is more than one thread, the loop on one thread and the loop over --threads worker processes
    # of one thread each (what a user who knows that small fits do not parallelize well would write)
    variants = {"sklearn": (f"sklearn loop, {args.threads} thread(s)", dict(threads=args.threads, jobs=1))}
    if args.threads > 1:
        variants["sklearn_1t"] = ("sklearn loop, 1 thread", dict(threads=1, jobs=1))
        variants["sklearn_jobs"] = (
            f"sklearn, {args.threads} processes x 1 thread (joblib)",
            dict(threads=1, jobs=args.threads),
        )

    # warm-up (libraries, allocator, joblib's workers) on a few cells each
    t0 = time.perf_counter()
    fit_probe_grid(x[subset[:4]], y, **kw)
    for _, opts in variants.values():
        sklearn_loop(x, y, subset[:2], args.l2, args.max_iter, **opts)
    log(f"  warm-up done in {time.perf_counter() - t0:.1f}s")

    gc.collect()
    with CpuShare() as share_grid:
        grid = fit_probe_grid(x, y, **kw)
    t_grid = share_grid.wall
    log(
        f"  [grid] all {C} cells: {t_grid:.1f}s ({1000 * t_grid / C:.1f} ms per cell); iterations per problem "
        f"mean {grid.n_iter.double().mean():.1f}, max {int(grid.n_iter.max())}, per cell (its slowest factor) mean "
        f"{grid.n_iter.amax(1).double().mean():.1f}; largest final gradient entry {grid.max_grad_norm:.1e} "
        f"(tol 1e-4), {int(grid.converged.sum())}/{grid.converged.numel()} converged"
    )

    # the subset: the grid and every sklearn variant, in an order rotated from round to round
    times: dict[str, list[float]] = {"grid": [], **{k: [] for k in variants}}
    sk_runs: dict[str, dict] = {}
    # other processes' CPU use per configuration: joblib's worker processes are not this process, so the rounds
    # that use them would count as a shared machine; the load is judged on the rounds run in this process only
    shares: dict[str, list[CpuShare]] = {k: [] for k in times}
    for r in range(args.repeats):
        names = list(times)
        for which in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            t0 = time.perf_counter()
            with CpuShare() as sh:
                if which == "grid":
                    grid_sub = fit_probe_grid(x[subset], y, **kw)
                else:
                    sk_runs[which] = sklearn_loop(x, y, subset, args.l2, args.max_iter, **variants[which][1])
            shares[which].append(sh)
            times[which].append(time.perf_counter() - t0)
        log(
            f"  [subset] round {r + 1}/{args.repeats} ({m} cells, {m * len(ks)} sklearn fits): "
            + ", ".join(f"{k} {ts[-1]:.1f}s" for k, ts in times.items())
        )
    in_process = [k for k in times if k == "grid" or variants[k][1].get("jobs", 1) == 1]
    share_sub = combine([s for k in in_process for s in shares[k]])
    share_of = {k: combine(v) for k, v in shares.items()}
    med = {k: statistics.median(ts) for k, ts in times.items()}
    t_sub, t_sk = med["grid"], med["sklearn"]
    t_subs, t_sks = times["grid"], times["sklearn"]
    sk = sk_runs["sklearn"]
    log(
        f"  [sklearn] iterations per fit mean {sk['n_iter'].mean():.1f}, max {sk['n_iter'].max()}; "
        f"{sk['not_converged']} fits stopped at max_iter"
    )
    for k in sk_runs:
        if k != "sklearn":
            gap = 100 * np.abs(sk_runs[k]["accuracy"] - sk["accuracy"]).max()
            log(f"  [{k}] same fits as the plain loop: max |accuracy diff| {gap:.2f} points")

    # looser tolerances for the grid on the subset: what "equal held-out accuracy" alone would allow
    sweep = []
    for tol in args.tols:
        gc.collect()
        t0 = time.perf_counter()
        g_tol = fit_probe_grid(x[subset], y, tol=tol, **kw)
        dt_tol = time.perf_counter() - t0
        d_tol = 100 * np.abs(g_tol.accuracy.numpy() - sk["accuracy"])
        ce_tol = np.abs(g_tol.cross_entropy.numpy() - sk["cross_entropy"])
        sweep.append((tol, dt_tol, d_tol.mean(), d_tol.max(), ce_tol.mean(), ce_tol.max()))

    # agreement on the subset (the grid's numbers from the full run: the same cells, the same split)
    ours = grid.accuracy[subset].numpy()
    ours_ce = grid.cross_entropy[subset].numpy()
    same_sub = float(np.abs(grid_sub.accuracy.numpy() - ours).max())
    diff = 100 * np.abs(ours - sk["accuracy"])
    dce = np.abs(ours_ce - sk["cross_entropy"])
    h = grid.entropy.numpy()
    dmi = np.abs(np.maximum(0, h - ours_ce) - np.maximum(0, h - sk["cross_entropy"]))
    sk_total = t_sk / m * C
    ratio = sk_total / t_grid
    ratio_sub = t_sk / t_sub
    acc_all = grid.accuracy.numpy()
    near_chance = float((acc_all < grid.chance.numpy() + 0.05).mean())
    near_one = float((acc_all > 0.95).mean())
    onsets = grid.onset(0.9, order=sorted(range(C), key=lambda i: (i % steps, i // steps)))
    cpu_grid = (share_grid.ours or 0.0) * t_grid  # CPU seconds of this process

    log("")
    log(f"held-out agreement on the {m} subset cells x {len(ks)} factors (grid vs sklearn, both tol 1e-4)")
    log(
        f"  accuracy: mean |diff| {diff.mean():.2f} points, max {diff.max():.2f} points "
        f"(target: within {TARGET_POINTS:g}); mean accuracy grid {100 * ours.mean():.2f}%, "
        f"sklearn {100 * sk['accuracy'].mean():.2f}%"
    )
    log(
        f"  cross-entropy: mean |diff| {dce.mean():.4f} bits, max {dce.max():.4f}; MI bound: mean |diff| "
        f"{dmi.mean():.4f} bits, max {dmi.max():.4f}"
    )
    log(
        f"  grid on the subset alone vs the same cells in the full grid: max |accuracy diff| {100 * same_sub:.2f} "
        f"points"
    )
    log(
        f"  grid accuracies: {100 * near_chance:.0f}% of the {acc_all.size} problems within 5 points of chance, "
        f"{100 * near_one:.0f}% above 95%, median {100 * np.median(acc_all):.1f}%"
    )
    log(
        "  first cell (steps in order, then layers) reaching 90%: "
        + ", ".join(f"{f} {'-' if k is None else f'step {k % steps} layer {k // steps}'}" for f, k in onsets.items())
    )
    log("")
    log(f"results (seconds; the subset rows are medians of {args.repeats} rounds)")
    log(f"  {'what':64s} {'time s':>8s} {'ms/cell':>8s}  other processes' CPU use")
    rows = [
        (f"fit_probe_grid, all {C} cells", t_grid, C, share_grid),
        (f"fit_probe_grid, the {m} subset cells", t_sub, m, share_sub),
    ]
    rows += [(f"{label}, the {m} subset cells", med[k], m, share_of[k]) for k, (label, _) in variants.items()]
    for label, t, k, sh in rows:
        other = "n/a" if sh.other is None else f"{sh.other:.2f} of {n_cpus()} cores"
        if "joblib" in label and sh.other is not None:
            other += " (its own worker processes included)"
        log(f"  {label:64s} {t:8.1f} {1000 * t / k:8.1f}  {other}")
    log(f"  {f'sklearn loop, all {C} cells (extrapolated per cell)':64s} {sk_total:8.1f} {1000 * t_sk / m:8.1f}")
    for tol, dt_tol, dm, dx, cm, cx in sweep:
        log(
            f"  {f'fit_probe_grid, the {m} subset cells, tol {tol:g}':64s} {dt_tol:8.1f} {1000 * dt_tol / m:8.1f}  "
            f"{t_sk / dt_tol:.1f}x sklearn; accuracy |diff| mean {dm:.2f} max {dx:.2f} points, CE max {cx:.4f} bits"
        )
    # the verdict is against the fastest scikit-learn configuration measured (issue 20), not the default loop
    best_k = fastest_sklearn(med, variants)
    best_label = variants[best_k][0]
    best_ratio = med[best_k] / m * C / t_grid
    verdict = "PASS" if best_ratio >= TARGET_RATIO and diff.max() <= TARGET_POINTS else "MISS"
    busy = max((sh.other or 0.0) for sh in (share_grid, share_sub))
    if args.threads + busy > n_cpus() + 0.25:
        verdict += (
            f" (oversubscribed: {args.threads} threads + {busy:.2f} cores of other work > {n_cpus()} CPUs; "
            f"the times measure scheduler stalls as much as arithmetic)"
        )
    log(
        f"  speed-up at the same tol 1e-4: {ratio:.1f}x on all cells (sklearn extrapolated from {m} cells), "
        f"{ratio_sub:.1f}x like for like on the subset"
    )
    log(
        f"  against the fastest sklearn configuration ({best_label}): {best_ratio:.1f}x extrapolated to all cells; "
        f"target >= {TARGET_RATIO:g}x within {TARGET_POINTS:g} points: {verdict}"
    )
    for k, (label, _) in variants.items():
        if k != "sklearn":
            log(
                f"  against the {label}: {med[k] / t_sub:.1f}x like for like on the subset, "
                f"{med[k] / m * C / t_grid:.1f}x extrapolated to all cells"
            )
    log(f"  grid, all cells: {cpu_grid:.0f} CPU seconds in {t_grid:.0f} s wall ({share_grid.ours or 0:.2f} cores)")
    load1 = os.getloadavg()
    log(f"  load average after the run: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    log(f"\ntotal script time {time.perf_counter() - t_start:.0f}s")

    if args.write:
        write_results(
            args,
            argv,
            dict(
                C=C,
                m=m,
                t_grid=t_grid,
                t_sub=t_sub,
                t_sk=t_sk,
                sk_total=sk_total,
                ratio=ratio,
                ratio_sub=ratio_sub,
                diff=diff,
                dce=dce,
                grid=grid,
                sk=sk,
                shares=(share_grid, share_sub),
                verdict=verdict,
                sweep=sweep,
                t_subs=t_subs,
                t_sks=t_sks,
                near_chance=near_chance,
                near_one=near_one,
                variants=variants,
                med=med,
            ),
        )
        log(f"\nwrote section {SECTION!r} of {RESULTS}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# RESULTS.md


def write_results(args, argv, r: dict) -> None:
    cmd_args = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python", "benchmarks/bench_probes.py", *map(shlex.quote, cmd_args)])
    mem = mem_gib()
    ncpu = n_cpus()
    grid, sk, m, C = r["grid"], r["sk"], r["m"], r["C"]
    share_grid, share_sub = r["shares"]
    others = [s.other for s in r["shares"] if s.other is not None]
    if not others:
        share_line = "Other processes' CPU use was not measured (no /proc/stat)."
    elif max(others) >= SHARED:
        share_line = (
            f"**The machine was shared**: other processes (another engineer's jobs) kept on average "
            f"{share_grid.other:.2f} of the {ncpu} cores busy during the full-grid run and "
            f"{share_sub.other:.2f} during the subset rounds (measured from /proc/stat), so the times are "
            f"inflated and noisy; the subset comparison alternates the two solvers round by round so that "
            f"both see the same load."
        )
    else:
        share_line = (
            f"Other processes used {share_grid.other:.2f} of the {ncpu} cores during the full-grid run "
            f"and {share_sub.other:.2f} during the subset rounds (/proc/stat): the machine was not shared "
            f"in any way that matters (under {SHARED} cores)."
        )
    ratio, ratio_sub, diff = r["ratio"], r["ratio_sub"], r["diff"]
    it = grid.n_iter.double()
    med, variants = r["med"], r["variants"]
    t_grid, t_sub = r["t_grid"], r["t_sub"]
    table = [
        f"| fit_probe_grid, all {C} cells | 1e-4 | {t_grid:.1f} | {1000 * t_grid / C:.1f} | | |",
        f"| fit_probe_grid, the {m} subset cells | 1e-4 | {t_sub:.1f} | {1000 * t_sub / m:.1f} | | |",
    ]
    fastest = min(med[k] for k in med if k.startswith("sklearn"))
    for tol, dt_tol, _dm, dx, _cm, cx in r["sweep"]:
        table.append(
            f"| fit_probe_grid, the {m} subset cells | {tol:g} | {dt_tol:.1f} | {1000 * dt_tol / m:.1f} | "
            f"{fastest / dt_tol:.1f}x the fastest sklearn row | accuracy within {dx:.2f} points, "
            f"CE within {cx:.4f} bits of sklearn at 1e-4 |"
        )
    for k, (label, _) in variants.items():
        table.append(
            f"| {label}, the {m} subset cells | 1e-4 | {med[k]:.1f} | {1000 * med[k] / m:.1f} | "
            f"**{med[k] / t_sub:.1f}x** | **{med[k] / m * C / t_grid:.1f}x** (extrapolated to {C} cells) |"
        )
    best_k = fastest_sklearn(med, variants)
    best = med[best_k]
    met = best / m * C / t_grid >= TARGET_RATIO and diff.max() <= TARGET_POINTS
    per_it = (1000 * med["sklearn_1t"] / sk["n_iter"].sum()) if "sklearn_1t" in med else None
    bullets = [
        f"* **Against the plain sklearn loop ({args.threads} thread(s), sklearn's default here): {ratio:.1f}x** on the "
        f"full grid (sklearn's time **extrapolated** per cell from {m} random cells: {r['sk_total']:.0f} s for "
        f"{C} cells), {ratio_sub:.1f}x like for like on those cells (medians of {args.repeats} rounds: grid "
        + ", ".join(f"{t:.1f}" for t in r["t_subs"])
        + " s; sklearn "
        + ", ".join(f"{t:.1f}" for t in r["t_sks"])
        + f" s). Issue 6's target (>= {TARGET_RATIO:g}x the plain loop): **{'met' if ratio >= TARGET_RATIO else 'not met'}**.",
    ]
    if "sklearn_1t" in med:
        bullets.append(
            f"* **That margin is mostly scikit-learn's threading, not the solver.** The same loop pinned to one "
            f"thread took {med['sklearn_1t']:.1f} s ({med['sklearn'] / med['sklearn_1t']:.1f}x less than with "
            f"{args.threads}), and {args.threads} worker processes of one thread each {med['sklearn_jobs']:.1f} s: a "
            f"fit at n = {args.n - round(args.n / 4)}, d = {args.d} is too small to split, and every iteration's "
            f"parallel BLAS and OpenMP regions cost more than they compute. Against the fastest sklearn "
            f"configuration ({variants[best_k][0]}) the grid is **{best / t_sub:.1f}x** like for like and "
            f"{best / m * C / t_grid:.1f}x extrapolated to all cells: issue 20's target (>= {TARGET_RATIO:g}x the "
            f"fastest configuration within {TARGET_POINTS:g} points) is **{'met' if met else 'not met'}**."
        )
    bullets += [
        f"* **Accuracy**: mean |diff| {diff.mean():.2f} points, max {diff.max():.2f} points over {diff.size} (cell, "
        f"factor) problems (target: within {TARGET_POINTS:g} point, "
        f"{'met' if diff.max() <= TARGET_POINTS else 'not met'}); cross-entropy |diff| {r['dce'].mean():.4f} bits "
        f"on average (max {r['dce'].max():.4f}). Both solvers stop at the same gradient tolerance on the same "
        f"objective, so they land on nearly the same optimum.",
        f"* Convergence: the grid's largest final gradient entry is {grid.max_grad_norm:.1e} "
        f"({int(grid.converged.sum())}/{grid.converged.numel()} problems <= tol 1e-4); {it.mean():.1f} iterations "
        f"per problem on average (max {int(it.max())}), and a cell, which stays in the solver until its slowest "
        f"factor is done, {grid.n_iter.amax(1).double().mean():.1f}; sklearn {sk['n_iter'].mean():.1f} per fit "
        f"(max {sk['n_iter'].max()}; {sk['not_converged']} fits stopped at max_iter).",
        "* Why the tuned ratio is what it is: per iteration both do the same arithmetic, two products of the "
        "(n, d+1) features with the (d+1, K) weights and a softmax. The grid does them for all six factors of a "
        "batch of cells (~20 here) in one bmm each, in float32, without sklearn's per-iteration Python/scipy "
        "overhead"
        + (
            f" (the one-thread loop spent {per_it:.1f} ms per iteration of one fit, for products that take ~0.2-0.3 ms)"
            if per_it
            else ""
        )
        + f", and needs about half the iterations per problem ({it.mean():.1f} against {sk['n_iter'].mean():.1f}: "
        "the Kronecker-factored preconditioner). But a cell iterates until its slowest factor converges, with all "
        "six factors' columns, which gives back most of that second advantage. On an accelerator the batched "
        "solve would run at matmul throughput (not measured: no GPU in this session).",
    ]
    if r["sweep"]:
        ok_rows = [row for row in r["sweep"] if row[3] <= TARGET_POINTS]
        if ok_rows:
            row = max(ok_rows, key=lambda row: row[0])
            bullets.append(
                f"* Looser tolerances (the tol rows): the issue's criterion is equal held-out accuracy, not an "
                f"equal stopping rule. At tol {row[0]:g} the grid took {row[1]:.1f} s on the subset "
                f"({fastest / row[1]:.1f}x the fastest sklearn configuration) with accuracy within {row[3]:.2f} points and cross-entropy within {row[5]:.4f} "
                f"bits of sklearn at 1e-4. The default stays 1e-4, sklearn's default rule, since the MI bound is "
                f"read off the cross-entropy."
            )
    bullets.append(
        f"* The grid spans the range the issue asks for: {100 * r['near_chance']:.0f}% of the {grid.accuracy.numel()} "
        f"problems are within 5 points of chance and {100 * r['near_one']:.0f}% above 95% held-out accuracy."
    )
    if others and max(others) >= SHARED and args.threads > 1:
        bullets.append(
            f"* With {args.threads} threads on a machine whose cores are busy with other work, every parallel region "
            f"waits for whichever of its threads was descheduled; both solvers run thousands of short parallel "
            f"regions, so the times say as much about the scheduler as about the arithmetic."
        )
    bullets += [f"* {note}" for note in args.note]
    body = f"""{SECTION}

Command (from the repository root; scikit-learn installed for the comparison only):

```
{command}
```

Machine: `nproc` = {ncpu}, CPU `{cpu_model()}` (/proc/cpuinfo){f", {mem:.0f} GiB RAM" if mem else ""}, no GPU.
Python {platform.python_version()}, torch {torch.__version__}, scikit-learn {__import__("sklearn").__version__},
layerscope {ls.__version__}; {args.threads} thread(s) on both sides. Measured {_dt.date.today().isoformat()} on
commit "{git_head()}" (+ the probe solver). {share_line}

Setup: synthetic pooled activations ({args.cells_layers} layers x {args.steps} steps = {C} cells, n = {args.n},
d = {args.d}, float32; the six Shapes factors with their class counts, each coded from its own onset step on, with
correlated channels, a nuisance latent that fades with the step, SiLU and per-channel scales; see the script's
docstring). Grid: `fit_probe_grid(x, labels, n_classes=..., l2={args.l2:g})` (tol 1e-4, 25% held out). sklearn:
per cell the same split and standardization, per factor `LogisticRegression(C=1/(l2 * n_train), tol=1e-4,
max_iter={args.max_iter})` (lbfgs, multinomial: the same objective and stopping rule) on float32 features, on
{m} random cells, as a plain loop with {args.threads} thread(s) and (with more than one thread) pinned to one
thread and over {args.threads} joblib processes; its time for all {C} cells is **extrapolated** from those cells
(time per cell x {C}). The full grid is timed once; on the subset all variants run in rotated order for
{args.repeats} rounds (medians).

### Output

```
{chr(10).join(_lines)}
```

### Reading

| what | tol | time (s) | ms per cell | sklearn / grid, subset | sklearn / grid, all cells |
|---|---|---|---|---|---|
{chr(10).join(table)}

{chr(10).join(bullets)}
"""
    replace_section(RESULTS, SECTION, body)


if __name__ == "__main__":
    sys.exit(main())
