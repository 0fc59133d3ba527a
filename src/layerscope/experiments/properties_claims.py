"""The property scorecard's claims (Schaerf 2025, Fig. 4) and their specification curve, from a saved Result.

Schaerf (2025) contrasts synthesis in a strict sense, one latent space that wholly determines the image (GAN and VAE
latents: dense, smooth, organized and relevant), with synthesis in a broad sense (diffusion models: no candidate space
holds all four). The property experiment marks each score V at or above
:data:`~layerscope.experiments.properties.FULL_SCORE`; this module re-derives both halves of the picture from the saved
scores (estimate and 95% CI per space and property) at every combination of the choices below, fixed in code before
any result was looked at.

Choices (the shipped one first):

- ``full_at``: the cut-off for a full mark (V) (:data:`FULL_LEVELS`); a property holds at or above it;
- ``estimate``: what is compared with the cut-off: the ``score``, its CI's ``low`` bound (holds only when shown) or
  its ``high`` bound (holds unless shown not to) (:data:`ESTIMATES`);
- ``spaces``: which scored sites count: the candidate ``spaces`` only, or ``spaces+layers`` (every scored site,
  transformer blocks included, as the section's synthesis sentence counts them) (:data:`SPACE_SETS`).

The sample size is not a choice here: the saved tables hold each score's estimate and CI, not the per-sample values
behind them, so subsamples cannot be recomputed without new generations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..stats.speccurve import check_curve, curve_from_rows, spec_string
from . import properties as pr
from .base import Result

#: the choices' levels, fixed before any result was looked at (the shipped level first)
FULL_LEVELS = (pr.FULL_SCORE, 0.6, 0.75, 0.8)
ESTIMATES = ("score", "low", "high")
SPACE_SETS = ("spaces+layers", "spaces")
SHIPPED: dict[str, dict[str, str]] = {
    "properties.latent_all_four": {"full_at": "0.67", "estimate": "score", "spaces": "spaces+layers"},
    "properties.diffusion_none_all_four": {"full_at": "0.67", "estimate": "score", "spaces": "spaces+layers"},
}

CLAIMS: dict[str, dict[str, Any]] = {
    "properties.latent_all_four": {
        "text": "A GAN's or VAE's latent space is dense, smooth, organized and relevant: it holds all four "
        "properties (synthesis in a strict sense).",
        "paper": "Schaerf 2025, Sec. 3 and Fig. 4",
        "measured": "property scorecard of the latent generator's spaces; statistic: the lowest of the four scores "
        "(weakest space), 95% bootstrap CI",
        "shipped": SHIPPED["properties.latent_all_four"],
    },
    "properties.diffusion_none_all_four": {
        "text": "No candidate space of a diffusion model holds all four properties (synthesis in a broad sense).",
        "paper": "Schaerf 2025, Sec. 3 and Fig. 4",
        "measured": "property scorecard of every candidate space; statistic: the best space's lowest score, 95% "
        "bootstrap CI",
        "shipped": SHIPPED["properties.diffusion_none_all_four"],
    },
}

LATENT_CLAIM, DIFFUSION_CLAIM = "properties.latent_all_four", "properties.diffusion_none_all_four"


def claim_of(result: Result) -> str:
    """The claim a scorecard speaks to: a generator of one latent, in one pass (its record has no steps: a GAN/VAE
    latent), speaks to :data:`LATENT_CLAIM`; a denoising model to :data:`DIFFUSION_CLAIM`."""
    return LATENT_CLAIM if result.record.get("steps") is None else DIFFUSION_CLAIM


def space_status(scores: pd.DataFrame, estimate: str, full_at: float) -> pd.Series:
    """Per space (in table order): ``holds`` when every property's ``estimate`` is at or above ``full_at``,
    ``fails`` when one is below it, ``unknown`` when none is below but one is missing (NaN)."""
    e = scores[estimate].astype(float)
    below = (e < full_at).groupby(scores["space"], sort=False).any()
    nan = e.isna().groupby(scores["space"], sort=False).any()
    return pd.Series(np.where(below, "fails", np.where(nan, "unknown", "holds")), index=below.index)


def claims_curve(result: Result, *, subject: str | None = None, control: str = "") -> pd.DataFrame:
    """The specification curve of the claim this scorecard speaks to (:func:`claim_of`) on one saved properties
    Result (schema: :mod:`layerscope.stats.speccurve`), one row per specification of the choices in this module's
    docstring. ``subject``: default the Result's model; ``control``: the control's label for a control's Result.

    A space holds all four when each property's estimate (score, CI low or CI high) is at or above ``full_at``.
    Latent claim: supports when every counted space holds all four, contradicts when one does not; statistic: the
    lowest estimate over the spaces and properties. Diffusion claim: supports when no counted space holds all four,
    contradicts when one does; statistic: the best space's lowest estimate. Undecided where an estimate is missing
    (NaN) and could change the verdict. The interval is the 95% CI of the property that gives the statistic."""
    scores = result[pr.SCORES]
    subject = subject or str(result.record["model"])
    claim = claim_of(result)
    n = result.record.get("n", "?")
    rows: list[dict[str, Any]] = []
    for full_at in FULL_LEVELS:
        for estimate in ESTIMATES:
            for spaces in SPACE_SETS:
                s = scores if spaces == "spaces+layers" else scores[scores["kind"] != "layer"]
                if s.empty or (spaces != "spaces+layers" and len(s) == len(scores)):
                    continue  # no space left, or no layer scored: the same specification as spaces+layers
                status = space_status(s, estimate, full_at)
                e = s[estimate].astype(float)
                lowest = e.groupby(s["space"], sort=False).min()  # each space's weakest property (NaN skipped)
                if claim == LATENT_CLAIM:
                    verdict = "contradicts" if (status == "fails").any() else (
                        "undecided" if (status == "unknown").any() else "supports"
                    )  # fmt: skip
                    space = lowest.idxmin() if lowest.notna().any() else lowest.index[0]
                    stat = f"lowest {estimate} of the four properties, weakest space ({n} samples)"
                else:
                    verdict = "contradicts" if (status == "holds").any() else (
                        "undecided" if (status == "unknown").any() else "supports"
                    )  # fmt: skip
                    space = lowest.idxmax() if lowest.notna().any() else lowest.index[0]
                    stat = f"best space's lowest {estimate} of the four properties ({n} samples)"
                mine = s[s["space"] == space]
                pick = mine.loc[mine[estimate].astype(float).fillna(np.inf).idxmin()]
                spec = spec_string({"full_at": full_at, "estimate": estimate, "spaces": spaces})
                rows.append(
                    {
                        "claim": claim,
                        "subject": subject,
                        "control": control,
                        "spec": spec,
                        "verdict": verdict,
                        "statistic": stat,
                        "value": float(pick[estimate]),
                        "ci_low": float(pick["low"]),
                        "ci_high": float(pick["high"]),
                    }
                )
    return check_curve(curve_from_rows(rows))
