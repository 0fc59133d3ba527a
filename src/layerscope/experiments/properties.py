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
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..engine.progress import progress_callback
from ..engine.spec import Capture, Intervention, PerTarget
from ..engine.steps import resolve_steps
from ..errors import ConfigError
from ..stats.bootstrap import bootstrap_ci

if TYPE_CHECKING:
    from ..models.base import Generator

PROPERTIES = ("density", "smoothness", "organization", "relevance")
SMOOTH_RADII = (0.1, 0.3)
UNIT_RADIUS = 1.0
RADII = SMOOTH_RADII + (UNIT_RADIUS,)
INTERIOR = (1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6)
FULL, PARTIAL = 0.67, 0.33
IN_DIST_QUANTILE = 0.95
STILL = 0.01  # open domain: endpoints closer than this share of d_far "read alike"
CONCEPT = ("object_hue", 0)  # Shapes world: a red object
OPEN_CONCEPT = "a dog"
OPEN_PROMPTS = ("a photo of a cat", "a house by a lake", "a bowl of fruit on a table", "a city street at night",
                "a portrait of an old man", "a red car in a field", "a mountain landscape", "a bird on a branch")
_TEXT_SPACES = ("text_embeds", "text_eos")
_NOT_SPACES = ("x_t",)  # the denoiser's input: perturbing it does not change the sampler's own latent
SCORES = "properties.parquet"
DETAILS = "properties_details.parquet"
STRIPS = "strips.npz"


def mark(score: float) -> str:
    """Figure 4's mark for a score: V (>= 0.67), ~ (partial, >= 0.33), X (below), ? (undefined)."""
    if score is None or not np.isfinite(score):
        return "?"
    return "V" if score >= FULL else "~" if score >= PARTIAL else "X"


def candidate_spaces(model: "Generator", **size: Any) -> list[str]:
    """The spaces the adapter offers (noise, text tokens, EOS, VAE latent, h-space, skips; a GAN/VAE latent)."""
    return [e.name for e in model.layer_map(size.get("height"), size.get("width")).spaces if e.name not in _NOT_SPACES]


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
        return {"model": self.model, "spaces": self.spaces, "steps": self.steps, "n": len(self.seeds),
                "pairs": len(self.pairs), "scorer": self.scorer, "concept": _concept_text(self.concept),
                "radii": list(RADII), "interior": [round(a, 4) for a in INTERIOR], "settings": self.gen_kwargs}


def _concept_text(concept: Any) -> str | None:
    if isinstance(concept, tuple):
        from ..world.text import COLOURS

        return f"{concept[0]} = {COLOURS[concept[1]] if concept[0].endswith('_hue') else concept[1]}"
    return concept


def plan_properties(model: "Generator", spaces: Any = None, *, n: int = 16, pairs: int = 8, steps: Any = None,
                    prompts: Sequence[Any] | None = None, seed: int = 0, scorer: str = "auto",
                    concept: Any = "auto", **gen_kwargs: Any) -> PropertiesPlan:
    """Validate the settings and resolve spaces, steps, samples and scorer before any generation."""
    if n < 4:
        raise ConfigError(f"n must be at least 4 base samples, got {n}")
    if not 1 <= pairs <= n:
        raise ConfigError(f"pairs must be between 1 and n={n}, got {pairs}")
    cfg = model.config(**gen_kwargs)
    lmap = model.layer_map(cfg.height, cfg.width)
    if spaces is None:
        names = candidate_spaces(model, height=cfg.height, width=cfg.width)
    else:
        asked = [spaces] if isinstance(spaces, str) else list(spaces)
        bad = [s for s in asked if s in _NOT_SPACES]
        names = [e.name for e in lmap.select(asked) if e.name not in _NOT_SPACES]  # globs skip x_t
        if bad:
            raise ConfigError(f"{bad[0]} is the denoiser's input, which the sampler does not read back; score "
                              "'noise' or a layer instead")
    if not names:
        raise ConfigError(f"no space of {model.spec} matches {spaces!r}")
    num = model.num_steps(cfg)
    step_list = list(resolve_steps(steps, num)) if num else None
    if steps is not None and not num:
        raise ConfigError(f"{model.spec} generates in one pass: it has no steps to choose")
    if scorer == "auto":
        scorer = "oracle" if model.spec.startswith("zoo:") else "pixel"
    if scorer not in ("oracle", "pixel"):
        raise ConfigError(f"unknown scorer {scorer!r}; valid: auto, oracle, pixel")
    text = model.family != "latent"
    if prompts is None:
        if not text:
            prompts = [None] * n
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
        concept = CONCEPT if scorer == "oracle" else (OPEN_CONCEPT if text else None)
    if isinstance(concept, str) and not text:
        raise ConfigError(f"{model.spec} takes no prompt: a concept prompt needs a text-conditioned model")
    if isinstance(concept, tuple) and scorer != "oracle":
        raise ConfigError("a Shapes-world concept (factor, value) needs the oracle scorer")
    return PropertiesPlan(model.spec, names, step_list, prompts, [seed + i for i in range(n)],
                          [(i, (i + 1) % n) for i in range(pairs)], scorer, concept,
                          {k: v for k, v in gen_kwargs.items()}, text)


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
            return {"features": r.features.double(), "pred": r.pred,
                    "in_dist": (r.confidence >= IN_DISTRIBUTION).all(axis=1).astype(float)}
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


def _interventions(info: Any, op: str, values: torch.Tensor, rows: list[int], steps: list[int] | None,
                   branches: list[str] | None, shared: bool = False) -> list[Intervention]:
    """``values``: (rows, step, *shape) per-row values, or (step, *shape) for one value shared by all rows."""
    out = []
    per_step = info.per_step and steps is not None
    for k, s in enumerate(steps if per_step else [None]):
        v = values[k] if shared else values[:, k]
        src = v.float() if shared else PerTarget(v.float())
        out.append(Intervention(info.name, op, src, targets=rows, steps=[s] if per_step else None,
                                branches=branches))
    return out


def run_properties(model: "Generator | str", spaces: Any = None, *, n: int = 16, pairs: int = 8,
                   steps: Any = None, prompts: Sequence[Any] | None = None, seed: int = 0, scorer: str = "auto",
                   concept: Any = "auto", max_batch: int | None = 64, progress: bool = False,
                   n_boot: int = 1000, **gen_kwargs: Any) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray],
                                                                   dict]:
    """Score each space of ``model`` on the four properties.

    Returns ``(scores, details, strips, record)``: the tidy scores (``model, space, kind, property, score, low,
    high, mark``), the measurements behind them (``model, space, metric, value``), example image strips per space
    (uint8, (k, 3, H, W): base, a density sample, the radii, the interpolation path, the concept addition) and the
    settings.
    """
    from ..loading import load

    gen = load(model) if isinstance(model, str) else model
    plan = plan_properties(gen, spaces, n=n, pairs=pairs, steps=steps, prompts=prompts, seed=seed, scorer=scorer,
                           concept=concept, **gen_kwargs)
    cfg = gen.config(**gen_kwargs)
    lmap = gen.layer_map(cfg.height, cfg.width)
    infos = {s: lmap[s] for s in plan.spaces}
    labels = gen.branch_labels(cfg)
    cap_branches = ["cond"] if "cond" in labels else None
    guided = "uncond" in labels
    reader = _Reader(plan.scorer)
    kw = dict(max_batch=max_batch, **gen_kwargs)
    capture = Capture(layers=plan.spaces, steps=plan.steps, branches=cap_branches)

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
    scores, details = [], []
    strips: dict[str, np.ndarray] = {}
    desc = f"scoring {len(plan.spaces)} spaces of {gen.spec}"
    with progress_callback(progress, desc) as report:
        for si, space in enumerate(plan.spaces):
            info, v = infos[space], values[space]
            branches = ["cond"] if (guided and space in _TEXT_SPACES) else None
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
            interp = torch.cat([(1 - alphas.view(-1, *[1] * (v.ndim - 1))) * v[a] + alphas.view(-1, *[1] * (v.ndim - 1))
                                * v[b] for a, b in plan.pairs])
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
                scores.append({"model": gen.spec, "space": space, "kind": kind, "property": prop, "score": s,
                               "low": lo, "high": hi, "mark": mark(s)})
            det = {f"change@{r:g}": float(np.mean(c[r])) for r in RADII}
            det.update({f"in_dist@{r:g}": float(np.mean(rd["in_dist"][r_rad[r]])) for r in RADII})
            det.update({"in_dist_base": float(np.mean(base_read["in_dist"])),
                        "in_dist_resampled": float(np.mean(rd["in_dist"][r_dens])),
                        "path": float(np.mean(path_vals)), "rho_distance": float(np.mean(rho_vals)),
                        "unit_change": float(np.mean(unit_vals)), "d_far": d_far,
                        "space_dims": int(np.prod(info.shape)), "rows": len(rows_p)})
            if r_con and base_c is not None:  # Shapes world: shares of images read as the concept
                det.update(concept_base=float(np.mean(base_c)), concept_added=float(np.mean(added)),
                           concept_gain=_gain(added, base_c))
            elif r_con:  # open domain: the share of the distance to the concept image closed
                det["concept_gain"] = float(np.mean(added))
            details += [{"model": gen.spec, "space": space, "metric": k, "value": val} for k, val in det.items()]
            pick = [r_dens[0]] + [r_rad[r][0] for r in RADII] + r_path[:len(INTERIOR) + 1] + r_con[:1]
            imgs = torch.cat([base.images[:1], out.images[pick]])
            strips[space] = (imgs.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            if report is not None:
                report(si + 1, len(plan.spaces))
    record = plan.record()
    record["strip_columns"] = (["sample", "density"] + [f"+{r:g} sd" for r in RADII]
                               + [f"a={a:.2f}" for a in INTERIOR] + ["a=1"] + (["+concept"] if directions else []))
    return pd.DataFrame.from_records(scores), pd.DataFrame.from_records(details), strips, record


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
        seg = rows[p * k:(p + 1) * k]
        if rd["pred"] is not None:
            seq = np.concatenate([base_read["pred"][a:a + 1], rd["pred"][seg]])  # (k + 1, factors)
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
        return float(np.isin(col, (e0, e1)).all() and np.all(col[hit[0]:] == e1))
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
    return pd.DataFrame({"all_full": g["mark"].apply(lambda m: bool((m == "V").all())),
                         "lowest": g["score"].min()}).reset_index()


def save(folder: str | Path, scores: pd.DataFrame, details: pd.DataFrame, strips: dict[str, np.ndarray],
         record: dict) -> Path:
    from ..world.training import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scores.to_parquet(folder / SCORES, index=False)
    details.to_parquet(folder / DETAILS, index=False)
    np.savez_compressed(folder / STRIPS, **{k.replace(".", "__"): v for k, v in strips.items()})
    write_json(folder / "properties.json", record)
    return folder


def load_strips(folder: str | Path) -> dict[str, np.ndarray]:
    with np.load(Path(folder) / STRIPS) as z:
        return {k.replace("__", "."): z[k] for k in z.files}
