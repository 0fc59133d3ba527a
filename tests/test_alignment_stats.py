"""The alignment analysis's statistics: Gram-only measures equal the feature-based ones, kNN ties are shared (no
order dependence), and the subsampling intervals cover known true values in simulation."""

import numpy as np
import pytest
import torch

from layerscope.experiments import alignment_analysis as an
from layerscope.metrics.alignment import kernel_similarity, mutual_knn, similarity_matrix


@pytest.mark.parametrize("metric", ["linear_cka", "debiased_cka", "mutual_knn", "cknna"])
def test_gram_only_measures_equal_the_feature_measures(metric):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(20, d, generator=g, dtype=torch.float64) for d in (3, 17, 40)]
    ys = [torch.randn(20, d, generator=g, dtype=torch.float64) + xs[0][:, :1] for d in (5, 9)]
    want = similarity_matrix(xs, ys, metric=metric, k=4)
    got = kernel_similarity(torch.stack([x @ x.T for x in xs]), torch.stack([y @ y.T for y in ys]), metric, 4)
    assert torch.allclose(got, want, atol=1e-10)


def test_knn_ties_are_shared_so_the_order_of_inputs_does_not_matter():
    """A one-hot code ties most rows at their k-th neighbour: the measure must not depend on which tied input
    torch.topk happens to return first."""
    rng = np.random.default_rng(0)
    codes = torch.nn.functional.one_hot(torch.as_tensor(rng.integers(0, 4, 40)), 4).double()
    feats = torch.as_tensor(rng.normal(size=(40, 6))) + codes @ torch.as_tensor(rng.normal(size=(4, 6)))
    values = []
    for seed in range(5):
        perm = torch.as_tensor(np.random.default_rng(seed).permutation(40))
        values.append(mutual_knn(codes[perm], feats[perm], k=10))
    assert max(values) - min(values) < 1e-12
    from layerscope.metrics.alignment import _cosine_gram, _knn_adjacency

    adj = _knn_adjacency(_cosine_gram(codes), 10)
    assert torch.allclose(adj.sum(1), torch.full((40,), 10.0, dtype=torch.float64))
    assert bool((adj.diagonal() == 0).all()) and 0 < float(adj[adj > 0].min()) < 1  # shared slots


def test_subsample_k_keeps_the_share_of_neighbours():
    assert an.subsample_k(10, 64) == 5 and an.subsample_k(5, 24) == 2 and an.subsample_k(3, 16) == 2


def _simulated_models(n, rng, noise_a, noise_b, blocks_b):
    """Two 'models' whose layers are noisy copies of blocks of one latent: A's layer i reads block i, B's layer j
    reads block ``blocks_b[j]``; population debiased CKA of layers on the same block: 1 / ((1 + s^2)(1 + t^2))."""
    d = 6
    z = rng.normal(size=(n, len(noise_a), d))
    a = [z[:, i] + s * rng.normal(size=(n, d)) for i, s in enumerate(noise_a)]
    b = [z[:, blk] + t * rng.normal(size=(n, d)) for blk, t in zip(blocks_b, noise_b)]
    grams = torch.as_tensor(np.stack([x @ x.T for x in a + b]))
    owner = np.array([0] * len(a) + [1] * len(b))
    coords = {c: np.r_[np.arange(len(a)), np.arange(len(b))].astype(float) for c in an.COORDINATES}
    return grams, owner, coords


def _coverage(noise_a, noise_b, blocks_b, truth, which, reps=60, n=64, n_boot=100):
    covered = 0
    rng = np.random.default_rng(1)
    for r in range(reps):
        grams, owner, coords = _simulated_models(n, rng, noise_a, noise_b, blocks_b)
        full = kernel_similarity(grams, None, "debiased_cka").numpy()[None]
        subs = np.stack(
            [kernel_similarity(grams[:, i][:, :, i], None, "debiased_cka").numpy() for i in an._halves(n, n_boot, r)]
        )
        s, o, _ = an._pair_stats(full, owner, coords, [(0, 1)])
        bs, bo, _ = an._pair_stats(subs, owner, coords, [(0, 1)])
        point, reps_ = (s[0, 0], bs[:, 0]) if which == "similarity" else (o[0, 0, 0], bo[:, 0, 0])
        lo, hi = an.basic_interval(reps_, point, -1, 1)
        covered += lo <= truth <= hi
    return covered / reps


def test_intervals_cover_the_true_component_similarity():
    """A's 3 layers each matched to B's layer of its own block; the true component similarity is the mean of the
    population CKAs of the matched pairs. 95% intervals must cover it in most of 60 simulated studies."""
    noise_a, noise_b = (0.6, 0.9, 1.2), (0.8, 0.8, 0.8)
    truth = np.mean([1 / ((1 + s**2) * (1 + 0.64)) for s in noise_a])
    assert _coverage(noise_a, noise_b, (0, 1, 2), truth, "similarity") >= 0.85


def test_intervals_cover_the_true_order_of_matches():
    """B's layers read A's blocks in the order (2, 0, 1, 4, 3): the true matches give Spearman 0.6."""
    blocks = (2, 0, 1, 4, 3)  # B's layer j reads block blocks[j]; A's layer i is matched to B's j with blocks[j] = i
    match = [blocks.index(i) for i in range(5)]
    from scipy.stats import spearmanr

    truth = spearmanr(np.arange(5), match).statistic
    assert abs(truth - 0.6) < 1e-12
    assert _coverage((0.8,) * 5, (0.8,) * 5, blocks, truth, "order") >= 0.85


def test_outcomes():
    assert an.arrangement_outcome(0.9, 0.6, 1.0, 0.5) == "preserved"
    assert an.arrangement_outcome(-0.9, -1.0, -0.6, 0.5) == "reversed"
    assert an.arrangement_outcome(0.1, -0.3, 0.4, 0.5) == "unrelated"
    assert an.arrangement_outcome(0.4, -0.1, 0.8, 0.5) == "undecided"
    assert an.arrangement_outcome(float("nan"), np.nan, np.nan, 0.5) == "degenerate"
    assert an.components_outcome([(0.05, 0.2), (0.01, 0.1)], 0.01) == "alike"
    assert an.components_outcome([(0.05, 0.2), (-0.3, -0.1)], 0.01) == "unalike"
    assert an.components_outcome([(0.05, 0.2), (-0.1, 0.1)], 0.01) == "undecided"
    assert an.components_outcome([(0.05, 0.2)], 0.2) == "unalike"  # the permutation test does not reject
