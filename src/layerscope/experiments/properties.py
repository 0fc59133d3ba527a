"""Latent-space properties as numbers: density, smoothness, organization, relevance (Schaerf 2025, Figure 4).

Schaerf asks whether a model has a latent space in the GAN/VAE sense, one space that is dense, smooth, organized and
relevant, and judges the candidate spaces of diffusion models by eye. This module scores every candidate space of a
model (initial noise, text tokens, the end-of-sentence token, h-space, each skip, any layer; a GAN/VAE latent) on
each property in [0, 1], with a bootstrap CI. The definitions were fixed before any result was looked at:

Notation. A space ``S`` is a site of the model, perturbed at the steps it is scored at (per-step spaces: every step
by default, with the same random direction scaled by each step's spread; text spaces on the conditional branch
only). ``n`` base samples (prompt, seed) are generated and ``S`` captured; ``mu`` and ``sigma`` are the per-element
mean and standard deviation of ``S`` over them (per step): the space's own empirical distribution. Every perturbed
image keeps everything else fixed (prompt, seed, all other sites). Images are compared by the distance ``d`` between
feature vectors: the oracle's features in the Shapes world, pixels otherwise. ``d_far`` is the median distance
between the base images of two different samples, and ``c_i(r) = d(I_i, I_i(r)) / d_far`` is the normalised change
of sample ``i`` when ``r * sigma * eps`` (``eps ~ N(0, I)``) is added to ``S``.

- **density**: replace ``S`` by a fresh point ``mu + sigma * eps`` of its per-element Gaussian; the share of these
  images that are in-distribution, divided by the share among the model's own samples (capped at 1), so a space
  scores by what sampling it costs, not by the model's quality. In-distribution: the oracle's max-probability is
  >= 0.9 on every factor (Shapes world); otherwise the image's nearest-neighbour distance to the base images is within
  the 95th percentile of the base images' own leave-one-out nearest-neighbour distances.
- **smoothness**: ``1 - mean_i mean_r min(1, c_i(r))`` over the small radii ``r`` in ``SMOOTH_RADII`` (0.1 and 0.3
  of the space's own spread): a tiny move giving a similar image scores near 1, a jump to an unrelated image near 0.
- **organization**: the mean of two parts, each floored at 0. *Path*: along the linear interpolation from sample
  ``i``'s value of ``S`` to sample ``j``'s (``INTERIOR`` points, endpoints at 0 and 1), the images move
  monotonically from one endpoint to the other: in the Shapes world, the share of factors that differ between the
  endpoint images whose oracle readings move monotonically from one endpoint's value to the other's (shape: only
  the two values, switching once; scale and orientation: between the two, never stepping back; hues: the same along
  one of the two arcs of the colour circle); otherwise
  the Spearman correlation of ``d(I_a, I_0) - d(I_a, I_1)`` with ``a`` over the interior points. A path whose
  endpoints read alike (open domain: closer than 1% of ``d_far``) scores 0 (it shows no change to organise).
  *Distance*: per base sample, the Spearman
  correlation between standardised distances in ``S`` and image distances to the other base samples.
- **relevance**: the mean of *change*, ``mean_i min(1, sqrt(2) * c_i(1))`` (a 1-sigma move is 1/sqrt(2) of the
  typical distance between two independent points, so an output that moves in proportion scores 1), and, where a
  concept can be read, *concept gain*: add the concept's direction in ``S`` and measure the share of the way from the
  base rate to always showing the concept: ``max(0, p_added - p_base) / (1 - p_base)``. Shapes world: the concept
  is a red object (``object_hue`` = red); its direction is the mean of ``S`` over the same samples with "red" in
  the prompt minus over the base samples (text-conditioned models), or the mean of ``S`` over pool samples the oracle
  reads as red minus the pool mean (GAN/VAE latents). Open domain: the concept is a prompt (default "a dog"), and
  ``p`` is replaced by the mean share of the distance to that seed's concept image that the addition closes.

Marks as in Figure 4: ``V`` for a score >= 0.67, ``~`` (partial) for >= 0.33, ``X`` below.

The experiment's shape (see :mod:`.base`): :class:`Settings` -> :func:`run` -> a :class:`~.base.Result` with tables
``properties`` (the scores) and ``properties_details`` (the measurements behind them) and the artifact ``strips``
(example images per space); :func:`main_job` names the zoo models and the sanity generators built to fail.
What a space is, which spaces are conditions and which scorer applies are read from the model's metadata
(``LayerInfo.role``, ``model.capabilities``), never from its spec or family.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..engine import Capture, Intervention, PerTarget, resolve_steps
from ..errors import ConfigError
from ..progress import ProgressArg
from ..stats.bootstrap import bootstrap_ci
from ..validate import MAX_STEPS, check_int, check_seeds
from .base import OPEN_PROMPTS, Job, Result, generation_kwargs, settings_dict
from .executor import Executor, Part, Task, run_cells
from .plans import Generations, StudyPlan, capture_bytes, image_bytes, model_bytes
from .workspace import Cell, Workspace, open_workspace

if TYPE_CHECKING:
    from ..layers import LayerInfo
    from ..models.base import Generator

NAME = "properties"
PROPERTIES = ("density", "smoothness", "organization", "relevance")
SMOOTH_RADII = (0.1, 0.3)
UNIT_RADIUS = 1.0
RADII = SMOOTH_RADII + (UNIT_RADIUS,)
INTERIOR = (1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6)
FULL_SCORE, PARTIAL_SCORE = 0.67, 0.33  # Figure 4's marks: V at or above FULL_SCORE, ~ at or above PARTIAL_SCORE
IN_DIST_QUANTILE = 0.95
STILL = 0.01  # open domain: endpoints closer than this share of d_far "read alike"
CONCEPT = ("object_hue", 0)  # Shapes world: a red object
OPEN_CONCEPT = "a dog"
CONDITION_ROLE = "condition"  # prompt conditions (text tokens, EOS, image embeddings): perturbed on the cond branch
NOT_A_SPACE_ROLE = "denoiser_input"  # x_t: perturbing it does not change the sampler's own latent
#: the Result's tables and artifact (saved as ``properties.parquet``, ``properties_details.parquet``, ``strips.npz``)
SCORES, DETAILS, STRIPS = "properties", "properties_details", "strips"


def mark(score: float) -> str:
    """Figure 4's mark for a score: V (>= 0.67), ~ (partial, >= 0.33), X (below), ? (undefined)."""
    if score is None or not np.isfinite(score):
        return "?"
    return "V" if score >= FULL_SCORE else "~" if score >= PARTIAL_SCORE else "X"


def candidate_spaces(model: "Generator", **size: Any) -> list[str]:
    """The spaces the adapter offers (noise, text tokens, EOS, VAE latent, h-space, skips; a GAN/VAE latent), less
    the denoiser's input (role ``denoiser_input``), which the sampler does not read back."""
    return [e.name for e in model.layer_map(size.get("height"), size.get("width")).spaces if e.role != NOT_A_SPACE_ROLE]


# ---------------------------------------------------------------------------------------------------------------------
# plan


@dataclass
class PropertiesPlan:
    model: str
    spaces: list[str]
    steps: list[int] | None  # step indices perturbed in per-step spaces (None: single-pass model)
    prompts: list[Any]
    seeds: list[int]
    pairs: list[tuple[int, int]]
    scorer: str  # oracle | pixel
    concept: Any  # (factor, value) for the oracle, a prompt, or None
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    text: bool = True
    pool: int = 256  # latent models with the oracle: samples read to find the concept's direction

    def record(self) -> dict[str, Any]:
        """What the report shows of the plan; ``generation``: the keywords passed to ``generate``."""
        return {
            "model": self.model,
            "spaces": self.spaces,
            "steps": self.steps,
            "n": len(self.seeds),
            "pairs": len(self.pairs),
            "scorer": self.scorer,
            "concept": _concept_text(self.concept),
            "radii": list(RADII),
            "interior": [round(a, 4) for a in INTERIOR],
            "generation": self.gen_kwargs,
        }


def _concept_text(concept: Any) -> str | None:
    if isinstance(concept, tuple):
        from ..world.text import COLOURS

        return f"{concept[0]} = {COLOURS[concept[1]] if concept[0].endswith('_hue') else concept[1]}"
    return concept


def plan_properties(
    model: "Generator",
    spaces: Any = None,
    *,
    n: int = 16,
    pairs: int = 8,
    steps: Any = None,
    prompts: Sequence[Any] | None = None,
    seed: int = 0,
    scorer: str = "auto",
    concept: Any = "auto",
    **gen_kwargs: Any,
) -> PropertiesPlan:
    """Validate the settings and resolve spaces, steps, samples and scorer before any generation.

    ``steps``: the steps at which per-step spaces are perturbed (None: every step). ``scorer``: ``auto`` picks the
    oracle where one reads the model's images (``capabilities.default_scorer``), pixels otherwise."""
    check_int(n, "n (base samples)", minimum=4)
    check_int(pairs, "pairs", minimum=1, maximum=n)
    check_seeds([seed, seed + n - 1], "seed (first seed; the base samples take seed .. seed + n - 1)")
    cfg = model.config(**gen_kwargs)
    lmap = model.layer_map(cfg.height, cfg.width)
    caps = model.capabilities
    if spaces is None:
        names = candidate_spaces(model, height=cfg.height, width=cfg.width)
    else:
        asked = [spaces] if isinstance(spaces, str) else list(spaces)
        bad = [s for s in asked if s in lmap and lmap[s].role == NOT_A_SPACE_ROLE]
        names = [e.name for e in lmap.select(asked) if e.role != NOT_A_SPACE_ROLE]  # globs skip x_t
        if bad:
            raise ConfigError(
                f"{bad[0]} is the denoiser's input, which the sampler does not read back; score "
                "'noise' or a layer instead"
            )
    if not names:
        raise ConfigError(f"no space of {model.spec} matches {spaces!r}")
    num = model.num_steps(cfg)
    step_list = list(resolve_steps(steps, num)) if num else None
    if steps is not None and not num:
        raise ConfigError(f"{model.spec} generates in one pass: it has no steps to choose")
    if scorer == "auto":
        scorer = "oracle" if caps.default_scorer == "oracle" else "pixel"
    if scorer not in ("oracle", "pixel"):
        raise ConfigError(f"unknown scorer {scorer!r}; valid: auto, oracle, pixel")
    if scorer == "oracle" and caps.oracle != "shapes":
        raise ConfigError(
            f"the oracle scorer reads Shapes-world images and no oracle reads {model.spec}'s: use the pixel scorer"
        )
    text = caps.conditioning == "text"
    latent = caps.conditioning == "latent"  # a generator of a latent vector: no prompt at all
    if prompts is None:
        if latent:
            prompts = [None] * n
        elif not text:
            raise ConfigError(
                f"{model.spec} is conditioned on {caps.conditioning}, not text: give n={n} prompts "
                f"({caps.conditioning}), one per base sample"
            )
        elif scorer == "oracle":
            from ..world.factors import sample_factors
            from ..world.text import prompts_for

            prompts = prompts_for(sample_factors(n, seed + 101, split="test"))
        else:
            prompts = [OPEN_PROMPTS[i % len(OPEN_PROMPTS)] for i in range(n)]
    prompts = list(prompts)
    if len(prompts) != n:
        raise ConfigError(f"give n={n} prompts, got {len(prompts)}")
    if concept == "auto":
        concept = CONCEPT if scorer == "oracle" and (text or latent) else (OPEN_CONCEPT if text else None)
    if isinstance(concept, str) and not text:
        raise ConfigError(f"{model.spec} takes no prompt: a concept prompt needs a text-conditioned model")
    if isinstance(concept, (tuple, list)):
        concept = tuple(concept)
        if scorer != "oracle":
            raise ConfigError("a Shapes-world concept (factor, value) needs the oracle scorer")
        if not (text or latent):
            raise ConfigError(
                f"a Shapes-world concept needs a text-conditioned or latent generator; {model.spec} "
                f"is conditioned on {caps.conditioning}"
            )
    return PropertiesPlan(
        model.spec,
        names,
        step_list,
        prompts,
        [seed + i for i in range(n)],
        [(i, (i + 1) % n) for i in range(pairs)],
        scorer,
        concept,
        {k: v for k, v in gen_kwargs.items()},
        text,
    )


# ---------------------------------------------------------------------------------------------------------------------
# reading images


class _Reader:
    """Features, in-distribution flags and (Shapes world) factor readings of images."""

    def __init__(self, scorer: str) -> None:
        self.scorer = scorer
        self.oracle = None
        if scorer == "oracle":
            from ..world.oracle import load_oracle

            self.oracle = load_oracle()
        self.ref: torch.Tensor | None = None
        self.threshold = 0.0

    def read(self, images: torch.Tensor) -> dict[str, Any]:
        if self.oracle is not None:
            from ..world.oracle import read
            from ..world.quality import IN_DISTRIBUTION

            r = read(images, self.oracle)
            return {
                "features": r.features.double(),
                "pred": r.pred,
                "in_dist": (r.confidence >= IN_DISTRIBUTION).all(axis=1).astype(float),
            }
        feats = images.flatten(1).double()
        return {"features": feats, "pred": None, "in_dist": self._nn_in_dist(feats)}

    def set_reference(self, feats: torch.Tensor) -> np.ndarray:
        """Base features as the reference set of the nearest-neighbour proxy; returns the base flags."""
        self.ref = feats
        d = torch.cdist(feats, feats)
        d.fill_diagonal_(math.inf)
        loo = d.min(dim=1).values.numpy()
        self.threshold = float(np.quantile(loo, IN_DIST_QUANTILE))
        return (loo <= self.threshold + 1e-12).astype(float)

    def _nn_in_dist(self, feats: torch.Tensor) -> np.ndarray:
        if self.ref is None:
            return np.full(len(feats), np.nan)
        return (torch.cdist(feats, self.ref).min(dim=1).values.numpy() <= self.threshold + 1e-12).astype(float)


# ---------------------------------------------------------------------------------------------------------------------
# statistics


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation; 0 where either side is constant (no order to correlate)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) < 1e-12:
        return 0.0
    return float(spearmanr(x, y).statistic)


def _density(resampled: np.ndarray, base: np.ndarray) -> float:
    b = base.mean() if len(base) else math.nan
    return min(1.0, resampled.mean() / b) if b > 0 else math.nan


def _smoothness(change: np.ndarray) -> float:
    return 1.0 - float(np.mean(change))


def _organization(path: np.ndarray, rho: np.ndarray) -> float:
    return 0.5 * (max(0.0, float(np.mean(path))) + max(0.0, float(np.mean(rho))))


def _gain(added: np.ndarray, base: np.ndarray) -> float:
    pa, pb = float(np.mean(added)), float(np.mean(base))
    return max(0.0, pa - pb) / (1 - pb) if pb < 1 else 0.0


def _relevance(unit: np.ndarray, added: np.ndarray | None = None, base: np.ndarray | None = None) -> float:
    u = float(np.mean(unit))
    if added is None:
        return u
    return 0.5 * (u + (_gain(added, base) if base is not None else float(np.mean(added))))


# ---------------------------------------------------------------------------------------------------------------------
# running


def _space_values(result: Any, name: str) -> torch.Tensor:
    """(sample, step, *shape) values of a captured space (first captured branch)."""
    return result.capture[name][:, :, 0].double()


def _interventions(
    info: Any,
    op: str,
    values: torch.Tensor,
    rows: list[int],
    steps: list[int] | None,
    branches: list[str] | None,
    shared: bool = False,
) -> list[Intervention]:
    """``values``: (rows, step, *shape) per-row values, or (step, *shape) for one value shared by all rows."""
    out = []
    per_step = info.per_step and steps is not None
    for k, s in enumerate(steps if per_step else [None]):
        v = values[k] if shared else values[:, k]
        src = v.float() if shared else PerTarget(v.float())
        out.append(Intervention(info.name, op, src, targets=rows, steps=[s] if per_step else None, branches=branches))
    return out


def run_properties(
    gen: "Generator",
    spaces: Any = None,
    *,
    n: int = 16,
    pairs: int = 8,
    steps: Any = None,
    prompts: Sequence[Any] | None = None,
    seed: int = 0,
    scorer: str = "auto",
    concept: Any = "auto",
    max_batch: int | None = 64,
    progress: ProgressArg = False,
    n_boot: int = 1000,
    cells: Workspace | None = None,
    executor: Executor | None = None,
    **gen_kwargs: Any,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray], dict[str, Any]]:
    """Score each space of the loaded model ``gen`` on the four properties (the work behind :func:`run`).

    Returns ``(scores, details, strips, record)``: the tidy scores (``model, space, kind, property, score, low,
    high, mark``), the measurements behind them (``model, space, metric, value``), example image strips per space
    (uint8, (k, 3, H, W): base, a density sample, the radii, the interpolation path, the concept addition) and the
    plan's record with the strips' column names. ``cells``: a workspace keeping each scored space as a cell, so an
    interrupted run scores only the missing spaces (the base samples are regenerated when any space is missing).
    ``executor``: where the spaces are scored, one cell each, after the base generation here (:mod:`.executor`).
    """
    plan = plan_properties(
        gen,
        spaces,
        n=n,
        pairs=pairs,
        steps=steps,
        prompts=prompts,
        seed=seed,
        scorer=scorer,
        concept=concept,
        **gen_kwargs,
    )
    cfg = gen.config(**gen_kwargs)
    lmap = gen.layer_map(cfg.height, cfg.width)
    infos = {s: lmap[s] for s in plan.spaces}
    labels = gen.branch_labels(cfg)
    cap_branches = ["cond"] if "cond" in labels else None
    guided = "uncond" in labels
    reader = _Reader(plan.scorer)
    kw = dict(max_batch=max_batch, **gen_kwargs)
    capture = Capture(layers=plan.spaces, steps=plan.steps, branches=cap_branches)

    done = {space: cells.get(f"space_{space}") if cells is not None else None for space in plan.spaces}
    if all(c is not None for c in done.values()):
        return _assemble(plan, done, plan.concept is not None)
    base = gen.generate(plan.prompts, plan.seeds, capture=capture, **kw)
    values = {s: _space_values(base, s) for s in plan.spaces}
    base_read = reader.read(base.images)
    if plan.scorer == "pixel":
        base_read["in_dist"] = reader.set_reference(base_read["features"])
    directions, concept_base, concept_images = _concepts(gen, plan, capture, base, values, base_read, reader, kw)

    fb = base_read["features"]
    dist = torch.cdist(fb, fb).numpy()
    iu = np.triu_indices(n, 1)
    d_far = float(np.median(dist[iu]))
    shared = _Shared(
        plan, guided, reader, base_read, base.images[:1], fb, dist, d_far, directions, concept_base, concept_images,
        seed, n_boot, kw,
    )  # fmt: skip
    tasks = [
        Task(f"space_{space}", gen.spec, _space_cell, (shared, si, space, infos[space], values[space]))
        for si, space in enumerate(plan.spaces)
    ]
    ws = cells if cells is not None else Workspace(None, {})
    parts = run_cells(
        ws, {gen.spec: gen}, tasks, executor, progress, f"scoring {len(plan.spaces)} spaces of {gen.spec}"
    )
    done = {space: Cell(p.tables, p.arrays) for space, p in zip(plan.spaces, parts)}
    return _assemble(plan, done, directions is not None)


@dataclass
class _Shared:
    """What every space's cell reads of the base generation (shipped to whichever process scores the space)."""

    plan: PropertiesPlan
    guided: bool
    reader: "_Reader"
    base_read: dict[str, Any]
    base_image: torch.Tensor
    fb: torch.Tensor
    dist: np.ndarray
    d_far: float
    directions: dict[str, torch.Tensor] | None
    concept_base: Any
    concept_images: Any
    seed: int
    n_boot: int
    kw: dict[str, Any]


def _space_cell(gen: "Generator", sh: _Shared, si: int, space: str, info: "LayerInfo", v: torch.Tensor) -> Part:
    """Score one space: one generation of every perturbation row, its readings, the four properties' estimates."""
    plan, guided, reader, base_read, fb, dist, d_far = (
        sh.plan,
        sh.guided,
        sh.reader,
        sh.base_read,
        sh.fb,
        sh.dist,
        sh.d_far,
    )
    directions, concept_base, concept_images, seed, n_boot, kw = (
        sh.directions,
        sh.concept_base,
        sh.concept_images,
        sh.seed,
        sh.n_boot,
        sh.kw,
    )
    n = len(plan.prompts)
    scores, details = [], []
    branches = ["cond"] if (guided and info.role == CONDITION_ROLE) else None
    rng = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(space.encode()))
    mu, sd = v.mean(0), v.std(0)
    eps = torch.randn(v.shape[:1] + v.shape[2:], generator=rng, dtype=torch.float64).unsqueeze(1)
    eps2 = torch.randn(v.shape[:1] + v.shape[2:], generator=rng, dtype=torch.float64).unsqueeze(1)
    rows_p, rows_s, ivs = [], [], []

    def block(k: int, prompts_idx: list[int]) -> list[int]:
        start = len(rows_p)
        rows_p.extend(plan.prompts[i] for i in prompts_idx)
        rows_s.extend(plan.seeds[i] for i in prompts_idx)
        return list(range(start, start + k))

    idx = list(range(n))
    r_dens = block(n, idx)
    ivs += _interventions(info, "replace", mu + sd * eps2, r_dens, plan.steps, branches)
    r_rad = {}
    for r in RADII:
        r_rad[r] = block(n, idx)
        ivs += _interventions(info, "add", r * sd * eps, r_rad[r], plan.steps, branches)
    path_src = [a for (a, _b) in plan.pairs for _ in (*INTERIOR, 1.0)]
    r_path = block(len(path_src), path_src)
    alphas = torch.tensor([*INTERIOR, 1.0], dtype=torch.float64)
    interp = torch.cat(
        [
            (1 - alphas.view(-1, *[1] * (v.ndim - 1))) * v[a] + alphas.view(-1, *[1] * (v.ndim - 1)) * v[b]
            for a, b in plan.pairs
        ]
    )
    ivs += _interventions(info, "replace", interp, r_path, plan.steps, branches)
    r_con: list[int] = []
    if directions is not None and space in directions:
        r_con = block(n, idx)
        ivs += _interventions(info, "add", directions[space], r_con, plan.steps, branches, shared=True)
    out = gen.generate(rows_p, rows_s, interventions=ivs, **kw)
    rd = reader.read(out.images)
    feats = rd["features"]

    def change(rows: list[int]) -> np.ndarray:
        d = (feats[rows] - fb).norm(dim=1).numpy()
        return d / d_far if d_far > 0 else np.zeros_like(d)

    c = {r: change(r_rad[r]) for r in RADII}
    smooth_vals = np.mean([np.minimum(1.0, c[r]) for r in SMOOTH_RADII], axis=0)
    unit_vals = np.minimum(1.0, math.sqrt(2) * c[UNIT_RADIUS])
    path_vals = _paths(plan, rd, r_path, base_read, d_far)
    rho_vals = _distance_rho(v, sd, dist)
    added = base_c = None
    if r_con:
        added, base_c = _concept_outcome(plan, rd, r_con, concept_base, concept_images, feats, fb)
    boot = dict(n_boot=n_boot, seed=seed + si)
    est = {
        "density": bootstrap_ci(_density, [rd["in_dist"][r_dens], base_read["in_dist"]], **boot),
        "smoothness": bootstrap_ci(_smoothness, [smooth_vals], **boot),
        "organization": bootstrap_ci(_organization, [path_vals, rho_vals], **boot),
        "relevance": bootstrap_ci(_relevance, [unit_vals] + [a for a in (added, base_c) if a is not None], **boot),
    }
    kind = info.kind if info.is_space else "layer"
    for prop, (s, lo, hi) in est.items():
        scores.append(
            {
                "model": gen.spec,
                "space": space,
                "kind": kind,
                "property": prop,
                "score": s,
                "low": lo,
                "high": hi,
                "mark": mark(s),
            }
        )
    det = {f"change@{r:g}": float(np.mean(c[r])) for r in RADII}
    det.update({f"in_dist@{r:g}": float(np.mean(rd["in_dist"][r_rad[r]])) for r in RADII})
    det.update(
        {
            "in_dist_base": float(np.mean(base_read["in_dist"])),
            "in_dist_resampled": float(np.mean(rd["in_dist"][r_dens])),
            "path": float(np.mean(path_vals)),
            "rho_distance": float(np.mean(rho_vals)),
            "unit_change": float(np.mean(unit_vals)),
            "d_far": d_far,
            "space_dims": int(np.prod(info.shape)),
            "rows": len(rows_p),
        }
    )
    if r_con and base_c is not None:  # Shapes world: shares of images read as the concept
        det.update(
            concept_base=float(np.mean(base_c)),
            concept_added=float(np.mean(added)),
            concept_gain=_gain(added, base_c),
        )
    elif r_con:  # open domain: the share of the distance to the concept image closed
        det["concept_gain"] = float(np.mean(added))
    details += [{"model": gen.spec, "space": space, "metric": k, "value": val} for k, val in det.items()]
    pick = [r_dens[0]] + [r_rad[r][0] for r in RADII] + r_path[: len(INTERIOR) + 1] + r_con[:1]
    imgs = torch.cat([sh.base_image, out.images[pick]])
    return Part(
        {"scores": pd.DataFrame.from_records(scores), "details": pd.DataFrame.from_records(details)},
        {"strip": (imgs.clamp(0, 1) * 255).round().to(torch.uint8).numpy()},
    )


def _assemble(
    plan: PropertiesPlan, cells: dict[str, Any], concept: bool
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray], dict[str, Any]]:
    """The tables, strips and record from every space's cell (in the plan's order)."""
    scores = pd.concat([cells[s].tables["scores"] for s in plan.spaces], ignore_index=True)
    details = pd.concat([cells[s].tables["details"] for s in plan.spaces], ignore_index=True)
    strips = {s: cells[s].arrays["strip"] for s in plan.spaces}
    record = plan.record()
    record["strip_columns"] = (
        ["sample", "density"]
        + [f"+{r:g} sd" for r in RADII]
        + [f"a={a:.2f}" for a in INTERIOR]
        + ["a=1"]
        + (["+concept"] if concept else [])
    )
    return scores, details, strips, record


def _concepts(gen, plan: PropertiesPlan, capture: Capture, base, values, base_read, reader: _Reader, kw):
    """The concept's direction per space, the base outcome per sample, and (open domain) the concept images."""
    if plan.concept is None:
        return None, None, None
    if isinstance(plan.concept, tuple):
        from ..world.factors import FACTORS

        f, val = FACTORS.index(plan.concept[0]), int(plan.concept[1])
        base_c = (base_read["pred"][:, f] == val).astype(float)
        if plan.text:
            from ..world.text import factors_from_prompt, prompt_for

            cprompts = []
            for p in plan.prompts:
                fac = factors_from_prompt(p)
                fac[f] = val
                cprompts.append(prompt_for(fac))
            cres = gen.generate(cprompts, plan.seeds, capture=capture, **kw)
            dirs = {s: (_space_values(cres, s) - values[s]).mean(0) for s in plan.spaces}
            return dirs, base_c, None
        # latent generators: class-mean difference over a pool read by the oracle
        pool_seeds = [plan.seeds[0] + 10_000 + i for i in range(plan.pool)]
        pres = gen.generate([None] * plan.pool, pool_seeds, capture=capture, **kw)
        hit = reader.read(pres.images)["pred"][:, f] == val
        if hit.sum() < 3:
            return None, None, None
        dirs = {}
        for s in plan.spaces:
            pv = _space_values(pres, s)
            dirs[s] = pv[torch.from_numpy(hit)].mean(0) - pv.mean(0)
        return dirs, base_c, None
    cres = gen.generate([plan.concept] * len(plan.seeds), plan.seeds, capture=capture, **kw)
    dirs = {s: (_space_values(cres, s) - values[s]).mean(0) for s in plan.spaces}
    return dirs, None, reader.read(cres.images)["features"]


def _concept_outcome(plan, rd, rows, concept_base, concept_feats, feats, fb):
    """Per-sample outcome after adding the concept (and before)."""
    if isinstance(plan.concept, tuple):
        from ..world.factors import FACTORS

        f = FACTORS.index(plan.concept[0])
        return (rd["pred"][rows, f] == int(plan.concept[1])).astype(float), concept_base
    before = (fb - concept_feats).norm(dim=1).numpy()
    after = (feats[rows] - concept_feats).norm(dim=1).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        closed = np.where(before > 0, (before - after) / before, 0.0)
    return np.clip(closed, 0.0, 1.0), None


def _paths(plan: PropertiesPlan, rd: dict, rows: list[int], base_read: dict, d_far: float) -> np.ndarray:
    k = len(INTERIOR) + 1
    out = []
    for p, (a, _b) in enumerate(plan.pairs):
        seg = rows[p * k : (p + 1) * k]
        if rd["pred"] is not None:
            seq = np.concatenate([base_read["pred"][a : a + 1], rd["pred"][seg]])  # (k + 1, factors)
            e0, e1 = seq[0], seq[-1]
            differ = np.flatnonzero(e0 != e1)
            out.append(float(np.mean([_monotone(seq[:, f], f) for f in differ])) if len(differ) else 0.0)
        else:
            f0 = base_read["features"][a]
            f1 = rd["features"][seg[-1]]
            mid = rd["features"][seg[:-1]]
            if float((f1 - f0).norm()) < STILL * d_far:  # the endpoints look alike: no change to organise
                out.append(0.0)
                continue
            diff = ((mid - f0).norm(dim=1) - (mid - f1).norm(dim=1)).numpy()
            out.append(_spearman(np.asarray(INTERIOR), diff))
    return np.asarray(out)


def _monotone(col: np.ndarray, f: int) -> float:
    """1 if a factor's readings along a path go monotonically from the first to the last value, else 0.

    Shape is categorical: only the two endpoint values, switching once. Scale and orientation are ordinal: readings
    stay between the endpoints and never step back. Hues lie on a circle: the same along one of its two arcs.
    """
    from ..world.factors import FACTORS, SIZES

    name = FACTORS[f]
    e0, e1 = int(col[0]), int(col[-1])
    if name == "shape":
        hit = np.flatnonzero(col == e1)
        return float(np.isin(col, (e0, e1)).all() and np.all(col[hit[0] :] == e1))
    if name.endswith("_hue"):
        k = SIZES[name]
        arcs = [((col - e0) * d) % k for d in (1, -1)]
        ends = [((e1 - e0) * d) % k for d in (1, -1)]
    else:
        sign = 1 if e1 > e0 else -1
        arcs, ends = [(col - e0) * sign], [abs(e1 - e0)]
    return float(any(bool(np.all((a >= 0) & (a <= e)) and np.all(np.diff(a) >= 0)) for a, e in zip(arcs, ends)))


def _distance_rho(v: torch.Tensor, sd: torch.Tensor, img_dist: np.ndarray) -> np.ndarray:
    """Per base sample: Spearman of standardised distances in the space vs image distances to the others."""
    keep = sd > 0
    if not bool(keep.any()):
        return np.zeros(len(v))
    z = (v / torch.where(keep, sd, torch.ones_like(sd)))[:, keep]
    lat = torch.cdist(z, z).numpy()
    n = len(v)
    return np.asarray([_spearman(np.delete(lat[i], i), np.delete(img_dist[i], i)) for i in range(n)])


# ---------------------------------------------------------------------------------------------------------------------
# tables


def scorecard(scores: pd.DataFrame) -> pd.DataFrame:
    """Spaces x properties with ``mark score [low, high]`` cells (Figure 4 as numbers), in the table's space order."""
    rows = []
    for (model, space), g in scores.groupby(["model", "space"], sort=False):
        row = {"model": model, "space": space}
        for _, r in g.iterrows():
            ci = "" if not np.isfinite(r["low"]) else f" [{r['low']:.2f}, {r['high']:.2f}]"
            row[r["property"]] = f"{r['mark']} {r['score']:.2f}{ci}" if np.isfinite(r["score"]) else "?"
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "space", *PROPERTIES])


def holds_all(scores: pd.DataFrame) -> pd.DataFrame:
    """Per model and space: whether all four properties are full (V), and the lowest score."""
    g = scores.groupby(["model", "space"], sort=False)
    return pd.DataFrame(
        {"all_full": g["mark"].apply(lambda m: bool((m == "V").all())), "lowest": g["score"].min()}
    ).reset_index()


# ---------------------------------------------------------------------------------------------------------------------
# the experiment: settings -> run -> Result


@dataclass(frozen=True)
class Settings:
    """A property scorecard of one model. ``spaces``: names or globs of the spaces (or layers) to score (None: every
    space the adapter offers, :func:`candidate_spaces`); ``n`` base samples; ``pairs`` interpolation pairs; ``at``:
    the steps at which per-step spaces are perturbed (a window ``early``/``middle``/``late``, ``"a:b"`` or step
    indices; None: every step); ``prompts``: one per base sample (None: held-out Shapes prompts with the oracle,
    a fixed open-domain list otherwise, none for latent generators); ``seed``: the first seed; ``scorer``: auto,
    oracle or pixel; ``concept``: ``"auto"``, a prompt, a Shapes ``(factor, value)`` or None (no concept);
    generation: ``steps`` (denoising steps, None: the model's) and ``generation`` (other keywords for
    ``generate``); ``n_boot``: bootstrap resamples of each CI; ``max_batch``: rows per generation."""

    spaces: str | tuple[str, ...] | None = None
    n: int = 16
    pairs: int = 8
    at: Any = None
    prompts: tuple[Any, ...] | None = None
    seed: int = 0
    scorer: str = "auto"
    concept: Any = "auto"
    steps: int | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    n_boot: int = 1000
    max_batch: int | None = 64


def _check(st: Settings) -> None:
    """What the plan does not check itself (before any generation)."""
    check_int(st.n_boot, "n_boot (bootstrap resamples)", minimum=1)
    check_int(st.max_batch, "max_batch (rows per generation)", minimum=1, optional=True)
    check_int(st.steps, "steps (denoising steps)", minimum=1, maximum=MAX_STEPS, optional=True)


def _plan_kw(st: Settings) -> tuple[Any, dict[str, Any]]:
    """The spaces and the keywords of :func:`plan_properties` / :func:`run_properties` (settings checked)."""
    _check(st)
    spaces = st.spaces if st.spaces is None or isinstance(st.spaces, str) else list(st.spaces)
    kw: dict[str, Any] = dict(
        n=st.n,
        pairs=st.pairs,
        steps=st.at,
        prompts=None if st.prompts is None else list(st.prompts),
        seed=st.seed,
        scorer=st.scorer,
        concept=st.concept,
        **generation_kwargs(st.steps, None, st.generation),
    )
    return spaces, kw


def plan(model: "Generator", settings: Settings) -> StudyPlan:
    """What :func:`run` will generate on ``model`` (``--dry-run``); nothing is generated. The base samples with every
    space captured, the concept's samples (captured too), then one call per space: the density resamples, the
    perturbations at each radius, the interpolation paths and the concept additions."""
    spaces, kw = _plan_kw(settings)
    p = plan_properties(model, spaces, **kw)
    gen_kw = {k: v for k, v in kw.items() if k not in ("n", "pairs", "steps", "prompts", "seed", "scorer", "concept")}
    cfg = model.config(**gen_kw)
    steps, branches = model.num_steps(cfg), len(model.branch_labels(cfg))
    labels = model.branch_labels(cfg)
    capture = Capture(layers=p.spaces, steps=p.steps, branches=["cond"] if "cond" in labels else None)
    n, mb = len(p.seeds), settings.max_batch or model.default_max_batch

    def gens(what: str, calls: int, images: int, captured: int = 0) -> Generations:
        per_call = images // calls
        return Generations(what, calls, images, min(mb, per_call), steps, branches, captured)

    rows = [gens("base samples, every space captured", 1, n, capture_bytes(model, capture, n, **gen_kw))]
    concept = p.concept is not None
    if concept:
        pool = p.pool if isinstance(p.concept, tuple) and not p.text else n
        rows.append(
            gens(
                "the concept's samples (its direction per space)",
                1,
                pool,
                capture_bytes(model, capture, pool, **gen_kw),
            )
        )
    per_space = n + len(RADII) * n + len(p.pairs) * (len(INTERIOR) + 1) + (n if concept else 0)
    rows.append(
        gens(
            f"{len(p.spaces)} spaces: resamples, radii, paths" + (", concept" if concept else ""),
            len(p.spaces),
            len(p.spaces) * per_space,
        )
    )
    strip = 2 + len(RADII) + len(INTERIOR) + 1 + (1 if concept else 0)  # base, density, radii, path, concept
    strips = image_bytes(model, len(p.spaces) * strip, **gen_kw)
    rows[-1] = dataclasses.replace(rows[-1], stored=strips)
    weights, row = model_bytes(model)
    notes = (
        [
            "a latent generator's concept direction needs 3 pool samples that show the concept; without them the concept rows are skipped"
        ]
        if concept and not p.text
        else []
    )
    return StudyPlan(NAME, model.spec, rows, weights, row, notes)


def run(
    model: "Generator",
    settings: Settings,
    out: str | Path | None = None,
    progress: ProgressArg = None,
    executor: Executor | None = None,
) -> Result:
    """The property scorecard of a loaded model: tables ``properties`` (one row per space x property: score, CI,
    mark) and ``properties_details`` (the measurements behind the scores), the artifact ``strips`` (one image strip
    per space) and a record of the plan, the strips' columns and the settings. ``out``: the folder the Result is
    saved in; each scored space is kept there as a cell until the Result is saved, so a rerun after an interruption
    scores only the missing spaces."""
    st = settings
    spaces, kw = _plan_kw(st)
    plan_properties(model, spaces, **kw)  # every settings error, before the folder or any generation
    with open_workspace(out, NAME, [model.spec], st, keep_cells=False) as ws:
        finished = ws.finished()
        if finished is not None:
            return finished
        scores, details, strips, plan_record = run_properties(
            model,
            spaces,
            max_batch=st.max_batch,
            progress=progress,
            n_boot=st.n_boot,
            cells=ws,
            executor=executor,
            **kw,
        )
        record = {"model": model.spec, "settings": settings_dict(st), **plan_record}
        return ws.save(Result(NAME, {SCORES: scores, DETAILS: details}, record, {STRIPS: strips}))


#: the main job: zoo:unet every space it offers (6 steps), zoo:dit its spaces and every transformer block, zoo:ldm the
#: noise, h-space and VAE latent (6 steps, as its injection study), the GAN/VAE latent
_LATENT = Settings(n=64, pairs=16)
FULL: dict[str, Settings] = {
    "zoo:unet": Settings(n=16, pairs=8, steps=6),
    "zoo:dit": Settings(n=16, pairs=8, steps=10, spaces=("*",)),
    "zoo:ldm": Settings(n=16, pairs=8, steps=6, spaces=("noise", "h_space", "vae_latent")),
    "zoo:vae": _LATENT,
    "zoo:gan": _LATENT,
}
#: controls run beside the models with the same settings and seeds: untrained copies (docs/controls.md) of the models
#: whose latents the claims are about
CONTROLS = ("zoo:vae", "zoo:gan")
QUICK: dict[str, Settings] = {
    "zoo:unet": Settings(n=8, pairs=4, steps=4, spaces=("noise", "text_embeds", "h_space")),
    "zoo:ldm": Settings(n=8, pairs=4, steps=4, spaces=("noise", "vae_latent")),
    "zoo:vae": Settings(n=32, pairs=8),
    "zoo:gan": Settings(n=32, pairs=8),
}
#: the sanity generators built to fail (``layerscope.testing.sanity``, loaded by spec: experiments do not import
#: test doubles) and what each must show; their settings (full, quick)
SANITY_SPEC = "torch:layerscope.testing.sanity:{}"
SANITY = {
    "ignores_latent": "relevance ~0",
    "hash_of_latent": "smoothness and organization ~0",
    "linear_decoder": "all four high",
}
SANITY_FULL = Settings(n=32, pairs=8)
SANITY_QUICK = Settings(n=16, pairs=4)


def main_job(quick: bool = False) -> list[Job]:
    """The scorecard of the zoo's diffusion models and GAN/VAE latents, then of the GAN/VAE's untrained copies
    (controls) and each sanity generator."""
    models, sanity = (QUICK, SANITY_QUICK) if quick else (FULL, SANITY_FULL)
    controls = [
        Job(f"untrained:{spec}", models[spec], part="control", note="untrained copy")
        for spec in CONTROLS
        if spec in models
    ]
    return (
        [Job(spec, st) for spec, st in models.items()]
        + controls
        + [Job(SANITY_SPEC.format(name), sanity, part="sanity", note=note) for name, note in SANITY.items()]
    )
