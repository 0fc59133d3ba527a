"""Representation-alignment metrics between paired features, batched over every pair of many layers and steps.

Each metric compares two feature matrices X (N x D1) and Y (N x D2) whose rows are the same N inputs (scenes,
prompts, seeds) passed through two models, layers or denoising steps; D1 and D2 may differ. 1 means the two
representations agree (up to the metric's invariances), ~0 that they are unrelated.

- ``linear_cka``: linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited"),
  ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K = X X^T``, ``L = Y Y^T`` and the biased estimator
  ``HSIC(K, L) = tr(K H L H)`` (``H = I - 11^T / N``; its 1/(N-1)^2 cancels in the ratio). Invariant to
  orthogonal transforms and isotropic scaling of either side; on the features as given.
- ``debiased_cka``: the same ratio with the unbiased HSIC estimator of Song et al. 2012 (eq. 5), as in platonic-rep's
  ``unbiased_cka``: with ``K~`` = K with its diagonal zeroed, ``HSIC_u(K, L) = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 /
  ((N-1)(N-2)) - 2/(N-2) 1^T K~ L~ 1] / (N(N-3))``. Removes the finite-sample bias that makes linear CKA of
  unrelated high-dimensional features clearly positive at small N; can be slightly negative; needs N >= 4.
- ``mutual_knn``: mutual k-nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation
  Hypothesis"): the mean over inputs i of ``|kNN_X(i) & kNN_Y(i)| / k``, where kNN(i) are the k other inputs most
  similar to i, the input itself excluded. Similarity as in platonic-rep (``measure_alignment.compute_score``
  L2-normalises each row, ``compute_nearest_neighbors`` ranks by inner product): the cosine similarity of rows.
  1 for the same neighbourhoods, ~k/(N-1) for unrelated ones; needs 1 <= k < N.
- ``cknna``: centred kernel nearest-neighbour alignment (Huh et al. 2024), CKA restricted to mutual-kNN pairs,
  as platonic-rep's ``cknna`` with its defaults (``unbiased=True``, ``distance_agnostic=False``) on row-normalised
  features (what their ``compute_score`` passes it): ``K`` = the cosine Gram matrix of X, ``A_K`` its kNN adjacency
  (``A_K[i, j] = 1`` iff j is one of the k nearest neighbours of i, i excluded: row-wise, not symmetric), and
  likewise ``L``, ``A_L`` for Y. With the pair's mask ``M = A_K * A_L`` (j is a neighbour of i in both spaces),
  ``cknna = HSIC_u(M*K, M*L) / sqrt(HSIC_u(A_K*K, A_K*K) HSIC_u(A_L*L, A_L*L))`` (elementwise products; HSIC_u is
  the formula above applied literally to these non-symmetric matrices, ``tr(K~ L~)`` and ``1^T K~ L~ 1`` included).
  Needs N >= 4 and 2 <= k < N (platonic-rep rejects k < 2). Note: the paper (Appendix A) centres each kernel row
  by its mean and then sums over the mutual-kNN pairs, a form bounded by 1; its released code, which we follow
  (the numbers published with it come from the code), masks the raw kernels and centres them with the unbiased
  HSIC, which has no such bound by construction. The directional mask makes cknna(X, Y) differ slightly from
  cknna(Y, X). With k = N - 1 the mask keeps every off-diagonal pair and cknna equals ``debiased_cka`` of the
  row-normalised features.

Where we depart from platonic-rep, on purpose: their ``cka`` and ``cknna`` add 1e-6 to the denominator; we do not,
so identical features give exactly 1 and an undefined ratio gives ``nan`` (a constant feature matrix, whose centred
Gram is zero, or a CKNNA self-term <= 0). Their pipeline also clamps features at the 95% quantile of |x|
(``prepare_features``) and row-normalises before every metric, CKA included: that is preprocessing, not the metric,
and is not done here (to reproduce their CKA numbers, pass ``torch.nn.functional.normalize(x, dim=1)``). **Ties** in a
kNN ranking (duplicate inputs, one-hot references: most rows of a one-hot factor code tie at their 10th neighbour)
are shared, not broken: the inputs tied at the k-th similarity split the slots left equally (fractional
neighbours, each row still sums to k), so no measure depends on the order of the inputs; platonic-rep breaks ties
by ``torch.topk``'s order. Without ties the two agree exactly.

All arithmetic is in float64 on the device of the first feature tensor.

The single-pair functions (:func:`linear_cka`, :func:`debiased_cka`, :func:`mutual_knn`, :func:`cknna`) compute the
definitions directly. :func:`similarity_matrix` computes a metric for every pair of two sets of entries (or within
one set) without a loop over pairs:

- CKA: each entry's centred Gram matrix (for debiased CKA its U-centred form, Szekely & Rizzo 2014, whose inner
  products are the unbiased HSIC up to the factor N(N-3)) is computed once and flattened; all pairs' HSICs are one
  matrix product, normalised by its diagonal;
- mutual kNN: each entry's kNN adjacency (N x N, 0/1) is computed once; all pairwise overlaps are one matrix product;
- CKNNA: the mask of a pair is the product of two adjacencies, and each term of the unbiased HSIC of the masked
  kernels factors into per-entry matrices: ``tr`` and the two sums are matrix products of flattened per-entry
  matrices, ``1^T K~ L~ 1`` is a batched product over the middle index (``N`` products of (S_a x N) by (N x S_b)),
  chunked over the entries of the first set to hold at most :data:`CKNNA_CHUNK_BYTES` of scratch at once. Exact:
  no pair's N x N mask is ever formed.

Memory: a set of S entries holds a few (S, N, N) float64 stacks (14 MB each for S = 430, N = 64).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = [
    "CKNNA_CHUNK_BYTES",
    "DEFAULT_K",
    "METRICS",
    "cknna",
    "debiased_cka",
    "EMBEDDABLE",
    "gram_embeddings",
    "gram_similarity",
    "kernel_similarity",
    "linear_cka",
    "mutual_knn",
    "similarity_matrix",
]

#: metric names accepted by :func:`similarity_matrix`
METRICS = ("linear_cka", "debiased_cka", "mutual_knn", "cknna")
#: neighbours per input of the kNN metrics (platonic-rep's default topk)
DEFAULT_K = 10
#: float64 scratch (bytes) the batched CKNNA may hold at once for its 1^T K~ L~ 1 term; rows are chunked to fit
CKNNA_CHUNK_BYTES = 256 * 2**20
#: two similarities closer than this tie in a kNN ranking (cosine similarities lie in [-1, 1])
TIE_TOL = 1e-10

_KNN_METRICS = ("mutual_knn", "cknna")
_UNBIASED_METRICS = ("debiased_cka", "cknna")


# ---------------------------------------------------------------------------------------------------- validation
def _features(x: object, where: str, device: torch.device | None = None) -> torch.Tensor:
    """One entry as a float64 (N, D) tensor after checking it is 2-D, has >= 2 rows and >= 1 column, and is finite."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{where} must be an (N, D) tensor or array, got {type(x).__name__} ({e})") from None
    if x.ndim != 2:
        raise ConfigError(f"{where} must be a 2-D (N inputs, D features) tensor, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise ConfigError(f"{where} must be real, got dtype {x.dtype}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ConfigError(f"{where} must have at least 2 rows (inputs) and 1 column, got shape {tuple(x.shape)}")
    x = x.detach().to(device=device if device is not None else x.device, dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{where} has non-finite values (nan or inf): alignment metrics need finite features")
    return x


def _entries(feats: object, name: str, device: torch.device | None) -> list[torch.Tensor]:
    """A sequence of (N, D_i) tensors (or one (S, N, D) tensor or array) as a list of validated float64 tensors."""
    if not isinstance(feats, torch.Tensor) and getattr(feats, "ndim", None) == 3:  # e.g. a numpy array
        feats = torch.as_tensor(feats)
    if isinstance(feats, torch.Tensor):
        if feats.ndim != 3:
            raise ConfigError(
                f"{name} must be a sequence of (N, D) tensors or one (S, N, D) tensor, got a tensor of shape "
                f"{tuple(feats.shape)} (wrap a single (N, D) tensor in a list)"
            )
        feats = list(feats.unbind(0))
    if not isinstance(feats, Sequence) or isinstance(feats, (str, bytes)):
        raise ConfigError(f"{name} must be a sequence of (N, D) tensors, got {type(feats).__name__}")
    if len(feats) == 0:
        raise ConfigError(f"{name} is empty: give at least one (N, D) feature tensor")
    out = []
    for i, x in enumerate(feats):
        t = _features(x, f"{name}[{i}]", device)
        device = t.device
        out.append(t)
    return out


def _same_n(named: Sequence[tuple[str, torch.Tensor]]) -> int:
    """The common number of rows N of the named tensors; ConfigError naming the first mismatch."""
    ref_name, ref = named[0]
    n = ref.shape[0]
    for where, x in named[1:]:
        if x.shape[0] != n:
            raise ConfigError(
                f"{where} has {x.shape[0]} rows but {ref_name} has {n}: every feature tensor must hold the same "
                f"N inputs, in the same order"
            )
    return n


def _check_metric(metric: str, n: int, k: int) -> int:
    """Check the metric name is known and N and k are valid for it; return k as an int."""
    if metric not in METRICS:
        raise ConfigError(f"unknown alignment metric {metric!r}; valid: {', '.join(METRICS)}")
    if metric in _UNBIASED_METRICS and n < 4:
        raise ConfigError(
            f"{metric} needs at least 4 inputs (the unbiased HSIC divides by N - 3 and N - 2), got N = {n}"
        )
    if metric in _KNN_METRICS:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise ConfigError(f"k must be an int (neighbours per input), got {k!r}")
        k_min = 2 if metric == "cknna" else 1
        if k < k_min:
            raise ConfigError(f"{metric} needs k >= {k_min} neighbours per input, got k = {k}")
        if k >= n:
            raise ConfigError(
                f"k = {k} neighbours need more than k inputs besides each input itself, got N = {n}: choose k < N"
            )
        return int(k)
    return k


def _pair(x: object, y: object, metric: str, k: int = DEFAULT_K) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validated float64 (x, y) of one pair, on x's device, and k as an int."""
    xt = _features(x, "x")
    yt = _features(y, "y", xt.device)
    n = _same_n([("x", xt), ("y", yt)])
    return xt, yt, _check_metric(metric, n, k)


# ---------------------------------------------------------------------------------------------- building blocks
def _cosine_gram(x: torch.Tensor) -> torch.Tensor:
    """(N, N) inner products of the L2-normalised rows of x (platonic-rep's kNN similarity)."""
    xn = F.normalize(x, dim=1)
    return xn @ xn.T


def _knn_adjacency(sim: torch.Tensor, k: int) -> torch.Tensor:
    """(..., N, N) float64 neighbour weights: row i has 1 at the columns j != i whose ``sim[..., i, j]`` is above
    its k-th largest value, and the inputs tied at that value (within :data:`TIE_TOL`) share the slots left, each
    ``(k - above) / tied``. Every row sums to k; without ties this is the 0/1 adjacency of the k nearest
    neighbours, and with ties the result no longer depends on the order of the inputs."""
    n = sim.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    s = sim.masked_fill(eye, float("-inf"))
    kth = s.topk(k, dim=-1).values[..., -1:]
    above = s > kth + TIE_TOL
    tied = ((s - kth).abs() <= TIE_TOL) & ~above & ~eye
    share = (k - above.sum(-1, keepdim=True)) / tied.sum(-1, keepdim=True).clamp_min(1)
    return above.to(sim.dtype) + tied.to(sim.dtype) * share.to(sim.dtype)


def _hsic_biased(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """tr(K H L H), the biased HSIC without its 1/(N-1)^2 (it cancels in every ratio here)."""
    n = kx.shape[0]
    h = torch.eye(n, dtype=kx.dtype, device=kx.device) - 1.0 / n
    return torch.trace(kx @ h @ ky @ h)


def _hsic_unbiased(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """Song et al. 2012, eq. 5, taken literally (also for non-symmetric K, L, as CKNNA's masked kernels are)."""
    n = kx.shape[0]
    kt = kx.clone().fill_diagonal_(0.0)
    lt = ky.clone().fill_diagonal_(0.0)
    kl = kt @ lt
    value = torch.trace(kl) + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2.0 * kl.sum() / (n - 2)
    return value / (n * (n - 3))


def _ratio(num: torch.Tensor, self_a: torch.Tensor, self_b: torch.Tensor) -> torch.Tensor:
    """num[i, j] / sqrt(self_a[i] self_b[j]); nan where either self-term is <= 0 (the ratio is undefined)."""
    ok = (self_a > 0)[:, None] & (self_b > 0)[None, :]
    den = self_a.clamp_min(0).sqrt()[:, None] * self_b.clamp_min(0).sqrt()[None, :]
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(num, math.nan))


def _scalar_ratio(num: torch.Tensor, self_a: torch.Tensor, self_b: torch.Tensor) -> float:
    return float(_ratio(num.reshape(1, 1), self_a.reshape(1), self_b.reshape(1))[0, 0])


def _u_centred(k: torch.Tensor) -> torch.Tensor:
    """U-centring (Szekely & Rizzo 2014) of a symmetric (..., N, N) kernel: <U(K), U(L)> / (N(N-3)) = HSIC_u(K, L)."""
    n = k.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    kt = k.masked_fill(eye, 0.0)
    rows = kt.sum(-1, keepdim=True) / (n - 2)
    cols = kt.sum(-2, keepdim=True) / (n - 2)
    total = kt.sum((-2, -1), keepdim=True) / ((n - 1) * (n - 2))
    return (kt - rows - cols + total).masked_fill(eye, 0.0)


# ---------------------------------------------------------------------------------------------- single pairs
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of paired features x (N, D1), y (N, D2): biased HSIC of the linear Grams.

    In [0, 1]; 1 iff y is an orthogonal transform of x up to scale (after centring); nan if either is constant.
    """
    x, y, _ = _pair(x, y, "linear_cka")
    kx, ky = x @ x.T, y @ y.T
    return _scalar_ratio(_hsic_biased(kx, ky), _hsic_biased(kx, kx), _hsic_biased(ky, ky))


def debiased_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Debiased linear CKA: the CKA ratio with Song et al.'s unbiased HSIC (platonic-rep's ``unbiased_cka``).

    ~0 for unrelated features at any N (where linear CKA is biased upwards), 1 for identical ones; needs N >= 4.
    """
    x, y, _ = _pair(x, y, "debiased_cka")
    kx, ky = x @ x.T, y @ y.T
    return _scalar_ratio(_hsic_unbiased(kx, ky), _hsic_unbiased(kx, kx), _hsic_unbiased(ky, ky))


def mutual_knn(x: torch.Tensor, y: torch.Tensor, k: int = DEFAULT_K) -> float:
    """Mutual k-NN alignment (Huh et al. 2024): mean share of each input's k cosine-nearest neighbours shared by x, y.

    Neighbours exclude the input itself; 1 for the same neighbourhoods, ~k/(N-1) for unrelated features.
    """
    x, y, k = _pair(x, y, "mutual_knn", k)
    a = _knn_adjacency(_cosine_gram(x), k)
    b = _knn_adjacency(_cosine_gram(y), k)
    return float(((a * b).sum(1) / k).mean())


def cknna(x: torch.Tensor, y: torch.Tensor, k: int = DEFAULT_K) -> float:
    """CKNNA (Huh et al. 2024) as platonic-rep's ``cknna``: unbiased-HSIC CKA of the cosine kernels on mutual-kNN pairs.

    See the module docstring for the exact definition (directional mask, unbiased HSIC); needs N >= 4, 2 <= k < N.
    """
    x, y, k = _pair(x, y, "cknna", k)
    kx, ky = _cosine_gram(x), _cosine_gram(y)
    ax, ay = _knn_adjacency(kx, k), _knn_adjacency(ky, k)
    m = ax * ay
    num = _hsic_unbiased(m * kx, m * ky)
    return _scalar_ratio(num, _hsic_unbiased(ax * kx, ax * kx), _hsic_unbiased(ay * ky, ay * ky))


# ---------------------------------------------------------------------------------------------- all pairs at once
def similarity_matrix(
    feats_a: Sequence[torch.Tensor],
    feats_b: Sequence[torch.Tensor] | None = None,
    metric: str = "linear_cka",
    k: int = DEFAULT_K,
) -> torch.Tensor:
    """The alignment ``metric`` of every pair of entries: (len(feats_a), len(feats_b)), or (S, S) within feats_a.

    ``feats_a`` / ``feats_b``: sequences of (N, D_i) feature tensors (or one (S, N, D) tensor), all with the same N
    rows (the same inputs in the same order); D_i may differ. ``metric``: one of :data:`METRICS`; ``k``: neighbours
    per input of the kNN metrics (ignored by the CKA ones). Entry ``[i, j]`` equals the single-pair function on
    ``(feats_a[i], feats_b[j])`` up to rounding, computed without a loop over pairs (see the module docstring).
    Returns float64 on the device of ``feats_a[0]``; nan where the ratio is undefined (e.g. a constant entry).
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown alignment metric {metric!r}; valid: {', '.join(METRICS)}")
    xa = _entries(feats_a, "feats_a", None)
    within = feats_b is None
    xb = xa if within else _entries(feats_b, "feats_b", xa[0].device)
    named = [(f"feats_a[{i}]", x) for i, x in enumerate(xa)]
    if not within:
        named += [(f"feats_b[{j}]", x) for j, x in enumerate(xb)]
    n = _same_n(named)
    k = _check_metric(metric, n, k)

    if metric in ("linear_cka", "debiased_cka"):
        ka = torch.stack([x @ x.T for x in xa])
        return gram_similarity(ka, None if within else torch.stack([x @ x.T for x in xb]), metric)
    ca = torch.stack([_cosine_gram(x) for x in xa])
    return _knn_similarity(ca, None if within else torch.stack([_cosine_gram(x) for x in xb]), metric, k)


def _knn_similarity(ca: torch.Tensor, cb: torch.Tensor | None, metric: str, k: int) -> torch.Tensor:
    """Mutual k-NN or CKNNA of every pair from (S, N, N) cosine kernels (``cb`` None: within ``ca``)."""
    n = ca.shape[-1]
    if metric == "mutual_knn":
        aa = _knn_adjacency(ca, k).flatten(1)
        ab = aa if cb is None else _knn_adjacency(cb, k).flatten(1)
        return (aa @ ab.T) / (n * k)
    return _cknna_matrix(ca, ca if cb is None else cb, k)


#: measures that are an inner product of per-entry vectors (:func:`gram_embeddings`)
EMBEDDABLE = ("linear_cka", "debiased_cka", "mutual_knn")


def gram_embeddings(grams: torch.Tensor, metric: str = "debiased_cka", k: int = DEFAULT_K) -> torch.Tensor:
    """Per entry of a (S, N, N) stack of linear Grams, the (S, N * N) vector whose inner products are the measure:
    ``kernel_similarity(a, b, metric, k) == gram_embeddings(a) @ gram_embeddings(b).T`` for the measures in
    :data:`EMBEDDABLE` (CKA: the centred, or U-centred, Gram over its norm; mutual k-NN: the kNN weights over
    ``sqrt(N k)``). An entry whose CKA is undefined (a centred Gram of norm 0) is a row of NaN. Permuting the inputs
    permutes each vector's (i, j) cells alike, so a shuffled entry's vector is an index into the original's."""
    if metric not in EMBEDDABLE:
        raise ConfigError(f"gram_embeddings computes {', '.join(EMBEDDABLE)}, not {metric!r}")
    g = grams.double()
    n = g.shape[-1]
    if metric == "mutual_knn":
        k = _check_metric(metric, n, k)
        norm = g.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().clamp_min(1e-12)
        adj = _knn_adjacency(g / norm[..., :, None] / norm[..., None, :], k)
        return adj.flatten(1) / math.sqrt(n * k)
    if metric == "debiased_cka":
        if n < 4:
            raise ConfigError(f"debiased CKA needs at least 4 inputs, got {n}")
        c = _u_centred(g).flatten(1)
    else:
        c = (g - g.mean(-1, keepdim=True) - g.mean(-2, keepdim=True) + g.mean((-2, -1), keepdim=True)).flatten(1)
    norm = c.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, c / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.full_like(c, math.nan))


def kernel_similarity(
    grams_a: torch.Tensor, grams_b: torch.Tensor | None = None, metric: str = "debiased_cka", k: int = DEFAULT_K
) -> torch.Tensor:
    """Any metric of :data:`METRICS` for every pair from linear Gram matrices ``X X^T`` (uncentred) alone, stacks
    (S, N, N) and (T, N, N): equal to :func:`similarity_matrix` on the features that made them. The kNN measures
    need only the cosine kernel ``G_ij / sqrt(G_ii G_jj)``, so the exact Gram of a whole activation map stands for
    the map (no projection), and a subsample of inputs is an index into it. A row with ``G_ii = 0`` (an all-zero
    feature vector) has no direction: its cosine similarities are 0, as ``F.normalize`` makes them."""
    if metric in ("linear_cka", "debiased_cka"):
        return gram_similarity(grams_a, grams_b, metric)
    if metric not in METRICS:
        raise ConfigError(f"unknown alignment metric {metric!r}; valid: {', '.join(METRICS)}")
    k = _check_metric(metric, grams_a.shape[-1], k)

    def cosine(g: torch.Tensor) -> torch.Tensor:
        g = g.double()
        norm = g.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().clamp_min(1e-12)
        return g / norm[..., :, None] / norm[..., None, :]

    ca = cosine(grams_a)
    return _knn_similarity(ca, None if grams_b is None else cosine(grams_b), metric, k)


def gram_similarity(
    grams_a: torch.Tensor, grams_b: torch.Tensor | None = None, metric: str = "linear_cka"
) -> torch.Tensor:
    """Linear or debiased CKA of every pair from linear Gram matrices ``X X^T`` (uncentred), stacks (S, N, N) and
    (T, N, N): (S, T), or (S, S) within ``grams_a``. A subsample of the inputs is an index into the Grams
    (``K[:, i][:, :, i]``), so resampling never recomputes features. Each Gram is centred once (``H K H``, or
    U-centred for debiased CKA) and all pairs are one matrix product."""
    if metric not in ("linear_cka", "debiased_cka"):
        raise ConfigError(f"gram_similarity computes linear_cka or debiased_cka, not {metric!r}")

    def centred(k: torch.Tensor) -> torch.Tensor:
        k = k.double()
        if metric == "debiased_cka":
            if k.shape[-1] < 4:
                raise ConfigError(f"debiased CKA needs at least 4 inputs, got {k.shape[-1]}")
            return _u_centred(k).flatten(1)
        return (k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)).flatten(1)

    ga = centred(grams_a)
    gb = ga if grams_b is None else centred(grams_b)
    sa = (ga * ga).sum(1)
    sb = sa if grams_b is None else (gb * gb).sum(1)
    return _ratio(ga @ gb.T, sa, sb)


def _cknna_parts(kern: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per entry of a (S, N, N) stack of cosine kernels: kNN weights A, masked kernel P = A * K, and S = A * A^T * K
    (the pairs that are mutual in-entry)."""
    adj = _knn_adjacency(kern, k)
    p = adj * kern
    s = p * adj.transpose(1, 2)
    return adj, p, s


def _cknna_self(adj: torch.Tensor, p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(S,) HSIC_u(A * K, A * K) per entry, N(N-3) omitted: the CKNNA normalisers."""
    n = adj.shape[-1]
    t1 = (s * p).sum((1, 2))  # tr(P P) = sum_ij P_ij P_ji = sum_ij S_ij K_ij
    t2 = p.sum((1, 2)) ** 2 / ((n - 1) * (n - 2))
    t3 = 2.0 * (p.sum(1) * p.sum(2)).sum(1) / (n - 2)  # 1^T P P 1 = sum_j colsum_j(P) rowsum_j(P)
    return t1 + t2 - t3


def _cknna_matrix(ka: torch.Tensor, kb: torch.Tensor, k: int) -> torch.Tensor:
    """CKNNA of every (a, b) pair: HSIC_u(M * K_a, M * K_b) with M = A_a * A_b, term by term as products of stacks.

    ``ka``, ``kb``: (S, N, N) and (T, N, N) cosine kernels (``kb is ka`` within one set). With P = A * K and
    S = A * A^T * K per entry (K symmetric, A the kNN weights with zero diagonal), for the pair (a, b):
    tr(K~_1 K~_2) = <S_a, S_b>; sum(K~_1) = <P_a, A_b>; sum(K~_2) = <A_a, P_b>; and 1^T K~_1 K~_2 1 =
    sum_j (sum_i P_a[i, j] A_b[i, j]) (sum_l A_a[j, l] P_b[j, l]), a batched product over j.
    """
    n = ka.shape[-1]
    adj_a, p_a, s_a = _cknna_parts(ka, k)
    same = kb is ka
    adj_b, p_b, s_b = (adj_a, p_a, s_a) if same else _cknna_parts(kb, k)
    t1 = s_a.flatten(1) @ s_b.flatten(1).T
    sum_1 = p_a.flatten(1) @ adj_b.flatten(1).T
    sum_2 = adj_a.flatten(1) @ p_b.flatten(1).T
    # 1^T K~_1 K~_2 1, chunked over the entries of a: c[j, a, b] = sum_i P_a[i, j] A_b[i, j],
    # r[j, a, b] = sum_l A_a[j, l] P_b[j, l]
    nb = adj_b.shape[0]
    adj_b_t = adj_b.permute(2, 1, 0).contiguous()  # [j, i, b] = A_b[i, j]
    p_b_t = p_b.permute(1, 2, 0).contiguous()  # [j, l, b] = P_b[j, l]
    t3 = torch.empty_like(t1)
    rows = max(1, CKNNA_CHUNK_BYTES // (3 * 8 * n * nb))
    for lo in range(0, adj_a.shape[0], rows):
        hi = lo + rows
        c = torch.bmm(p_a[lo:hi].permute(2, 0, 1), adj_b_t)  # (N_j, rows, S_b)
        r = torch.bmm(adj_a[lo:hi].permute(1, 0, 2), p_b_t)
        t3[lo:hi] = (c * r).sum(0)
    hsic = t1 + sum_1 * sum_2 / ((n - 1) * (n - 2)) - 2.0 * t3 / (n - 2)
    self_a = _cknna_self(adj_a, p_a, s_a)
    self_b = self_a if same else _cknna_self(adj_b, p_b, s_b)
    return _ratio(hsic, self_a, self_b)
