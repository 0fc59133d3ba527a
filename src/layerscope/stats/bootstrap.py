"""Bootstrap confidence intervals: the one place layerscope resamples.

- :func:`mean_ci` / :func:`median_ci`: one sample, scipy's BCa interval (percentile where BCa degenerates), used for
  shares and medians over pairs, seeds and starts (injection summaries, fork entropies);
- :func:`bootstrap_ci`: any statistic of several samples resampled independently, percentile interval (the property
  scores, whose statistics combine two or three per-sample arrays);
- :func:`resample_weights` + :func:`percentile_interval`: many statistics at once, vectorised: one shared resample
  of ``n`` samples as count weights (the probe grid's held-out accuracy over every layer x step x factor).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def _boot_ci(
    values: Any, stat: Callable[..., Any], confidence: float, n_resamples: int, seed: int
) -> tuple[float, float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    point = float(stat(x, axis=-1))
    if x.size < 2:
        return point, math.nan, math.nan
    if np.all(x == x[0]):  # no spread to resample (and the mean of equal floats can drift by an ulp)
        v = float(x[0])
        return v, v, v
    from scipy import stats  # imported here: scipy.stats alone takes about a second to import

    # bound the (batch, n) resample arrays (BCa's jackknife would otherwise hold n x n values)
    batch = max(1, min(n_resamples, 4_000_000 // x.size))
    kw: dict[str, Any] = dict(n_resamples=n_resamples, batch=batch, vectorized=True, confidence_level=confidence)
    rng_key = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"  # scipy < 1.15
    for method in ("BCa", "percentile"):
        kw[rng_key] = np.random.default_rng(seed)
        with warnings.catch_warnings():
            # ties make BCa's jackknife degenerate (DegenerateDataWarning, nan bounds): try the next method
            warnings.simplefilter("error", stats.DegenerateDataWarning)
            warnings.simplefilter("error", RuntimeWarning)
            try:
                ci = stats.bootstrap((x,), stat, method=method, **kw).confidence_interval
            except (Warning, ValueError, FloatingPointError):
                continue
        lo, hi = float(ci.low), float(ci.high)
        if np.isfinite(lo) and np.isfinite(hi):
            return point, lo, hi
    with warnings.catch_warnings():  # last resort: percentile, whatever it warns about
        warnings.simplefilter("ignore")
        kw[rng_key] = np.random.default_rng(seed)
        ci = stats.bootstrap((x,), stat, method="percentile", **kw).confidence_interval
    return point, float(ci.low), float(ci.high)


def median_ci(
    values: Any, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(median, low, high): the median with a bootstrap CI (scipy BCa, percentile on degenerate data); NaNs dropped."""
    return _boot_ci(values, np.median, confidence, n_resamples, seed)


def mean_ci(
    values: Any, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean (e.g. a share of 0/1 outcomes) with a bootstrap CI, as :func:`median_ci`."""
    return _boot_ci(values, np.mean, confidence, n_resamples, seed)


def bootstrap_ci(
    stat: Callable[..., float],
    arrays: Sequence[np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """(estimate, low, high): ``stat(*arrays)`` with a percentile CI, each array resampled independently."""
    arrays = [np.asarray(a, dtype=float) for a in arrays]
    point = float(stat(*arrays))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        vals.append(stat(*[a[rng.integers(0, len(a), len(a))] if len(a) else a for a in arrays]))
    vals = np.asarray(vals, dtype=float)
    vals = vals[np.isfinite(vals)]
    if not np.isfinite(point) or len(vals) < n_boot // 2:
        return point, math.nan, math.nan
    q = (1 - confidence) / 2
    return point, float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q))


def resample_weights(n: int, n_boot: int, seed: int = 0) -> torch.Tensor:
    """(n_boot, n) float64 count weights of ``n_boot`` bootstrap resamples of ``n`` samples (torch generator)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    return torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64))


def percentile_interval(boot: torch.Tensor, confidence: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile interval (low, high) over the first axis of bootstrap replicates ``boot``."""
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=boot.dtype)
    lo, hi = torch.quantile(boot, q, dim=0)
    return lo, hi
