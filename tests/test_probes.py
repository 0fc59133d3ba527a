"""The batched probe solver (layerscope.stats.probes): onsets, MI bounds, padding, streaming, sklearn, errors."""

import math

import pytest
import torch

from layerscope.errors import ConfigError
from layerscope.stats import ProbeGrid, entropy_bits, fit_probe_grid, mi_lower_bound

N, D, C, ONSET = 600, 16, 8, 5


def _labels(n: int, ks: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, k, (n,), generator=g) for k in ks], dim=1)


def _onset_world(dtype=torch.float32) -> tuple[dict, torch.Tensor]:
    """8 cells in step order; factor 'a' (4 classes) is linearly coded from cell 5 on, factor 'b' (3) never."""
    g = torch.Generator().manual_seed(1)
    y = _labels(N, [4, 3], seed=2)
    code = torch.randn(4, D, generator=g) * 3.0  # a one-hot-ish code of factor a, mixed into 16 channels
    cells = {}
    for step in range(C):
        x = torch.randn(N, D, generator=g)
        if step >= ONSET:
            x = x + code[y[:, 0]]
        cells[("mid", step)] = x.to(dtype)
    return cells, y


@pytest.fixture(scope="module")
def onset_grid() -> ProbeGrid:
    cells, y = _onset_world()
    return fit_probe_grid(cells, y, n_classes=[4, 3], factor_names=["a", "b"])


def test_onset_of_a_linearly_coded_factor(onset_grid):
    grid = onset_grid
    assert grid.keys == [("mid", s) for s in range(C)]
    assert grid.accuracy.shape == (C, 2) and grid.cross_entropy.shape == (C, 2) and grid.mi_bound.shape == (C, 2)
    onset = grid.onset(0.9)
    assert onset == {"a": ("mid", ONSET), "b": None}
    acc = grid.accuracy[:, 0]
    assert bool((acc[:ONSET] < grid.chance[0] + 0.12).all()), acc  # chance before the onset
    assert bool((acc[ONSET:] > 0.97).all()), acc  # ~1 after
    # the order argument: scanning the steps backwards finds the last cell first
    assert grid.onset(0.9, order=[("mid", s) for s in reversed(range(C))])["a"] == ("mid", C - 1)
    assert grid.onset(1.01)["a"] is None
    with pytest.raises(ValueError):
        grid.onset(0.9, order=[("late", 0)])


def test_accuracy_and_onset_intervals(onset_grid):
    from layerscope.experiments.abstractions import onset_intervals

    grid = onset_grid
    assert grid.test_correct.shape == (C, 2, grid.n_test)
    assert torch.allclose(grid.test_correct.double().mean(-1), grid.accuracy)
    lo, hi = grid.accuracy_ci()
    assert bool((lo <= grid.accuracy + 1e-12).all() and (grid.accuracy <= hi + 1e-12).all())
    width = (hi - lo)[:, 1]  # a chance-level factor on 150 held-out samples: about +-8 points
    assert bool((width > 0.05).all() and (width < 0.25).all()), width
    ci = onset_intervals(grid)  # keys are (layer, step), as the zoo's
    assert ci["a"] == (ONSET, ONSET)  # a sharp onset: every resample finds the same step
    assert ci["b"][0] <= ci["b"][1]  # never coded: the "onset" of noise wanders


def test_mi_bound_tracks_information(onset_grid):
    grid = onset_grid
    h = grid.entropy
    assert grid.entropy.shape == (2,) and abs(float(h[0]) - 2.0) < 0.05  # ~uniform 4 classes
    mi = grid.mi_bound
    assert bool((mi[:ONSET, 0] < 0.1).all()), mi[:, 0]  # pure noise: nothing
    assert bool((mi[:, 1] < 0.1).all()), mi[:, 1]  # never coded
    assert bool((mi[ONSET:, 0] > 1.5).all()), mi[:, 0]
    assert torch.allclose(mi, (h - grid.cross_entropy).clamp_min(0.0))
    # the solver's record: every problem converged
    assert bool(grid.converged.all()) and grid.max_grad_norm <= grid.tol
    assert grid.n_train + grid.n_test == N and grid.n_test == round(0.25 * N)
    assert int(grid.n_iter.min()) >= 1
    assert grid.seconds > 0


def test_mi_bound_shuffled_and_separable():
    g = torch.Generator().manual_seed(3)
    y = _labels(N, [4, 6], seed=4)
    sep = torch.nn.functional.one_hot(y[:, 0], 4).float() * 5.0 + 0.05 * torch.randn(N, 4, generator=g)
    shuffled = y[torch.randperm(N, generator=g)]
    noise = torch.randn(N, D, generator=g)
    feats = torch.zeros(2, N, D)
    feats[0, :, :4] = sep
    feats[1] = noise
    grid = fit_probe_grid(feats, y, n_classes=[4, 6], widths=torch.tensor([4, D]), l2=1e-4)
    assert abs(float(grid.mi_bound[0, 0]) - float(grid.entropy[0])) < 0.1  # separable: ~H(Y)
    assert float(grid.accuracy[0, 0]) == 1.0
    assert float(grid.mi_bound[1].max()) < 0.1  # noise features
    shuf = fit_probe_grid(feats[:1], shuffled, n_classes=[4, 6], widths=torch.tensor([4]))
    assert float(shuf.mi_bound.max()) < 0.1  # the separable features against shuffled labels


def test_entropy_and_mi_helpers():
    y = torch.arange(400) % 4
    assert float(entropy_bits(y, 4)) == pytest.approx(2.0)
    both = torch.stack([y, torch.zeros_like(y)], dim=1)
    assert torch.allclose(entropy_bits(both, [4, 3]), torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert float(mi_lower_bound(0.5, y)) == pytest.approx(1.5)
    assert float(mi_lower_bound(3.0, y)) == 0.0  # clipped
    assert torch.allclose(
        mi_lower_bound(torch.tensor([[0.5, 0.0]]), both), torch.tensor([[1.5, 0.0]], dtype=torch.float64)
    )
    with pytest.raises(ValueError):
        entropy_bits(y, 3)  # label 3 out of range
    with pytest.raises(ValueError):
        entropy_bits(y.float(), 4)
    with pytest.raises(ValueError):
        mi_lower_bound(torch.zeros(3), both)  # 3 cross-entropies for 2 factors


def test_padding_does_not_matter():
    """A narrow cell padded into a wide grid gives what fitting it alone gives (and garbage padding is ignored)."""
    g = torch.Generator().manual_seed(5)
    y = _labels(N, [5, 3], seed=6)
    code = torch.randn(5, 6, generator=g)
    narrow = torch.randn(N, 6, generator=g, dtype=torch.float64) + code[y[:, 0]].double()
    wide = torch.randn(N, D, generator=g, dtype=torch.float64)
    wide[:, :5] += 2 * code[y[:, 0], :5].double()
    grid = fit_probe_grid({"wide": wide, "narrow": narrow}, y, n_classes=[5, 3])
    alone = fit_probe_grid({"narrow": narrow}, y, n_classes=[5, 3])
    assert grid.keys == ["wide", "narrow"]
    assert torch.equal(grid.accuracy[1], alone.accuracy[0])
    assert torch.allclose(grid.cross_entropy[1], alone.cross_entropy[0], atol=1e-6)
    # the same through a padded tensor whose padding holds noise: widths says what is real
    padded = torch.randn(2, N, D, generator=g, dtype=torch.float64) * 10
    padded[0] = wide
    padded[1, :, :6] = narrow
    via_widths = fit_probe_grid(padded, y, n_classes=[5, 3], widths=torch.tensor([D, 6]))
    assert torch.equal(via_widths.accuracy[1], alone.accuracy[0])
    assert torch.allclose(via_widths.cross_entropy, grid.cross_entropy, atol=1e-6)


def test_streaming_slots_and_progress():
    """Cells streaming through 2 slots (refills, shrinking) give the grid that 8 slots give, in float64."""
    cells, y = _onset_world(torch.float64)
    calls = []
    few = fit_probe_grid(
        cells, y, n_classes=[4, 3], chunk_cells=2, progress=lambda done, total: calls.append((done, total))
    )
    many = fit_probe_grid(cells, y, n_classes=[4, 3], chunk_cells=8)
    assert torch.equal(few.accuracy, many.accuracy)
    assert torch.allclose(few.cross_entropy, many.cross_entropy, atol=1e-9)
    assert torch.equal(few.n_iter, many.n_iter)
    assert calls[-1] == (C, C) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_to_frame(onset_grid):
    frame = onset_grid.to_frame()
    assert list(frame.columns) == ["cell", "factor", "metric", "value"]
    assert len(frame) == C * 2 * 3
    assert set(frame["metric"]) == {"accuracy", "cross_entropy", "mi_bound"}
    row = frame[(frame["cell"] == ("mid", ONSET)) & (frame["factor"] == "a") & (frame["metric"] == "accuracy")]
    assert float(row["value"].iloc[0]) == pytest.approx(float(onset_grid.accuracy[ONSET, 0]))


def test_both_curvatures_reach_one_optimum():
    """The diagonal and the full (K-FAC) curvature only shape the steps: at a tight tol both end at the optimum."""
    cells, y = _onset_world(torch.float64)
    full = fit_probe_grid(cells, y, n_classes=[4, 3], tol=1e-9, curvature="kfac")
    diag = fit_probe_grid(cells, y, n_classes=[4, 3], tol=1e-9, curvature="diagonal")
    assert bool(full.converged.all()) and bool(diag.converged.all())
    assert full.max_grad_norm <= 1e-9 and diag.max_grad_norm <= 1e-9
    assert torch.allclose(full.cross_entropy, diag.cross_entropy, atol=1e-7)
    assert torch.equal(full.accuracy, diag.accuracy)
    assert not torch.equal(full.n_iter, diag.n_iter)  # two different solvers did run
    with pytest.raises(ConfigError, match="curvature must be"):
        fit_probe_grid(cells, y, n_classes=[4, 3], curvature="newton")


@pytest.mark.parametrize("curvature", ["kfac", "diagonal"])
def test_agrees_with_sklearn(curvature):
    pytest.importorskip("sklearn")  # in the test extra; skipped only where it is not installed
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(7)
    n, d, k, l2 = 800, 12, 5, 1e-3
    y = _labels(n, [k], seed=8)
    x = torch.randn(n, d, generator=g) + 0.8 * torch.randn(k, d, generator=g)[y[:, 0]]
    x = x @ torch.randn(d, d, generator=g)  # correlated channels
    grid = fit_probe_grid(x[None], y, n_classes=[k], l2=l2, curvature=curvature)
    n_test = round(0.25 * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # the solver's split (seed=0)
    tr, te = perm[n_test:], perm[:n_test]
    xd = x.double()
    mu, sd = xd[tr].mean(0), xd[tr].std(0, unbiased=False)
    xs = ((xd - mu) / sd).numpy()
    clf = LogisticRegression(C=1.0 / (l2 * len(tr)), max_iter=1000, tol=1e-6)
    clf.fit(xs[tr], y[tr, 0].numpy())
    acc = clf.score(xs[te], y[te, 0].numpy())
    assert abs(float(grid.accuracy[0, 0]) - acc) <= 0.02
    proba = torch.from_numpy(clf.predict_proba(xs[te]))
    ce = float(-proba.gather(1, y[te, :1]).log().mean() / math.log(2))
    assert float(grid.cross_entropy[0, 0]) == pytest.approx(ce, abs=0.01)
    assert 0.3 < acc < 0.98  # a problem in between chance and separable


def test_unconverged_problems_are_reported():
    cells, y = _onset_world()
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        grid = fit_probe_grid(cells, y, n_classes=[4, 3], max_iter=1)
    assert not bool(grid.converged.all()) and grid.max_grad_norm > grid.tol
    assert int(grid.n_iter.max()) == 1


def test_errors():
    x = torch.randn(2, 40, 3)
    y = _labels(40, [3, 2])
    ok = dict(n_classes=[3, 2])
    with pytest.raises(ValueError, match="rows"):
        fit_probe_grid(x, y[:30], **ok)
    with pytest.raises(ValueError, match="lie in"):
        fit_probe_grid(x, y, n_classes=[2, 2])  # label 2 of factor 0 out of range
    with pytest.raises(ValueError, match="n_classes"):
        fit_probe_grid(x, y, n_classes=[3])
    with pytest.raises(ValueError, match="too few"):
        fit_probe_grid(x[:, :2], y[:2], **ok)
    with pytest.raises(ValueError, match=r"\(C, n, d\)"):
        fit_probe_grid(x[0], y, **ok)
    with pytest.raises(ValueError, match="widths"):
        fit_probe_grid(x, y, widths=torch.tensor([3]), **ok)
    with pytest.raises(ValueError, match="widths"):
        fit_probe_grid(x, y, widths=torch.tensor([3, 4]), **ok)
    with pytest.raises(ValueError, match="widths"):
        fit_probe_grid({"a": x[0]}, y, widths=torch.tensor([3]), **ok)
    with pytest.raises(ValueError, match="same number of samples"):
        fit_probe_grid({"a": x[0], "b": x[1, :30]}, y, **ok)
    with pytest.raises(ValueError, match="test_fraction"):
        fit_probe_grid(x, y, test_fraction=1.0, **ok)
    with pytest.raises(ValueError, match="factor_names"):
        fit_probe_grid(x, y, factor_names=["a"], **ok)
    with pytest.raises(ValueError, match="integer"):
        fit_probe_grid(x, y.float(), **ok)
    with pytest.raises(ValueError, match="NaN"):
        fit_probe_grid(x.clone().fill_(math.nan), y, **ok)
