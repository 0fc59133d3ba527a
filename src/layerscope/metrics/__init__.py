"""Metrics of layerscope studies: open-domain image comparison for injection sweeps (see :mod:`.images`)."""

from .images import (
    CLIP_ENV,
    DEFAULT_METRICS,
    METRICS,
    ClipEmbedder,
    clip_notice,
    injection_scores,
    mean_ci,
    median_ci,
    similarity,
)

__all__ = [
    "CLIP_ENV", "DEFAULT_METRICS", "METRICS", "ClipEmbedder", "clip_notice", "injection_scores", "mean_ci",
    "median_ci", "similarity",
]
