"""Metrics of layerscope studies: open-domain image similarity for injection sweeps (see :mod:`.similarity`)."""

from .similarity import (
    CLIP_ENV,
    DEFAULT_METRICS,
    METRICS,
    ClipEmbedder,
    clip_notice,
    injection_scores,
    similarity,
)

__all__ = [
    "CLIP_ENV",
    "DEFAULT_METRICS",
    "METRICS",
    "ClipEmbedder",
    "clip_notice",
    "injection_scores",
    "similarity",
]
