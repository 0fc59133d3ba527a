"""The injection study's claims (Schaerf 2025, Fig. 5) and their specification curve, from a saved Result.

Schaerf (2025) reports that in every diffusion model one or more layers compose the image's *structure*, one or more
its *content* and one or more its *surface* details and colours, and that where they sit differs by architecture:
Stable Diffusion 1.4 has its content layers after its surface layers, most other models have content first. The
injection experiment decides these with one analysis choice (:func:`layerscope.experiments.injection.label`, both
thresholds 0.2, the transfer share, every pair, all steps). This module re-derives the verdicts from the saved
per-pair table at every combination of the choices below, which were fixed in code before any result was looked at.

Choices (the shipped one first in each; a spec names every choice that applies):

- ``inert``: a layer is inert when no group's share reaches this (:data:`INERT_LEVELS`);
- ``margin``: a layer is specialised when its strongest group leads the second by this (:data:`MARGIN_LEVELS`);
- ``measure``: the group score per pair, ``transfer`` (C shows E's value) or ``moved`` (1 - keep: C no longer shows
  O's value, whatever it shows) (:data:`MEASURES`); image-scored sweeps have the one measure of
  :func:`~layerscope.experiments.injection.specialize`, also named ``transfer`` there (the share of the O-to-E gap
  closed, from medians over pairs);
- ``pairs``: every pair, or one of two disjoint halves of the pairs (a seeded random split) (:data:`PAIR_SUBSETS`);
- ``window``: each step window the sweep holds; ``protocol``: how the pairs were made (``full`` prompts differing in
  every factor, or ``partial`` prompts), a property of the Result, so a model swept under both protocols has both in
  its curve; ``scorer``: the sweep's scorer (``oracle`` or ``images``), likewise;
- ``sets`` (roles claim): whether the candidate spaces swept beside the layers (noise, text embeddings, skips) count
  as layers (``layers+spaces``, as the section's findings count them) or not (``layers``);
- ``position`` (order claim): a role's place in forward order is its ``first`` labelled layer or the ``median`` of
  its labelled layers (spaces have no forward place and take no part).
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Any

import numpy as np
import pandas as pd

from ..stats.speccurve import check_curve, curve_from_rows, spec_string
from . import injection as inj
from .base import Result

#: the choices' levels, fixed before any result was looked at (the shipped level first)
INERT_LEVELS = (inj.INERT_BELOW, 0.1, 0.3)
MARGIN_LEVELS = (inj.MARGIN, 0.1, 0.3)
MEASURES = ("transfer", "moved")
PAIR_SUBSETS = ("all", "half1", "half2")
SUBSET_SEED = 0  # the split of the pairs into two halves
SETS = ("layers+spaces", "layers")
POSITIONS = ("first", "median")
#: the shipped specification of each claim (choice -> level); a result without a choice's level has no shipped row
SHIPPED: dict[str, dict[str, str]] = {
    "injection.roles_split": {
        "inert": "0.2", "margin": "0.2", "measure": "transfer", "pairs": "all", "window": "all",
        "protocol": "full", "sets": "layers+spaces",
    },
    "injection.roles_order": {
        "inert": "0.2", "margin": "0.2", "measure": "transfer", "pairs": "all", "window": "all",
        "protocol": "full", "position": "first",
    },
}  # fmt: skip
#: the bootstrap of the shipped specification's statistic (pairs resampled)
N_BOOT, BOOT_SEED = 200, 0
ROLES = ("structure", "content", "surface")

CLAIMS: dict[str, dict[str, Any]] = {
    "injection.roles_split": {
        "text": "The layers of a diffusion model split into roles: at least one layer carries the structure, one the "
        "content and one the surface (colours) of the image.",
        "paper": "Schaerf 2025, Sec. 4 and Fig. 5",
        "measured": "injection sweep: per layer, the share of pairs whose factor groups move from E into O; "
        "statistic: roles (of 3) with at least one specialised layer",
        "shipped": SHIPPED["injection.roles_split"],
    },
    "injection.roles_order": {
        "text": "Where the roles sit depends on the architecture: in Stable Diffusion 1.4's layout the content layers "
        "come after the surface layers, in most other models content comes first.",
        "paper": "Schaerf 2025, Sec. 4",
        "measured": "injection sweep labels: forward position (normalised depth) of the content layers minus that "
        "of the surface layers, against the order reported for the model's layout",
        "shipped": SHIPPED["injection.roles_order"],
    },
}


#: what Schaerf reports of each layout: SD 1.4's content layers sit after its surface layers, most models' before
ORDERS = {"sd14": "surface first", "other": "content first"}


def layout(result: Result) -> str:
    """``"sd14"`` when the sweep holds a layer under every name of :data:`~.injection.SD14_ANCHORS` (a model built
    in Stable Diffusion 1.x's layout, whose published anchors it shares), else ``"other"``."""
    layers = list(result.record.get("layer_info", {}))
    covered = all(any(fnmatch.fnmatchcase(x, pattern) for x in layers) for pattern, _, _ in inj.SD14_ANCHORS)
    return "sd14" if covered else "other"


def protocol(result: Result) -> str:
    """How the sweep's pairs were made: ``partial`` prompts (``named``) or ``full`` prompts."""
    return "partial" if result.record.get("settings", {}).get("named") else "full"


def _subsets(obs: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Per level of :data:`PAIR_SUBSETS`, a 0/1 weight per observation (pair, seed): every pair, or one of two
    disjoint halves of the pairs (seeded split; left out with fewer than two pairs)."""
    pairs = sorted({p for p, _ in obs})
    out = {"all": np.ones(len(obs))}
    if len(pairs) >= 2:
        perm = np.random.default_rng(SUBSET_SEED).permutation(pairs)
        first = set(perm[: len(pairs) // 2].tolist())
        in_first = np.array([p in first for p, _ in obs], dtype=float)
        out["half1"], out["half2"] = in_first, 1.0 - in_first
    return {k: out[k] for k in PAIR_SUBSETS if k in out}


def _observations(
    table: pd.DataFrame, window: str, measure: str
) -> tuple[list[tuple[int, int]], list[str], np.ndarray]:
    """The oracle's group scores per observation: (pair, seed) keys, layers in sweep order, and an array
    (observation, layer, group in :data:`ROLES` order), NaN where the group's factors read alike in O and E."""
    t = table[table["window"] == window]
    g = inj.group_table(t)
    g = g[g["metric"] == ("transfer" if measure == "transfer" else "keep")]
    vals = g["value"] if measure == "transfer" else 1.0 - g["value"]
    g = g.assign(value=vals)
    layers = list(t.sort_values("layer_index", kind="stable")["layer"].drop_duplicates())
    obs = sorted({(int(p), int(s)) for p, s in zip(t["pair"], t["seed"])})
    o_idx = {o: i for i, o in enumerate(obs)}
    l_idx = {x: i for i, x in enumerate(layers)}
    arr = np.full((len(obs), len(layers), len(ROLES)), np.nan)
    for r in g.itertuples():
        if r.group in ROLES:
            arr[o_idx[(int(r.pair), int(r.seed))], l_idx[r.layer], ROLES.index(r.group)] = r.value
    return obs, layers, arr


def _weighted_means(arr: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per (weights row, layer, group): the weighted mean over observations, skipping NaN (all NaN: NaN).
    ``weights``: (k, observations) counts; returns (k, layer, group)."""
    ok = ~np.isnan(arr)
    v = np.where(ok, arr, 0.0)
    num = np.einsum("ko,olg->klg", weights, v)
    den = np.einsum("ko,olg->klg", weights, ok.astype(float))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def label_codes(scores: np.ndarray, inert: float, margin: float) -> np.ndarray:
    """:func:`~.injection.label` on an array of group scores (..., group in :data:`ROLES` order) at thresholds
    ``inert`` and ``margin``: codes 0..2 (the group of :data:`ROLES`), 3 (mixed) or 4 (inert)."""
    filled = np.where(np.isnan(scores), -np.inf, scores)
    order = np.argsort(-filled, axis=-1, kind="stable")
    top = np.take_along_axis(filled, order[..., :1], axis=-1)[..., 0]
    if scores.shape[-1] > 1:
        second = np.take_along_axis(filled, order[..., 1:2], axis=-1)[..., 0]
    else:
        second = np.full(top.shape, -np.inf)
    second = np.where(np.isfinite(second), second, 0.0)
    out = np.where(top - second >= margin, order[..., 0], 3)
    return np.where(~np.isfinite(top) | (top < inert), 4, out)


CODE_NAMES = (*ROLES, "mixed", "inert")


def _image_scores(table: pd.DataFrame, window: str, weights: np.ndarray, obs: list[tuple[int, int]]) -> np.ndarray:
    """Image-scored sweeps: per layer the group scores of :func:`~.injection.specialize` (the share of the O-to-E
    gap closed, from the medians over the weighted-in observations); (layer, group)."""
    t = table[table["window"] == window]
    keep = {o for o, w in zip(obs, weights) if w > 0}
    t = t[[(int(p), int(s)) in keep for p, s in zip(t["pair"], t["seed"])]]
    layers = list(t.sort_values("layer_index", kind="stable")["layer"].drop_duplicates())
    med = t.groupby(["layer", "metric"])["value"].median()
    out = np.full((len(layers), len(ROLES)), np.nan)
    for li, layer in enumerate(layers):
        for gi, g in enumerate(ROLES):
            closed = []
            for m in inj.IMAGE_GROUPS[g]:
                to_e, base = med.get((layer, f"{m}_to_E")), med.get((layer, f"{m}_baseline"))
                if to_e is not None and base is not None and base < 1:
                    closed.append(min(1.0, to_e / (1.0 - base)))
            out[li, gi] = float(np.mean(closed)) if closed else np.nan
    return out


def _image_layers(table: pd.DataFrame, window: str) -> tuple[list[tuple[int, int]], list[str]]:
    t = table[table["window"] == window]
    obs = sorted({(int(p), int(s)) for p, s in zip(t["pair"], t["seed"])})
    return obs, list(t.sort_values("layer_index", kind="stable")["layer"].drop_duplicates())


def _roles_found(codes: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per row of ``codes`` (..., layer): how many of the three roles have a labelled layer among ``keep``."""
    c = codes[..., keep]
    return np.asarray(sum((c == k).any(axis=-1).astype(int) for k in range(len(ROLES))))


def _order_value(codes: np.ndarray, depth: np.ndarray, position: str) -> np.ndarray:
    """Per row of ``codes`` (..., layer of the forward-ordered layers): the content layers' depth minus the surface
    layers' (``first`` or ``median`` labelled layer), NaN when either role has no layer."""
    c_i, s_i = ROLES.index("content"), ROLES.index("surface")

    def pos(k: int) -> np.ndarray:
        d = np.where(codes == k, depth, np.nan)
        with warnings.catch_warnings():  # a role without a layer: all-NaN slices give NaN, as meant
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.asarray(np.nanmin(d, axis=-1) if position == "first" else np.nanmedian(d, axis=-1))

    return np.asarray(pos(c_i) - pos(s_i))


def _depths(forward: np.ndarray) -> np.ndarray:
    """Normalised depth 0..1 of each forward-ordered layer (the layers that are not spaces, in sweep order)."""
    n = int(forward.sum())
    return np.arange(n) / max(1, n - 1)


def _order_verdict(value: float, expected: str) -> str:
    if not np.isfinite(value) or value == 0:
        return "undecided"
    surface_first = value > 0
    return "supports" if surface_first == (expected == "surface first") else "contradicts"


def _interval(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if len(v) < 2:
        return np.nan, np.nan
    return float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))


def claims_curve(result: Result, *, subject: str | None = None, control: str = "") -> pd.DataFrame:
    """The specification curve of :data:`CLAIMS` on one saved injection Result (schema:
    :mod:`layerscope.stats.speccurve`), one row per claim x specification of the choices in this module's docstring.

    ``subject``: what the rows are about (default: the Result's model); ``control``: the control's label when the
    Result is a control's (the same analysis, labelled). The shipped specification's statistic gets a 95%
    percentile bootstrap interval over pairs (:data:`N_BOOT` resamples); the other rows' intervals are NaN."""
    table = result["injection"]
    record = result.record
    subject = subject or str(record["model"])
    info = record.get("layer_info", {})
    scorer = record.get("plan", {}).get("scorer", "oracle")
    proto, expected = protocol(result), ORDERS[layout(result)]
    windows = [w for w in ("all", "early", "middle", "late") if w in set(table["window"])]
    measures = MEASURES if scorer == "oracle" else ("transfer",)  # images: the share of the gap closed
    rows: list[dict[str, Any]] = []
    n_pairs = table["pair"].nunique()
    for window in windows:
        for measure in measures:
            if scorer == "oracle":
                obs, layers, arr = _observations(table, window, measure)
            else:
                (obs, layers), arr = _image_layers(table, window), None
            is_space = np.array([bool(info.get(x, {}).get("is_space", False)) for x in layers])
            fwd = ~is_space
            depth = _depths(fwd)
            subsets = _subsets(obs)
            for subset, w in subsets.items():
                if arr is not None:
                    scores = _weighted_means(arr, w[None, :])[0]
                else:
                    scores = _image_scores(table, window, w, obs)
                for inert in INERT_LEVELS:
                    for margin in MARGIN_LEVELS:
                        codes = label_codes(scores, inert, margin)
                        base = {
                            "inert": inert, "margin": margin, "measure": measure, "pairs": subset,
                            "window": window, "protocol": proto, "scorer": scorer,
                        }  # fmt: skip
                        for sets in SETS:
                            keep = np.ones(len(layers), bool) if sets == "layers+spaces" else fwd
                            found = int(_roles_found(codes, keep))
                            spec = {**base, "sets": sets}
                            rows.append(
                                _row("injection.roles_split", subject, control, spec,
                                     "supports" if found == len(ROLES) else "contradicts",
                                     f"roles with a specialised layer, of 3 ({n_pairs} pairs)", found)
                            )  # fmt: skip
                        for position in POSITIONS:
                            value = float(_order_value(codes[fwd], depth, position))
                            spec = {**base, "position": position}
                            rows.append(
                                _row("injection.roles_order", subject, control, spec,
                                     _order_verdict(value, expected),
                                     f"content depth - surface depth ({expected} expected, "
                                     f"{'SD 1.4' if expected == 'surface first' else 'most models'}; "
                                     f"{n_pairs} pairs)", value)
                            )  # fmt: skip
    curve = curve_from_rows(rows)
    if scorer == "oracle":
        curve = _shipped_intervals(curve, table, info)
    return check_curve(curve)


def _row(
    claim: str, subject: str, control: str, spec: dict[str, Any], verdict: str, stat: str, value: float
) -> dict[str, Any]:
    return {
        "claim": claim,
        "subject": subject,
        "control": control,
        "spec": spec_string(spec),
        "verdict": verdict,
        "statistic": stat,
        "value": float(value),
        "ci_low": np.nan,
        "ci_high": np.nan,
    }


def _shipped_intervals(curve: pd.DataFrame, table: pd.DataFrame, info: dict[str, Any]) -> pd.DataFrame:
    """The 95% bootstrap interval (pairs x seeds resampled) of each claim's statistic at its shipped specification."""
    from ..stats.speccurve import matches

    for claim, shipped in SHIPPED.items():
        hit = curve.index[(curve["claim"] == claim) & curve["spec"].map(lambda s, c=shipped: matches(s, c))]
        if not len(hit):
            continue
        ch = shipped
        obs, layers, arr = _observations(table, ch["window"], ch["measure"])
        if not obs:
            continue
        rng = np.random.default_rng(BOOT_SEED)
        draws = rng.integers(0, len(obs), size=(N_BOOT, len(obs)))
        weights = np.stack([np.bincount(d, minlength=len(obs)) for d in draws]).astype(float)
        codes = label_codes(_weighted_means(arr, weights), float(ch["inert"]), float(ch["margin"]))
        fwd = np.array([not info.get(x, {}).get("is_space", False) for x in layers])
        if claim == "injection.roles_split":
            keep = np.ones(len(layers), bool) if ch["sets"] == "layers+spaces" else fwd
            stats = _roles_found(codes, keep).astype(float)
        else:
            stats = _order_value(codes[:, fwd], _depths(fwd), ch["position"])
        lo, hi = _interval(stats)
        curve.loc[hit, ["ci_low", "ci_high"]] = [lo, hi]
    return curve
