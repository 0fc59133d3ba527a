"""Do models arrange their representations alike? Representational alignment across layers, steps and models, and
a test of the Platonic Representation Hypothesis (Huh et al. 2024) against Schaerf (2025, section 3.1).

**Inputs matched across models.** Every model sees the same inputs. Shapes world (every model read by the Shapes
oracle): the unit is a *scene* (a factor combination, held-out split); text models generate it from its prompt
(same seeds for all), generators with a ``code`` layer (role ``code``: ``zoo:vae``, ``zoo:gan``) get the scene's
one-hot code at that layer (same seeds), and two references that are not models stand beside them: the factors
themselves (``factors``, one-hot) and the oracle's features of the scene's render (``oracle``); the factor groups of
the injection experiment (``structure``: scale, orientation; ``content``: shape; ``surface``: the three hues) are
references too. Open domain: the same prompts and seeds for every text model, or the same seeds (hence latents) for
torch generators of one latent shape; other mixes cannot be matched and are refused.

**Features.** Every layer of each model at every step (conditional branch), from one capture per model: a fixed
Gaussian random projection of the whole map to ``project`` dims (seeded per width; 0: the spatial / token mean).

**Measures** (:mod:`layerscope.metrics.alignment`): linear CKA, debiased CKA, mutual k-NN and CKNNA, all pairs at
once from per-feature Gram matrices. Tables:

- ``layers``: one row per feature set (model, layer, layer_index, depth = index / (layers - 1), step, timestep);
- ``within``: per model, layer x layer at each step and step x step for each layer;
- ``across``: per model pair, layer x layer at matched steps (same step index; both models with the same steps) and
  with each layer at its *best step* (``step = -1`` rows): the step where it aligns most with the world's
  ``factors`` (debiased CKA), or the last step without a world;
- ``world``: each layer x step against each reference;
- ``arrangement``: per model and factor group, the layer and step where the alignment (debiased CKA) peaks, its
  normalised depth, with CIs over scenes;
- ``matching``: per ordered model pair, each layer of A matched to its most similar layer of B (debiased CKA, best
  steps); *component similarity* = the mean of those best-match similarities, *depth order* = the Spearman
  correlation of the layers' normalised depths with their matches' depths; CIs over scenes; the verdict; and the
  chance level of the component similarity (the same with B's scenes shuffled).

Best steps, arrangement and matching use **debiased CKA** (:data:`STAT_METRIC`): linear CKA of unrelated features is
far from 0 once the feature width nears the number of scenes. Layers with an input role (``code``: the scene's
one-hot, set by the experiment) take no part in the arrangement and matching. **CIs** come from random
half-samples of the scenes without replacement (a bootstrap draw repeats scenes, which inflates every CKA), re-centred
on the full-sample estimate (:func:`_ci`). These three choices were made after a first full run on the zoo (linear
CKA, bootstrap with replacement, the code layer included) gave components "alike" at the chance level of linear
CKA and intervals that excluded their own estimates; docs/alignment.md reports both.

**The Platonic test** (rule fixed before any result was seen; constants below). Components are *alike* when the
CI of the component similarity lies at or above ``ALIKE`` (0.5), *unalike* when it lies below. Arrangements are
*preserved* when the CI of the depth-order correlation lies at or above ``PRESERVED`` (0.5), *different* when it
lies below it, undecided otherwise. Huh et al.'s claim (convergence) is supported by a pair whose components are
alike and arranged alike; Schaerf's (components alike, arrangements different) by alike components arranged
differently; anything else decides neither.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..engine import Capture, PerTarget, ProgressArg, replace
from ..errors import ConfigError
from ..metrics.alignment import METRICS, gram_similarity, similarity_matrix
from .base import OPEN_PROMPTS, Job, Result, generation_kwargs, settings_dict
from .executor import Executor, Part, Task, run_cells
from .plans import Generations, StudyPlan, capture_bytes, model_bytes
from .workspace import Cell, open_workspace

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import Generator

NAME = "alignment"
ALIKE = 0.5  # component similarity (mean best-match debiased CKA) at or above this: components alike
PRESERVED = 0.5  # Spearman correlation of matched depths at or above this: arrangement preserved
MIN_SCENES = 16  # the CIs' half-samples hold n // 2 scenes; debiased CKA needs 4 and is noisy below 8
#: the measure of best steps, arrangement and matching: debiased CKA, because linear CKA of unrelated features is far
#: from 0 once the feature width nears the number of scenes (0.79 for independent Gaussians of 64 x 256)
STAT_METRIC = "debiased_cka"
#: roles left out of the arrangement and matching: a ``code`` layer holds the scene's one-hot by construction
INPUT_ROLES = ("code",)
CHANCE_PERMUTATIONS = 20  # scene shuffles of the chance level of the component similarity
WORLD_REFERENCES = ("factors", "oracle", "structure", "content", "surface")


@dataclass(frozen=True)
class Settings:
    """An alignment study of two or more models (or one, for within-model similarity). ``n``: scenes (Shapes
    world) or prompt/seed rows (open domain); ``seed``: the scenes' and rows' first seed; ``prompts``: open-domain
    prompts (None: a fixed list, cycled); ``layers``: a glob or globs (None: every layer); ``metrics``: among
    linear_cka, debiased_cka, mutual_knn, cknna; ``k``: neighbours of the kNN measures; ``project``: random
    projection dims of each map (0: pooled); ``n_boot``: bootstrap resamples over scenes; generation: ``steps``
    (None: the model's), ``guidance`` and ``generation`` (other keywords), ``max_batch``."""

    n: int = 64
    seed: int = 0
    prompts: tuple[str, ...] | None = None
    layers: str | tuple[str, ...] | None = None
    metrics: tuple[str, ...] = ("linear_cka", "debiased_cka", "mutual_knn", "cknna")
    k: int = 10
    project: int = 256
    n_boot: int = 200
    steps: int | None = None
    guidance: float | None = None
    max_batch: int | None = None
    generation: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelFeatures:
    """One model's features: ``cells[(layer, step)]`` (n, d) in layer-major order, and what the rows mean."""

    spec: str
    layers: list[str]
    steps: list[int]
    timesteps: list[float]
    iterative: bool
    cells: dict[tuple[str, int], torch.Tensor]
    roles: dict[str, str] = field(default_factory=dict)

    def analysed(self) -> list[str]:
        """The layers that take part in the arrangement and matching (not the experiment's own inputs)."""
        return [n for n in self.layers if self.roles.get(n, "layer") not in INPUT_ROLES]

    def depth(self, layer: str) -> float:
        i = self.layers.index(layer)
        return i / (len(self.layers) - 1) if len(self.layers) > 1 else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# matching the inputs


def _mode(models: Sequence[Generator]) -> str:
    """``scenes`` (all read by the Shapes oracle), ``prompts`` (all text models) or ``latents`` (torch generators)."""
    caps = [m.capabilities for m in models]
    if all(c.oracle == "shapes" for c in caps):
        bad = [m.spec for m, c in zip(models, caps) if c.conditioning != "text" and _code_layer(m) is None]
        if bad:
            raise ConfigError(
                f"{bad[0]} takes neither a prompt nor a scene code (no layer with role 'code'): its "
                "inputs cannot be matched to the other models' scenes"
            )
        return "scenes"
    kinds = {c.conditioning for c in caps}
    if kinds == {"text"}:
        return "prompts"
    if kinds == {"latent"}:
        shapes = {tuple(m.layer_map()["z"].shape) if "z" in m.layer_map() else None for m in models}
        if len(shapes) == 1 and None not in shapes:
            return "latents"
        raise ConfigError(
            f"torch generators with different latent shapes {sorted(map(str, shapes))} get no "
            "common latents: their inputs cannot be matched"
        )
    raise ConfigError(
        "these models' inputs cannot be matched: in the open domain align text models with text models "
        f"(same prompts and seeds) or torch generators with torch generators (same latents); got "
        f"{', '.join(f'{m.spec} ({c.conditioning})' for m, c in zip(models, caps))}"
    )


def _code_layer(model: Generator) -> str | None:
    return next((e.name for e in model.layer_map().layers if e.role == "code"), None)


def scenes(n: int, seed: int = 0) -> np.ndarray:
    """``n`` held-out Shapes scenes (factor indices, (n, 6)), the rows every model of a Shapes-world study sees."""
    from ..world.factors import sample_factors

    return sample_factors(n, seed + 303, split="test")


def _one_hot(factors: np.ndarray, names: Sequence[str]) -> torch.Tensor:
    from ..world.factors import FACTORS, SIZES

    cols = [
        torch.nn.functional.one_hot(torch.as_tensor(factors[:, FACTORS.index(f)]).long(), SIZES[f]).double()
        for f in names
    ]
    return torch.cat(cols, dim=1)


def world_references(factors: np.ndarray) -> dict[str, torch.Tensor]:
    """The references that are not models: the factors (one-hot), the oracle's features of each scene's render, and
    the one-hot of each factor group (structure, content, surface)."""
    from ..world.factors import FACTORS, GROUPS
    from ..world.oracle import read
    from ..world.render import render

    refs = {"factors": _one_hot(factors, FACTORS), "oracle": read(render(factors, 32)).features.double()}
    for group, members in GROUPS.items():
        refs[group] = _one_hot(factors, members)
    return refs


# ---------------------------------------------------------------------------------------------------------------------
# features


def _projection(d_in: int, d_out: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(d_in)
    return torch.randn(d_in, d_out, generator=g, dtype=torch.float64) / d_out**0.5


def collect(
    model: Generator, st: Settings, mode: str, factors: np.ndarray | None, progress: ProgressArg = None
) -> ModelFeatures:
    """One capture of every selected layer at every step (conditional branch) for the matched inputs."""
    gen_kw = generation_kwargs(st.steps, st.guidance, st.generation)
    lmap = model.layer_map()
    names = [e.name for e in (lmap.layers if st.layers is None else lmap.select(st.layers)) if not e.is_space]
    if not names:
        raise ConfigError(f"{model.spec} has no capturable layer matching {st.layers!r}")
    n = st.n
    seeds = [st.seed + i for i in range(n)]
    ivs = []
    if mode == "scenes" and model.capabilities.conditioning != "text":
        from ..world.factors import FACTORS

        code = _code_layer(model)
        assert factors is not None and code is not None
        ivs = [replace(code, PerTarget(_one_hot(factors, FACTORS).float()), targets=list(range(n)))]
        prompts: list[Any] = [None] * n
    elif mode == "scenes":
        from ..world.text import prompts_for

        prompts = list(prompts_for(factors))
    elif mode == "prompts":
        pool = st.prompts or OPEN_PROMPTS
        prompts = [pool[i % len(pool)] for i in range(n)]
    else:
        prompts = [None] * n
    branches = ["cond"] if "cond" in model.branch_labels(model.config(**gen_kw)) else None
    cap = Capture(names, branches=branches, pooled=st.project == 0)
    with tempfile.TemporaryDirectory(prefix="layerscope-align-") as tmp:
        if model.capture_bytes(cap, n, **gen_kw) > cap.budget_bytes:
            cap = Capture(names, branches=branches, pooled=st.project == 0, store=Path(tmp) / "features.zarr")
        res = model.generate(
            prompts, seeds, capture=cap, interventions=ivs, max_batch=st.max_batch, progress=progress, **gen_kw
        )
        steps = [int(s) if s is not None else 0 for s in res.capture.steps_of(names[0])]
        cells: dict[tuple[str, int], torch.Tensor] = {}
        projections: dict[int, torch.Tensor] = {}
        for name in names:
            for k, s in enumerate(steps):
                x = torch.as_tensor(np.asarray(res.capture[name][:, k, 0])).double().flatten(1)
                if st.project and x.shape[1] > st.project:
                    d = x.shape[1]
                    if d not in projections:
                        projections[d] = _projection(d, st.project)
                    x = x @ projections[d]
                cells[(name, s)] = x
    all_t = [float(t) for t in res.timesteps]
    return ModelFeatures(
        model.spec,
        names,
        steps,
        [all_t[s] for s in steps] if all_t else [],
        model.capabilities.iterative,
        cells,
        {n: lmap[n].role for n in names},
    )


# ---------------------------------------------------------------------------------------------------------------------
# analysis


def _matrix(a: list[torch.Tensor], b: list[torch.Tensor] | None, metric: str, k: int) -> np.ndarray:
    return similarity_matrix(a, b, metric=metric, k=k).double().numpy()


def within_table(f: ModelFeatures, metrics: Sequence[str], k: int) -> pd.DataFrame:
    """Layer x layer at each step, and step x step for each layer, of one model."""
    rows = []
    for metric in metrics:
        for s in f.steps:
            m = _matrix([f.cells[(name, s)] for name in f.layers], None, metric, k)
            for i, la in enumerate(f.layers):
                for j, lb in enumerate(f.layers):
                    rows.append((f.spec, metric, "layers", la, s, lb, s, m[i, j]))
        if len(f.steps) > 1:
            for name in f.layers:
                m = _matrix([f.cells[(name, s)] for s in f.steps], None, metric, k)
                for i, sa in enumerate(f.steps):
                    for j, sb in enumerate(f.steps):
                        rows.append((f.spec, metric, "steps", name, sa, name, sb, m[i, j]))
    return pd.DataFrame(rows, columns=["model", "metric", "view", "layer_a", "step_a", "layer_b", "step_b", "value"])


def world_table(f: ModelFeatures, refs: dict[str, torch.Tensor], metrics: Sequence[str], k: int) -> pd.DataFrame:
    keys = [(name, s) for name in f.layers for s in f.steps]
    names = list(refs)
    rows = []
    for metric in metrics:
        m = _matrix([f.cells[c] for c in keys], [refs[r] for r in names], metric, k)
        for i, (layer, s) in enumerate(keys):
            for j, ref in enumerate(names):
                rows.append((f.spec, layer, f.layers.index(layer), f.depth(layer), s, ref, metric, m[i, j]))
    return pd.DataFrame(
        rows, columns=["model", "layer", "layer_index", "depth", "step", "reference", "metric", "value"]
    )


def best_steps(f: ModelFeatures, world: pd.DataFrame | None) -> dict[str, int]:
    """Each layer's best step: where its debiased CKA with the world's factors peaks (the last step without a
    world)."""
    if world is None or world.empty:
        return {name: f.steps[-1] for name in f.layers}
    w = world[(world["model"] == f.spec) & (world["reference"] == "factors") & (world["metric"] == STAT_METRIC)]
    return {name: int(sub.loc[sub["value"].idxmax(), "step"]) for name, sub in w.groupby("layer", sort=False)}


def across_table(
    fa: ModelFeatures, fb: ModelFeatures, best_a: dict[str, int], best_b: dict[str, int], metrics: Sequence[str], k: int
) -> pd.DataFrame:
    """Layer x layer of two models at matched steps (same step index, same step count) and at best steps (-1)."""
    rows = []
    matched = fa.iterative and fb.iterative and fa.steps == fb.steps
    for metric in metrics:
        plans = [(s, {n: s for n in fa.layers}, {n: s for n in fb.layers}) for s in (fa.steps if matched else [])]
        plans.append((-1, best_a, best_b))
        for s, sa, sb in plans:
            m = _matrix([fa.cells[(n, sa[n])] for n in fa.layers], [fb.cells[(n, sb[n])] for n in fb.layers], metric, k)
            for i, la in enumerate(fa.layers):
                for j, lb in enumerate(fb.layers):
                    rows.append((fa.spec, fb.spec, metric, s, la, fa.depth(la), lb, fb.depth(lb), m[i, j]))
    return pd.DataFrame(
        rows, columns=["model_a", "model_b", "metric", "step", "layer_a", "depth_a", "layer_b", "depth_b", "value"]
    )


def _grams(xs: list[torch.Tensor]) -> torch.Tensor:
    """(S, n, n) linear Gram matrices (uncentred), so a subsample of scenes is an index into them."""
    return torch.stack([x @ x.T for x in xs])


def _sub(g: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    return g[:, i][:, :, i]


def _halves(n: int, n_boot: int, seed: int) -> list[torch.Tensor]:
    """``n_boot`` random half-samples of the scenes, without replacement: a scene drawn twice would add an exact
    duplicate pair to both Gram matrices and inflate every CKA."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[: n // 2].sort().values for _ in range(n_boot)]


def _ci(values: np.ndarray, point: float, lo: float = -np.inf, hi: float = np.inf) -> tuple[float, float]:
    """95% interval from half-sample replicates, re-centred on the full-sample estimate: ``point`` plus the
    replicates' 2.5% / 97.5% quantiles minus their median. At half the sample the replicates' spread around the full
    sample's value matches the estimate's own (finite-population factor 1/m - 1/n = 1/n at m = n/2); re-centring
    removes the shift that the smaller sample and the max over layers add."""
    v = values[np.isfinite(values)]
    if len(v) < 2 or not np.isfinite(point):
        return (np.nan, np.nan)
    med = float(np.median(v))
    return (
        float(np.clip(point + np.quantile(v, 0.025) - med, lo, hi)),
        float(np.clip(point + np.quantile(v, 0.975) - med, lo, hi)),
    )


def arrangement_table(f: ModelFeatures, refs: dict[str, torch.Tensor], n_boot: int, seed: int) -> pd.DataFrame:
    """Per factor group: the (layer, step) where debiased CKA with the group's one-hot peaks, its normalised depth
    and step, with half-sample CIs over scenes (the peak found again in each half-sample). Layers with an input role
    (:data:`INPUT_ROLES`) take no part."""
    layers = f.analysed()
    keys = [(name, s) for name in layers for s in f.steps]
    groups = [g for g in ("structure", "content", "surface") if g in refs]
    if not keys or not groups:
        return pd.DataFrame()
    grams = _grams([f.cells[c] for c in keys])
    ref_grams = _grams([refs[g] for g in groups])
    point = gram_similarity(grams, ref_grams, STAT_METRIC).numpy()  # (S, G)
    halves = _halves(grams.shape[1], n_boot, seed)
    boot = np.stack([gram_similarity(_sub(grams, i), _sub(ref_grams, i), STAT_METRIC).numpy() for i in halves])
    rows = []
    for j, group in enumerate(groups):
        top = int(np.nanargmax(point[:, j]))
        layer, step = keys[top]
        finite = np.isfinite(boot[:, :, j]).any(axis=1)  # half-samples where some feature set is defined
        picks = np.where(np.isfinite(boot[finite, :, j]), boot[finite, :, j], -np.inf).argmax(axis=1)
        depths = np.array([f.depth(keys[p][0]) for p in picks])
        steps = np.array([keys[p][1] for p in picks], dtype=float)
        d_ci = _ci(depths, f.depth(layer), 0.0, 1.0)
        s_ci = _ci(steps, float(step), float(min(f.steps)), float(max(f.steps)))
        v_ci = _ci(np.nanmax(boot[finite, :, j], axis=1), float(point[top, j]))
        rows.append(
            {
                "model": f.spec,
                "group": group,
                "layer": layer,
                "depth": f.depth(layer),
                "step": step,
                "value": float(point[top, j]),
                "depth_low": d_ci[0],
                "depth_high": d_ci[1],
                "step_low": s_ci[0],
                "step_high": s_ci[1],
                "value_low": v_ci[0],
                "value_high": v_ci[1],
                "metric": STAT_METRIC,
            }
        )
    return pd.DataFrame(rows)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _verdict(sim: tuple[float, float], rho: tuple[float, float]) -> tuple[str, str, str]:
    comp = "alike" if sim[0] >= ALIKE else "unalike" if sim[1] < ALIKE else "undecided"
    arr = "preserved" if rho[0] >= PRESERVED else "different" if rho[1] < PRESERVED else "undecided"
    if comp == "alike" and arr == "preserved":
        claim = "Huh et al. (convergence)"
    elif comp == "alike" and arr == "different":
        claim = "Schaerf (alike components, different arrangements)"
    else:
        claim = "neither"
    return comp, arr, claim


def matching_table(
    fa: ModelFeatures, fb: ModelFeatures, best_a: dict[str, int], best_b: dict[str, int], n_boot: int, seed: int
) -> pd.DataFrame:
    """Each layer of A matched to its most similar layer of B (debiased CKA, best steps): component similarity
    and depth order with half-sample CIs over scenes, and the Platonic verdict. Layers with an input role
    (:data:`INPUT_ROLES`) take no part."""
    la_names, lb_names = fa.analysed(), fb.analysed()
    ga = _grams([fa.cells[(n, best_a[n])] for n in la_names])
    gb = _grams([fb.cells[(n, best_b[n])] for n in lb_names])
    da = np.array([fa.depth(n) for n in la_names])
    db = np.array([fb.depth(n) for n in lb_names])

    def stats(m: np.ndarray) -> tuple[float, float]:
        ok = np.isfinite(m).any(axis=1)  # a layer whose similarities are all undefined takes no part
        if ok.sum() < 1:
            return float("nan"), float("nan")
        best = np.where(np.isfinite(m), m, -np.inf).argmax(axis=1)
        return float(m[ok, best[ok]].mean()), _spearman(da[ok], db[best[ok]])

    m = gram_similarity(ga, gb, STAT_METRIC).numpy()
    sim, rho = stats(m)
    boot = np.array(
        [
            stats(gram_similarity(_sub(ga, i), _sub(gb, i), STAT_METRIC).numpy())
            for i in _halves(ga.shape[1], n_boot, seed)
        ]
    )
    sim_ci, rho_ci = _ci(boot[:, 0], sim, -1.0, 1.0), _ci(boot[:, 1], rho, -1.0, 1.0)
    # chance level of the component similarity: B's scenes shuffled, so no row of A meets its own scene in B
    g = torch.Generator().manual_seed(seed + 7)
    chance = float(
        np.mean(
            [
                stats(gram_similarity(ga, _sub(gb, torch.randperm(ga.shape[1], generator=g)), STAT_METRIC).numpy())[0]
                for _ in range(CHANCE_PERMUTATIONS)
            ]
        )
    )
    comp, arr, claim = _verdict(sim_ci, rho_ci)
    matches = ";".join(
        f"{la}->{lb_names[j]}" for la, j in zip(la_names, np.where(np.isfinite(m), m, -np.inf).argmax(axis=1))
    )
    return pd.DataFrame(
        [
            {
                "model_a": fa.spec,
                "model_b": fb.spec,
                "metric": STAT_METRIC,
                "component_similarity": sim,
                "similarity_low": sim_ci[0],
                "similarity_high": sim_ci[1],
                "chance_similarity": chance,
                "depth_order": rho,
                "order_low": rho_ci[0],
                "order_high": rho_ci[1],
                "components": comp,
                "arrangement": arr,
                "supports": claim,
                "layers_a": len(la_names),
                "layers_b": len(lb_names),
                "matches": matches,
            }
        ]
    )


def _layers_table(f: ModelFeatures) -> pd.DataFrame:
    ts = dict(zip(f.steps, f.timesteps))
    return pd.DataFrame(
        [
            {
                "model": f.spec,
                "layer": name,
                "layer_index": i,
                "depth": f.depth(name),
                "step": s,
                "timestep": ts.get(s, np.nan),
                "dims": int(f.cells[(name, s)].shape[1]),
            }
            for i, name in enumerate(f.layers)
            for s in f.steps
        ]
    )


# ---------------------------------------------------------------------------------------------------------------------
# the experiment


def _check(models: Sequence[Generator], st: Settings) -> str:
    if not models:
        raise ConfigError("give at least one model to align")
    specs = [m.spec for m in models]
    if len(set(specs)) != len(specs):
        raise ConfigError(f"each model once: {specs} names one twice")
    bad = [m for m in st.metrics if m not in METRICS]
    if bad or not st.metrics:
        raise ConfigError(f"unknown alignment metric(s) {bad}; valid: {', '.join(METRICS)}")
    if st.n < MIN_SCENES:
        raise ConfigError(
            f"n must be at least {MIN_SCENES} scenes or rows (debiased CKA on half-samples of them), got {st.n}"
        )
    if any(m in ("mutual_knn", "cknna") for m in st.metrics) and not 1 <= st.k < st.n:
        raise ConfigError(f"k must be between 1 and n - 1 = {st.n - 1} for the kNN measures, got {st.k}")
    if st.project < 0 or st.n_boot < 10:
        raise ConfigError(f"project must be >= 0 and n_boot >= 10, got {st.project} and {st.n_boot}")
    mode = _mode(models)
    for m in models:
        lmap = m.layer_map()
        chosen = lmap.layers if st.layers is None else [e for e in lmap.select(st.layers) if not e.is_space]
        if not chosen:
            raise ConfigError(f"{m.spec} has no capturable layer" + (f" matching {st.layers!r}" if st.layers else ""))
    return mode


def plan(models: Generator | Sequence[Generator], settings: Settings) -> list[StudyPlan]:
    """What :func:`run` will generate (``--dry-run``), one plan per model; nothing is generated. Each model makes the
    ``n`` matched inputs once, every selected layer captured at every step (streamed to a temporary store when
    over the capture's memory budget)."""
    ms = [models] if not isinstance(models, Sequence) else list(models)
    st = settings
    _check(ms, st)
    gen_kw = generation_kwargs(st.steps, st.guidance, st.generation)
    plans = []
    for m in ms:
        lmap = m.layer_map()
        names = [e.name for e in (lmap.layers if st.layers is None else lmap.select(st.layers)) if not e.is_space]
        cfg = m.config(**gen_kw)
        labels = m.branch_labels(cfg)
        cap = Capture(names, branches=["cond"] if "cond" in labels else None, pooled=st.project == 0)
        held = capture_bytes(m, cap, st.n, **gen_kw)
        size = st.max_batch or m.default_max_batch
        row = Generations(
            f"{st.n} matched inputs, {len(names)} layers at every step",
            -(-st.n // size),
            st.n,
            min(st.n, size),
            m.num_steps(cfg),
            len(labels),
            held,
            held if held > cap.budget_bytes else 0,  # a capture over the budget streams to a temporary store
            streamed=held > cap.budget_bytes,
        )
        weights, per_row = model_bytes(m)
        plans.append(StudyPlan(NAME, m.spec, [row], weights, per_row))
    return plans


def run(
    models: Generator | Sequence[Generator],
    settings: Settings,
    out: str | Path | None = None,
    progress: ProgressArg = None,
    executor: Executor | None = None,
) -> Result:
    """The alignment study on loaded models (the same inputs for all, see the module docstring): tables
    ``layers``, ``within``, ``across``, ``world``, ``arrangement``, ``matching``; the record holds the settings, the
    input mode, the verdict rule and each model's layers and steps. ``out``: the folder the Result is saved in;
    each model's features are kept there as a cell until then, so a rerun collects only the missing models'.
    ``executor``: where each model's features are collected (:mod:`.executor`); the tables are the same either way."""
    ms = [models] if not isinstance(models, Sequence) else list(models)
    st = settings
    mode = _check(ms, st)
    factors = scenes(st.n, st.seed) if mode == "scenes" else None
    with open_workspace(out, NAME, [m.spec for m in ms], st, keep_cells=False) as ws:
        finished = ws.finished()
        if finished is not None:
            return finished
        tasks = [
            Task(f"features_{i}_{m.spec}", m.spec, _features_cell, (st, mode, factors)) for i, m in enumerate(ms)
        ]  # one cell per model: its features
        desc = f"alignment: features of {len(ms)} models"
        parts = run_cells(ws, {m.spec: m for m in ms}, tasks, executor, progress, desc)
        feats = [_features_from(Cell(arrays=p.arrays, record=p.record)) for p in parts]
        return ws.save(_analyse(ms, st, mode, factors, feats))


def _features_cell(model: "Generator", st: Settings, mode: str, factors: Any) -> Part:
    """One model's features as an executor's cell."""
    f = collect(model, st, mode, factors)
    return Part(arrays=_feature_arrays(f), record=_feature_record(f))


def _feature_arrays(f: ModelFeatures) -> dict[str, np.ndarray]:
    return {f"{layer}@{step}": x.numpy() for (layer, step), x in f.cells.items()}


def _feature_record(f: ModelFeatures) -> dict[str, Any]:
    return {
        "spec": f.spec,
        "layers": f.layers,
        "steps": f.steps,
        "timesteps": f.timesteps,
        "iterative": f.iterative,
        "roles": f.roles,
    }


def _features_from(cell: Any) -> ModelFeatures:
    r = cell.record
    cells = {
        (layer, int(step)): torch.from_numpy(cell.arrays[f"{layer}@{step}"])
        for layer in r["layers"]
        for step in r["steps"]
    }
    return ModelFeatures(r["spec"], r["layers"], r["steps"], r["timesteps"], r["iterative"], cells, r["roles"])


def _analyse(
    ms: list[Generator], st: Settings, mode: str, factors: np.ndarray | None, feats: list[ModelFeatures]
) -> Result:
    """The tables and record from every model's features."""
    refs = world_references(factors) if factors is not None else {}
    metrics = list(dict.fromkeys([*st.metrics, STAT_METRIC]))  # the arrangement and matching need it
    within = pd.concat([within_table(f, metrics, st.k) for f in feats], ignore_index=True)
    world = (
        pd.concat([world_table(f, refs, metrics, st.k) for f in feats], ignore_index=True)
        if refs
        else pd.DataFrame(columns=["model", "layer", "layer_index", "depth", "step", "reference", "metric", "value"])
    )
    best = {f.spec: best_steps(f, world if refs else None) for f in feats}
    across, matching = [], []
    for a in range(len(feats)):
        for b in range(len(feats)):
            if a == b:
                continue
            fa, fb = feats[a], feats[b]
            if a < b:
                across.append(across_table(fa, fb, best[fa.spec], best[fb.spec], metrics, st.k))
            matching.append(matching_table(fa, fb, best[fa.spec], best[fb.spec], st.n_boot, st.seed + a * 31 + b))
    tables = {
        "layers": pd.concat([_layers_table(f) for f in feats], ignore_index=True),
        "within": within,
        "across": pd.concat(across, ignore_index=True) if across else pd.DataFrame(),
        "world": world,
        "arrangement": (
            pd.concat([arrangement_table(f, refs, st.n_boot, st.seed) for f in feats], ignore_index=True)
            if refs
            else pd.DataFrame()
        ),
        "matching": pd.concat(matching, ignore_index=True) if matching else pd.DataFrame(),
    }
    record = {
        "models": [m.spec for m in ms],
        "model": "+".join(m.spec for m in ms),
        "settings": settings_dict(st),
        "mode": mode,
        "rows": st.n,
        "alike": ALIKE,
        "preserved": PRESERVED,
        "best_steps": best,
        "steps": {f.spec: f.steps for f in feats},
        "iterative": {f.spec: f.iterative for f in feats},
        "references": list(refs),
        "notes": [],
    }
    return Result(NAME, tables, record)


MAIN_MODELS = ("zoo:unet", "zoo:dit", "zoo:vae", "zoo:gan")
FULL = Settings(n=64, steps=10)
QUICK = Settings(n=24, steps=4, metrics=("linear_cka", "mutual_knn"), k=5, n_boot=50)


def main_job(quick: bool = False) -> list[Job]:
    """The four zoo models on the same held-out scenes."""
    return [Job(MAIN_MODELS, QUICK if quick else FULL, folder="zoo")]
