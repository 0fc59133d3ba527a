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

from . import properties as pr

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
