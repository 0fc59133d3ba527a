"""Linear probes for every cell (layer x step) and factor at once, with the mutual-information bound.

Corallo et al. (2024), "Latent Abstractions in Generative Diffusion Models", read latent factors off a diffusion
model's internal features with linear probes, for every layer x denoising step, and bound the mutual information
between a factor Y and the features Z from below by the probe's held-out cross-entropy:

    I(Y; Z) >= H(Y) - CE      (both in bits; the CE of any probe q(y | z) is >= H(Y | Z))

:func:`fit_probe_grid` fits all those probes in one batched solve. For C cells (e.g. layers x steps flattened) and
F factors there are C x F independent multinomial logistic regressions (softmax with bias, L2 penalty on the
weights, features standardized per cell with train statistics), on the same samples and one train/held-out split.

How they are solved together:

* one cell's F factors share its features, so all their logits are one matrix product ``X_c W_c`` with ``W_c`` of
  shape (d+1, K_1 + ... + K_F); a batch of cells is one ``bmm``. Per-factor softmax reductions are reductions
  over views, one per run of consecutive factors with equal class counts (4 for the Shapes factors), and
  per-problem inner products one small matrix product; nothing loops over cells;
* the optimizer is L-BFGS **per problem**: every (cell, factor) keeps its own history, step length and stopping
  test, and only the arithmetic is batched, so a hard problem neither slows the steps of an easy one nor is
  stopped early by it. An iteration costs two large products (the trial point's logits and the gradient), a
  softmax and a few small products. The backtracking line search (Armijo) tries step 1 for every problem at
  once; the few problems that must backtrack are re-evaluated on their own cells only;
* the initial inverse Hessian of L-BFGS is a Kronecker-factored approximation of the Hessian (as in K-FAC),
  ``Sigma (x) A + l2``: ``Sigma = X^T X / n`` the cell's feature covariance (fixed), ``A = mean_i diag(p_i) -
  p_i p_i^T`` the softmax curvature at the current iterate (refreshed every iteration on a sample of the train
  set). Both factors are small and symmetric, so the inverse is two eigenbases and a division. It is the exact
  Hessian at W = 0, where the first step is therefore a Newton step, and it makes the solver insensitive to
  correlated features (real activations are nearly low-rank), which slow plain gradient methods down. The
  features are solved in Sigma's eigenbasis (rotated once per cell; the objective and every score are the same),
  so only A's eigenbasis is applied per iteration; with few train samples A is kept diagonal (``curvature``),
  and the preconditioner is one division;
* cells stream through a fixed number of slots: a cell leaves as soon as all its factors have converged and the
  next one takes its place, so each cell costs its own iterations and memory stays bounded.

Every problem stops when the largest absolute entry of its gradient is <= ``tol``: the criterion scikit-learn's
``LogisticRegression(solver="lbfgs", tol=tol)`` uses on the same objective (mean cross-entropy in nats +
``l2 / 2 * ||W||^2``, bias not penalized, i.e. ``C = 1 / (l2 * n_train)``). The result records each problem's
final gradient and iterations; problems that did not converge are reported with a warning.

The result, :class:`ProbeGrid`, holds held-out accuracy, cross-entropy (bits), the entropy of each factor, the
bound ``max(0, H(Y) - CE)``, chance levels, the convergence record, a tidy table and onsets.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch

from ..allocator import tune_cpu_allocator
from ..errors import ConfigError
from ..progress import ProgressArg, progress_callback
from .bootstrap import percentile_interval, resample_weights
from .entropy import entropy_bits, mi_lower_bound

__all__ = ["ProbeGrid", "entropy_bits", "fit_probe_grid", "mi_lower_bound"]

LN2 = math.log(2.0)
#: L-BFGS history length per problem
HISTORY = 10
#: Armijo sufficient-decrease constant and the most backtracking trials per iteration
ARMIJO = 1e-4
MAX_BACKTRACK = 30
#: default size of one (slots, K_1 + ... + K_F, n_train) work buffer (bytes) on a CPU: big enough to amortize the
#: per-iteration Python overhead, small enough to stay near the cache (16 slots of the Shapes factors x 3,750
#: samples measured faster than 4, 8 or 32)
CHUNK_BYTES = 16 << 20
#: train samples the preconditioner's softmax curvature is estimated on (it only shapes the steps)
CURVATURE_SAMPLES = 1024
#: below this many elements in a work buffer a CPU solve runs on one thread (see _single_thread)
SMALL = 1 << 18
#: ``curvature="auto"``: below this many train samples the preconditioner keeps only the diagonal of the softmax
#: curvature. It takes 5-20% more iterations than the full K x K curvature, but each is cheaper: no eigenbasis per
#: problem and iteration, one division instead of two small products. Measured on 2 CPU cores, 64 features, the
#: Shapes factors: diagonal 1.43 s vs full 1.93 s at 240 train samples (260 cells), even at 750, full ahead from
#: 1,500 (1.02 vs 1.12 s, 40 cells) and at 3,750 (1.64 vs 2.04 s).
DIAGONAL_BELOW = 800


# ---------------------------------------------------------------------------------------------------------------------
# result


@dataclass
class ProbeGrid:
    """Held-out probe results for C cells x F factors (tensors on the CPU, float64).

    ``accuracy``, ``cross_entropy`` (bits) and ``mi_bound`` (bits, ``max(0, entropy - cross_entropy)``) are (C, F);
    ``entropy`` (bits, of the held-out labels' empirical distribution) and ``chance`` (held-out accuracy of always
    answering the training set's most frequent class) are (F,). ``keys`` name the cells (dict keys, or 0..C-1),
    ``factors`` the factors. Solver record: ``n_iter`` (C, F) iterations each problem took, ``grad_norm`` (C, F)
    the largest absolute gradient entry at the end, ``converged`` (C, F) whether it reached ``tol``;
    ``train_accuracy`` (C, F) is the probes' accuracy on their own training samples (far above ``accuracy`` means
    the probe overfits: more samples or a larger ``l2``).
    """

    accuracy: torch.Tensor
    cross_entropy: torch.Tensor
    entropy: torch.Tensor
    mi_bound: torch.Tensor
    chance: torch.Tensor
    keys: list[Hashable]
    factors: list[str]
    seconds: float
    n_iter: torch.Tensor
    grad_norm: torch.Tensor
    converged: torch.Tensor
    n_train: int = 0
    n_test: int = 0
    l2: float = 0.0
    tol: float = 0.0
    train_accuracy: torch.Tensor | None = field(default=None, repr=False)
    test_correct: torch.Tensor | None = field(default=None, repr=False)  # (C, F, n_test) bool, held-out hits

    def bootstrap_accuracy(self, n_boot: int = 200, seed: int = 0) -> torch.Tensor:
        """(n_boot, C, F) held-out accuracies on bootstrap resamples of the held-out samples (one resample shared
        by every cell and factor, so differences between cells keep their pairing)."""
        if self.test_correct is None:
            raise ValueError("this grid kept no per-sample held-out results")
        n = self.test_correct.shape[-1]
        w = resample_weights(n, n_boot, seed)
        return torch.einsum("cfn,bn->bcf", self.test_correct.double(), w) / n

    def accuracy_ci(
        self, confidence: float = 0.95, n_boot: int = 200, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Percentile bootstrap interval (low, high), each (C, F), of the held-out accuracy."""
        return percentile_interval(self.bootstrap_accuracy(n_boot, seed), confidence)

    @property
    def max_grad_norm(self) -> float:
        """The largest final gradient entry over all cells and factors (every problem converged if <= ``tol``)."""
        return float(self.grad_norm.max()) if self.grad_norm.numel() else 0.0

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: one row per (cell, factor, metric), metric in {accuracy, cross_entropy, mi_bound}."""
        metrics = {"accuracy": self.accuracy, "cross_entropy": self.cross_entropy, "mi_bound": self.mi_bound}
        c, f = self.accuracy.shape
        cells = [k for k in self.keys for _ in range(f * len(metrics))]
        factors = [self.factors[j] for _ in range(c) for j in range(f) for _ in metrics]
        names = list(metrics) * (c * f)
        values = torch.stack([m for m in metrics.values()], dim=-1).reshape(-1).tolist()
        return pd.DataFrame({"cell": cells, "factor": factors, "metric": names, "value": values})

    def onset(self, threshold: float, order: Sequence[Hashable] | None = None) -> dict[str, Hashable | None]:
        """For each factor, the first cell in ``order`` (default: ``keys`` as given) whose accuracy >= threshold.

        ``order`` lists cell keys, e.g. one layer's cells in step order; cells not listed are ignored. A factor no
        listed cell reaches maps to None.
        """
        index = {k: i for i, k in enumerate(self.keys)}
        seq = list(self.keys) if order is None else list(order)
        missing = [k for k in seq if k not in index]
        if missing:
            raise ConfigError(f"order names cells that are not in the grid: {missing[:5]!r}")
        out: dict[str, Hashable | None] = {}
        for j, name in enumerate(self.factors):
            out[name] = next((k for k in seq if float(self.accuracy[index[k], j]) >= threshold), None)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# input checks


def _stack(features, widths) -> tuple[torch.Tensor, torch.Tensor | None, list[Hashable]]:
    """(C, n, d) tensor, optional widths and keys from a tensor or a {key: (n, d_c)} dict (zero-padded)."""
    if isinstance(features, Mapping):
        if widths is not None:
            raise ConfigError("widths is only for a (C, n, d) tensor; a dict's cells carry their own widths")
        if not features:
            raise ConfigError("features is an empty dict; give at least one cell")
        keys = list(features)
        mats = [torch.as_tensor(features[k]) for k in keys]
        for k, m in zip(keys, mats):
            if m.ndim != 2:
                raise ConfigError(f"cell {k!r} must be an (n, d) tensor, got shape {tuple(m.shape)}")
        ns = {m.shape[0] for m in mats}
        if len(ns) != 1:
            raise ConfigError(f"every cell must have the same number of samples, got {sorted(ns)}")
        ws = [m.shape[1] for m in mats]
        d = max(ws)
        dtype = torch.float64 if any(m.dtype == torch.float64 for m in mats) else torch.float32
        x = torch.zeros(len(mats), mats[0].shape[0], d, dtype=dtype, device=mats[0].device)
        for i, m in enumerate(mats):  # a copy per cell to pad; no arithmetic
            x[i, :, : m.shape[1]] = m.to(x.device, dtype)
        w = torch.tensor(ws) if len(set(ws)) > 1 else None
        return x, w, keys
    x = torch.as_tensor(features)
    if x.ndim != 3:
        raise ConfigError(
            f"features must be a (C, n, d) tensor or a dict of (n, d) tensors, got shape {tuple(x.shape)}"
        )
    if widths is not None:
        widths = torch.as_tensor(widths).long().cpu()
        if widths.shape != (x.shape[0],):
            raise ConfigError(f"widths must have shape ({x.shape[0]},), one per cell, got {tuple(widths.shape)}")
        if int(widths.min()) < 1 or int(widths.max()) > x.shape[2]:
            raise ConfigError(f"widths must lie in [1, {x.shape[2]}], got {int(widths.min())}..{int(widths.max())}")
    return x, widths, list(range(x.shape[0]))


def _check_labels(labels, n: int, n_classes) -> tuple[torch.Tensor, list[int]]:
    lab = torch.as_tensor(labels)
    if lab.ndim == 1:
        lab = lab[:, None]
    if lab.ndim != 2:
        raise ConfigError(f"labels must have shape (n, F), got {tuple(lab.shape)}")
    if lab.dtype.is_floating_point or lab.dtype == torch.bool or lab.is_complex():
        raise ConfigError(f"labels must be an integer tensor, got dtype {lab.dtype}")
    if lab.shape[0] != n:
        raise ConfigError(f"labels have {lab.shape[0]} rows but features have {n} samples")
    ks = [int(n_classes)] * lab.shape[1] if isinstance(n_classes, int) else [int(k) for k in n_classes]
    if len(ks) != lab.shape[1]:
        raise ConfigError(f"n_classes has {len(ks)} entries but labels have {lab.shape[1]} factors")
    if min(ks) < 1:
        raise ConfigError(f"every factor needs at least 1 class, got n_classes={ks}")
    lab = lab.long().cpu()
    lo, hi = lab.min(0).values, lab.max(0).values
    for f, k in enumerate(ks):
        if int(lo[f]) < 0 or int(hi[f]) >= k:
            raise ConfigError(f"labels of factor {f} must lie in [0, {k}), got {int(lo[f])}..{int(hi[f])}")
    return lab, ks


# ---------------------------------------------------------------------------------------------------------------------
# the batched solver


class _Segments:
    """Index tables for F factors of K_1..K_F classes, concatenated into Kt = sum(K_f) columns.

    Weights and gradients are (c, D, Kt): one matrix product gives every factor's logits. Logits are (c, Kt, n),
    classes on the middle axis, so that consecutive factors with the same class count form one group viewed as
    (c, F_g, K, n), and each per-factor softmax reduction is a plain reduction over one axis of a view, with no
    padding or copies (the Shapes factors, K = 10, 10, 10, 8, 4, 15, make 4 groups).
    """

    def __init__(self, ks: list[int], device: torch.device, dtype: torch.dtype) -> None:
        self.ks = ks
        self.F, self.Kt, self.Kmax = len(ks), sum(ks), max(ks)
        offsets = [0]
        for k in ks[:-1]:
            offsets.append(offsets[-1] + k)
        self.offsets = torch.tensor(offsets, device=device)
        seg = torch.cat([torch.full((k,), f, dtype=torch.long) for f, k in enumerate(ks)])
        self.seg = seg.to(device)  # (Kt,) factor of each column
        self.member = torch.nn.functional.one_hot(seg, self.F).to(device, dtype)  # (Kt, F)
        self.kcol = torch.tensor([float(ks[f]) for f in seg.tolist()], device=device, dtype=dtype)  # (Kt,)
        self.kf = torch.tensor([float(k) for k in ks], device=device, dtype=dtype)  # (F,)
        #: runs of consecutive factors with equal class counts: (first column, first factor, factors, classes)
        self.groups: list[tuple[int, int, int, int]] = []
        f = 0
        while f < self.F:
            g = f
            while g + 1 < self.F and ks[g + 1] == ks[f]:
                g += 1
            self.groups.append((offsets[f], f, g - f + 1, ks[f]))
            f = g + 1
        # (Kt,) -> (F, Kmax) index for small tensors; slot Kt is a filler
        gather = torch.full((self.F * self.Kmax,), self.Kt, dtype=torch.long)
        for f, k in enumerate(ks):
            gather[f * self.Kmax : f * self.Kmax + k] = torch.arange(offsets[f], offsets[f] + k)
        self.gather = gather.to(device)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-problem inner products of (c, D, Kt) tensors: (c, F)."""
        return (a * b).sum(1) @ self.member

    def spread(self, v: torch.Tensor) -> torch.Tensor:
        """(c, F) per-problem scalars -> (c, 1, Kt), to scale each factor's columns."""
        return (v @ self.member.T).unsqueeze(1)

    def class_mean(self, q: torch.Tensor) -> torch.Tensor:
        """(c, r, Kt) -> (c, r, Kt): each entry replaced by the mean of its factor's classes in its row."""
        return ((q @ self.member) / self.kf) @ self.member.T

    def seg_max(self, v: torch.Tensor) -> torch.Tensor:
        """Per-factor maximum of a small (c, Kt) tensor: (c, F)."""
        v = torch.cat([v, v.new_full((v.shape[0], 1), -math.inf)], dim=1)
        return v.index_select(1, self.gather).view(-1, self.F, self.Kmax).amax(-1)

    def views(self, z: torch.Tensor):
        """Per group: (first factor, number of factors, the (c, F_g, K, n) view of logits-like z (c, Kt, n))."""
        c, _, n = z.shape
        for col, f, nf, k in self.groups:
            yield f, nf, z[:, col : col + nf * k].view(c, nf, k, n)

    def true_index(self, y: torch.Tensor) -> torch.Tensor:
        """Flat index (F * n,) of each sample's true-class logit in a (Kt, n) block, factor-major."""
        n = y.shape[0]
        return ((y + self.offsets) * n + torch.arange(n, device=y.device).unsqueeze(1)).T.reshape(-1)

    def softmax_stats(self, z: torch.Tensor, e: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """For logits z (c, Kt, n): exp(z - max) into e (per factor), its sums s, and the cross-entropy (c, F).

        Returns (ce, s) with s (c, F, n); ``idx`` from :meth:`true_index`.
        """
        c, _, n = z.shape
        m = torch.empty(c, self.F, n, dtype=z.dtype, device=z.device)
        for (f, nf, zv), (_, _, ev) in zip(self.views(z), self.views(e)):
            torch.amax(zv, 2, out=m[:, f : f + nf])
            torch.sub(zv, m[:, f : f + nf].unsqueeze(2), out=ev)
        e.clamp_min_(-80.0)  # exp of less is 0 to float precision; denormal results would be ~10x slower
        e.exp_()
        s = torch.empty_like(m)
        for f, nf, ev in self.views(e):
            torch.sum(ev, 2, out=s[:, f : f + nf])
        zy = z.view(c, -1).gather(1, idx.expand(c, -1)).view(c, self.F, n)
        ce = (m + s.log() - zy).mean(-1)
        return ce, s

    def normalize(self, e: torch.Tensor, s: torch.Tensor) -> None:
        """e /= s in place, per factor: exp(z - max) -> softmax."""
        for f, nf, ev in self.views(e):
            ev.div_(s[:, f : f + nf].unsqueeze(2))

    def argmax(self, z: torch.Tensor) -> torch.Tensor:
        """Per-factor predicted class (c, F, n) of logits (c, Kt, n), the first one on ties.

        Computed with max reductions (argmax over a non-innermost axis is ~100x slower on a CPU).
        """
        out = []
        for _, _, zv in self.views(z):
            k = zv.shape[2]
            rank = torch.arange(k, 0, -1, device=z.device, dtype=z.dtype).view(1, 1, k, 1)  # K..1: first wins
            top = ((zv == zv.amax(2, keepdim=True)) * rank).amax(2)
            out.append((k - top).long())
        return torch.cat(out, dim=1)


class _Pool:
    """A working set of ``B`` slots, each holding one cell's F problems, iterated together until every cell is done.

    A cell leaves its slot as soon as all its factors have converged (its held-out scores are computed then) and a
    queued cell takes the slot, so the batch stays full and a cell costs its own iterations, not its chunk's
    slowest; when the queue is empty the working set shrinks to the cells still running. Every problem keeps its
    own L-BFGS history, step and stopping test; only the arithmetic is shared.
    """

    def __init__(
        self,
        seg: _Segments,
        slots: int,
        ytr: torch.Tensor,
        yte: torch.Tensor,
        D: int,
        l2: float,
        tol: float,
        max_iter: int,
        dtype: torch.dtype,
        device: torch.device,
        diagonal: bool = False,
    ) -> None:
        self.seg, self.l2, self.tol, self.max_iter = seg, l2, tol, max_iter
        self.diagonal = diagonal
        self.dt, self.dev = dtype, device
        self.ytr, self.yte = ytr, yte
        n, Kt = ytr.shape[0], seg.Kt
        self.n, self.D = n, D
        cols = ytr + seg.offsets  # (n, F) column of each true class
        self.onehot = torch.zeros(Kt, n, dtype=dtype, device=device).scatter_(0, cols.T, 1.0)  # (Kt, n)
        self.idx = seg.true_index(ytr)
        self.log_k = seg.kf.log()  # (F,) cross-entropy of the uniform prediction (W = 0)
        self.B = 0
        self._alloc(slots)

    # -- slot storage ----------------------------------------------------------------------------------------------

    _SLOT = (
        "xt",
        "xte",
        "pen",
        "u",
        "lam",
        "xy",
        "w",
        "g",
        "gn",
        "f0",
        "gamma",
        "done",
        "n_iter",
        "cell",
    )

    def _alloc(self, B: int) -> None:
        seg, dt, dev, n, D = self.seg, self.dt, self.dev, self.n, self.D
        F, Kt, d = seg.F, seg.Kt, D - 1
        self.B = B
        self.xt = torch.zeros(B, D, n, dtype=dt, device=dev)
        self.xte = torch.zeros(B, D, self.yte.shape[0], dtype=dt, device=dev)
        self.pen = torch.zeros(B, D, 1, dtype=dt, device=dev)
        self.u = torch.zeros(B, d, d, dtype=dt, device=dev)
        self.lam = torch.zeros(B, d, dtype=dt, device=dev)
        # per group of equal-K factors: eigenvalues (B, F_g, K) and eigenvectors (B, F_g, K, K) of the softmax
        # curvature A = mean_i diag(p_i) - p_i p_i^T
        self.adiag = torch.zeros(B, 1, Kt, dtype=dt, device=dev)  # the curvature's diagonal (``diagonal``)
        self.av = [torch.zeros(B, nf, k, dtype=dt, device=dev) for _, _, nf, k in seg.groups]
        self.ua = [torch.zeros(B, nf, k, k, dtype=dt, device=dev) for _, _, nf, k in seg.groups]
        for name in ("xy", "w", "g"):
            setattr(self, name, torch.zeros(B, D, Kt, dtype=dt, device=dev))
        self.gn = torch.zeros(B, F, dtype=dt, device=dev)
        self.f0 = torch.zeros(B, F, dtype=dt, device=dev)
        self.gamma = torch.ones(B, F, dtype=dt, device=dev)
        self.done = torch.ones(B, F, dtype=torch.bool, device=dev)
        self.n_iter = torch.zeros(B, F, dtype=torch.long, device=dev)
        self.cell = torch.full((B,), -1, dtype=torch.long, device=dev)
        self.s_hist: list[torch.Tensor] = []
        self.y_hist: list[torch.Tensor] = []
        self.rho_hist: list[torch.Tensor] = []
        self._buffers()

    def _buffers(self) -> None:
        """Work buffers with no per-slot state, reused every iteration (fresh multi-MiB allocations are slow)."""
        B, Kt, n = self.B, self.seg.Kt, self.n
        self.zt = torch.empty(B, Kt, n, dtype=self.dt, device=self.dev)  # trial logits
        self.e = torch.empty_like(self.zt)  # exp(z - max), then the softmax

    def shrink(self, keep: torch.Tensor) -> None:
        """Keep only the slots ``keep`` (the queue is empty and the rest are done)."""
        for name in self._SLOT:
            setattr(self, name, getattr(self, name).index_select(0, keep))
        self.adiag = self.adiag.index_select(0, keep)
        self.av = [a.index_select(0, keep) for a in self.av]
        self.ua = [a.index_select(0, keep) for a in self.ua]
        self.s_hist = [h.index_select(0, keep) for h in self.s_hist]
        self.y_hist = [h.index_select(0, keep) for h in self.y_hist]
        self.rho_hist = [h.index_select(0, keep) for h in self.rho_hist]
        self.B = int(keep.numel())
        self._buffers()

    def load(self, slots: torch.Tensor, cells: torch.Tensor, xtr: torch.Tensor, xte: torch.Tensor) -> None:
        """Put new cells (standardized features (k, D, n) with a row of ones last) into free slots, at W = 0.

        The features are solved in the eigenbasis of their train covariance Sigma = X^T X / n (the bias row stays
        as it is): an orthogonal change of coordinates, under which the penalized objective, the logits and so every
        score are the same, and in which Sigma is diagonal, so the preconditioner needs no rotations per iteration.
        Only the stopping test, on the largest gradient entry in the features' own coordinates, rotates back (see
        :meth:`_gnorm`)."""
        seg = self.seg
        xf = xtr[:, :-1]
        sigma = (xf @ xf.transpose(1, 2)).double() / self.n
        lam, u = torch.linalg.eigh(sigma)
        u = u.to(self.dt)
        ut = u.transpose(1, 2)
        xtr = torch.cat([ut @ xf, xtr[:, -1:]], dim=1)
        xte = torch.cat([ut @ xte[:, :-1], xte[:, -1:]], dim=1)
        self.xt[slots] = xtr
        self.xte[slots] = xte
        pen = torch.ones_like(xtr[:, :, :1])
        pen[:, -1] = 0.0  # the bias is not penalized (padded and constant columns: their weights stay 0)
        self.pen[slots] = pen
        # preconditioner (see _precond): Sigma's eigenvalues, and the softmax curvature at W = 0 (uniform)
        self.lam[slots] = lam.clamp_min(0.0).to(self.dt)
        self.u[slots] = u
        self.adiag[slots] = 1.0 / seg.kcol - 1.0 / seg.kcol**2  # diagonal of the curvature at W = 0
        k_slots = len(slots)
        for j, (_, _, nf, k) in enumerate(seg.groups if not self.diagonal else ()):
            a = torch.eye(k, dtype=torch.float64, device=self.dev) / k - 1.0 / k**2
            av, ua = torch.linalg.eigh(a)
            self.av[j][slots] = av.clamp_min(0.0).to(self.dt).expand(k_slots, nf, k)
            self.ua[j][slots] = ua.to(self.dt).expand(k_slots, nf, k, k)
        xy = xtr @ self.onehot.T / self.n  # (k, D, Kt): the class means, the constant part of the gradient
        self.xy[slots] = xy
        self.w[slots] = 0.0
        self.g[slots] = xtr.mean(2, keepdim=True) / seg.kcol - xy  # gradient at W = 0 (uniform softmax)
        gn = self._gnorm(self.g[slots], u)
        self.gn[slots] = gn
        self.f0[slots] = self.log_k.expand(len(slots), -1)
        self.done[slots] = gn <= self.tol
        self.n_iter[slots] = 0
        self.gamma[slots] = 1.0
        for h in self.rho_hist:  # the slots' old history belongs to other cells
            h[slots] = 0.0
        for h in self.s_hist + self.y_hist:
            h[slots] = 0.0
        self.cell[slots] = cells

    # -- arithmetic ------------------------------------------------------------------------------------------------

    def _gnorm(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """(b, F): the largest absolute gradient entry per problem in the features' own coordinates, of gradients g
        (b, D, Kt) in the eigenbasis u (b, d, d)."""
        top = torch.cat([u @ g[:, :-1], g[:, -1:]], dim=1).abs().amax(1)
        return self.seg.seg_max(top)

    def _stopping_norm(self, g: torch.Tensor) -> torch.Tensor:
        """:meth:`_gnorm` of every slot, rotated back only where it decides the stopping test.

        A column's largest entry after the rotation lies between its Euclidean norm (the rotation keeps it) and
        that over sqrt(d): where the lower bound is above ``tol`` the problem goes on and where the upper one is at
        most ``tol`` it stops, whatever the exact value; only the cells with a problem in between are rotated. The
        value kept for a running problem may be its lower bound; finished cells are measured exactly at harvest.
        """
        d = g.shape[1] - 1
        feat = g[:, :-1].norm(dim=1)  # (B, Kt)
        bias = g[:, -1].abs()
        upper = self.seg.seg_max(torch.maximum(feat, bias))
        lower = self.seg.seg_max(torch.maximum(feat / math.sqrt(max(d, 1)), bias))
        out = torch.where(upper <= self.tol, upper, lower)
        rows = ((lower <= self.tol) & (upper > self.tol) & ~self.done).any(1).nonzero().squeeze(1)
        if rows.numel():
            out[rows] = self._gnorm(g.index_select(0, rows), self.u.index_select(0, rows))
        return out

    def _curvature(self) -> None:
        """Refresh each problem's softmax curvature A = mean_i diag(p_i) - p_i p_i^T from the softmax in e (only its
        diagonal, mean_i p_i (1 - p_i), with ``diagonal``)."""
        m = min(self.n, CURVATURE_SAMPLES)  # the train samples are in random order: the first m are a sample
        if self.diagonal:
            p = self.e[..., :m]  # mean p (1 - p), without a temporary the size of p
            self.adiag = ((p.sum(-1) - torch.linalg.vector_norm(p, dim=-1).square()) / m).unsqueeze(1)  # (B, 1, Kt)
            return
        for j, (_, _, pv) in enumerate(self.seg.views(self.e)):
            pv = pv[..., :m]  # (B, F_g, K, m)
            a = torch.diag_embed(pv.mean(-1)) - pv @ pv.transpose(2, 3) / m
            av, ua = torch.linalg.eigh(a.double())
            self.av[j], self.ua[j] = av.clamp_min(0.0).to(self.dt), ua.to(self.dt)

    def _precond(self, q: torch.Tensor) -> torch.Tensor:
        """Approximate inverse Hessian times q (B, D, Kt), per problem.

        The Hessian of a factor's mean cross-entropy is mean_i (x_i x_i^T) (x) (diag(p_i) - p_i p_i^T); with x and p
        taken as uncorrelated it is Sigma (x) A (Kronecker-factored, as in K-FAC), + l2 on the feature rows. Sigma
        = X^T X / n is the cell's feature covariance (the bias row is uncorrelated with the centred features, so it
        is its own block with Sigma = 1) and A the softmax curvature at the current iterate. Both are symmetric,
        so the inverse is two small eigenbases and a division: exact at W = 0, where p is uniform, and tracking
        the curvature as the probe grows confident. A's null direction (all classes equal) feels the penalty only
        (features) or nothing (bias, whose gradient has no such component).
        """
        seg, l2 = self.seg, self.l2
        B, D, Kt = q.shape
        rot = q  # (B, D, Kt): the features are in Sigma's eigenbasis (see load)
        if self.diagonal:  # Sigma is diagonal here, so the diagonal of Sigma (x) A is Sigma's times A's
            lamd = torch.cat([self.lam, torch.ones_like(self.lam[:, :1])], dim=1).unsqueeze(2)
            den = lamd * self.adiag + self.l2 * self.pen
            return torch.where(den > 1e-10, q / den.clamp_min(1e-10), torch.zeros_like(q))
        lam = torch.cat([self.lam, torch.ones_like(self.lam[:, :1])], dim=1)  # (B, D)
        pen = torch.full((D,), l2, dtype=q.dtype, device=q.device)
        pen[-1] = 0.0
        out = torch.empty_like(rot)
        for j, (col, _, nf, k) in enumerate(seg.groups):
            v = rot[:, :, col : col + nf * k].view(B, D, nf, k).transpose(1, 2)  # (B, F_g, D, K)
            v = v @ self.ua[j]  # in A's eigenbasis
            den = lam.view(B, 1, D, 1) * self.av[j].unsqueeze(2) + pen.view(1, 1, D, 1)
            v = torch.where(den > 1e-10, v / den.clamp_min(1e-10), torch.zeros_like(v))
            v = v @ self.ua[j].transpose(2, 3)
            out[:, :, col : col + nf * k] = v.transpose(1, 2).reshape(B, D, nf * k)
        return out

    def _evaluate(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy (B, F) at weights w (B, D, Kt); logits into zt, exp(z - max) into e; (ce, sums)."""
        torch.bmm(w.transpose(1, 2), self.xt, out=self.zt)
        return self.seg.softmax_stats(self.zt, self.e, self.idx)

    def _evaluate_rows(self, rows: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like _evaluate for the slots ``rows`` only (weights w (k, D, Kt)); their rows of e are overwritten."""
        z = torch.bmm(w.transpose(1, 2), self.xt.index_select(0, rows))
        e = torch.empty_like(z)
        ce, s = self.seg.softmax_stats(z, e, self.idx)
        self.e.index_copy_(0, rows, e)
        return ce, s

    def _gradient(self, s: torch.Tensor) -> torch.Tensor:
        """Gradient (B, D, Kt) at the point whose exp(z - max) is in e (consumed) with sums s."""
        self.seg.normalize(self.e, s)  # softmax
        g = torch.baddbmm(self.xy, self.xt, self.e.transpose(1, 2), beta=-1.0, alpha=1.0 / self.n)
        return g.addcmul_(self.w, self.pen, value=self.l2)

    def step(self) -> None:
        """One L-BFGS iteration of every unfinished problem."""
        seg, dt, B, F = self.seg, self.dt, self.B, self.seg.F
        g, done = self.g, self.done
        # two-loop recursion, per problem (each problem's inner products are sums over its own columns)
        q = g.clone()
        alphas = []
        for s_, y_, rho in zip(reversed(self.s_hist), reversed(self.y_hist), reversed(self.rho_hist)):
            a = rho * seg.dot(s_, q)
            alphas.append(a)
            q.addcmul_(seg.spread(a), y_, value=-1.0)
        r = seg.spread(self.gamma) * self._precond(q)
        for (s_, y_, rho), a in zip(zip(self.s_hist, self.y_hist, self.rho_hist), reversed(alphas)):
            r.addcmul_(seg.spread(a - rho * seg.dot(y_, r)), s_)
        d = -r * seg.spread((~done).to(dt))
        slope = seg.dot(g, d)  # (B, F), < 0 for every unfinished problem
        bad = (slope >= 0) & ~done
        if bool(bad.any()):  # numerical trouble: those problems restart from the preconditioned gradient
            sel = seg.spread(bad.to(dt))
            d = sel * -self._precond(g) + (1 - sel) * d
            slope = seg.dot(g, d)
        wp = self.w * self.pen
        wpw, wpd, dpd = seg.dot(wp, self.w), seg.dot(wp, d), seg.dot(d * self.pen, d)

        def penalty(st: torch.Tensor) -> torch.Tensor:
            return 0.5 * self.l2 * (wpw + 2 * st * wpd + st * st * dpd)

        # backtracking (Armijo) line search, per problem, from step 1 (a quasi-Newton step). The first trial
        # evaluates every cell; later trials only the cells with a problem still searching (usually one or two),
        # and e / s_sum always end up holding every problem's accepted point
        f0 = self.f0
        step = torch.ones(B, F, dtype=dt, device=self.dev)
        slack = 8 * torch.finfo(dt).eps * f0.abs()  # round-off of the loss itself
        ce, s_sum = self._evaluate(torch.addcmul(self.w, seg.spread(step), d))
        f_try = ce + penalty(step)
        accepted = done | (f_try <= f0 + ARMIJO * step * slope + slack)
        for _ in range(MAX_BACKTRACK):
            if bool(accepted.all()):
                break
            # quadratic interpolation, kept within [0.1, 0.5] of the last step
            curv = 2 * (f_try - f0 - slope * step)
            step_q = torch.where(curv > 0, -slope * step * step / curv.clamp_min(1e-30), 0.5 * step)
            step = torch.where(accepted, step, torch.minimum(torch.maximum(step_q, 0.1 * step), 0.5 * step))
            rows = (~accepted).any(1).nonzero().squeeze(1)
            ce_r, s_r = self._evaluate_rows(rows, torch.addcmul(self.w, seg.spread(step), d).index_select(0, rows))
            s_sum[rows] = s_r
            f_try[rows] = ce_r + penalty(step)[rows]
            accepted |= f_try <= f0 + ARMIJO * step * slope + slack
        failed = ~accepted  # line search failed (round-off at the optimum): no step, and the problem stops
        step = torch.where(failed | done, torch.zeros_like(step), step)
        if bool(failed.any()):
            rows = failed.any(1).nonzero().squeeze(1)
            ce_r, s_r = self._evaluate_rows(rows, torch.addcmul(self.w, seg.spread(step), d).index_select(0, rows))
            s_sum[rows] = s_r
        f_new = torch.where(done | failed, f0, f_try)
        s_vec = seg.spread(step) * d
        self.w = self.w + s_vec
        g_new = self.g = self._gradient(s_sum)
        self._curvature()
        y_vec = g_new - g
        sy = seg.dot(s_vec, y_vec)
        ok = sy > 1e-10 * (seg.dot(s_vec, s_vec) * seg.dot(y_vec, y_vec)).sqrt()
        rho = torch.where(ok, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))
        hy = seg.dot(y_vec, self._precond(y_vec))
        self.gamma = torch.where(ok & (hy > 0), sy / hy.clamp_min(1e-30), self.gamma)  # scale of H0 (Nocedal-Wright)
        self.s_hist.append(s_vec)
        self.y_hist.append(y_vec)
        self.rho_hist.append(rho)
        if len(self.s_hist) > HISTORY:
            del self.s_hist[0], self.y_hist[0], self.rho_hist[0]
        self.g, self.f0 = g_new, f_new
        self.gn = torch.where(done, self.gn, self._stopping_norm(g_new))
        self.n_iter += (~done).long()
        self.done = done | (self.gn <= self.tol) | failed | (self.n_iter >= self.max_iter)


@contextmanager
def _single_thread(on: bool) -> Iterator[None]:
    """Run a small CPU solve on one intra-op thread, restoring the setting after.

    A small problem's ops are too small to split, yet each parallel region still waits for all its threads; on a
    machine whose cores are busy with other work that wait is a scheduler time slice, and a solve that takes 30 ms
    on one thread was measured taking 0.2-1 s on two.
    """
    before = torch.get_num_threads()
    if not on or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prepare(
    x: torch.Tensor,
    cells: torch.Tensor,
    width: torch.Tensor,
    tr: torch.Tensor,
    te: torch.Tensor,
    dt: torch.dtype,
    dev: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized train and held-out features (k, d+1, n) of some cells, a row of ones last.

    Columns past a cell's width are zeroed first; mean and standard deviation come from the train samples, and
    constant (and padded) columns become 0.
    """
    d = x.shape[2]
    xc = x.index_select(0, cells.to(x.device)).to(dev, dt)
    cmask = (torch.arange(d, device=dev) < width[cells].to(dev).unsqueeze(1)).to(dt)  # (k, d)
    xc = xc * cmask.unsqueeze(1)
    xtr = xc.index_select(1, tr)
    mu = xtr.mean(1, keepdim=True)
    sd = xtr.std(1, keepdim=True, unbiased=False)
    keep = sd > torch.clamp_min(1e-6 * mu.abs(), 1e-30)  # a constant column's float round-off is ~1e-7 * |mean|
    xs = torch.where(keep, (xc - mu) / torch.where(keep, sd, torch.ones_like(sd)), torch.zeros_like(xc))
    xs = torch.cat([xs, torch.ones_like(xs[:, :, :1])], dim=2).transpose(1, 2)  # (k, D, n)
    return xs.index_select(2, tr), xs.index_select(2, te)


def _score(
    w: torch.Tensor, xt: torch.Tensor, y: torch.Tensor, seg: _Segments
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy in bits, accuracy ((c, F) each) and per-sample hits ((c, F, n) bool), on the CPU, of weights
    (c, D, Kt) on features (c, D, n)."""
    z = torch.bmm(w.transpose(1, 2), xt)  # (c, Kt, n)
    ce, _ = seg.softmax_stats(z, torch.empty_like(z), seg.true_index(y))
    hit = seg.argmax(z) == y.T.unsqueeze(0)
    return (ce / LN2).double().cpu(), hit.double().mean(-1).cpu(), hit.cpu()


def fit_probe_grid(
    features: torch.Tensor | Mapping[Hashable, torch.Tensor],
    labels: torch.Tensor,
    *,
    n_classes: Sequence[int],
    widths: torch.Tensor | None = None,
    factor_names: Sequence[str] | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float = 1e-3,
    max_iter: int = 200,
    tol: float = 1e-4,
    chunk_cells: int | None = None,
    device: torch.device | str | None = None,
    curvature: str = "auto",
    progress: ProgressArg = None,
) -> ProbeGrid:
    """Fit a linear softmax probe for every cell x factor in one batched solve; held-out scores and MI bounds.

    ``features``: (C, n, d) tensor (cells zero-padded to a common width d; ``widths`` (C,) gives each cell's true
    width, and columns past it are ignored), or a dict {cell_key: (n, d_c) tensor} which is padded and stacked here
    (the keys become ``ProbeGrid.keys``). ``labels``: (n, F) integer factors, ``n_classes``: F class counts.

    One seeded split (``test_fraction`` held out, the same for every cell); features standardized per cell with
    the train mean and standard deviation (constant columns become 0); a probe per (cell, factor) minimizing the
    mean cross-entropy + ``l2 / 2 * ||W||^2`` (bias unpenalized; scikit-learn's ``C = 1 / (l2 * n_train)``), until
    the largest absolute gradient entry is <= ``tol`` or ``max_iter`` iterations (a RuntimeWarning names the
    problems that did not converge). ``chunk_cells`` cells are in the solver at a time (a finished cell's slot goes to
    the next one; default: what keeps one (cells, K_1 + ... + K_F, n_train) buffer near 16 MiB on a CPU, 1 GiB on an
    accelerator); ``device``: where to solve (default: the features' device); float64 features are solved in
    float64, anything else in float32. A small CPU problem (work buffers under ~256K elements) runs on one thread,
    restoring ``torch.get_num_threads()`` after, because its parallel regions cost more than they save.
    ``curvature``: the softmax curvature in the preconditioner, ``"kfac"`` (each problem's full K x K matrix),
    ``"diagonal"`` (its diagonal: more iterations, each cheaper) or ``"auto"`` (diagonal below
    ``DIAGONAL_BELOW`` train samples, where it was measured faster); every choice stops at the same ``tol``.
    ``progress``: True for a bar, or a callable(done_cells, total_cells).
    """
    t0 = time.perf_counter()
    x, widths, keys = _stack(features, widths)
    C, n, d = x.shape
    lab, ks = _check_labels(labels, n, n_classes)
    F = lab.shape[1]
    names = [f"factor_{j}" for j in range(F)] if factor_names is None else [str(s) for s in factor_names]
    if len(names) != F:
        raise ConfigError(f"factor_names has {len(names)} entries but labels have {F} factors")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    n_train = n - n_test
    if n_test < 1 or n_train < 2:
        raise ConfigError(
            f"n = {n} samples is too few for test_fraction={test_fraction}: need at least 2 to train "
            f"and 1 to test, got {n_train} and {n_test}"
        )
    if l2 < 0 or not math.isfinite(l2):
        raise ConfigError(f"l2 must be a finite number >= 0, got {l2}")
    if max_iter < 1:
        raise ConfigError(f"max_iter must be >= 1, got {max_iter}")
    if not torch.isfinite(x).all():
        raise ConfigError("features contain NaN or infinite values")
    if curvature not in ("auto", "kfac", "diagonal"):
        raise ConfigError(f"curvature must be 'auto', 'kfac' or 'diagonal', got {curvature!r}")

    dev = torch.device(device) if device is not None else x.device
    if dev.type == "cpu":  # the solver's work tensors reuse heap pages (3-4% here; layerscope.allocator)
        tune_cpu_allocator()
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, te = perm[n_test:], perm[:n_test]
    ytr, yte = lab[tr], lab[te]
    seg = _Segments(ks, dev, dt)
    if chunk_cells is None:
        per_cell = seg.Kt * n_train * torch.finfo(dt).bits // 8
        budget = CHUNK_BYTES if dev.type == "cpu" else 1 << 30  # an accelerator wants big batches
        chunk_cells = int(min(C, max(4, budget // max(per_cell, 1))))
    if chunk_cells < 1:
        raise ConfigError(f"chunk_cells must be >= 1, got {chunk_cells}")
    width = torch.full((C,), d, dtype=torch.long) if widths is None else widths
    tr_d, te_d = tr.to(dev), te.to(dev)

    def prepare(cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _prepare(x, cells, width, tr_d, te_d, dt, dev)

    acc = torch.empty(C, F, dtype=torch.float64)
    acc_tr = torch.empty(C, F, dtype=torch.float64)
    hits = torch.empty(C, F, n_test, dtype=torch.bool)
    ce = torch.empty(C, F, dtype=torch.float64)
    n_iter = torch.empty(C, F, dtype=torch.long)
    gnorm = torch.empty(C, F, dtype=torch.float64)
    B = min(C, chunk_cells)
    diagonal = curvature == "diagonal" or (curvature == "auto" and n_train < DIAGONAL_BELOW)
    pool = _Pool(seg, B, ytr.to(dev), yte.to(dev), d + 1, l2, tol, max_iter, dt, dev, diagonal)
    refill = max(1, B // 8)  # free slots worth a refill
    queue = 0  # cells 0..queue-1 have been loaded
    finished = 0
    small = dev.type == "cpu" and B * seg.Kt * n_train < SMALL
    with progress_callback(progress, f"probes: {C} cells x {F} factors") as report, _single_thread(small):
        while True:
            free = (pool.cell < 0).nonzero().squeeze(1)
            if queue < C and (free.numel() >= refill or free.numel() == pool.B):
                k = min(int(free.numel()), C - queue)
                cells = torch.arange(queue, queue + k)
                pool.load(free[:k], cells.to(dev), *prepare(cells))
                queue += k
            elif queue >= C and 0 < free.numel() and 2 * (pool.B - free.numel()) <= pool.B:
                pool.shrink((pool.cell >= 0).nonzero().squeeze(1))
            if pool.B == 0 or bool((pool.cell < 0).all()):
                break
            if not bool(pool.done[pool.cell >= 0].all()):
                pool.step()
            # harvest the cells whose every factor is done: held-out scores now, then free their slots
            out = ((pool.cell >= 0) & pool.done.all(1)).nonzero().squeeze(1)
            if out.numel():
                cells = pool.cell[out].cpu()
                w = pool.w.index_select(0, out)
                ce[cells], acc[cells], hits[cells] = _score(w, pool.xte.index_select(0, out), pool.yte, seg)
                acc_tr[cells] = _score(w, pool.xt.index_select(0, out), pool.ytr, seg)[1]
                n_iter[cells] = pool.n_iter[out].cpu()
                gnorm[cells] = pool._gnorm(pool.g.index_select(0, out), pool.u.index_select(0, out)).double().cpu()
                pool.cell[out] = -1
                finished += int(out.numel())
                if report is not None:
                    report(finished, C)

    entropy = entropy_bits(yte, ks)
    counts = [torch.bincount(ytr[:, f], minlength=k) for f, k in enumerate(ks)]
    chance = torch.tensor(
        [float((yte[:, f] == int(cnt.argmax())).double().mean()) for f, cnt in enumerate(counts)], dtype=torch.float64
    )
    converged = gnorm <= tol
    if not bool(converged.all()):
        bad = (~converged).nonzero().tolist()
        warnings.warn(
            f"{len(bad)} of {C * F} probes did not reach tol={tol:g} in {max_iter} iterations "
            f"(largest gradient entry {float(gnorm.max()):.2e}; first: cell {keys[bad[0][0]]!r}, factor "
            f"{names[bad[0][1]]!r}); raise max_iter or l2",
            RuntimeWarning,
            stacklevel=2,
        )
    return ProbeGrid(
        accuracy=acc,
        cross_entropy=ce,
        entropy=entropy,
        mi_bound=(entropy - ce).clamp_min(0.0),
        chance=chance,
        keys=keys,
        factors=names,
        seconds=time.perf_counter() - t0,
        n_iter=n_iter,
        grad_norm=gnorm,
        converged=converged,
        n_train=n_train,
        n_test=n_test,
        l2=float(l2),
        tol=float(tol),
        train_accuracy=acc_tr,
        test_correct=hits,
    )
