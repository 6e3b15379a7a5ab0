"""The streaming statistics against an exact float64 PCA: components and ratios, masked and
unmasked, merges of halves, badly scaled data, and the eigensolver of the exact one."""

import pytest
import torch
from conftest import exact_pca, subspace_similarity

from evagraph.stats import ExactCovariance, IncrementalSVD, flush_all, make_statistic
from evagraph.stats.eigen import top_eigenpairs

KINDS = {"exact": ExactCovariance, "lowrank": IncrementalSVD}


def known_spectrum(n, d, spectrum, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    z = torch.randn(n, d, generator=g) * torch.tensor(spectrum)
    return z @ q.T + 5.0  # a large mean: centring must be exact


def low_rank(n, d, rank, seed=0):
    """Rows spanning ``rank`` directions (plus a mean): within what the sketch holds exactly."""
    spectrum = [float(2 * rank - i) for i in range(rank)] + [0.0] * (d - rank)
    return known_spectrum(n, d, spectrum, seed)


def stream(stat, x, sizes, weights=None):
    start = 0
    for size in sizes:
        w = None if weights is None else weights[start : start + size]
        stat.update(x[start : start + size], w)
        start += size
    assert start == len(x)
    return stat


def assert_same_pca(got, rows, k, *, cos=0.9999, rtol=1e-4):
    ref_v, ref_ratio = exact_pca(rows, k)
    assert got.n_rows == len(rows)
    assert torch.all((got.components * ref_v).sum(1).abs() > cos)
    torch.testing.assert_close(got.explained_variance_ratio, ref_ratio, rtol=rtol, atol=1e-6)
    eye = torch.eye(len(got.components))
    torch.testing.assert_close(got.components @ got.components.T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.mean, rows.mean(0), atol=1e-4, rtol=1e-5)


SIZES = [3, 1, 2, 500, 7, 1487]  # batches smaller than k must count too


def test_exact_components_equal_float64_pca():
    d, k = 24, 6
    x = known_spectrum(2000, d, [10, 8, 6, 4, 3, 2] + [0.3] * (d - 6))
    assert_same_pca(stream(ExactCovariance(d, k, "cpu"), x, SIZES).finalize(), x, k)


def test_lowrank_components_equal_float64_pca_when_the_rows_fit_the_sketch():
    d, k = 200, 6  # the sketch holds max(2k + 4, k + 12) = 18 directions; the rows span 10
    x = low_rank(2000, d, 10)
    assert_same_pca(stream(IncrementalSVD(d, k, "cpu"), x, SIZES).finalize(), x, k)


def test_lowrank_components_close_to_float64_pca_on_full_rank_rows():
    d, k = 300, 8
    spectrum = [float(30 - 2 * i) for i in range(12)] + [1.0] * (d - 12)
    x = known_spectrum(6000, d, spectrum)
    got = stream(IncrementalSVD(d, k, "cpu"), x, [200] * 30).finalize()
    ref_v, ref_ratio = exact_pca(x, k)
    assert subspace_similarity(got.components, ref_v) > 0.999
    torch.testing.assert_close(got.explained_variance_ratio, ref_ratio, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_weight_rows_are_excluded(kind):
    d, k = 40, 4
    x = low_rank(400, d, 6)
    junk = 1e3 * torch.randn(100, d)
    junk[::7] = float("nan")  # padding rows may hold NaN (softmax over a masked row)
    rows, weights = torch.cat([x, junk]), torch.cat([torch.ones(400), torch.zeros(100)])
    perm = torch.randperm(500)
    stat = stream(KINDS[kind](d, k, "cpu"), rows[perm], [120, 380], weights[perm])
    assert_same_pca(stat.finalize(), x, k, rtol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_merging_halves_equals_one_statistic_over_all_rows(kind):
    d, k = 64, 4
    x = low_rank(1200, d, 8, seed=2)
    whole = stream(KINDS[kind](d, k, "cpu"), x, [300] * 4).finalize()
    first = stream(KINDS[kind](d, k, "cpu"), x[:700], [300, 400])
    second = stream(KINDS[kind](d, k, "cpu"), x[700:] * 1.0 + 0.0, [100, 400])
    first.merge(second)
    merged = first.finalize()
    assert merged.n_rows == whole.n_rows == 1200
    assert torch.all((merged.components * whole.components).sum(1).abs() > 0.9999)
    torch.testing.assert_close(
        merged.explained_variance, whole.explained_variance, rtol=1e-4, atol=0
    )
    torch.testing.assert_close(merged.mean, whole.mean, atol=1e-4, rtol=1e-5)
    assert_same_pca(merged, x, k)


def test_merging_into_an_empty_statistic_copies_it():
    d, k = 30, 3
    x = low_rank(500, d, 4)
    empty, full = ExactCovariance(d, k, "cpu"), stream(ExactCovariance(d, k, "cpu"), x, [500])
    empty.merge(full)
    assert_same_pca(empty.finalize(), x, k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("factor", [1e20, 1e-25, 1e-40])  # 1e-40: subnormal float32 rows
def test_badly_scaled_rows_give_the_same_components(kind, factor):
    d, k = 48, 4
    x = known_spectrum(900, d, [9, 7, 5, 3] + [0.5] * (d - 4))
    plain = stream(KINDS[kind](d, k, "cpu"), x, [300] * 3).finalize()
    scaled = stream(KINDS[kind](d, k, "cpu"), x * factor, [300] * 3).finalize()
    assert torch.all((scaled.components * plain.components).sum(1).abs() > 0.9999)
    torch.testing.assert_close(
        scaled.explained_variance_ratio, plain.explained_variance_ratio, rtol=1e-4, atol=0
    )
    ratio = scaled.explained_variance / plain.explained_variance
    torch.testing.assert_close(ratio, torch.full_like(ratio, factor**2), rtol=1e-3, atol=0)
    assert torch.isfinite(scaled.explained_variance).all()


@pytest.mark.parametrize("kind", KINDS)
def test_batches_without_rows_add_nothing(kind):
    # A layer the data never reaches in some batches (an empty routing, all rows masked).
    d, k = 16, 3
    x = known_spectrum(200, d, [6, 4, 2] + [0.3] * (d - 3))
    plain = stream(KINDS[kind](d, k, "cpu"), x, [100, 100]).finalize()
    stat = KINDS[kind](d, k, "cpu")
    stat.update(torch.zeros(0, d))
    stream(stat, x, [100, 0, 100])
    stat.update(torch.zeros(0, d), torch.zeros(0))
    got = stat.finalize()
    assert got.n_rows == 200 and bool(stat.finite())
    assert torch.all((got.components * plain.components).sum(1).abs() > 0.9999)
    assert KINDS[kind](d, k, "cpu").finalize() is None  # no rows at all: no components


@pytest.mark.parametrize("kind", KINDS)
def test_sign_convention_largest_entry_positive(kind):
    x = known_spectrum(300, 40, [5, 4, 3, 2] + [1] * 36)
    v = stream(KINDS[kind](40, 4, "cpu"), x, [300]).finalize().components
    pivot = v.abs().argmax(1)
    assert torch.all(v[torch.arange(4), pivot] > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_rows_are_flagged(kind):
    stat = KINDS[kind](8, 2, "cpu")
    stat.update(torch.randn(10, 8))
    assert bool(stat.finite())
    bad = torch.randn(10, 8)
    bad[3, 2] = float("inf")
    stat.update(bad)
    assert not bool(stat.finite())


def test_deferred_solves_batched_across_statistics_equal_eager_ones():
    x = [low_rank(600, d, 5, seed=d) for d in (50, 50, 70)]
    eager = [IncrementalSVD(len(r[0]), 3, "cpu", defer=False) for r in x]
    lazy = [IncrementalSVD(len(r[0]), 3, "cpu", defer=True) for r in x]
    for step in range(3):
        for stat, rows in zip(eager, x):
            stat.update(rows[step * 200 : (step + 1) * 200])
        for stat, rows in zip(lazy, x):
            stat.update(rows[step * 200 : (step + 1) * 200])
        flush_all(lazy)  # two of the three share one eigh call
    for a, b in zip(eager, lazy):
        ca, cb = a.finalize(), b.finalize()
        torch.testing.assert_close(ca.components, cb.components, atol=1e-5, rtol=0)
        torch.testing.assert_close(ca.explained_variance, cb.explained_variance)


def test_make_statistic_is_exact_only_for_narrow_rows_unless_asked():
    assert isinstance(make_statistic("auto", 64, 8, "cpu"), ExactCovariance)
    assert isinstance(make_statistic("auto", 65, 8, "cpu"), IncrementalSVD)
    assert isinstance(make_statistic("exact", 4096, 8, "cpu"), ExactCovariance)
    assert isinstance(make_statistic("lowrank", 16, 8, "cpu"), IncrementalSVD)
    with pytest.raises(ValueError, match="statistic must be one of"):
        make_statistic("svd", 16, 8, "cpu")


def test_iterative_eigensolver_matches_dense_on_wide_matrices():
    d, k = 700, 8  # above the dense threshold: subspace iteration
    x = known_spectrum(3000, d, [float(30 - i) for i in range(12)] + [0.5] * (d - 12))
    cov = torch.cov(x.T)
    ev, vecs, basis = top_eigenpairs(cov.double(), k, tol=1e-9)
    ref_ev, ref_vecs = torch.linalg.eigh(cov.double())
    torch.testing.assert_close(ev.double(), ref_ev.flip(0)[:k], rtol=1e-4, atol=1e-6)
    cos = (vecs.double() * ref_vecs.flip(1)[:, :k].T).sum(1).abs()
    assert torch.all(cos > 0.9999)
    # warm-started from the previous basis on a slightly moved matrix: the same answer
    moved = cov + 1e-3 * torch.cov(x[:100].T)
    ev2, vecs2, _ = top_eigenpairs(moved.double(), k, basis, tol=1e-9)
    ref2 = torch.linalg.eigh(moved.double()).eigenvectors.flip(1)[:, :k].T
    assert torch.all((vecs2.double() * ref2).sum(1).abs() > 0.9999)


def _stops_at(estimates, k, tau=0.99):
    """The spec's criterion: the first minibatch whose top-k all have |cos| >= tau with the
    previous minibatch's estimate."""
    for i in range(1, len(estimates)):
        if bool(((estimates[i][:k] * estimates[i - 1][:k]).sum(1).abs() >= tau).all()):
            return i + 1
    return len(estimates)


def test_sketch_does_not_stop_the_criterion_much_before_the_exact_pca():
    # A slowly decaying spectrum (a wide layer of a random-init model looks so): a sketch
    # drops the old rows' energy outside it, so its estimates turn less from batch to batch
    # than the exact PCA's and the tau criterion would stop on rows the exact PCA has not
    # settled on. Here a rank-2k sketch stops at 0.63x the exact PCA's minibatches.
    d, k, batches = 256, 8, 120
    spectrum = (1.0 / (1.0 + 0.02 * torch.arange(d, dtype=torch.float64))).sqrt()
    totals = {"exact": 0, "default": 0, "2k": 0}
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        stats = {
            "default": IncrementalSVD(d, k, "cpu"),
            "2k": IncrementalSVD(d, k, "cpu", rank=2 * k),
        }
        est = {name: [] for name in totals}
        gram, total, n = (
            torch.zeros(d, d, dtype=torch.float64),
            torch.zeros(d, dtype=torch.float64),
            0,
        )
        for _ in range(batches):
            x = torch.randn(64, d, generator=g, dtype=torch.float64) @ (q * spectrum).T
            gram, total, n = gram + x.T @ x, total + x.sum(0), n + len(x)
            cov = (gram - torch.outer(total, total) / n) / (n - 1)
            est["exact"].append(torch.linalg.eigh(cov)[1].flip(1)[:, :k].T)
            for name, stat in stats.items():
                stat.update(x.float())
                est[name].append(stat.estimate()[0].double())
        for name in totals:
            totals[name] += _stops_at(est[name], k)
    assert totals["default"] >= 0.85 * totals["exact"], totals
    assert totals["2k"] < 0.75 * totals["exact"], totals  # the effect is real here
