"""The alignment study's analysis: from every feature set's Gram matrices (models, untrained copies, the render) to
the descriptive tables, the calibrated verdicts and the specification curve of the two claims. Every choice below
was fixed in code before the zoo's results were computed with it; docs/alignment.md says what changed and why.

**Specifications** (:data:`CHOICES`): the diffusion step read (each step of the study, matched across diffusion
models by noise level, i.e. the nearest timestep; single-pass models have one; or ``best``: each layer at the step
where its debiased CKA with the scene's factors peaks), the measure, the features (whole map or its position mean),
the arrangement coordinate and the order threshold.

**Component similarity** of an ordered pair A -> B: each analysed layer of A matched to its most similar layer of
B, the mean of those best matches. **Calibrated** against nulls computed with the same statistic, on the same
scenes and subsamples: the render as A (``render -> B``), an untrained copy of A (``untrained:A -> B``) and of B
(``A -> untrained:B``); components are *alike* when every paired difference to a null has its interval above 0 and
the permutation p-value (B's scenes shuffled, the whole max-over-layers statistic recomputed) is below
:data:`ALPHA`, *unalike* when some difference has its interval below 0, undecided otherwise.

**Arrangement** of A -> B: the Spearman correlation between each matched layer's coordinate in A and its match's in
B, on two coordinates: ``depth`` (position along the computation, input -> output) and ``image_distance`` (log2 of
the image's side over the layer's positions' side, from the layer map's shapes: the same orientation in every
model). Outcomes at threshold T: *preserved* (interval at or above T), *reversed* (at or below -T), *unrelated*
(inside (-T, T)), *undecided* otherwise, *degenerate* when the correlation is undefined (every layer matched to one
layer, or a coordinate constant over the layers, as image distance is over a DiT's blocks).

**Intervals** (95%): subsampling, :data:`Settings.n_boot <layerscope.experiments.alignment.Settings>` random halves
of the scenes without replacement, with the whole statistic recomputed on each (best steps, matching, max over
layers); the basic interval ``[2 t - q97.5, 2 t - q2.5]``. Without replacement at m = n / 2 the subsample
estimate's spread around the full-sample one equals the full-sample estimate's own (finite-population factor
1/m - 1/n = 1/n), and the reflection removes the bias a smaller sample adds to a max. Their coverage is checked by
simulation in tests/test_alignment_stats.py.

**Claims**: the specification curve of the two claims is built from the ``matching`` table in
:mod:`.alignment_claims`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..engine import ProgressArg
from ..metrics.alignment import kernel_similarity
from ..progress import progress_callback

if TYPE_CHECKING:  # pragma: no cover
    from .alignment import ModelFeatures, Settings

__all__ = [
    "ALPHA",
    "CHOICES",
    "COORDINATES",
    "FEATURES",
    "GROUPS",
    "ORDER_THRESHOLDS",
    "SHIPPED",
    "STAT_METRIC",
    "analyse",
    "arrangement_outcome",
    "basic_interval",
    "components_outcome",
    "shipped_step",
    "subsample_k",
]

#: the measure of best steps and factor-group peaks, and the first of the curve's measures
STAT_METRIC = "debiased_cka"
COORDINATES = ("depth", "image_distance")
FEATURES = ("full", "pooled")  # the whole map, or its mean over positions / tokens
#: |Spearman| thresholds of a monotone arrangement, one per specification
ORDER_THRESHOLDS = (0.3, 0.5, 0.7)
ALPHA = 0.05  # the permutation test's level
GROUPS = ("structure", "content", "surface")
#: the specification the tables' single-number summaries and the claims table's "measured" column use
SHIPPED = {
    "step": "last",
    "measure": STAT_METRIC,
    "features": "full",
    "coordinate": "image_distance",
    "order_threshold": 0.5,
}
#: every analysis choice of the curve and its levels (``step``: each step index of the study, ``last`` is the last
#: of them, and ``best``; ``measure``: Settings.curve_measures)
CHOICES = {
    "step": "every step, matched by noise level, and best",
    "measure": "Settings.curve_measures",
    "features": ("full", "pooled"),
    "coordinate": COORDINATES,
    "order_threshold": ORDER_THRESHOLDS,
}
# ---------------------------------------------------------------------------------------------------------------------
# intervals and outcomes


def basic_interval(reps: np.ndarray, point: float, lo: float = -np.inf, hi: float = np.inf) -> tuple[float, float]:
    """95% basic (reflected) interval of a statistic from its half-sample replicates: ``[2 t - q97.5, 2 t -
    q2.5]``, clipped to the statistic's range; NaN when the estimate or most replicates are undefined."""
    v = np.asarray(reps, dtype=float)
    v = v[np.isfinite(v)]
    if not np.isfinite(point) or len(v) < max(2, len(reps) // 2):
        return (np.nan, np.nan)
    q_lo, q_hi = np.quantile(v, [0.025, 0.975])
    return (float(np.clip(2 * point - q_hi, lo, hi)), float(np.clip(2 * point - q_lo, lo, hi)))


def _halves(n: int, n_boot: int, seed: int) -> list[torch.Tensor]:
    """``n_boot`` random half-samples of the scenes, without replacement: a scene drawn twice would add an exact
    duplicate pair to both Gram matrices and inflate every CKA."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[: n // 2].sort().values for _ in range(n_boot)]


def subsample_k(k: int, n: int) -> int:
    """The kNN measures' k on a half-sample: the same share of the other inputs, ``round(k (m - 1) / (n - 1))`` at
    m = n // 2 (at least 2). With k fixed, a half-sample's mutual k-NN would measure wider neighbourhoods (its chance
    level k / (m - 1) doubles) and the replicates would not estimate the full sample's spread."""
    m = n // 2
    return max(2, min(m - 1, round(k * (m - 1) / (n - 1))))


def components_outcome(diffs: Sequence[tuple[float, float]], perm_p: float) -> str:
    """``alike`` when every null's difference interval lies above 0 and the permutation p-value is below
    :data:`ALPHA`; ``unalike`` when some interval lies below 0 (or the permutation test does not reject);
    ``undecided`` otherwise."""
    if any(hi < 0 for _, hi in diffs) or not perm_p < ALPHA:
        return "unalike"
    if all(lo > 0 for lo, _ in diffs):
        return "alike"
    return "undecided"


def arrangement_outcome(rho: float, lo: float, hi: float, threshold: float) -> str:
    """``preserved`` / ``reversed`` / ``unrelated`` / ``undecided``, or ``degenerate`` for an undefined order."""
    if not np.isfinite(rho) or not (np.isfinite(lo) and np.isfinite(hi)):
        return "degenerate"
    if lo >= threshold:
        return "preserved"
    if hi <= -threshold:
        return "reversed"
    if lo > -threshold and hi < threshold:
        return "unrelated"
    return "undecided"


# ---------------------------------------------------------------------------------------------------------------------
# feature stacks


def _grid(feats: Sequence[ModelFeatures]) -> list[float]:
    """The study's step grid: the timesteps of its first iterative model (its step indices without timesteps)."""
    it = [f for f in feats if f.iterative and len(f.steps) > 1]
    first = next((f for f in it if not f.control), it[0] if it else None)
    if first is None:
        return [0.0]
    return list(first.timesteps) if first.timesteps else [float(s) for s in first.steps]


def _step_of(f: ModelFeatures, level: int, grid: list[float]) -> int:
    """The step of ``f`` read at grid level ``level``: its only step, or the one nearest in noise level."""
    if not f.iterative or len(f.steps) == 1:
        return f.steps[0]
    if f.timesteps and len(grid) > 1:
        return f.steps[int(np.argmin(np.abs(np.asarray(f.timesteps) - grid[level])))]
    return f.steps[min(level, len(f.steps) - 1)]


def _entries(feats: Sequence[ModelFeatures]) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    owner, layers, coords = [], [], {c: [] for c in COORDINATES}
    for i, f in enumerate(feats):
        for name in f.analysed():
            owner.append(i)
            layers.append(name)
            coords["depth"].append(f.depth(name))
            coords["image_distance"].append(f.distance.get(name, np.nan))
    return np.array(owner), layers, {c: np.array(v, dtype=float) for c, v in coords.items()}


def _best_steps(feats: Sequence[ModelFeatures], kind: str, factors: torch.Tensor | None, idx: torch.Tensor | None):
    """Per feature set and analysed layer: the step where its debiased CKA with the factors peaks on the scenes
    ``idx`` (None: all); the last step without a world."""
    out: list[dict[str, int]] = []
    for f in feats:
        if factors is None or len(f.steps) == 1:
            out.append({name: f.steps[-1] for name in f.analysed()})
            continue
        names = f.analysed()
        g = torch.stack([f.grams[(name, s, kind)] for name in names for s in f.steps])
        ref = factors[None]
        if idx is not None:
            g, ref = g[:, idx][:, :, idx], ref[:, idx][:, :, idx]
        sim = kernel_similarity(g, ref, STAT_METRIC).reshape(len(names), len(f.steps)).numpy()
        best = np.where(np.isfinite(sim), sim, -np.inf).argmax(axis=1)
        out.append({name: f.steps[int(b)] for name, b in zip(names, best)})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# matching


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of one (k,) vector with each row of (H, k): Pearson of average ranks; NaN where undefined."""
    if x.shape[-1] < 3 or np.ptp(x) == 0:
        return np.full(y.shape[0], np.nan)
    rx = _ranks(x) - (x.shape[-1] + 1) / 2
    ry = _ranks(y)
    ry = ry - ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx**2).sum() * (ry**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ry @ rx) / np.where(den > 0, den, 1.0), np.nan)


def _pair_stats(
    m: np.ndarray, owner: np.ndarray, coords: dict[str, np.ndarray], pairs: list[tuple[int, int]], ok_rows=None
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """For a stack of similarity matrices ``m`` (H, E, E) (the full sample, or its subsamples) and each ordered
    pair (a, b) of feature sets: the component similarity (H, P) (mean best match of a's entries in b), the
    Spearman order per coordinate (H, P, C), and the matches of the first matrix (index into b's entries). A row of
    a whose similarities are all undefined in the first matrix (``ok_rows``: that mask, per pair) takes no part."""
    h = m.shape[0]
    sims = np.full((h, len(pairs)), np.nan)
    orders = np.full((h, len(pairs), len(COORDINATES)), np.nan)
    matches = []
    rows_of = {i: np.flatnonzero(owner == i) for i in np.unique(owner)}
    for p, (a, b) in enumerate(pairs):
        ra, rb = rows_of[a], rows_of[b]
        block = m[:, ra][:, :, rb]  # (H, La, Lb)
        finite = np.isfinite(block)
        ok = finite[0].any(axis=1) if ok_rows is None else ok_rows[p]
        best = np.where(finite, block, -np.inf).argmax(axis=2)  # (H, La)
        matches.append(best[0])
        if not ok.any():
            continue
        val = np.take_along_axis(block, best[:, :, None], axis=2)[:, :, 0][:, ok]
        val = np.where(np.isfinite(val), val, np.nan)
        with np.errstate(invalid="ignore"):
            sims[:, p] = np.nanmean(val, axis=1) if val.size else np.nan
        for c, name in enumerate(COORDINATES):
            orders[:, p, c] = _spearman_rows(coords[name][ra][ok], coords[name][rb][best[:, ok]])
    return sims, orders, matches


def _ok_rows(m: np.ndarray, owner: np.ndarray, pairs: list[tuple[int, int]]) -> list[np.ndarray]:
    rows_of = {i: np.flatnonzero(owner == i) for i in np.unique(owner)}
    return [np.isfinite(m[np.ix_(rows_of[a], rows_of[b])]).any(axis=1) for a, b in pairs]


def _levels(grid: list[float]) -> list[str]:
    return [str(k) for k in range(len(grid))] + ["best"]


def _keys(feats: Sequence[ModelFeatures]) -> dict[tuple[int, str, int], int]:
    """Row of every (feature set, analysed layer, step) in the study's stacks."""
    keys: dict[tuple[int, str, int], int] = {}
    for i, f in enumerate(feats):
        for name in f.analysed():
            for s in f.steps:
                keys[(i, name, s)] = len(keys)
    return keys


def _candidates(feats: Sequence[ModelFeatures], keys: dict[tuple[int, str, int], int]) -> np.ndarray:
    """(entries, most steps) rows of each analysed layer at each of its steps (a single-step set repeats its one)."""
    width = max(len(f.steps) for f in feats)
    return np.array(
        [
            [keys[(i, name, feats[i].steps[min(j, len(feats[i].steps) - 1)])] for j in range(width)]
            for i, f in enumerate(feats)
            for name in f.analysed()
        ]
    )


def _best_rows(cand: np.ndarray, factor_sims: np.ndarray) -> np.ndarray:
    """Each entry's row at its best step: where its similarity with the factors (``factor_sims``, one per row)
    peaks; undefined similarities never win."""
    by_step = factor_sims[cand]
    return cand[np.arange(len(cand)), np.where(np.isfinite(by_step), by_step, -np.inf).argmax(axis=1)]


@dataclass
class _Pass:
    """One pass over the full sample (h = 0), its half-samples and its permutations: per (features, measure,
    level) the (H, E, E) similarity matrices of the analysed layers (float32), the permutations' pair similarities,
    and per level the (H, E, groups) debiased CKA of every entry with the factor groups (whole maps)."""

    sims: dict[tuple[str, str, str], np.ndarray]
    perm: dict[tuple[str, str, str], np.ndarray]
    groups: dict[str, np.ndarray]
    rows: dict[tuple[str, str], np.ndarray]  # (features, level) -> the full sample's row of each entry


def _run_pass(
    feats: Sequence[ModelFeatures],
    refs: dict[str, torch.Tensor],
    st: Settings,
    pairs: list[tuple[int, int]],
    owner: np.ndarray,
    coords: dict[str, np.ndarray],
    tick: Any,
) -> tuple[_Pass, dict[tuple[str, str, str], tuple]]:
    """Every similarity the verdicts need, from one embedding of every Gram per (half-)sample (the measures are
    inner products of per-Gram vectors: :func:`~layerscope.metrics.alignment.gram_embeddings`), so a level or a
    permutation is only an index and a matrix product."""
    from ..metrics.alignment import gram_embeddings

    grid = _grid(feats)
    keys = _keys(feats)
    entries = [(i, name) for i, f in enumerate(feats) for name in f.analysed()]
    numbered = {
        str(lv): np.array([keys[(i, name, _step_of(feats[i], lv, grid))] for i, name in entries])
        for lv in range(len(grid))
    }
    cand = _candidates(feats, keys)
    halves = _halves(st.n, st.n_boot, st.seed)
    perm_gen = torch.Generator().manual_seed(st.seed + 7)
    perms = [torch.randperm(st.n, generator=perm_gen) for _ in range(st.permutations)]
    group_names = [g for g in GROUPS if g in refs]
    ref_grams = torch.stack([refs[g] @ refs[g].T for g in ["factors", *group_names]]) if "factors" in refs else None
    levels = [*numbered, "best"]
    out = _Pass({}, {}, {lv: np.empty((len(halves) + 1, len(entries), len(group_names))) for lv in levels}, {})
    stats: dict[tuple[str, str, str], tuple] = {}
    done = 0
    for kind in FEATURES:
        order = sorted(keys, key=keys.get)
        g_all = torch.stack([feats[i].grams[(name, s, kind)] for i, name, s in order])
        store = {
            (m, lv): np.empty((len(halves) + 1, len(entries), len(entries)), np.float32)
            for m in st.curve_measures
            for lv in levels
        }
        full_emb: dict[str, torch.Tensor] = {}
        for h, idx in enumerate([None, *halves]):
            g = g_all if idx is None else g_all[:, idx][:, :, idx]
            k = st.k if idx is None else subsample_k(st.k, st.n)
            emb = {STAT_METRIC: gram_embeddings(g, STAT_METRIC)}
            for m in st.curve_measures:
                if m not in emb:
                    emb[m] = gram_embeddings(g, m, k)
            rows = dict(numbered)
            if ref_grams is not None:
                r = ref_grams if idx is None else ref_grams[:, idx][:, :, idx]
                ref_sims = (emb[STAT_METRIC] @ gram_embeddings(r, STAT_METRIC).T).numpy()  # (K, 1 + groups)
                rows["best"] = _best_rows(cand, ref_sims[:, 0])
                if kind == "full":
                    for lv in levels:
                        out.groups[lv][h] = ref_sims[rows[lv], 1:]
            else:
                rows["best"] = cand[:, -1]
            if idx is None:
                full_emb = emb
                for lv in levels:
                    out.rows[(kind, lv)] = rows[lv]
            for m in st.curve_measures:
                for lv in levels:
                    # float32 products: the replicates only feed quantiles and argmaxes (the full sample's is exact)
                    e = emb[m][rows[lv]]
                    store[(m, lv)][h] = (e @ e.T).numpy() if idx is None else (e.float() @ e.float().T).numpy()
        n = st.n
        flat_perms = [(p[:, None] * n + p[None, :]).flatten() for p in perms]  # (i, j) -> (p_i, p_j) in a flat Gram
        for m in st.curve_measures:
            for lv in levels:
                e = full_emb[m][out.rows[(kind, lv)]].float()
                shuffled = np.stack([(e @ e[:, q].T).numpy() for q in flat_perms])
                ok = _ok_rows(store[(m, lv)][0], owner, pairs)
                full_s, full_o, matches = _pair_stats(store[(m, lv)][:1].astype(np.float64), owner, coords, pairs, ok)
                b_s, b_o, _ = _pair_stats(store[(m, lv)][1:], owner, coords, pairs, ok)
                p_s = _pair_stats(shuffled, owner, coords, pairs, ok)[0]
                stats[(kind, m, lv)] = (full_s[0], full_o[0], matches, b_s, b_o, p_s)
                done += 1
                if tick is not None:
                    tick(done, len(FEATURES) * len(st.curve_measures) * len(levels))
        del store
    return out, stats


def _matching(
    feats: Sequence[ModelFeatures], refs: dict[str, torch.Tensor], st: Settings, progress: ProgressArg
) -> tuple[pd.DataFrame, _Pass]:
    """Every ordered pair of feature sets (models and controls; the render only as A) at every specification of
    step, measure and features: similarity and orders with intervals, the permutation null, and for the models'
    pairs and the untrained copies' pairs the calibrated outcomes."""
    grid = _grid(feats)
    owner, layers, coords = _entries(feats)
    targets = [i for i, f in enumerate(feats) if f.control != "render"]
    pairs = [(a, b) for a in range(len(feats)) for b in targets if a != b]
    with progress_callback(progress, "alignment: matching, intervals and nulls") as tick:
        passed, stats = _run_pass(feats, refs, st, pairs, owner, coords, tick)
    index = {pair: p for p, pair in enumerate(pairs)}
    rows = []
    for (kind, measure, level), (sims, orders, matches, b_sims, b_orders, p_sims) in stats.items():
        for p, (a, b) in enumerate(pairs):
            fa, fb = feats[a], feats[b]
            ra, rb = np.flatnonzero(owner == a), np.flatnonzero(owner == b)
            ci = basic_interval(b_sims[:, p], sims[p], -1.0, 1.0)
            row: dict[str, Any] = {
                "model_a": fa.spec,
                "model_b": fb.spec,
                "control_a": fa.control,
                "control_b": fb.control,
                "features": kind,
                "measure": measure,
                "step": level,
                "timestep": grid[int(level)] if level != "best" and len(grid) > 1 else np.nan,
                "similarity": sims[p],
                "similarity_low": ci[0],
                "similarity_high": ci[1],
                "perm_q95": float(np.nanquantile(p_sims[:, p], 0.95)),
                "perm_p": float((1 + np.sum(p_sims[:, p] >= sims[p])) / (1 + len(p_sims))),
                "layers_a": len(ra),
                "layers_b": len(rb),
                "matches": ";".join(f"{layers[i]}->{layers[rb[j]]}" for i, j in zip(ra, matches[p])),
            }
            for c, name in enumerate(COORDINATES):
                oci = basic_interval(b_orders[:, p, c], orders[p, c], -1.0, 1.0)
                row[f"order_{name}"], row[f"order_{name}_low"], row[f"order_{name}_high"] = orders[p, c], *oci
            nulls = _nulls(feats, a, b)
            if nulls is not None:
                diffs = []
                for label, pair in nulls:
                    q = index[pair]
                    d = sims[p] - sims[q]
                    diffs.append((label, d, basic_interval(b_sims[:, p] - b_sims[:, q], d, -2.0, 2.0)))
                finite = [x for x in diffs if np.isfinite(x[1])]
                strongest = min(finite, key=lambda x: x[1]) if finite else None
                row["nulls"] = ";".join(f"{label}={sims[index[pair]]:.4f}" for label, pair in nulls)
                row["excess"] = strongest[1] if strongest else np.nan
                row["excess_low"], row["excess_high"] = strongest[2] if strongest else (np.nan, np.nan)
                row["strongest_null"] = strongest[0] if strongest else ""
                row["components"] = components_outcome([d[2] for d in diffs], row["perm_p"])
                for name in COORDINATES:
                    row[f"arrangement_{name}"] = arrangement_outcome(
                        row[f"order_{name}"],
                        row[f"order_{name}_low"],
                        row[f"order_{name}_high"],
                        SHIPPED["order_threshold"],
                    )
            rows.append(row)
    return pd.DataFrame(rows), passed


def _nulls(feats: Sequence[ModelFeatures], a: int, b: int) -> list[tuple[str, tuple[int, int]]] | None:
    """The nulls of the pair (a, b), as (label, pair): for two models, the render as A and the untrained copy of A
    and of B; for two untrained copies, the render as A. None for any other pair (a null itself)."""
    fa, fb = feats[a], feats[b]
    spec = {f.spec: i for i, f in enumerate(feats)}
    render = next((i for i, f in enumerate(feats) if f.control == "render"), None)
    copy = {f.of: i for i, f in enumerate(feats) if f.control == "untrained"}
    if fa.control == "" and fb.control == "":
        out = [] if render is None else [("render", (render, b))]
        if fa.spec in copy:
            out.append(("untrained A", (copy[fa.spec], b)))
        if fb.spec in copy:
            out.append(("untrained B", (a, copy[fb.spec])))
        return out
    if fa.control == fb.control == "untrained" and fa.of in spec and fb.of in spec:
        return [] if render is None else [("render", (render, b))]
    return None


CROSSFIT_SPLITS = 10  # random splits of the scenes in two halves for the selection-bias check


def _crossfit(feats: Sequence[ModelFeatures], refs: dict[str, torch.Tensor], st: Settings) -> pd.DataFrame:
    """The selection-bias check of the best steps (debiased CKA, whole maps): per ordered pair of models, the
    component similarity on one half of the scenes with each layer's best step chosen on that half (in-sample) and
    chosen on the other half (cross-fitted), averaged over random splits. A large gap would mean the ``best`` level
    owes its numbers to choosing steps on the scenes it is scored on."""
    from ..metrics.alignment import gram_embeddings

    if "factors" not in refs:
        return pd.DataFrame()
    owner, _, coords = _entries(feats)
    keys = _keys(feats)
    cand = _candidates(feats, keys)
    models = [i for i, f in enumerate(feats) if f.control == ""]
    pairs = [(a, b) for a in models for b in models if a != b]
    if not pairs:
        return pd.DataFrame()
    order = sorted(keys, key=keys.get)
    g_all = torch.stack([feats[i].grams[(name, s, "full")] for i, name, s in order])
    factors = refs["factors"] @ refs["factors"].T
    gen = torch.Generator().manual_seed(st.seed + 11)
    inside, crossed = [], []
    for _ in range(CROSSFIT_SPLITS):
        perm = torch.randperm(st.n, generator=gen)
        halves = (perm[: st.n // 2].sort().values, perm[st.n // 2 :].sort().values)
        embs, bests = [], []
        for idx in halves:
            e = gram_embeddings(g_all[:, idx][:, :, idx], STAT_METRIC)
            ref = gram_embeddings(factors[idx][:, idx][None], STAT_METRIC)
            bests.append(_best_rows(cand, (e @ ref.T).numpy()[:, 0]))
            embs.append(e)
        for score, choose in ((1, 1), (1, 0)):  # scored on the second half; steps chosen on it, or on the first
            e = embs[score][bests[choose]]
            sims = _pair_stats((e @ e.T).numpy()[None], owner, coords, pairs)[0][0]
            (inside if score == choose else crossed).append(sims)
    inside_m, crossed_m = np.mean(inside, axis=0), np.mean(crossed, axis=0)
    return pd.DataFrame(
        [
            {
                "model_a": feats[a].spec,
                "model_b": feats[b].spec,
                "in_sample": inside_m[p],
                "cross_fitted": crossed_m[p],
                "difference": inside_m[p] - crossed_m[p],
                "splits": CROSSFIT_SPLITS,
            }
            for p, (a, b) in enumerate(pairs)
        ]
    )


# ---------------------------------------------------------------------------------------------------------------------
# peaks of the factor groups


def _peaks(feats: Sequence[ModelFeatures], refs: dict[str, torch.Tensor], passed: _Pass | None) -> pd.DataFrame:
    """Per feature set (not the render), step level and factor group: the analysed layer whose debiased CKA (whole
    maps) with the group's one-hot peaks, its coordinates and value, with subsampling intervals (coordinates: the
    2.5-97.5% range of the half-samples' peaks, a location, with no reflection; value: basic)."""
    groups = [g for g in GROUPS if g in refs]
    if not groups or passed is None:
        return pd.DataFrame()
    owner, layers, coords = _entries(feats)
    keys = sorted(_keys(feats).items(), key=lambda kv: kv[1])
    step_of_row = np.array([s for (_, _, s), _ in keys])
    rows = []
    for i, f in enumerate(feats):
        if f.control == "render":
            continue
        mine = np.flatnonzero(owner == i)
        for level, sims in passed.groups.items():
            for j, group in enumerate(groups):
                v = sims[:, mine, j]  # (H, layers of f)
                top = int(np.nanargmax(v[0])) if np.isfinite(v[0]).any() else 0
                picks = np.where(np.isfinite(v[1:]), v[1:], -np.inf).argmax(axis=1)
                row = {
                    "model": f.spec,
                    "control": f.control,
                    "step": level,
                    "group": group,
                    "layer": layers[mine[top]],
                    "layer_step": int(step_of_row[passed.rows[("full", level)][mine[top]]]),
                    "value": float(v[0, top]),
                }
                tops = np.where(np.isfinite(v[1:]), v[1:], -np.inf).max(axis=1)
                row["value_low"], row["value_high"] = basic_interval(
                    np.where(np.isfinite(tops), tops, np.nan), row["value"]
                )
                for coord in COORDINATES:
                    c = coords[coord][mine]
                    row[coord] = float(c[top])
                    row[f"{coord}_low"], row[f"{coord}_high"] = (
                        float(x) for x in np.quantile(c[picks], [0.025, 0.975])
                    )
                rows.append(row)
    return pd.DataFrame(rows)


def _order_string(values: pd.Series) -> str:
    """Groups by their coordinate, nearest the image first: ``"surface < structure = content"``."""
    out, prev = "", None
    for group, v in values.sort_values(kind="stable").items():
        out += group if prev is None else (" = " if v == prev else " < ") + group
        prev = v
    return out


def _peak_order(peaks: pd.DataFrame, feats: Sequence[ModelFeatures]) -> pd.DataFrame:
    """Per ordered pair of models (and of untrained copies), step level and coordinate: the share of the three
    pairs of factor groups whose order along the coordinate (before, tied, after) is the same in both models: the
    within-model arrangement, compared with no cross-model axis."""
    if peaks.empty:
        return pd.DataFrame()
    rows = []
    sets = [f for f in feats if f.control in ("", "untrained")]
    for fa in sets:
        for fb in sets:
            if fa.spec >= fb.spec or fa.control != fb.control:
                continue
            for level, sub in peaks.groupby("step", sort=False):
                pa = sub[sub["model"] == fa.spec].set_index("group")
                pb = sub[sub["model"] == fb.spec].set_index("group")
                if pa.empty or pb.empty:
                    continue
                for coord in COORDINATES:
                    agree = [
                        np.sign(pa.loc[g, coord] - pa.loc[h, coord]) == np.sign(pb.loc[g, coord] - pb.loc[h, coord])
                        for i, g in enumerate(GROUPS)
                        for h in GROUPS[i + 1 :]
                        if g in pa.index and h in pa.index
                    ]
                    rows.append(
                        {
                            "model_a": fa.spec,
                            "model_b": fb.spec,
                            "control": fa.control,
                            "step": level,
                            "coordinate": coord,
                            "order_a": _order_string(pa[coord]),
                            "order_b": _order_string(pb[coord]),
                            "agreement": float(np.mean(agree)) if agree else np.nan,
                        }
                    )
    return pd.DataFrame(rows)


def analyse(
    feats: Sequence[ModelFeatures], refs: dict[str, torch.Tensor], st: Settings, progress: ProgressArg = None
) -> dict[str, pd.DataFrame]:
    """Every table of the study from its feature sets (models, untrained copies, the render)."""
    from .alignment_tables import across_table, layers_table, within_table, world_table

    models = [f for f in feats if not f.control]
    metrics = list(dict.fromkeys([*st.metrics, STAT_METRIC]))
    grid = _grid(feats)
    factor_gram = None if "factors" not in refs else refs["factors"] @ refs["factors"].T
    best = {f.spec: _best_steps([f], "full", factor_gram, None)[0] for f in models}
    across = [
        across_table(fa, fb, metrics, st.k, grid, (best[fa.spec], best[fb.spec]))
        for i, fa in enumerate(models)
        for fb in models[i + 1 :]
    ]
    matching, passed = _matching(feats, refs, st, progress) if len(feats) > 1 else (pd.DataFrame(), None)
    peaks = _peaks(feats, refs, passed)
    world_sets = [f for f in feats if f.control != "render"]
    return {
        "layers": pd.concat([layers_table(f) for f in feats], ignore_index=True),
        "within": pd.concat([within_table(f, metrics, st.k) for f in models], ignore_index=True),
        "across": pd.concat(across, ignore_index=True) if across else pd.DataFrame(),
        "world": (
            pd.concat([world_table(f, refs, metrics, st.k) for f in world_sets], ignore_index=True)
            if refs
            else pd.DataFrame(
                columns=["model", "control", "layer", "layer_index", "depth", "step", "reference", "metric", "value"]
            )
        ),
        "peaks": peaks,
        "peak_order": _peak_order(peaks, feats),
        "matching": matching,
        "crossfit": _crossfit(feats, refs, st),
    }


# ---------------------------------------------------------------------------------------------------------------------
# the shipped specification


def shipped_step(levels: Sequence[str]) -> str:
    """The step level of :data:`SHIPPED` among a table's levels (``last``: the last numbered step)."""
    numbered = [lv for lv in levels if lv != "best"]
    if SHIPPED["step"] == "last":
        return max(numbered, key=int) if numbered else "best"
    return str(SHIPPED["step"])
