"""The convergence loop (pipelines/calibrator.py): the convergence criterion, and whose fault an
error is."""

import pytest
import torch
from conftest import SharedMLP, correlated, exact_pca, quiet, subspace_similarity

import evagraph
from evagraph.errors import DataError
from evagraph.stats import ExactCovariance, IncrementalSVD


def known_spectrum(n, d, spectrum, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    z = torch.randn(n, d, generator=g) * torch.tensor(spectrum)
    return z @ q.T + 5.0


def test_convergence_is_declared_only_on_the_per_minibatch_criterion():
    """Independently of how checks are scheduled and how much is solved per check: where a
    layer is reported converged, its needed components moved less than tau between the
    exact PCAs before and after that minibatch."""
    import evagraph

    d, r, tau = 48, 4, 0.99  # k = 8
    spectrum = [4.0, 3.6, 3.3, 3.1, 2.9, 2.8, 2.7, 2.6] + [1.0] * (d - 8)
    x = known_spectrum(32 * 120, d, spectrum, seed=3)  # consecutive cosines pass 0.99 at ~11
    batches = list(x.split(32))
    model = torch.nn.Sequential(torch.nn.Linear(d, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    state = evagraph.calibrate(
        model, batches, budget=r, rho=2.0, tau=tau, progress=False, targets=["0"],
        statistic="exact",
    )  # fmt: skip
    (layer,) = state.converged_at
    step = state.converged_at[layer]
    assert step is not None and step >= 3  # it took several minibatches: a real test
    before, _ = exact_pca(torch.cat(batches[: step - 1]), r)
    after, _ = exact_pca(torch.cat(batches[:step]), r)
    cos = (before.double() * after.double()).sum(1).abs()
    assert torch.all(cos >= tau - 1e-4), cos
    assert state.ranks(r, 2.0)[layer] == r


@pytest.mark.parametrize("statistic", ["exact", "lowrank"])
def test_both_statistics_give_the_pca_of_the_rows_seen(statistic):
    d = 64
    x = correlated(40 * 32, d, rank=6)
    batches = list(x.split(32))
    model = torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    state = quiet(
        evagraph.calibrate, model, batches, budget=2, rho=2, progress=False, targets=["0"],
        statistic=statistic,
    )  # fmt: skip
    (group,) = state.components
    runs = state.batches[group]
    seen = torch.cat([batches[i] for a, b in runs for i in range(a, b)])
    ref, ratio = exact_pca(seen, 4)
    got = state.components[group]
    assert got.n_rows == len(seen)
    assert subspace_similarity(got.components, ref) > 0.9999
    torch.testing.assert_close(got.explained_variance_ratio, ratio, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("cls", [ExactCovariance, IncrementalSVD])
def test_a_failure_in_evagraphs_own_statistics_is_not_reported_as_the_datas(cls, monkeypatch):
    def broken(self, rows, weights=None):
        raise RuntimeError("a bug in evagraph")

    monkeypatch.setattr(cls, "update", broken)
    batches = [b for b in correlated(64, 16).split(8)]
    with pytest.raises(RuntimeError, match="a bug in evagraph") as info:
        evagraph.transform(SharedMLP(), batches, budget=2, statistic="exact" if cls is
                           ExactCovariance else "lowrank", progress=False)  # fmt: skip
    assert not isinstance(info.value, DataError)


def test_a_failure_in_the_users_model_is_reported_as_the_datas():
    batches = [torch.randn(8, 16), torch.randn(8, 12), torch.randn(8, 16)]  # 1: too narrow
    with pytest.raises(DataError, match="failed on calibration batch 1: RuntimeError"):
        quiet(evagraph.transform, SharedMLP(), batches, budget=2, progress=False)


def test_the_graph_is_cut_again_only_when_it_pays():
    from evagraph.config import CalibrationSettings
    from evagraph.pipelines.base import trace
    from evagraph.pipelines.calibrator import Calibrator

    d, n = 8, 20
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(n)])
    settings = CalibrationSettings(budget=2)
    run = Calibrator(trace(model, torch.randn(4, d), settings, None), settings, "cpu")
    groups = list(run.groups)  # all but the last layer, the model's output head
    assert len(groups) == n - 1

    def size(module):
        return len(module.graph.nodes)

    every = run.module_for(groups)
    # the last layer done: a new cut would drop under a tenth of the graph, so none is made,
    # and that layer's probe is off
    assert run.module_for(groups[:-1]) is every
    last = run.probed.probes[next(p for p, gs in run.probe_groups.items() if groups[-1] in gs)]
    assert not last.active
    half = run.module_for(groups[: n // 2])  # half the layers done: cut
    assert half is not every and size(half) < 0.6 * size(every)
    assert run.module_for(groups[: n // 2 - 1]) is half
    # a layer beyond the cut needed again: cut anew, whatever the size
    again = run.module_for(groups)
    assert again is not half and size(again) == size(every)
    x = torch.randn(4, d)
    again(x)  # runs, returning nothing
    assert all(p.active for p in run.probed.probes.values())
