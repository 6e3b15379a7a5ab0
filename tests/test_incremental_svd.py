import torch
from conftest import exact_pca, subspace_similarity

from evagraph.passes.incremental_svd import StreamingPCA, top_eigenpairs


def known_spectrum(n, d, spectrum, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    z = torch.randn(n, d, generator=g) * torch.tensor(spectrum)
    return z @ q.T + 5.0  # a large mean: centring must be exact


def test_streamed_components_equal_exact_svd():
    d, k = 24, 6
    spectrum = [10, 8, 6, 4, 3, 2] + [0.3] * (d - 6)
    x = known_spectrum(2000, d, spectrum)
    pca = StreamingPCA(d, k, torch.device("cpu"))
    sizes = [3, 1, 2, 500, 7, 1487]  # batches smaller than k must count too
    start = 0
    for size in sizes:
        pca.update(x[start : start + size])
        start += size
    got = pca.decompose()
    ref_v, ref_ratio = exact_pca(x, k)
    assert got.n_rows == 2000
    assert subspace_similarity(got.components, ref_v) >= 0.99
    cos = (got.components * ref_v).sum(1).abs()
    assert torch.all(cos > 0.999)
    torch.testing.assert_close(got.explained_variance_ratio, ref_ratio, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.components @ got.components.T, torch.eye(k), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.mean, x.mean(0), atol=1e-4, rtol=1e-5)


def test_sign_convention_largest_entry_positive():
    x = known_spectrum(300, 10, [5, 4, 3, 2, 1, 1, 1, 1, 1, 1])
    pca = StreamingPCA(10, 4, torch.device("cpu"))
    pca.update(x)
    v = pca.decompose().components
    pivot = v.abs().argmax(1)
    assert torch.all(v[torch.arange(4), pivot] > 0)


def test_zero_weight_rows_are_excluded():
    x = known_spectrum(400, 12, [6, 5, 4, 3, 2, 1] + [0.2] * 6)
    junk = torch.full((100, 12), 1e3) * torch.randn(100, 12)
    rows = torch.cat([x, junk])
    weights = torch.cat([torch.ones(400), torch.zeros(100)])
    pca = StreamingPCA(12, 4, torch.device("cpu"))
    pca.update(rows, weights)
    got = pca.decompose()
    ref_v, ref_ratio = exact_pca(x, 4)
    assert got.n_rows == 400
    assert subspace_similarity(got.components, ref_v) > 0.999
    torch.testing.assert_close(got.explained_variance_ratio, ref_ratio, rtol=1e-4, atol=1e-6)


def test_iterative_eigensolver_matches_dense_on_wide_matrices():
    d, k = 700, 8  # above the dense threshold: subspace iteration
    x = known_spectrum(3000, d, [float(30 - i) for i in range(12)] + [0.5] * (d - 12))
    cov = torch.cov(x.T)
    ev, vecs, basis = top_eigenpairs(cov.double(), k, tol=1e-9)
    ref_ev, ref_vecs = torch.linalg.eigh(cov.double())
    torch.testing.assert_close(ev.double(), ref_ev.flip(0)[:k], rtol=1e-4, atol=1e-6)
    assert subspace_similarity(vecs, ref_vecs.flip(1)[:, :k].T.float()) > 0.9999
    cos = (vecs.double() * ref_vecs.flip(1)[:, :k].T).sum(1).abs()
    assert torch.all(cos > 0.9999)
    # warm-started from the previous basis on a slightly moved matrix: the same answer
    moved = cov + 1e-3 * torch.cov(x[:100].T)
    ev2, vecs2, _ = top_eigenpairs(moved.double(), k, basis, tol=1e-9)
    ref2 = torch.linalg.eigh(moved.double()).eigenvectors.flip(1)[:, :k].T
    assert torch.all((vecs2.double() * ref2).sum(1).abs() > 0.9999)


def test_resolve_solves_the_leading_pairs_to_tolerance():
    d, k, r = 300, 8, 3
    x = known_spectrum(2000, d, [float(20 - i) for i in range(10)] + [0.5] * (d - 10))
    cov = torch.cov(x.T).double()
    ref = torch.linalg.eigh(cov).eigenvectors.flip(1)[:, :k].T
    ev, vecs, _ = top_eigenpairs(cov, k, tol=1e-9, resolve=r)
    assert ev.shape == (k,) and vecs.shape == (k, d)
    assert torch.all((vecs[:r] * ref[:r]).sum(1).abs() > 0.9999)


def test_convergence_is_declared_only_on_the_per_minibatch_criterion():
    """Independently of how checks are scheduled and how much is solved per check: where a
    layer is reported converged, its needed components moved less than tau between the
    exact PCAs before and after that minibatch."""
    import evagraph

    d, r, tau = 48, 4, 0.99  # k = 8 and d > 4k + 8: the iterative solver, resolving r of k
    spectrum = [4.0, 3.6, 3.3, 3.1, 2.9, 2.8, 2.7, 2.6] + [1.0] * (d - 8)
    x = known_spectrum(32 * 120, d, spectrum, seed=3)  # consecutive cosines pass 0.99 at ~11
    batches = list(x.split(32))
    model = torch.nn.Sequential(torch.nn.Linear(d, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    state = evagraph.calibrate(
        model, batches, budget=r, rho=2.0, tau=tau, progress=False, targets=["0"]
    )
    (layer,) = state.converged_at
    step = state.converged_at[layer]
    assert step is not None and step >= 3  # it took several minibatches: a real test
    before, _ = exact_pca(torch.cat(batches[: step - 1]), r)
    after, _ = exact_pca(torch.cat(batches[:step]), r)
    cos = (before.double() * after.double()).sum(1).abs()
    assert torch.all(cos >= tau - 1e-4), cos
    assert state.ranks(r, 2.0)[layer] == r
