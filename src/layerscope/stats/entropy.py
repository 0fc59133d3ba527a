"""Entropies in bits: the plug-in entropy of observed values and of integer labels, and the mutual-information
lower bound ``I(Y; Z) >= H(Y) - CE`` that the probe grid reports (Corallo et al. 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError


def plugin_entropy(values: Sequence[Any]) -> float:
    """Plug-in (maximum-likelihood) entropy in bits of the empirical distribution of ``values``: 0 when all agree,
    log2(k) for k equally frequent values. Biased low for few samples (at most log2(len(values)))."""
    _, counts = np.unique(np.asarray(values), return_counts=True)
    if counts.size == 0:
        raise ValueError("the entropy of no values is undefined")
    p = counts / counts.sum()
    return float(max(0.0, -(p * np.log2(p)).sum()))


def entropy_bits(labels: torch.Tensor, n_classes: int | Sequence[int]) -> torch.Tensor:
    """Entropy in bits of the empirical distribution of integer labels: (n,) -> scalar, (n, F) -> (F,).

    ``n_classes`` is the number of classes (one int, or one per column); labels must lie in [0, n_classes).
    Classes that never occur contribute nothing, so this is the plug-in entropy of what was observed, which is what
    :func:`mi_lower_bound` subtracts the held-out cross-entropy from.
    """
    lab = torch.as_tensor(labels)
    single = lab.ndim == 1
    if single:
        lab = lab[:, None]
    if lab.ndim != 2 or lab.shape[0] == 0:
        raise ConfigError(f"labels must have shape (n,) or (n, F) with n >= 1, got {tuple(lab.shape)}")
    if lab.dtype.is_floating_point or lab.dtype == torch.bool or lab.is_complex():
        raise ConfigError(f"labels must be an integer tensor, got dtype {lab.dtype}")
    ks = [int(n_classes)] * lab.shape[1] if isinstance(n_classes, int) else [int(k) for k in n_classes]
    if len(ks) != lab.shape[1]:
        raise ConfigError(f"n_classes has {len(ks)} entries but labels have {lab.shape[1]} columns")
    lab = lab.long().cpu()
    out = torch.empty(lab.shape[1], dtype=torch.float64)
    for f, k in enumerate(ks):  # F is a handful; bincount is per column
        col = lab[:, f]
        if int(col.min()) < 0 or int(col.max()) >= k:
            raise ConfigError(f"labels of column {f} must lie in [0, {k}), got {int(col.min())}..{int(col.max())}")
        p = torch.bincount(col, minlength=k).double() / col.numel()
        p = p[p > 0]
        out[f] = (-(p * p.log2()).sum()).clamp_min(0.0)  # not -0.0 for a constant column
    return out[0] if single else out


def mi_lower_bound(ce_bits: torch.Tensor | float, labels: torch.Tensor) -> torch.Tensor:
    """Lower bound on I(Y; features) in bits: ``max(0, H(Y) - CE)``, H from the labels' empirical distribution.

    ``ce_bits``: held-out cross-entropy of a probe in bits, a scalar or a tensor whose last axis matches the labels'
    columns (e.g. (C, F) against labels (n, F)); ``labels``: the held-out labels the cross-entropy was measured on,
    (n,) or (n, F). Any probe's cross-entropy is >= H(Y | features), hence the bound (Corallo et al. 2024); it is
    clipped at 0 because a probe worse than the label prior says nothing.
    """
    lab = torch.as_tensor(labels)
    if lab.ndim not in (1, 2):
        raise ConfigError(f"labels must have shape (n,) or (n, F), got {tuple(lab.shape)}")
    if lab.numel() and int(lab.min()) < 0:
        raise ConfigError(f"labels must be >= 0, got {int(lab.min())}")
    k = int(lab.max()) + 1 if lab.numel() else 1
    h = entropy_bits(lab, k)
    ce = torch.as_tensor(ce_bits, dtype=torch.float64)
    if lab.ndim == 2 and ce.ndim and ce.shape[-1] != lab.shape[1]:
        raise ConfigError(f"ce_bits' last axis has {ce.shape[-1]} entries but labels have {lab.shape[1]} columns")
    return (h - ce).clamp_min(0.0)
