"""Metrics of layerscope studies: open-domain image similarity for injection sweeps (see :mod:`.similarity`) and
representation alignment between layers and models, CKA, mutual kNN and CKNNA, batched over all pairs (see
:mod:`.alignment`)."""

from .alignment import METRICS as ALIGNMENT_METRICS
from .alignment import cknna, debiased_cka, gram_similarity, linear_cka, mutual_knn, similarity_matrix
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
    "ALIGNMENT_METRICS",
    "CLIP_ENV",
    "DEFAULT_METRICS",
    "METRICS",
    "ClipEmbedder",
    "cknna",
    "clip_notice",
    "debiased_cka",
    "gram_similarity",
    "injection_scores",
    "linear_cka",
    "mutual_knn",
    "similarity",
    "similarity_matrix",
]
