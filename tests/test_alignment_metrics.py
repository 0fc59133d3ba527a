"""Alignment metrics (layerscope.metrics.alignment) against independent references written here from the papers'
equations (numpy, float64: centering matrix H, Song et al.'s unbiased HSIC term by term, kNN by sorting each row),
against rsatoolbox's linear CKA when it is installed, on their invariances, and the batched matrix against the
single-pair functions."""

import numpy as np
import pytest
import torch

from layerscope.errors import ConfigError
from layerscope.metrics import alignment as al
from layerscope.metrics.alignment import cknna, debiased_cka, linear_cka, mutual_knn, similarity_matrix

PAIR_FUNCS = {"linear_cka": linear_cka, "debiased_cka": debiased_cka, "mutual_knn": mutual_knn, "cknna": cknna}


# ---------------------------------------------------------------------------------------------------- data
def related(n: int, dims: list[int], seed: int, noise: float = 0.7) -> list[torch.Tensor]:
    """Feature sets that share a 6-d latent (so the metrics take values well inside (0, 1)), one per width."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g, dtype=torch.float64)
    out = []
    for d in dims:
        w = torch.randn(6, d, generator=g, dtype=torch.float64)
        x = torch.tanh(z @ w) + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
        out.append(x * 3.0 + 1.5)  # an offset and scale: centring matters
    return out


def orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# ---------------------------------------------------------------------------------------------------- references
def ref_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019: HSIC(K, L) = tr(K H L H) / (n - 1)^2 with H = I - 11^T / n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def ref_linear_cka_features(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019, eq. in feature space: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


def ref_hsic_unbiased(k: np.ndarray, l_: np.ndarray) -> float:
    """Song et al. 2012, eq. 5: [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))."""
    n = k.shape[0]
    kt, lt = k.copy(), l_.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return (term1 + term2 - term3) / (n * (n - 3))


def ref_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    k, l_ = x @ x.T, y @ y.T
    return ref_hsic_unbiased(k, l_) / np.sqrt(ref_hsic_unbiased(k, k) * ref_hsic_unbiased(l_, l_))


def ref_cosine(x: np.ndarray) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return xn @ xn.T


def ref_neighbours(x: np.ndarray, k: int) -> list[list[int]]:
    """For each row i: the k other rows of largest cosine similarity, by sorting row i (i itself left out)."""
    sim = ref_cosine(x)
    out = []
    for i in range(x.shape[0]):
        others = sorted((j for j in range(x.shape[0]) if j != i), key=lambda j: -sim[i, j])
        out.append(others[:k])
    return out


def ref_mutual_knn(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Huh et al. 2024: mean_i |kNN_x(i) & kNN_y(i)| / k."""
    nx, ny = ref_neighbours(x, k), ref_neighbours(y, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(nx, ny)]))


def ref_cknna(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """platonic-rep's cknna (unbiased=True): unbiased HSIC of the cosine kernels restricted to mutual-kNN pairs."""
    n = x.shape[0]
    kx, ky = ref_cosine(x), ref_cosine(y)
    nx, ny = ref_neighbours(x, k), ref_neighbours(y, k)
    ax, ay = np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):
        ax[i, nx[i]] = 1.0
        ay[i, ny[i]] = 1.0
    m = ax * ay
    num = ref_hsic_unbiased(m * kx, m * ky)
    return num / np.sqrt(ref_hsic_unbiased(ax * kx, ax * kx) * ref_hsic_unbiased(ay * ky, ay * ky))


REFS = {
    "linear_cka": lambda x, y, k: ref_linear_cka(x, y),
    "debiased_cka": lambda x, y, k: ref_debiased_cka(x, y),
    "mutual_knn": ref_mutual_knn,
    "cknna": ref_cknna,
}


# ---------------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("metric", list(REFS))
def test_single_pair_matches_reference(metric):
    feats = related(40, [5, 24, 80], seed=1)  # D < N and D > N
    k = 7
    for i in range(len(feats)):
        for j in range(len(feats)):
            if i == j:
                continue
            x, y = feats[i], feats[j]
            ref = REFS[metric](x.numpy(), y.numpy(), k)
            got = PAIR_FUNCS[metric](x, y, k=k) if metric in ("mutual_knn", "cknna") else PAIR_FUNCS[metric](x, y)
            assert 0.05 < ref < 0.99  # a non-trivial value
            assert got == pytest.approx(ref, abs=1e-12), (metric, i, j)


def test_linear_cka_feature_space_formula():
    x, y = related(30, [12, 50], seed=2)
    assert linear_cka(x, y) == pytest.approx(ref_linear_cka_features(x.numpy(), y.numpy()), abs=1e-12)


def test_linear_cka_matches_rsatoolbox():
    """rsatoolbox's 'cosine_cov' comparison of squared-Euclidean RDMs without a noise covariance is linear CKA."""
    pytest.importorskip("rsatoolbox")
    from rsatoolbox.data import Dataset
    from rsatoolbox.rdm import calc_rdm, compare

    feats = related(36, [4, 20, 64], seed=3)
    rdms = [calc_rdm(Dataset(x.numpy()), method="euclidean") for x in feats]
    for i in range(len(feats)):
        for j in range(i + 1, len(feats)):
            ref = float(compare(rdms[i], rdms[j], method="cosine_cov")[0, 0])
            assert linear_cka(feats[i], feats[j]) == pytest.approx(ref, abs=1e-10)


def test_mutual_knn_reference_k_values():
    x, y = related(30, [8, 16], seed=4, noise=1.0)
    for k in (1, 3, 10, 29):
        assert mutual_knn(x, y, k=k) == pytest.approx(ref_mutual_knn(x.numpy(), y.numpy(), k), abs=1e-12)
    assert mutual_knn(x, y, k=29) == 1.0  # every other input is a neighbour


def test_cknna_with_all_neighbours_is_debiased_cka_of_normalised_rows():
    x, y = related(25, [6, 30], seed=5)
    xn, yn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    assert cknna(x, y, k=24) == pytest.approx(debiased_cka(xn, yn), abs=1e-12)


# ---------------------------------------------------------------------------------------------------- invariances
def test_cka_invariances():
    x = related(50, [20], seed=6)[0]
    xq = x @ orthogonal(20, 0)
    for f in (linear_cka, debiased_cka):
        assert f(x, xq) == pytest.approx(1.0, abs=1e-12)
        assert f(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)
        assert f(x, x) == pytest.approx(1.0, abs=1e-14)
    # a (centred) subspace of x is less than 1
    assert linear_cka(x, x[:, :5]) < 0.99


def test_debiased_cka_of_independent_features_is_near_zero():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(500, 64, generator=g)
    y = torch.randn(500, 32, generator=g)
    assert abs(debiased_cka(x, y)) < 0.05
    assert linear_cka(x, y) > 0.05  # the bias debiasing removes, at this N and D


def test_knn_metrics_identity_and_permutation():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(500, 32, generator=g, dtype=torch.float64)
    k = 10
    assert mutual_knn(x, x, k) == 1.0
    assert mutual_knn(x, x @ orthogonal(32, 1), k) == 1.0  # cosine similarity is rotation-invariant
    assert mutual_knn(x, 3 * x, k) == 1.0
    perm = torch.randperm(500, generator=g)
    assert abs(mutual_knn(x, x[perm], k) - k / 499) < 0.01
    assert cknna(x, x, k) == pytest.approx(1.0, abs=1e-12)
    assert cknna(x, x @ orthogonal(32, 2), k) == pytest.approx(1.0, abs=1e-10)
    assert abs(cknna(x, x[perm], k)) < 0.1


def test_constant_features_give_nan():
    x = related(20, [5], seed=9)[0]
    const = torch.ones(20, 3)
    assert np.isnan(linear_cka(x, const))
    assert np.isnan(debiased_cka(const, x))
    m = similarity_matrix([x, const], metric="linear_cka")
    assert torch.isnan(m[0, 1]) and torch.isnan(m[1, 1]) and m[0, 0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------- batched
@pytest.mark.parametrize("metric", al.METRICS)
def test_similarity_matrix_equals_single_pairs(metric):
    fa = related(30, [3, 16, 40, 7, 64], seed=10)
    fb = related(30, [5, 9, 33], seed=11)
    k = 6
    kw = {"k": k} if metric in ("mutual_knn", "cknna") else {}
    f = PAIR_FUNCS[metric]
    cross = similarity_matrix(fa, fb, metric=metric, k=k)
    within = similarity_matrix(fa, metric=metric, k=k)
    assert cross.shape == (5, 3) and within.shape == (5, 5)
    assert cross.dtype == torch.float64
    want_cross = torch.tensor([[f(a, b, **kw) for b in fb] for a in fa], dtype=torch.float64)
    want_within = torch.tensor([[f(a, b, **kw) for b in fa] for a in fa], dtype=torch.float64)
    assert (cross - want_cross).abs().max() < 1e-10
    assert (within - want_within).abs().max() < 1e-10
    assert (within.diagonal() - 1).abs().max() < 1e-10
    if metric != "cknna":  # cknna's row-wise mask makes it (slightly) asymmetric
        assert (within - within.T).abs().max() < 1e-12
    # one (S, N, D) tensor is a sequence of entries too; float32 inputs are computed in float64
    same_d = related(30, [12, 12, 12], seed=12)
    stacked = similarity_matrix(torch.stack(same_d).float(), metric=metric, k=k)
    assert (stacked - similarity_matrix([x.float() for x in same_d], metric=metric, k=k)).abs().max() == 0


def test_cknna_is_directional_and_chunking_is_exact(monkeypatch):
    fa = related(24, [4, 10, 30, 8], seed=13, noise=1.2)
    full = similarity_matrix(fa, metric="cknna", k=5)
    assert (full - full.T).abs().max() > 1e-6  # cknna(X, Y) != cknna(Y, X) in general, as in platonic-rep
    monkeypatch.setattr(al, "CKNNA_CHUNK_BYTES", 1)  # one row of the first set at a time
    assert (similarity_matrix(fa, metric="cknna", k=5) - full).abs().max() < 1e-12
    assert (similarity_matrix(fa, fa[:2], metric="cknna", k=5) - full[:, :2]).abs().max() < 1e-12


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: mutual_knn(x, x, k=20), "choose k < N"),
        (lambda x: cknna(x, x, k=25), "choose k < N"),
        (lambda x: similarity_matrix([x], metric="mutual_knn", k=20), "choose k < N"),
        (lambda x: cknna(x, x, k=1), "k >= 2"),
        (lambda x: mutual_knn(x, x, k=0), "k >= 1"),
        (lambda x: mutual_knn(x, x, k=2.5), "k must be an int"),
        (lambda x: debiased_cka(x[:3], x[:3]), "at least 4 inputs"),
        (lambda x: cknna(x[:3], x[:3], k=2), "at least 4 inputs"),
        (lambda x: similarity_matrix([x[:3]], metric="debiased_cka"), "at least 4 inputs"),
        (lambda x: linear_cka(x, x[:10]), "y has 10 rows but x has 20"),
        (lambda x: similarity_matrix([x, x, x[:10]]), r"feats_a\[2\] has 10 rows but feats_a\[0\] has 20"),
        (lambda x: similarity_matrix([x], [x, x[:10]]), r"feats_b\[1\] has 10 rows"),
        (lambda x: similarity_matrix([x], metric="cka"), "valid: linear_cka, debiased_cka, mutual_knn, cknna"),
        (lambda x: similarity_matrix([]), "empty"),
        (lambda x: similarity_matrix(x), "sequence of"),
        (lambda x: linear_cka(x[:1], x[:1]), "at least 2 rows"),
        (lambda x: linear_cka(x[:, 0], x), "2-D"),
        (lambda x: linear_cka(x, torch.where(x > 1, float("nan"), x)), "non-finite"),
        (lambda x: similarity_matrix([x, x * float("inf")]), r"feats_a\[1\] has non-finite"),
    ],
)
def test_errors(call, match):
    x = related(20, [6], seed=14)[0]
    with pytest.raises(ConfigError, match=match):
        call(x)
