"""The alignment study's descriptive tables (every measure, models only or every feature set): layer x layer and
step x step within a model, layer x layer across two models at matched steps, each layer against the world's
references, and the layers themselves. The verdicts are in :mod:`.alignment_analysis`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..metrics.alignment import kernel_similarity
from .alignment_analysis import _step_of

if TYPE_CHECKING:  # pragma: no cover
    from .alignment import ModelFeatures

__all__ = ["across_table", "layers_table", "within_table", "world_table"]


def _sim(a: list[torch.Tensor], b: list[torch.Tensor] | None, metric: str, k: int) -> np.ndarray:
    return kernel_similarity(torch.stack(a), None if b is None else torch.stack(b), metric, k).numpy()


def _view_steps(f: ModelFeatures) -> list[int]:
    """The steps of the layer x layer views: the first, middle and last."""
    return sorted({f.steps[0], f.steps[len(f.steps) // 2], f.steps[-1]})


def within_table(f: ModelFeatures, metrics: Sequence[str], k: int) -> pd.DataFrame:
    """Layer x layer at the first, middle and last step, and step x step for each layer, of one model."""
    rows = []
    for metric in metrics:
        for s in _view_steps(f):
            m = _sim([f.grams[(name, s, "full")] for name in f.layers], None, metric, k)
            for i, la in enumerate(f.layers):
                for j, lb in enumerate(f.layers):
                    rows.append((f.spec, metric, "layers", la, s, lb, s, m[i, j]))
        if len(f.steps) > 1:
            for name in f.layers:
                m = _sim([f.grams[(name, s, "full")] for s in f.steps], None, metric, k)
                for i, sa in enumerate(f.steps):
                    for j, sb in enumerate(f.steps):
                        rows.append((f.spec, metric, "steps", name, sa, name, sb, m[i, j]))
    return pd.DataFrame(rows, columns=["model", "metric", "view", "layer_a", "step_a", "layer_b", "step_b", "value"])


def world_table(f: ModelFeatures, refs: dict[str, torch.Tensor], metrics: Sequence[str], k: int) -> pd.DataFrame:
    """Each layer x step of one feature set against each world reference."""
    keys = [(name, s) for name in f.layers for s in f.steps]
    names = list(refs)
    ref_grams = [refs[r] @ refs[r].T for r in names]
    rows = []
    for metric in metrics:
        m = _sim([f.grams[(name, s, "full")] for name, s in keys], ref_grams, metric, k)
        for i, (layer, s) in enumerate(keys):
            for j, ref in enumerate(names):
                rows.append((f.spec, f.control, layer, f.layers.index(layer), f.depth(layer), s, ref, metric, m[i, j]))
    return pd.DataFrame(
        rows, columns=["model", "control", "layer", "layer_index", "depth", "step", "reference", "metric", "value"]
    )


def across_table(
    fa: ModelFeatures, fb: ModelFeatures, metrics: Sequence[str], k: int, grid: list[float], best
) -> pd.DataFrame:
    """Layer x layer of two models at the first, middle and last step of the grid (matched by noise level) and at
    their best steps (``step = -1``)."""
    rows = []
    levels = sorted({0, len(grid) // 2, len(grid) - 1})
    plans = [
        (lv, {n: _step_of(fa, lv, grid) for n in fa.layers}, {n: _step_of(fb, lv, grid) for n in fb.layers})
        for lv in levels
    ]
    plans.append(
        (-1, {**{n: fa.steps[-1] for n in fa.layers}, **best[0]}, {**{n: fb.steps[-1] for n in fb.layers}, **best[1]})
    )
    for metric in metrics:
        for s, sa, sb in plans:
            m = _sim(
                [fa.grams[(n, sa[n], "full")] for n in fa.layers],
                [fb.grams[(n, sb[n], "full")] for n in fb.layers],
                metric,
                k,
            )
            for i, la in enumerate(fa.layers):
                for j, lb in enumerate(fb.layers):
                    rows.append((fa.spec, fb.spec, metric, s, la, fa.depth(la), lb, fb.depth(lb), m[i, j]))
    return pd.DataFrame(
        rows, columns=["model_a", "model_b", "metric", "step", "layer_a", "depth_a", "layer_b", "depth_b", "value"]
    )


def layers_table(f: ModelFeatures) -> pd.DataFrame:
    ts = dict(zip(f.steps, f.timesteps))
    return pd.DataFrame(
        [
            {
                "model": f.spec,
                "control": f.control,
                "layer": name,
                "layer_index": i,
                "role": f.roles.get(name, "layer"),
                "analysed": name in f.analysed(),
                "duplicate_of": f.duplicates.get(name, ""),
                "depth": f.depth(name),
                "image_distance": f.distance.get(name, np.nan),
                "step": s,
                "timestep": ts.get(s, np.nan),
            }
            for i, name in enumerate(f.layers)
            for s in f.steps
        ]
    )
