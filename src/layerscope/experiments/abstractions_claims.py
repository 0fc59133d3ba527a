"""The abstractions study's claim (Corallo et al. 2024) and its specification curve, from a saved Result.

Corallo et al. (2024) find that the factors of large spatial extent (wall and floor hue; with shape and object hue in
their list) emerge earlier in diffusion time than scale and orientation. The experiment reads this twice: when linear
probes on the layers' features can read each factor (:func:`~layerscope.experiments.abstractions.relative_onsets`,
half-way from chance to the top) and when the generation commits to it (forking entropy at or below
:data:`~layerscope.experiments.abstractions.COMMIT_BITS`). This module re-derives the order from the saved probe and
fork tables at every combination of the choices below, fixed in code before any result was looked at.

Choices (the shipped one first):

- ``method`` / ``readout`` / ``criterion`` / ``level`` (:data:`CRITERIA`): the probes' held-out ``accuracy``
  reaching a ``relative`` share of the way from chance to its top (0.25, 0.5, 0.75) or an ``absolute`` accuracy
  (0.8, 0.9, 0.95), the probes' MI bound reaching a ``relative`` share of its top, the forks' mean entropy staying
  at or below ``bits`` (0.25, 0.5, 1.0) or a ``fraction`` of its first value (0.25, 0.5, 0.75);
- ``early`` (:data:`EARLY_SETS`): which factors must come first: the ``background`` (wall and floor hue, the largest
  extent) or the paper's list (``corallo``: shape, wall, floor and object hue); the late ones are scale and
  orientation (:data:`LATE`).

Probe kinds: the main job fits one kind (pooled features); a result with several would add them as a choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..stats.speccurve import check_curve, curve_from_rows, spec_string
from . import abstractions as ab
from .base import Result

#: (method, readout, criterion, level) of every way to time a factor, fixed before any result was looked at; the
#: shipped one first (forking, as the section's forking sentence decides the order)
CRITERIA: tuple[tuple[str, str, str, float], ...] = (
    ("forks", "entropy", "bits", ab.COMMIT_BITS),
    ("forks", "entropy", "bits", 0.25),
    ("forks", "entropy", "bits", 1.0),
    ("forks", "entropy", "fraction", ab.COMMIT_FRACTION),
    ("forks", "entropy", "fraction", 0.25),
    ("forks", "entropy", "fraction", 0.75),
    ("probe", "accuracy", "relative", 0.5),
    ("probe", "accuracy", "relative", 0.25),
    ("probe", "accuracy", "relative", 0.75),
    ("probe", "accuracy", "absolute", 0.9),
    ("probe", "accuracy", "absolute", 0.8),
    ("probe", "accuracy", "absolute", 0.95),
    ("probe", "mi_bound", "relative", 0.5),
    ("probe", "mi_bound", "relative", 0.25),
    ("probe", "mi_bound", "relative", 0.75),
)
EARLY_SETS: dict[str, tuple[str, ...]] = {
    "corallo": ("shape", "wall_hue", "floor_hue", "object_hue"),
    "background": ("wall_hue", "floor_hue"),
}
LATE = ("scale", "orientation")
SHIPPED: dict[str, dict[str, str]] = {
    "abstractions.extent_order": {
        "method": "forks", "readout": "entropy", "criterion": "bits", "level": "0.5", "early": "corallo",
    },
}  # fmt: skip

CLAIMS: dict[str, dict[str, Any]] = {
    "abstractions.extent_order": {
        "text": "Factors of large spatial extent (wall and floor hue; shape and object hue in the paper's list) "
        "emerge and commit earlier in diffusion time than scale and orientation.",
        "paper": "Corallo et al. 2024, Sec. 5",
        "measured": "probe onsets and forking-entropy commitment per factor; statistic: steps by which the first of "
        "scale/orientation follows the last early factor",
        "shipped": SHIPPED["abstractions.extent_order"],
    },
}

CLAIM = "abstractions.extent_order"
Times = dict[str, float]  # factor -> step or tau (never: one past the last)
Timed = tuple[Times, Times | None, Times | None]  # times, earliest, latest


def _times(hits: dict[str, Any], never: float) -> Times:
    """Per factor its step (an onset dict or a commitment int; None: never, as ``never``)."""
    out: Times = {}
    for f, h in hits.items():
        if h is None:
            out[f] = never
        elif isinstance(h, dict):
            out[f] = float(h["step"])
        else:
            out[f] = float(h)
    return out


def _probe_times(table: pd.DataFrame, record: dict[str, Any], readout: str, criterion: str, level: float) -> Timed:
    """(times, earliest, latest) per factor from a probe table; the bounds are None where no interval applies."""
    exclude = ab.baseline_of(record)
    never = float(max(record["steps"])) + 1
    lo = hi = None
    if criterion == "absolute":
        t = _times(ab.readable_onsets(table, level, exclude=exclude), never)
        if {"accuracy_low", "accuracy_high"} <= set(table["metric"]):  # the best cells' 95% bands
            lo = _times(ab.readable_onsets(table, level, metric="accuracy_high", exclude=exclude), never)
            hi = _times(ab.readable_onsets(table, level, metric="accuracy_low", exclude=exclude), never)
        return t, lo, hi
    if readout == "accuracy":
        t = _times(ab.relative_onsets(table, record["chance"], level, exclude=exclude), never)
        ci = record.get("onset_ci") or {}
        if level == 0.5 and ci:  # the experiment's own bootstrap interval of the half-way step
            lo = {f: (never if not np.isfinite(v[0]) else float(v[0])) for f, v in ci.items()}
            hi = {f: (never if not np.isfinite(v[1]) else float(v[1])) for f, v in ci.items()}
        return t, lo, hi
    mi = table[table["metric"] == "mi_bound"].assign(metric="accuracy")  # from 0 bits to the top
    zero = {f: 0.0 for f in set(mi["factor"])}
    return _times(ab.relative_onsets(mi, zero, level, exclude=exclude), never), None, None


def _fork_times(forks: pd.DataFrame, record: dict[str, Any], criterion: str, level: float) -> Timed:
    """(times, earliest, latest) per factor from a fork table; bounds (the entropy's 95% band) for ``bits``."""
    summary = ab.entropy_summary(forks)
    never = float(max(record["taus"])) + 1
    if criterion == "fraction":
        return _times(ab.commitment_times(summary, fraction=level), never), None, None
    t = _times(ab.commitment_times(summary, level), never)
    lo = _times(ab.commitment_times(summary.assign(entropy=summary["low"]), level), never)
    hi = _times(ab.commitment_times(summary.assign(entropy=summary["high"]), level), never)
    return t, lo, hi


def lead(times: Times, early: tuple[str, ...]) -> float:
    """Steps by which the first late factor (:data:`LATE`) follows the last ``early`` factor: > 0 the paper's
    order, 0 a tie, < 0 a late factor first."""
    return min(times[f] for f in LATE) - max(times[f] for f in early)


def _verdict(value: float) -> str:
    return "supports" if value > 0 else "contradicts" if value < 0 else "undecided"


def claims_curve(result: Result, *, subject: str | None = None, control: str = "") -> pd.DataFrame:
    """The specification curve of :data:`CLAIMS` on one saved abstractions Result (schema:
    :mod:`layerscope.stats.speccurve`): one row per way of timing the factors (:data:`CRITERIA` whose table the
    Result holds) x early set. ``subject``: default the Result's model; ``control``: the control's label for a
    control's Result.

    Verdict: the sign of :func:`lead` (supports when every early factor comes strictly before scale and orientation,
    contradicts when a late one comes strictly before the last early one, undecided at a tie; a factor never reached
    counts as one step past the last). Interval: from each factor's interval (forks at ``bits``: the commitment
    times of the entropy's 95% band; probes at ``absolute``: of the best cells' 95% accuracy bands; the half-way
    step: the experiment's bootstrap interval), the widest lead they allow; NaN elsewhere. Probe grids on a user's
    labels (not the Shapes factors) take no part."""
    subject = subject or str(result.record["model"])
    probes, forks = result.tables.get(ab.PROBES), result.tables.get(ab.FORKS)
    precord, frecord = result.record.get("probes"), result.record.get("forking")
    needed = set(LATE) | {f for fs in EARLY_SETS.values() for f in fs}
    rows: list[dict[str, Any]] = []
    for method, readout, criterion, level in CRITERIA:
        if method == "probe":
            if probes is None or precord is None or precord.get("labels") is not None:
                continue
            if not needed <= set(probes["factor"]):
                continue
            times, lo, hi = _probe_times(probes, precord, readout, criterion, level)
            n = f"{precord['samples']} samples"
        else:
            if forks is None or frecord is None:
                continue
            times, lo, hi = _fork_times(forks, frecord, criterion, level)
            n = f"{frecord['starts']} starts x {frecord['forks']} forks"
        unit = "steps" if method == "probe" else "taus"
        for early_name, early in EARLY_SETS.items():
            value = lead(times, early)
            if lo is not None and hi is not None:
                ci = (min(lo[f] for f in LATE) - max(hi[f] for f in early),
                      min(hi[f] for f in LATE) - max(lo[f] for f in early))  # fmt: skip
            else:
                ci = (np.nan, np.nan)
            spec = {"method": method, "readout": readout, "criterion": criterion, "level": level, "early": early_name}
            rows.append(
                {
                    "claim": CLAIM,
                    "subject": subject,
                    "control": control,
                    "spec": spec_string(spec),
                    "verdict": _verdict(value),
                    "statistic": f"{unit} from the last early factor to the first of scale/orientation ({n})",
                    "value": float(value),
                    "ci_low": float(ci[0]),
                    "ci_high": float(ci[1]),
                }
            )
    return check_curve(curve_from_rows(rows))
