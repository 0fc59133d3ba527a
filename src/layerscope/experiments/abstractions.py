"""Latent abstractions over diffusion time (Corallo et al. 2024): when does each factor become linearly readable?

Generation as non-linear filtering: unobservable latent factors steer the observable generative path. The probe
grid asks, for every layer x denoising step (and for the noisy sample ``x_t`` itself, the baseline: the map's entry
whose role is ``denoiser_input``), how well a linear probe on the model's features reads each factor of the image
the generation ends in, and bounds the mutual information between factor and features by ``I(Y; Z) >= H(Y) - CE``
(bits; :mod:`layerscope.stats.probes`).

Features (:func:`collect_features`): layers are captured pooled (spatial / token mean) from the CFG-conditional
branch; ``x_t`` is captured whole in the same generation (``Capture(unpooled=...)``) and reduced by a fixed
Gaussian random projection (seeded), since its spatial mean is only a mean colour. Labels: for the Shapes world,
the oracle's reading of each final image (:func:`shapes_labels`); for any other pipeline, the user's own labels per
prompt (:func:`labels_from_csv`).

On the zoo the samples are drawn **unconditionally** (empty prompt, no guidance; the zoo models were trained with
10% prompt dropout): with a prompt, every cross-attention layer would carry the prompt's factors from the first step
on, and the grid would only show that the text is read, not when the process commits.

Forking entropy (:func:`run_forking`): run a generation to step tau, fork ``n_forks`` continuations with fresh sampler
noise (DDIM with ``eta=1``; :meth:`Generator.generate`'s ``fork_at`` / ``fork_seeds``), read each ending with the
oracle, and take per factor the plug-in entropy of the readings across the forks of one start; its mean over starts
falls as tau grows, and the step from which it stays low is when the process has committed to that factor
(:func:`commitment_times`).

The experiment's shape (:mod:`.base`): :class:`Settings` -> :func:`run` -> a Result with tables ``probes`` and / or
``forks`` and a record holding the probe record under ``"probes"`` and the forking record under ``"forking"``;
:func:`main_job` is the probe grid then forking on the zoo's diffusion models.
"""

from __future__ import annotations

import csv
import dataclasses
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..engine import Capture
from ..errors import ConfigError
from ..progress import ProgressArg
from ..stats.bootstrap import mean_ci
from ..stats.entropy import plugin_entropy
from ..stats.probes import ProbeGrid, fit_probe_grid
from ..validate import MAX_STEPS, check_float, check_int, check_seeds
from . import injection
from .base import Job, Result, generation_kwargs, settings_dict
from .executor import Executor, Part, Task, run_cells
from .plans import Generations, StudyPlan, capture_bytes, image_bytes, model_bytes
from .workspace import Cell, Workspace, open_workspace

if TYPE_CHECKING:  # pragma: no cover
    from ..layers import LayerMap
    from ..models.base import Generator

NAME = "abstractions"
#: the Result's tables (saved as ``probes.parquet`` and ``forks.parquet``)
PROBES, FORKS = "probes", "forks"
TABLE, FORK_TABLE = f"{PROBES}.parquet", f"{FORKS}.parquet"
#: the role of the map entry probed as the baseline: the noisy sample entering the denoiser (``x_t``)
BASELINE_ROLE = "denoiser_input"
#: the fewest samples a probe grid is fitted on (a quarter is held out)
MIN_SAMPLES = 8
# commitment: the mean fork entropy stays at or below COMMIT_BITS from that tau on. Fixed before any result was seen:
# with 8 forks, one fork in 8 reading another value is 0.54 bit, so <= 0.5 bit means that on average the forks of a
# start agree on the factor, up to less than one dissenting fork in 8 (and any share of oracle misreadings).
COMMIT_BITS = 0.5
# the relative criterion, also fixed beforehand: the mean entropy stays at or below this fraction of its tau=0 value
COMMIT_FRACTION = 0.5


@dataclass
class Features:
    """Per (layer, step) features (n, d), the layer order, the steps and their scheduler timesteps, final images,
    and the name of the baseline (the denoiser input, first in ``layers``; None when not captured)."""

    cells: dict[tuple[str, int], torch.Tensor]
    layers: list[str]
    steps: list[int]
    timesteps: list[float]
    images: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None


def baseline_layer(lmap: "LayerMap") -> str | None:
    """The name of the map's denoiser input (role :data:`BASELINE_ROLE`, ``x_t`` on the zoo), None without one:
    the probes' baseline, found from the entries' roles whatever the family."""
    return next((e.name for e in lmap if e.role == BASELINE_ROLE), None)


def _projection(d_in: int, d_out: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_in, d_out, generator=g) / d_out**0.5


def collect_features(
    model: "Generator",
    prompts: Sequence[Any],
    seeds: Sequence[int],
    *,
    layers: str | Sequence[str] | None = None,
    steps: Any = None,
    baseline: bool = True,
    projection: int = 128,
    project_layers: bool = False,
    max_batch: int | None = None,
    store: str | Path | None = None,
    progress: ProgressArg = None,
    cells: Workspace | None = None,
    executor: Executor | None = None,
    **gen_kwargs: Any,
) -> Features:
    """Capture pooled features of ``layers`` (default: every layer) at ``steps`` (default: all), conditional branch,
    and the baseline, the map's denoiser input ``x_t`` (:func:`baseline_layer`; captured whole in the same generation,
    then randomly projected to ``projection`` dims; left out when the map has none).

    ``project_layers``: the layers too are captured whole and reduced by a fixed Gaussian random projection (seeded
    per width) to ``projection`` dims instead of their spatial mean, which keeps where things are (memory: the whole
    maps, so this usually streams to a store). ``store``: a zarr folder the capture streams to (read back one step
    at a time). Without one, a capture larger than the engine's memory budget (``Capture.budget_bytes``) streams to
    a temporary store, deleted afterwards.

    The samples are generated in batches of ``max_batch`` (default: the model's), one generation each; with
    ``cells`` (a workspace) each batch's features are kept as a cell, so an interrupted collection resumes at the
    first missing batch."""
    cfg = model.config(**gen_kwargs)
    if model.num_steps(cfg) == 0:
        raise ConfigError(f"{model.spec} generates in one pass: the probe grid needs a denoising model")
    lmap = model.layer_map(cfg.height, cfg.width)
    names = [e.name for e in lmap.layers] if layers is None else [e.name for e in lmap.select(layers)]
    base = baseline_layer(lmap) if baseline else None
    order = ([base] if base else []) + list(names)
    # one generation per batch: layers pooled, x_t whole (its spatial mean is only a mean colour) for the projection
    cap = Capture(
        names + ([base] if base else []),
        steps=steps,
        branches=["cond"],
        pooled=True,
        unpooled=([base] if base else []) + (names if project_layers else []),
        store=store,
    )
    n = len(prompts)
    # a given store is itself the resumable unit (one capture of every sample); otherwise one cell per batch
    size = n if store is not None else (max_batch or model.default_max_batch)
    batches = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    what = (names, base, project_layers, projection)
    tasks = [
        Task(f"features_{b:04d}_of_{len(batches)}", model.spec, _feature_cell,
             (cap, [prompts[i] for i in rows], [seeds[i] for i in rows], what, max_batch, gen_kwargs))
        for b, rows in enumerate(batches)
    ]  # fmt: skip
    ws = cells if cells is not None else Workspace(None, {})
    desc = f"probe features: {n} samples in {len(batches)} batches"
    parts = run_cells(ws, {model.spec: model}, tasks, executor, progress, desc)
    step_ids = [int(s) for s in parts[0].record["steps"]]
    all_t = [float(t) for t in parts[0].record["timesteps"]]
    feats = {
        (name, s): torch.cat([torch.from_numpy(c.arrays[f"{name}@{s}"]) for c in parts])
        for name in order
        for s in step_ids
    }
    return Features(
        feats,
        order,
        step_ids,
        [all_t[s] for s in step_ids] if all_t else [],
        torch.cat([torch.from_numpy(c.arrays["images"]) for c in parts]),
        {
            "projection": projection if base else None,
            "project_layers": project_layers,
            "settings": {"num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale},
        },
        baseline=base,
    )


def _feature_cell(
    model: "Generator",
    cap: Capture,
    prompts: list[Any],
    seeds: list[int],
    what: tuple[list[str], str | None, bool, int],
    max_batch: int | None,
    gen_kwargs: dict[str, Any],
) -> Part:
    """:func:`_feature_batch` as an executor's cell (the projections are seeded per width: any process makes the
    same ones)."""
    cell = _feature_batch(model, cap, prompts, seeds, (*what, {}), max_batch, gen_kwargs)
    return Part(arrays=cell.arrays, record=cell.record)


def _feature_batch(
    model: "Generator",
    cap: Capture,
    prompts: list[Any],
    seeds: list[int],
    what: tuple[list[str], str | None, bool, int, dict[int, torch.Tensor]],
    max_batch: int | None,
    gen_kwargs: dict[str, Any],
) -> Cell:
    """One batch of samples generated with the capture: per (layer, step) features, the images, the steps.
    ``what``: the layer names, the baseline, whether layers are projected, the projection's width and its cache."""
    names, base, project_layers, projection, projections = what
    with tempfile.TemporaryDirectory(prefix="layerscope-probes-") as tmp:
        if cap.store is None and model.capture_bytes(cap, len(prompts), **gen_kwargs) > cap.budget_bytes:
            cap = dataclasses.replace(cap, store=Path(tmp) / "features.zarr")
        res = model.generate(prompts, seeds, capture=cap, max_batch=max_batch, **gen_kwargs)

        def at(name: str, k: int) -> torch.Tensor:  # (n, *feature) of one step, from memory or the store
            return torch.as_tensor(np.asarray(res.capture[name][:, k, 0])).float()

        def projected(name: str, k: int) -> torch.Tensor:  # (n, projection): the whole map, one step at a time
            x = at(name, k).flatten(1)
            d = x.shape[-1]
            if d not in projections:
                projections[d] = _projection(d, min(projection, d))
            return x @ projections[d]

        step_ids = [int(s) for s in res.capture.steps_of(names[0])]
        arrays: dict[str, np.ndarray] = {}
        for k, s in enumerate(step_ids):
            if base:
                arrays[f"{base}@{s}"] = projected(base, k).numpy()
            for name in names:
                arrays[f"{name}@{s}"] = (projected(name, k) if project_layers else at(name, k)).numpy()
    arrays["images"] = res.images.numpy()
    return Cell(arrays=arrays, record={"steps": step_ids, "timesteps": [float(t) for t in res.timesteps]})


def shapes_labels(images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """The oracle's reading of the final images as probe labels (n, 6), and its confidence (n, 6)."""
    from ..world.oracle import read

    r = read(images)
    return torch.as_tensor(r.pred, dtype=torch.long), r.confidence


def labels_from_csv(path: str | Path) -> tuple[list[str], torch.Tensor, list[str], list[int]]:
    """A user's labels: a CSV with a ``prompt`` column and one column per factor (any values, encoded per column).

    Returns prompts, labels (n, F) as class indices, factor names and class counts."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "prompt" not in rows[0]:
        raise ConfigError(f"{path} must be a CSV with a 'prompt' column and one column per factor")
    factors = [c for c in rows[0] if c != "prompt"]
    if not factors:
        raise ConfigError(f"{path} has no label column besides 'prompt'")
    codes = []
    sizes = []
    for f in factors:
        values = sorted({r[f] for r in rows})
        idx = {v: i for i, v in enumerate(values)}
        codes.append([idx[r[f]] for r in rows])
        sizes.append(len(values))
    return [r["prompt"] for r in rows], torch.tensor(codes, dtype=torch.long).T.contiguous(), factors, sizes


def probe_table(grid: ProbeGrid, feats: Features, model: str, n_boot: int = 200) -> pd.DataFrame:
    """The grid as a tidy table: model, layer, layer_index, step, timestep, factor, metric, value; metrics
    accuracy, cross_entropy, mi_bound and ``accuracy_low`` / ``accuracy_high``, the 95% percentile bootstrap interval
    of the held-out accuracy (held-out samples resampled)."""
    t = grid.to_frame()
    if grid.test_correct is not None:
        lo, hi = grid.accuracy_ci(n_boot=n_boot)
        c, f = lo.shape
        extra = pd.DataFrame(
            {
                "cell": [k for k in grid.keys for _ in range(2 * f)],
                "factor": [grid.factors[j] for _ in range(c) for j in range(f) for _ in range(2)],
                "metric": ["accuracy_low", "accuracy_high"] * (c * f),
                "value": torch.stack([lo, hi], dim=-1).reshape(-1).numpy(),
            }
        )
        t = pd.concat([t, extra[t.columns]], ignore_index=True)
    layer_index = {name: i for i, name in enumerate(feats.layers)}
    tsteps = dict(zip(feats.steps, feats.timesteps))
    t["layer"] = [c[0] for c in t["cell"]]
    t["step"] = [int(c[1]) for c in t["cell"]]
    t["layer_index"] = t["layer"].map(layer_index)
    t["timestep"] = t["step"].map(tsteps)
    t.insert(0, "model", model)
    return t.drop(columns=["cell"])[["model", "layer", "layer_index", "step", "timestep", "factor", "metric", "value"]]


def run_probes(
    model: "Generator",
    n: int = 320,
    *,
    seed: int = 0,
    steps: Any = None,
    layers: Any = None,
    conditional: bool = False,
    project_layers: bool = False,
    max_batch: int | None = None,
    progress: ProgressArg = None,
    cells: Workspace | None = None,
    executor: Executor | None = None,
    **gen_kwargs: Any,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The probe grid on a Shapes-world model: ``n`` samples (unconditional unless ``conditional``: then held-out
    prompts), labels read by the oracle, every layer x step plus the ``x_t`` baseline. Returns the tidy table and a
    record (entropies, chance levels, oracle confidence, solver convergence, timing, the baseline's name)."""
    from ..world.factors import FACTORS, SIZES, sample_factors
    from ..world.text import prompts_for

    if conditional:
        prompts = prompts_for(sample_factors(n, seed + 101, split="test"))
    else:
        prompts = [""] * n
        gen_kwargs.setdefault("guidance_scale", 1.0)
    seeds = list(range(seed, seed + n))
    feats = collect_features(
        model,
        prompts,
        seeds,
        layers=layers,
        steps=steps,
        project_layers=project_layers,
        max_batch=max_batch,
        progress=progress,
        cells=cells,
        executor=executor,
        **gen_kwargs,
    )
    labels, conf = shapes_labels(feats.images)
    grid = fit_probe_grid(
        feats.cells, labels, n_classes=[SIZES[f] for f in FACTORS], factor_names=list(FACTORS), seed=seed
    )
    table = probe_table(grid, feats, model.spec)
    record = {
        "samples": n,
        "conditional": conditional,
        **_grid_record(grid, feats, FACTORS),
        "oracle_confidence": dict(zip(FACTORS, [float(v) for v in conf.mean(0)])),
        "in_distribution": float((conf >= 0.9).all(1).mean()),
    }
    return table, record


def _grid_record(grid: ProbeGrid, feats: Features, factors: Sequence[str]) -> dict[str, Any]:
    """What every probe record holds: the features' settings, steps and layers, the labels' entropies and chance
    levels, the fit's time and the onset intervals."""
    return {
        "settings": feats.meta["settings"],
        "projection": feats.meta["projection"],
        "steps": feats.steps,
        "timesteps": feats.timesteps,
        "layers": feats.layers,
        "baseline": feats.baseline,
        "entropy_bits": dict(zip(factors, [float(v) for v in grid.entropy])),
        "chance": dict(zip(factors, [float(v) for v in grid.chance])),
        "fit_seconds": float(grid.seconds),
        "onset_ci": {f: list(v) for f, v in onset_intervals(grid, exclude=_excluded(feats.baseline)).items()},
    }


def _excluded(baseline: str | None) -> tuple[str, ...]:
    return (baseline,) if baseline else ()


def baseline_of(record: dict[str, Any]) -> tuple[str, ...]:
    """The layer names to leave out of "best layer" readings of a probe table: its baseline (from the probe
    record :func:`run_probes` / :func:`run_probes_csv` return), or nothing when it was not captured."""
    return _excluded(record.get("baseline"))


def readable_onsets(
    table: pd.DataFrame, threshold: float = 0.9, metric: str = "accuracy", exclude: Sequence[str] = ()
) -> dict[str, dict[str, Any] | None]:
    """Per factor, the first step at which some layer's held-out ``metric`` reaches ``threshold`` (best layer).
    ``exclude``: layers left out, e.g. the baseline (:func:`baseline_of` the probe record)."""
    t = table[(table["metric"] == metric) & ~table["layer"].isin(exclude)]
    out: dict[str, dict[str, Any] | None] = {}
    for f, sub in t.groupby("factor", sort=False):
        best = sub.loc[sub.groupby("step")["value"].idxmax()].sort_values("step")
        hit = best[best["value"] >= threshold]
        out[f] = (
            {"step": int(hit["step"].iloc[0]), "layer": str(hit["layer"].iloc[0]), "value": float(hit["value"].iloc[0])}
            if len(hit)
            else None
        )
    return out


def run_probes_csv(
    model: "Generator",
    labels_csv: str | Path,
    *,
    seed: int = 0,
    steps: Any = None,
    layers: Any = None,
    project_layers: bool = False,
    max_batch: int | None = None,
    progress: ProgressArg = None,
    cells: Workspace | None = None,
    executor: Executor | None = None,
    **gen_kwargs: Any,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The probe grid on any text-to-image pipeline with the user's labels (:func:`labels_from_csv`): each prompt is
    generated once (seed ``seed + row``) and its features are probed for the CSV's label columns."""
    prompts, labels, factors, sizes = labels_from_csv(labels_csv)
    seeds = list(range(seed, seed + len(prompts)))
    feats = collect_features(
        model,
        prompts,
        seeds,
        layers=layers,
        steps=steps,
        project_layers=project_layers,
        max_batch=max_batch,
        progress=progress,
        cells=cells,
        executor=executor,
        **gen_kwargs,
    )
    grid = fit_probe_grid(feats.cells, labels, n_classes=sizes, factor_names=factors, seed=seed)
    table = probe_table(grid, feats, model.spec)
    record = {
        "samples": len(prompts),
        "conditional": True,
        "labels": str(labels_csv),
        **_grid_record(grid, feats, factors),
    }
    return table, record


def onset_intervals(
    grid: ProbeGrid,
    frac: float = 0.5,
    confidence: float = 0.95,
    n_boot: int = 200,
    seed: int = 0,
    exclude: Sequence[str] = (),
) -> dict[str, tuple[float, float]]:
    """Per factor, a percentile bootstrap interval of the half-way step of :func:`relative_onsets` (the held-out
    samples resampled, the probes kept): (low, high) steps, inf where a resample never rises above chance.
    ``exclude``: layers (cells ``(layer, step)``) left out, e.g. the baseline."""
    keep = [i for i, k in enumerate(grid.keys) if k[0] not in exclude]
    steps = np.array([int(grid.keys[i][1]) for i in keep])
    uniq = np.unique(steps)
    boot = grid.bootstrap_accuracy(n_boot, seed).numpy()[:, keep]  # (B, C', F)
    best = np.stack([boot[:, steps == s].max(axis=1) for s in uniq], axis=1)  # (B, S, F)
    top = best.max(axis=1)  # (B, F)
    chance = grid.chance.numpy()[None, :]
    level = chance + frac * (top - chance)
    reached = best >= level[:, None, :]
    first = np.where(reached.any(axis=1), uniq[reached.argmax(axis=1)], np.inf).astype(float)
    first[top <= chance] = np.inf
    q = (1 - confidence) / 2
    return {
        f: (float(np.quantile(first[:, j], q, method="lower")), float(np.quantile(first[:, j], 1 - q, method="higher")))
        for j, f in enumerate(grid.factors)
    }


def relative_onsets(
    table: pd.DataFrame, chance: dict[str, float], frac: float = 0.5, exclude: Sequence[str] = ()
) -> dict[str, dict[str, Any] | None]:
    """Per factor, the first step at which the best layer's held-out accuracy has come ``frac`` of the way from
    chance to its highest value over all steps (None when it never rises above chance). ``exclude``: layers left
    out, e.g. the baseline (:func:`baseline_of` the probe record).

    An absolute threshold (:func:`readable_onsets`) says when a factor is read well; this relative onset says when
    most of what the probes will ever read is already there, which a limited sample (few hundred generations) still
    resolves."""
    t = table[(table["metric"] == "accuracy") & ~table["layer"].isin(exclude)]
    out: dict[str, dict[str, Any] | None] = {}
    for f, sub in t.groupby("factor", sort=False):
        best = sub.loc[sub.groupby("step")["value"].idxmax()].sort_values("step")
        top = float(best["value"].max())
        if top <= chance[f]:
            out[f] = None
            continue
        level = chance[f] + frac * (top - chance[f])
        hit = best[best["value"] >= level]
        out[f] = {
            "step": int(hit["step"].iloc[0]),
            "layer": str(hit["layer"].iloc[0]),
            "value": float(hit["value"].iloc[0]),
            "level": level,
            "top": top,
        }
    return out


# -- forking entropy -----------------------------------------------------------------------------------------------
def fork_plan(n_prompts: int, n_forks: int, taus: Sequence[int], seed: int = 0) -> pd.DataFrame:
    """One row per generation: tau, prompt (index), fork, seed (the start: initial noise and the noise before the
    fork) and fork_seed. Rows are grouped by (tau, prompt) so a batch of a multiple of ``n_forks`` rows keeps the forks
    of a start together. Fork k of prompt p has the same fork seed at every tau (common random numbers)."""
    rows = [
        (int(tau), p, k, seed + p, 10_000 + seed + p * n_forks + k)
        for tau in taus
        for p in range(n_prompts)
        for k in range(n_forks)
    ]
    return pd.DataFrame(rows, columns=["tau", "prompt", "fork", "seed", "fork_seed"])


def fork_entropy_table(
    plan: pd.DataFrame, pred: np.ndarray, confidence: np.ndarray, factors: Sequence[str], sizes: Sequence[int]
) -> pd.DataFrame:
    """Per (tau, prompt, factor): the plug-in entropy (bits) of the forks' readings ``pred`` (rows of ``plan``, one
    column per factor), normalised by log2(number of values of the factor), the number of distinct values, the
    share of forks on the most common value and the oracle's mean confidence."""
    rows = []
    for (tau, prompt), idx in plan.groupby(["tau", "prompt"], sort=True).indices.items():
        for j, (f, k) in enumerate(zip(factors, sizes)):
            v = pred[idx, j]
            h = plugin_entropy(v)
            rows.append(
                {
                    "tau": int(tau),
                    "factor": f,
                    "prompt": int(prompt),
                    "entropy": h,
                    "normalised": h / np.log2(k),
                    "distinct": int(np.unique(v).size),
                    "mode_share": float(np.bincount(v).max() / len(v)),
                    "confidence": float(confidence[idx, j].mean()),
                    "forks": int(len(idx)),
                }
            )
    return pd.DataFrame(rows)


def entropy_summary(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per (model, tau, factor): mean fork entropy over starts with a bootstrap CI (bits), and the normalised mean."""
    rows = []
    keys = ["model", "tau", "factor"] if "model" in table else ["tau", "factor"]
    for key, sub in table.groupby(keys, sort=False):
        mean, lo, hi = mean_ci(sub["entropy"].to_numpy(), confidence)
        rows.append(
            {
                **dict(zip(keys, key)),
                "entropy": mean,
                "low": lo,
                "high": hi,
                "normalised": float(sub["normalised"].mean()),
                "mode_share": float(sub["mode_share"].mean()),
                "prompts": int(len(sub)),
            }
        )
    return pd.DataFrame(rows).sort_values(keys[:-1], kind="stable").reset_index(drop=True)


def commitment_times(
    summary: pd.DataFrame, threshold: float = COMMIT_BITS, fraction: float | None = None
) -> dict[str, int | None]:
    """Per factor, the first tau from which the mean entropy stays at or below ``threshold`` bits at every later tau
    of ``summary`` (an :func:`entropy_summary` of one model), or, with ``fraction``, at or below ``fraction`` times
    its value at the first tau. None when it is above at the last tau."""
    out: dict[str, int | None] = {}
    for f, sub in summary.groupby("factor", sort=False):
        sub = sub.sort_values("tau")
        taus = sub["tau"].to_numpy()
        h = sub["entropy"].to_numpy()
        level = threshold if fraction is None else fraction * h[0]
        above = np.nonzero(h > level + 1e-12)[0]
        if len(above) == 0:
            out[str(f)] = int(taus[0])
        elif above[-1] == len(h) - 1:
            out[str(f)] = None
        else:
            out[str(f)] = int(taus[above[-1] + 1])
    return out


def _fork_cell(
    model: "Generator", texts: list[str], rows: np.ndarray, batch: int, eta: float, gen_kwargs: dict[str, Any]
) -> Part:
    """One batch of fork generations (``rows``: seed, tau, fork seed per row), read by the oracle."""
    import time

    from ..world.oracle import read

    t0 = time.perf_counter()
    res = model.generate(
        texts,
        [int(x) for x in rows[:, 0]],
        fork_at=[int(x) for x in rows[:, 1]],
        fork_seeds=[int(x) for x in rows[:, 2]],
        max_batch=batch,
        eta=eta,
        **gen_kwargs,
    )
    seconds = time.perf_counter() - t0
    r = read(res.images)
    return Part(
        arrays={"pred": np.asarray(r.pred), "confidence": np.asarray(r.confidence)},
        record={"seconds": seconds, "timesteps": [float(t) for t in res.timesteps]},
    )


def run_forking(
    model: "Generator",
    n_prompts: int = 16,
    n_forks: int = 8,
    taus: Sequence[int] | None = None,
    *,
    seed: int = 0,
    conditional: bool = False,
    eta: float = 1.0,
    max_batch: int | None = None,
    progress: ProgressArg = None,
    cells: Workspace | None = None,
    executor: Executor | None = None,
    **gen_kwargs: Any,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Forking entropy on a Shapes-world model (Corallo et al. 2024).

    ``n_prompts`` starts (unconditional, empty prompt and no guidance, as :func:`run_probes`; or with
    ``conditional`` held-out prompts at the model's guidance), each run to every step tau of ``taus`` (default: every
    step but the last, whose DDIM update draws no noise) and forked there into ``n_forks`` continuations with fresh
    sampler noise (DDIM with ``eta``). The oracle reads each ending; per start, tau and factor the table holds the
    plug-in entropy (bits) of the readings across the forks. All forks of all starts and taus go in one generate call
    (chunks of a multiple of ``n_forks`` rows). Returns the tidy table (model, tau, timestep, factor, prompt, entropy,
    normalised, distinct, mode_share, confidence, forks) and a record (summary with bootstrap CIs, commitment times,
    settings, timing)."""

    from ..world.factors import FACTORS, SIZES, sample_factors
    from ..world.text import prompts_for

    if n_prompts < 1 or n_forks < 2:
        raise ConfigError(f"forking needs at least 1 start and 2 forks, got {n_prompts} and {n_forks}")
    if not conditional:
        gen_kwargs.setdefault("guidance_scale", 1.0)
    cfg = model.config(eta=eta, **gen_kwargs)
    steps = model.num_steps(cfg)
    if steps < 2:
        raise ConfigError(f"{model.spec}: forking needs a denoising model with at least 2 steps")
    taus = list(range(steps - 1)) if taus is None else sorted({int(t) for t in taus})
    plan = fork_plan(n_prompts, n_forks, taus, seed)
    if conditional:
        factors = sample_factors(n_prompts, seed + 101, split="test")
        texts = prompts_for(factors)
    else:
        factors = None
        texts = [""] * n_prompts
    batch = max_batch or n_forks * max(1, model.default_max_batch * 2 // n_forks)
    batch = max(n_forks, batch - batch % n_forks)
    chunks = [list(range(i, min(i + batch, len(plan)))) for i in range(0, len(plan), batch)]
    tasks = [
        Task(f"forks_{c:04d}_of_{len(chunks)}", model.spec, _fork_cell,
             ([texts[p] for p in plan.iloc[rows]["prompt"]], plan.iloc[rows][["seed", "tau", "fork_seed"]].to_numpy(),
              batch, eta, gen_kwargs))
        for c, rows in enumerate(chunks)  # one cell per generation batch (whole starts: a multiple of n_forks)
    ]  # fmt: skip
    ws = cells if cells is not None else Workspace(None, {})
    parts = run_cells(ws, {model.spec: model}, tasks, executor, progress, f"forking: {len(plan)} generations")
    preds = [c.arrays["pred"] for c in parts]
    confs = [c.arrays["confidence"] for c in parts]
    gen_seconds = sum(float(c.record["seconds"]) for c in parts)
    all_t = [float(t) for t in parts[-1].record["timesteps"]] if parts else []
    reading_pred, reading_conf = np.concatenate(preds), np.concatenate(confs)
    sizes = [SIZES[f] for f in FACTORS]
    table = fork_entropy_table(plan, reading_pred, reading_conf, FACTORS, sizes)
    table["timestep"] = table["tau"].map(lambda t: all_t[t] if all_t else np.nan)
    table.insert(0, "model", model.spec)
    table = table[
        [
            "model",
            "tau",
            "timestep",
            "factor",
            "prompt",
            "entropy",
            "normalised",
            "distinct",
            "mode_share",
            "confidence",
            "forks",
        ]
    ]
    summary = entropy_summary(table)
    record: dict[str, Any] = {
        "model": model.spec,
        "starts": n_prompts,
        "forks": n_forks,
        "taus": taus,
        "conditional": conditional,
        "generations": len(plan),
        "seed": seed,
        "settings": {
            "num_inference_steps": cfg.num_inference_steps,
            "guidance_scale": cfg.guidance_scale,
            "eta": eta,
            "sampler": model.capabilities.sampler,
        },
        "timesteps": [all_t[t] for t in taus] if all_t else [],
        "entropy": "plug-in (maximum-likelihood) entropy of the oracle's readings across the forks of one start, "
        "bits; mean over starts with a 95% bootstrap CI",
        "max_bits": {f: float(np.log2(min(n_forks, k))) for f, k in zip(FACTORS, sizes)},
        "threshold_bits": COMMIT_BITS,
        "fraction": COMMIT_FRACTION,
        "summary": summary.drop(columns=["model"]).to_dict(orient="records"),
        "commitment": commitment_times(summary, COMMIT_BITS),
        "commitment_relative": commitment_times(summary, fraction=COMMIT_FRACTION),
        "oracle_confidence": dict(zip(FACTORS, [float(v) for v in reading_conf.mean(0)])),
        "generate_seconds": gen_seconds,
        "seconds_per_generation": gen_seconds / len(plan),
        "max_batch": batch,
    }
    if factors is not None:
        agree = reading_pred == np.asarray(factors)[plan["prompt"].to_numpy()]
        record["prompt_agreement"] = {f: float(agree[:, j].mean()) for j, f in enumerate(FACTORS)}
    return table, record


# -- the experiment: settings -> run -> Result ---------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """A probe grid and / or forking study. Probes (``probes``): ``n`` samples (seeds ``seed`` on), unconditional
    unless ``conditional`` (held-out Shapes prompts), labelled by the Shapes oracle, or by the user's ``labels`` CSV
    (:func:`labels_from_csv`; its prompts are the samples, ``n`` is unused) on models the oracle does not read;
    ``layers``: globs (None: every layer); ``project_layers``: a random projection of each layer's whole map instead
    of its spatial mean. Forking (``forks`` continuations per start, 0: none): ``fork_prompts`` starts forked at each
    step of ``taus`` (None: every step but the last) with DDIM ``eta``. Generation: ``steps`` (None: the model's),
    ``max_batch`` (rows per generation, None: the default) and ``generation`` (other keywords for ``generate``)."""

    n: int = 320
    seed: int = 0
    steps: int | None = None
    layers: tuple[str, ...] | str | None = None
    conditional: bool = False
    project_layers: bool = False
    probes: bool = True
    labels: str | None = None
    forks: int = 0
    fork_prompts: int = 12
    taus: tuple[int, ...] | None = None
    eta: float = 1.0
    max_batch: int | None = None
    generation: dict[str, Any] = field(default_factory=dict)


def _check(model: "Generator", st: Settings, gen_kw: dict[str, Any]) -> None:
    """Every settings error this run can tell before generating (one ConfigError, one sentence)."""
    check_int(st.n, "n (samples)", minimum=1)
    check_seeds([st.seed, st.seed + max(st.n, st.fork_prompts) - 1], "seed (the samples take seed, seed + 1, ...)")
    check_int(st.steps, "steps (denoising steps)", minimum=1, maximum=MAX_STEPS, optional=True)
    check_int(st.max_batch, "max_batch (rows per generation)", minimum=1, optional=True)
    check_int(st.forks, "forks (continuations per start; 0: no forking)", minimum=0)
    check_int(st.fork_prompts, "fork_prompts (starts)", minimum=1)
    check_float(st.eta, "eta (DDIM noise scale)", minimum=0.0, maximum=1.0)
    if not st.probes and not st.forks:
        raise ConfigError("nothing to do: --no-probes needs --forks N (the probe grid and forking are both off)")
    caps = model.capabilities
    if not caps.iterative:
        raise ConfigError(f"{model.spec} generates in one pass: the probe grid and forking need a denoising model")
    shapes = caps.oracle == "shapes"
    if st.forks and not shapes:
        raise ConfigError(
            f"forking reads each ending with the Shapes oracle, which does not read "
            f"{model.spec}'s images: it needs a zoo model"
        )
    if st.probes and st.labels is None:
        if not shapes:
            raise ConfigError(
                f"the Shapes oracle does not read {model.spec}'s images, so its samples have no labels: "
                "give --labels CSV (a 'prompt' column and one column per factor)"
            )
        if st.n < MIN_SAMPLES:
            raise ConfigError(f"the probe grid needs at least {MIN_SAMPLES} samples (--n), got {st.n}")
    if st.probes and st.labels is not None:
        if not Path(st.labels).is_file():
            raise ConfigError(f"the labels CSV {st.labels} does not exist")
        rows = len(labels_from_csv(st.labels)[0])
        if rows < MIN_SAMPLES:
            raise ConfigError(f"the probe grid needs at least {MIN_SAMPLES} samples, and {st.labels} has {rows} rows")
    if st.forks:
        if st.forks < 2 or st.fork_prompts < 1:
            raise ConfigError(f"forking needs at least 1 start and 2 forks, got {st.fork_prompts} and {st.forks}")
        if not caps.forkable:
            raise ConfigError(f"{model.spec} cannot fork a generation at a step, which forking needs")
        steps = model.num_steps(model.config(eta=st.eta, **gen_kw))
        if steps < 2:
            raise ConfigError(f"{model.spec}: forking needs a denoising model with at least 2 steps, got {steps}")
        bad = [t for t in st.taus or () if not 0 <= int(t) < steps]
        if bad:
            raise ConfigError(f"fork steps (taus) must be in 0..{steps - 1} for {steps} steps, got {bad}")


def plan(model: "Generator", settings: Settings) -> StudyPlan:
    """What :func:`run` will generate on ``model`` (``--dry-run``); nothing is generated. The probe samples in
    batches, every layer pooled and ``x_t`` whole captured at every step (streamed to a temporary store when over
    the capture's memory budget), then the fork starts x taus x forks continuations in chunks of whole starts."""
    st = settings
    gen_kw = generation_kwargs(st.steps, None, st.generation)
    _check(model, st, gen_kw)
    rows: list[Generations] = []
    if st.probes:
        n = len(labels_from_csv(st.labels)[0]) if st.labels is not None else st.n
        kw = dict(gen_kw)
        if st.labels is None and not st.conditional:
            kw.setdefault("guidance_scale", 1.0)
        cfg = model.config(**kw)
        lmap = model.layer_map(cfg.height, cfg.width)
        names = [e.name for e in lmap.layers] if st.layers is None else [e.name for e in lmap.select(st.layers)]
        base = baseline_layer(lmap)
        cap = Capture(
            names + ([base] if base else []),
            branches=["cond"],
            pooled=True,
            unpooled=([base] if base else []) + (names if st.project_layers else []),
        )
        size = st.max_batch or model.default_max_batch
        calls = -(-n // size)
        held = capture_bytes(model, cap, min(n, size), **kw)
        steps = model.num_steps(cfg)
        item = 4  # features are kept as float32 cells until the Result is saved
        per_sample = steps * (sum(_width(lmap[x], st.project_layers) for x in names) + (128 if base else 0))
        kept = n * item * per_sample + 4 * image_bytes(model, n, **kw)
        rows.append(
            Generations(
                f"probe samples ({len(names)} layers{' + ' + base if base else ''}, every step)",
                calls,
                n,
                min(n, size),
                steps,
                len(model.branch_labels(cfg)),
                held,
                kept,
                streamed=held > cap.budget_bytes,
            )
        )
    if st.forks:
        kw = dict(gen_kw) if st.conditional else {"guidance_scale": 1.0, **gen_kw}
        cfg = model.config(eta=st.eta, **kw)
        steps = model.num_steps(cfg)
        taus = list(range(steps - 1)) if st.taus is None else sorted({int(x) for x in st.taus})
        total = st.fork_prompts * st.forks * len(taus)
        batch = st.max_batch or st.forks * max(1, model.default_max_batch * 2 // st.forks)
        batch = max(st.forks, batch - batch % st.forks)
        rows.append(
            Generations(
                f"forks ({st.fork_prompts} starts x {len(taus)} taus x {st.forks})",
                -(-total // batch),
                total,
                min(batch, total),
                steps,
                len(model.branch_labels(cfg)),
            )
        )
    weights, row = model_bytes(model)
    return StudyPlan(NAME, model.spec, rows, weights, row)


def _width(e: Any, projected: bool) -> int:
    """Values per sample and step of a probed layer: its channels (spatial mean) or the projection's 128."""
    if projected:
        return min(128, int(np.prod(e.shape)))
    return int(np.prod([s for s, d in zip(e.shape, e.dims) if d not in ("h", "w", "token")]))


def run(
    model: "Generator",
    settings: Settings,
    out: str | Path | None = None,
    progress: ProgressArg = None,
    executor: Executor | None = None,
) -> Result:
    """The probe grid (:func:`run_probes`, or :func:`run_probes_csv` with ``labels``) and then forking
    (:func:`run_forking`, with ``forks``) on a loaded model, after checking the settings against the model's
    capabilities. Tables ``probes`` / ``forks``; the record holds ``model``, ``settings`` and the probe and forking
    records (``"probes"``, ``"forking"``). ``out``: the folder the Result is saved in; each batch of probe samples
    and of fork starts is kept there as a cell until the Result is saved, so a rerun resumes at what is missing.
    ``executor``: where those cells are computed (:mod:`.executor`); the tables are the same either way."""
    st = settings
    gen_kw = generation_kwargs(st.steps, None, st.generation)
    _check(model, st, gen_kw)
    layers = list(st.layers) if isinstance(st.layers, (tuple, list)) else st.layers
    with open_workspace(out, NAME, [model.spec], st, keep_cells=False) as ws:
        finished = ws.finished()
        if finished is not None:
            return finished
        tables: dict[str, pd.DataFrame] = {}
        record: dict[str, Any] = {"model": model.spec, "settings": settings_dict(st), "notes": []}
        if st.probes and st.labels is None:
            tables[PROBES], record["probes"] = run_probes(
                model,
                n=st.n,
                seed=st.seed,
                layers=layers,
                conditional=st.conditional,
                project_layers=st.project_layers,
                max_batch=st.max_batch,
                progress=progress,
                cells=ws,
                executor=executor,
                **gen_kw,
            )
        elif st.probes and st.labels is not None:
            tables[PROBES], record["probes"] = run_probes_csv(
                model,
                st.labels,
                seed=st.seed,
                layers=layers,
                project_layers=st.project_layers,
                max_batch=st.max_batch,
                progress=progress,
                cells=ws,
                executor=executor,
                **gen_kw,
            )
        if st.forks:
            tables[FORKS], record["forking"] = run_forking(
                model,
                st.fork_prompts,
                st.forks,
                list(st.taus) if st.taus is not None else None,
                seed=st.seed,
                conditional=st.conditional,
                eta=st.eta,
                max_batch=st.max_batch,
                progress=progress,
                cells=ws,
                executor=executor,
                **gen_kw,
            )
        return ws.save(Result(NAME, tables, record))


#: the main job's settings: the probe grid, then forking (fork_prompts unconditional starts x forks continuations at
#: every tau, DDIM eta=1), at the probes' steps, on each of MAIN_MODELS
MAIN_MODELS = ("zoo:unet", "zoo:dit", "zoo:ldm")
FULL = Settings(n=320, steps=10, forks=8, fork_prompts=6, taus=tuple(range(9)))
QUICK = Settings(n=64, steps=4, forks=4, fork_prompts=3, taus=(0, 1, 2))
#: zoo:ldm at its injection study's 6 steps (a fork at every step but the last), fewer starts: the 10-minute budget
LDM_FULL = Settings(n=320, steps=6, forks=8, fork_prompts=6, taus=tuple(range(5)))
#: zoo:ldm: the layers of its injection study (its blocks, the bottleneck's and decoder's attention, PnP's
#: up_blocks.1.resnets.1), not all 53
LDM_LAYERS = tuple(name for name in injection.LDM_LAYERS if not name.startswith(("skip.", "noise", "text_")))


#: per model: the layers probed (None: every layer)
MAIN_LAYERS: dict[str, tuple[str, ...] | None] = {"zoo:unet": None, "zoo:dit": None, "zoo:ldm": LDM_LAYERS}


#: per model: the full settings where they are not FULL
MAIN_FULL: dict[str, Settings] = {"zoo:ldm": LDM_FULL}


def main_job(quick: bool = False) -> list[Job]:
    """The probe grid and forking entropy on the zoo's diffusion models (unconditional samples, oracle labels)."""
    return [
        Job(spec, dataclasses.replace(QUICK if quick else MAIN_FULL.get(spec, FULL), layers=MAIN_LAYERS[spec]))
        for spec in MAIN_MODELS
    ]
