"""Latent abstractions over diffusion time (Corallo et al. 2024): when does each factor become linearly readable?

Generation as non-linear filtering: unobservable latent factors steer the observable generative path. The probe
grid asks, for every layer x denoising step (and for the noisy sample ``x_t`` itself, the baseline), how well a
linear probe on the model's features reads each factor of the image the generation ends in, and bounds the mutual
information between factor and features by ``I(Y; Z) >= H(Y) - CE`` (bits; :mod:`.probes`).

Features (:func:`collect_features`): layers are captured pooled (spatial / token mean) from the CFG-conditional
branch; ``x_t`` is captured whole in the same generation (``Capture(unpooled=...)``) and reduced by a fixed
Gaussian random projection (seeded), since its spatial mean is only a mean colour. Labels: for the Shapes world, the oracle's reading of each final image
(:func:`shapes_labels`); for any other pipeline, the user's own labels per prompt (:func:`labels_from_csv`).

On the zoo the samples are drawn **unconditionally** (empty prompt, no guidance; the zoo models were trained with
10% prompt dropout): with a prompt, every cross-attention layer would carry the prompt's factors from the first step
on, and the grid would only show that the text is read, not when the process commits.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..engine.progress import ProgressArg
from ..engine.spec import Capture
from ..errors import ConfigError
from .probes import ProbeGrid, fit_probe_grid

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import Generator

BASELINE = "x_t"
TABLE = "probes.parquet"


@dataclass
class Features:
    """Per (layer, step) features (n, d), the layer order, the steps and their scheduler timesteps, final images."""

    cells: dict[tuple[str, int], torch.Tensor]
    layers: list[str]
    steps: list[int]
    timesteps: list[float]
    images: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)


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
    max_batch: int | None = None,
    progress: ProgressArg = None,
    **gen_kwargs: Any,
) -> Features:
    """Capture pooled features of ``layers`` (default: every layer) at ``steps`` (default: all), conditional branch,
    and the ``x_t`` baseline (captured whole in the same generation, then randomly projected to ``projection`` dims)."""
    cfg = model.config(**gen_kwargs)
    if model.num_steps(cfg) == 0:
        raise ConfigError(f"{model.spec} generates in one pass: the probe grid needs a denoising model")
    lmap = model.layer_map(cfg.height, cfg.width)
    names = [e.name for e in lmap.layers] if layers is None else [e.name for e in lmap.select(layers)]
    # one generation: layers pooled, x_t whole (its spatial mean is only a mean colour) for the projection
    cap = Capture(names + ([BASELINE] if baseline else []), steps=steps, branches=["cond"], pooled=True,
                  unpooled=[BASELINE])
    res = model.generate(list(prompts), list(seeds), capture=cap, max_batch=max_batch, progress=progress,
                         **gen_kwargs)
    step_ids = [int(s) for s in res.capture.steps_of(names[0])]
    cells = {(name, s): res.capture[name][:, k, 0].float() for name in names for k, s in enumerate(step_ids)}
    order = list(names)
    if baseline:
        arr = res.capture[BASELINE][:, :, 0].float().flatten(2)  # (n, step, d_full)
        proj = _projection(arr.shape[-1], min(projection, arr.shape[-1]))
        for k, s in enumerate(step_ids):
            cells[(BASELINE, s)] = arr[:, k] @ proj
        order = [BASELINE] + order
    all_t = [float(t) for t in res.timesteps]
    return Features(cells, order, step_ids, [all_t[s] for s in step_ids] if all_t else [], res.images,
                    {"projection": projection if baseline else None, "settings": {
                        "num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale}})


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


def probe_table(grid: ProbeGrid, feats: Features, model: str) -> pd.DataFrame:
    """The grid as a tidy table: model, layer, layer_index, step, timestep, factor, metric, value."""
    t = grid.to_frame()
    layer_index = {name: i for i, name in enumerate(feats.layers)}
    tsteps = dict(zip(feats.steps, feats.timesteps))
    t["layer"] = [c[0] for c in t["cell"]]
    t["step"] = [int(c[1]) for c in t["cell"]]
    t["layer_index"] = t["layer"].map(layer_index)
    t["timestep"] = t["step"].map(tsteps)
    t.insert(0, "model", model)
    return t.drop(columns=["cell"])[["model", "layer", "layer_index", "step", "timestep", "factor", "metric",
                                     "value"]]


def run_probes(model: "Generator | str", n: int = 320, *, seed: int = 0, steps: Any = None, layers: Any = None,
               conditional: bool = False, progress: ProgressArg = None, **gen_kwargs: Any
               ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The probe grid on a Shapes-world model: ``n`` samples (unconditional unless ``conditional``: then held-out
    prompts), labels read by the oracle, every layer x step plus the ``x_t`` baseline. Returns the tidy table and a
    record (entropies, chance levels, oracle confidence, solver convergence, timing)."""
    from ..world.factors import FACTORS, SIZES, sample_factors
    from ..world.text import prompts_for

    if isinstance(model, str):
        from ..specs import load

        model = load(model)
    if conditional:
        prompts = prompts_for(sample_factors(n, seed + 101, split="test"))
    else:
        prompts = [""] * n
        gen_kwargs.setdefault("guidance_scale", 1.0)
    seeds = list(range(seed, seed + n))
    feats = collect_features(model, prompts, seeds, layers=layers, steps=steps, progress=progress, **gen_kwargs)
    labels, conf = shapes_labels(feats.images)
    grid = fit_probe_grid(feats.cells, labels, n_classes=[SIZES[f] for f in FACTORS], factor_names=list(FACTORS),
                          seed=seed)
    table = probe_table(grid, feats, model.spec)
    record = {"samples": n, "conditional": conditional, "settings": feats.meta["settings"],
              "projection": feats.meta["projection"], "steps": feats.steps, "timesteps": feats.timesteps,
              "layers": feats.layers,
              "entropy_bits": dict(zip(FACTORS, [float(v) for v in grid.entropy])),
              "chance": dict(zip(FACTORS, [float(v) for v in grid.chance])),
              "oracle_confidence": dict(zip(FACTORS, [float(v) for v in conf.mean(0)])),
              "in_distribution": float((conf >= 0.9).all(1).mean()),
              "fit_seconds": float(grid.seconds)}
    return table, record


def readable_onsets(table: pd.DataFrame, threshold: float = 0.9, metric: str = "accuracy",
                    exclude: Sequence[str] = (BASELINE,)) -> dict[str, dict[str, Any]]:
    """Per factor, the first step at which some layer's held-out ``metric`` reaches ``threshold`` (best layer)."""
    t = table[(table["metric"] == metric) & ~table["layer"].isin(exclude)]
    out: dict[str, dict[str, Any]] = {}
    for f, sub in t.groupby("factor", sort=False):
        best = sub.loc[sub.groupby("step")["value"].idxmax()].sort_values("step")
        hit = best[best["value"] >= threshold]
        out[f] = ({"step": int(hit["step"].iloc[0]), "layer": str(hit["layer"].iloc[0]),
                   "value": float(hit["value"].iloc[0])} if len(hit) else None)
    return out


def run_probes_csv(model: "Generator | str", labels_csv: str | Path, *, seed: int = 0, steps: Any = None,
                   layers: Any = None, progress: ProgressArg = None, **gen_kwargs: Any
                   ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The probe grid on any text-to-image pipeline with the user's labels (:func:`labels_from_csv`): each prompt is
    generated once (seed ``seed + row``) and its features are probed for the CSV's label columns."""
    if isinstance(model, str):
        from ..specs import load

        model = load(model)
    prompts, labels, factors, sizes = labels_from_csv(labels_csv)
    seeds = list(range(seed, seed + len(prompts)))
    feats = collect_features(model, prompts, seeds, layers=layers, steps=steps, progress=progress, **gen_kwargs)
    grid = fit_probe_grid(feats.cells, labels, n_classes=sizes, factor_names=factors, seed=seed)
    table = probe_table(grid, feats, model.spec)
    record = {"samples": len(prompts), "conditional": True, "labels": str(labels_csv),
              "settings": feats.meta["settings"], "projection": feats.meta["projection"], "steps": feats.steps,
              "timesteps": feats.timesteps, "layers": feats.layers,
              "entropy_bits": dict(zip(factors, [float(v) for v in grid.entropy])),
              "chance": dict(zip(factors, [float(v) for v in grid.chance])),
              "fit_seconds": float(grid.seconds)}
    return table, record


def relative_onsets(table: pd.DataFrame, chance: dict[str, float], frac: float = 0.5,
                    exclude: Sequence[str] = (BASELINE,)) -> dict[str, dict[str, Any] | None]:
    """Per factor, the first step at which the best layer's held-out accuracy has come ``frac`` of the way from
    chance to its highest value over all steps (None when it never rises above chance).

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
        out[f] = {"step": int(hit["step"].iloc[0]), "layer": str(hit["layer"].iloc[0]),
                  "value": float(hit["value"].iloc[0]), "level": level, "top": top}
    return out
