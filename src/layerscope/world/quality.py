"""Quality of a generator in the Shapes world, read by the oracle.

- **prompt agreement** (text-conditioned models): prompts of combinations from the held-out tenth (never trained
  on); per factor, the share of samples in which the oracle reads the value the prompt asks for;
- **in-distribution share**: the share of samples whose oracle max-probability is >= 0.9 on every factor;
- **Frechet distance** between oracle features (256-d) of samples and of held-out renders, with the distance
  between two independent sets of held-out renders as the floor it is measured against.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import linalg

from .factors import FACTORS, sample_factors
from .oracle import load_oracle, read
from .render import render
from .text import prompts_for

IN_DISTRIBUTION = 0.9


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (n, d)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # features that never fire make the covariances singular: offset the diagonals as pytorch-fid does
    eps = np.eye(len(s1)) * 1e-6
    covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps)).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def reference_features(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return read(render(sample_factors(n, seed, split="test"), size)).features


def measure(
    model: Any, n: int = 1000, seed: int = 0, batch: int = 250, progress: bool = False, **gen_kwargs: Any
) -> dict:
    """Quality numbers of a loaded :class:`~layerscope.models.base.Generator` (text-conditioned or latent)."""
    oracle = load_oracle()
    text = model.capabilities.conditioning == "text"
    seeds = list(range(seed, seed + n))
    if text:
        asked = sample_factors(n, seed + 7, split="test")
        res = model.generate(prompts_for(asked), seeds, max_batch=batch, progress=progress, **gen_kwargs)
    else:
        asked = None
        res = model.generate([None] * n, seeds, max_batch=batch, progress=progress, **gen_kwargs)
    r = read(res.images, oracle)
    conf = r.confidence
    out: dict[str, Any] = {"samples": n, "seed": seed, "settings": {k: v for k, v in gen_kwargs.items()}}
    if text:
        out["settings"].setdefault("num_inference_steps", model.config().num_inference_steps)
        out["settings"].setdefault("guidance_scale", model.config().guidance_scale)
        out["prompt_agreement"] = {f: float((r.pred[:, i] == asked[:, i]).mean()) for i, f in enumerate(FACTORS)}
    out["in_distribution"] = float((conf >= IN_DISTRIBUTION).all(axis=1).mean())
    out["mean_confidence"] = {f: float(conf[:, i].mean()) for i, f in enumerate(FACTORS)}
    out["coverage"] = {f: int(len(np.unique(r.pred[:, i]))) for i, f in enumerate(FACTORS)}
    ref = reference_features(n, seed + 1)
    out["frechet_distance"] = frechet_distance(r.features, ref)
    out["frechet_floor"] = frechet_distance(reference_features(n, seed + 2), ref)
    return out


BARS = {"hue": 0.9, "shape": 0.9, "scale": 0.7, "orientation": 0.7, "in_distribution": 0.9}
#: zoo:ldm (partial captions): every factor a caption names is followed in at least this share of samples
NAMED_BAR = 0.95


def verdicts(q: dict) -> dict[str, bool]:
    """Which quality bars of the zoo a measurement meets."""
    out: dict[str, bool] = {}
    agree = q.get("prompt_agreement")
    named = q.get("named_followed")
    if named:  # a model trained on partial captions: named factors followed, samples in distribution
        out.update({f"{f} (named)": v >= NAMED_BAR for f, v in named.items()})
        out["in_distribution"] = q["in_distribution"] >= BARS["in_distribution"]
    elif agree:
        for f, v in agree.items():
            bar = BARS["hue"] if f.endswith("_hue") else BARS[f]
            out[f] = v >= bar
    else:
        out["in_distribution"] = q["in_distribution"] >= BARS["in_distribution"]
    return out
