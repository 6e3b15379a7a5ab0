"""Degenerate statistics: dead, constant, rank-deficient, masked and duplicated layer inputs.

Defined behaviour: variance that float32 statistics cannot tell from 0 is exactly 0; such
directions are never components (allocation gives their rank to layers with variance, or
the ranks sum to less than budget x L when too few components carry variance); a layer with
no variance gets rank 0 and its skip reason says so; no variance at any target layer is a
DataError; adapters never hold NaN/Inf and leave the output unchanged at init.
"""

import warnings

import pytest
import torch
from conftest import loras, quiet
from torch import nn

import evagraph
from evagraph.passes.allocate import allocate
from evagraph.stats import ExactCovariance


def check_sound(model, adapted, report, *inputs):
    """Finite adapters and ratios, ranks as reported, output unchanged at init."""
    for layer in report.layers:
        assert all(torch.isfinite(torch.tensor(layer.explained_variance_ratio))), layer.name
    assert {n: a.rank for n, a in loras(adapted).items()} == {
        n: r for n, r in report.ranks.items() if r
    }
    for lora in loras(adapted).values():
        assert torch.isfinite(lora.lora_A.weight).all() and torch.isfinite(lora.lora_B.weight).all()
    with torch.no_grad():
        torch.testing.assert_close(adapted(*inputs), model(*inputs), equal_nan=True)


def layer(report, name):
    return next(r for r in report.layers if r.name == name)


class DeadBranch(nn.Module):
    """``b`` reads ReLU of a strongly negative pre-activation: exactly zero input."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 2)
        with torch.no_grad():
            self.a.bias.fill_(-100.0)

    def forward(self, x):
        return self.head(self.c(x) + self.b(torch.relu(self.a(x))))


def test_dead_layer_gets_rank_zero_and_its_budget_goes_to_layers_with_variance():
    model = DeadBranch().eval()
    batches = [torch.randn(16, 8) for _ in range(4)]
    adapted, report = quiet(evagraph.transform, model, batches, budget=4, rho=2, progress=False)
    assert layer(report, "b").explained_variance_ratio == [0.0] * 8
    assert report.ranks["b"] == 0 and "no variance" in report.skipped["b"]
    assert sum(report.ranks.values()) == 4 * 3  # a and c (k = 8 each) take b's share
    check_sound(model, adapted, report, batches[0])


def test_dead_layer_with_uniform_ranks_sums_to_what_is_achievable():
    model = DeadBranch().eval()
    batches = [torch.randn(16, 8) for _ in range(4)]
    adapted, report = quiet(evagraph.transform, model, batches, budget=4, rho=1, progress=False)
    # rho = 1 caps every layer at 4: b's 4 cannot move, and zero directions are not taken
    assert report.ranks == {"c": 4, "a": 4, "b": 0}
    check_sound(model, adapted, report, batches[0])


class ConstantBranch(nn.Module):
    """``b`` reads a non-zero constant (a buffer broadcast over the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.register_buffer("level", torch.linspace(-3.0, 7.0, 6))

    def forward(self, x):
        return self.head(self.a(x) + self.b(x * 0 + self.level))


def test_constant_nonzero_input_has_no_variance():
    model = ConstantBranch().eval()
    batches = [torch.randn(10, 6) for _ in range(3)]
    adapted, report = quiet(evagraph.transform, model, batches, budget=2, rho=2, progress=False)
    assert layer(report, "b").explained_variance_ratio == [0.0] * 4
    assert report.ranks == {"a": 4, "b": 0}
    check_sound(model, adapted, report, batches[0])


class Chain(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(d, d), nn.Linear(d, 2)

    def forward(self, x):
        return self.head(self.a(x))


# Every target without variance: an error, not a model without adapters (nothing to train,
# and the cause, the data, would surface far away).
@pytest.mark.parametrize("value", [0.0, 0.37])
def test_no_variance_anywhere_is_a_data_error(value):
    batches = [torch.full((8, 8), value) for _ in range(3)]
    with pytest.raises(evagraph.DataError, match="zero variance"):
        quiet(evagraph.transform, Chain().eval(), batches, budget=2, progress=False)


def test_constant_first_batch_does_not_end_calibration():
    model = Chain().eval()
    batches = [torch.zeros(8, 8)] + [torch.randn(8, 8) for _ in range(5)]
    adapted, report = quiet(evagraph.transform, model, batches, budget=2, progress=False)
    assert report.steps > 1 and report.ranks == {"a": 2}
    check_sound(model, adapted, report, batches[1])


@pytest.mark.parametrize("d", [16, 64])  # dense eigh, and the iterative solver (d > 2(2k + 4))
@pytest.mark.parametrize("whiten", [False, True])
def test_activations_in_a_subspace_give_only_its_components(d, whiten):
    model = Chain(d).eval()
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(3, d, generator=g)
    batches = [torch.randn(12, 3, generator=g) @ basis + 2.0 for _ in range(6)]
    adapted, report = quiet(
        evagraph.transform, model, batches, budget=4, rho=2, whiten=whiten, progress=False
    )
    ratios = layer(report, "a").explained_variance_ratio
    assert all(r > 0 for r in ratios[:3]) and ratios[3:] == [0.0] * 5
    assert sum(ratios) == pytest.approx(1.0, abs=1e-4)
    assert report.ranks == {"a": 3}  # budget 4, but only 3 directions carry variance
    check_sound(model, adapted, report, batches[0])


def test_fewer_rows_than_width():
    model = Chain(64).eval()
    batches = [torch.randn(5, 64), torch.randn(5, 64)]  # 10 rows: 9 centred directions
    adapted, report = quiet(evagraph.transform, model, batches, budget=8, rho=2, progress=False)
    ratios = layer(report, "a").explained_variance_ratio
    assert all(r > 0 for r in ratios[:9]) and ratios[9:] == [0.0] * 7
    assert report.ranks == {"a": 8}
    check_sound(model, adapted, report, batches[0])


class MaskedAttention(nn.Module):
    """-inf masking: a sample whose mask is all 0 has NaN attention rows (softmax of -inf)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.qkv, self.o, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 2)

    def forward(self, x, attention_mask):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2)).masked_fill(attention_mask[:, None, :] == 0, -torch.inf)
        return self.head(self.o(scores.softmax(-1) @ v)[:, 0])


def test_fully_masked_samples_are_left_out_even_when_nan():
    model = MaskedAttention().eval()
    x, mask = torch.randn(12, 5, 8), torch.ones(12, 5)
    mask[[0, 5, 9]] = 0  # three samples entirely padding
    mask[3, 2:] = 0
    batches = [{"x": x[i : i + 4], "attention_mask": mask[i : i + 4]} for i in (0, 4, 8)]
    with torch.no_grad():
        assert model(**batches[0]).isnan().any()  # the padded sample's rows really are NaN
    adapted, report = quiet(evagraph.transform, model, batches, budget=2, progress=False)
    for name in ("qkv", "o"):
        assert report.rows[layer(report, name).group] == int(mask.sum())
    assert all(report.ranks.values())
    check_sound(model, adapted, report, batches[0]["x"], batches[0]["attention_mask"])


def test_everything_masked_is_a_data_error():
    batches = [{"x": torch.randn(4, 5, 8), "attention_mask": torch.zeros(4, 5)} for _ in range(2)]
    with pytest.raises(evagraph.DataError, match="row"):
        quiet(evagraph.transform, MaskedAttention().eval(), batches, budget=2, progress=False)


def perturb_b(adapted):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lora in loras(adapted).values():
            lora.lora_B.weight.copy_(torch.randn(lora.lora_B.weight.shape, generator=g))


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.a(torch.tanh(self.a(x))))


def test_layer_called_twice_has_one_decomposition_over_both_calls():
    model = CalledTwice().eval()
    batches = [torch.randn(16, 8) for _ in range(3)]
    adapted, report = quiet(evagraph.transform, model, batches, budget=2, progress=False)
    assert [r.name for r in report.layers] == ["a"]
    consumed = sum(stop - start for start, stop in report.batches[layer(report, "a").group])
    assert report.rows[layer(report, "a").group] == 2 * 16 * consumed  # rows of both calls
    check_sound(model, adapted, report, batches[0])
    perturb_b(adapted)
    with torch.no_grad():
        x = batches[0]
        torch.testing.assert_close(evagraph.merge(adapted)(x), adapted(x), atol=1e-5, rtol=1e-5)
        # the adapter acts at both calls: a(x) + d(x), then a(tanh(.)) + d(tanh(.))
        a, d = adapted.a.base_layer, loras(adapted)["a"]
        h = a(x) + d(x)
        torch.testing.assert_close(adapted(x), model.head(a(torch.tanh(h)) + d(torch.tanh(h))))


class TwinLayers(nn.Module):
    """Two layers with identical weights reading the same input (copied or tied)."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        if tied:
            self.b.weight = self.a.weight
        else:
            self.b.load_state_dict(self.a.state_dict())

    def forward(self, x):
        return self.head(self.a(x) * self.b(x))


@pytest.mark.parametrize("tied", [False, True])
def test_identical_layers_share_a_decomposition_but_get_their_own_adapters(tied):
    model = TwinLayers(tied).eval()
    batches = [torch.randn(16, 8) for _ in range(3)]
    adapted, report = quiet(evagraph.transform, model, batches, budget=2, rho=2, progress=False)
    a, b = layer(report, "a"), layer(report, "b")
    assert a.group == b.group and report.groups[a.group] == ["a", "b"]
    assert sum(report.ranks.values()) == 4 and set(loras(adapted)) == {"a", "b"}
    check_sound(model, adapted, report, batches[0])
    perturb_b(adapted)
    x = batches[0]
    if tied:  # one Parameter cannot hold two different deltas
        with pytest.raises(evagraph.ConfigError, match="share one base weight"):
            evagraph.merge(adapted)
    else:
        with torch.no_grad():
            torch.testing.assert_close(evagraph.merge(adapted)(x), adapted(x), atol=1e-5, rtol=0)


def test_module_registered_under_two_names_is_one_layer():
    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.head = nn.Linear(8, 8), nn.Linear(8, 2)
            self.b = self.a

        def forward(self, x):
            return self.head(self.b(torch.tanh(self.a(x))))

    model = Aliased().eval()
    batches = [torch.randn(16, 8) for _ in range(3)]
    adapted, report = quiet(evagraph.transform, model, batches, budget=2, progress=False)
    # wrapped under both names: the adapter acts at both calls, as the statistics assumed
    assert [r.name for r in report.layers] == ["a"] and adapted.a is adapted.b
    check_sound(model, adapted, report, batches[0])
    perturb_b(adapted)
    merged = evagraph.merge(adapted)
    assert merged.a is merged.b and isinstance(merged.b, nn.Linear)
    with torch.no_grad():
        x = batches[0]
        torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-5)
        restored = evagraph.unmerge(merged, adapted)
        assert restored.a is restored.b
        torch.testing.assert_close(restored(x), adapted(x), atol=1e-5, rtol=1e-5)


# Unit level: the noise floor and allocation.


def test_noise_variances_are_exactly_zero():
    g = torch.Generator().manual_seed(0)
    pca = ExactCovariance(32, 8, "cpu")
    basis = torch.randn(2, 32, generator=g)
    for _ in range(4):
        pca.update(torch.randn(50, 2, generator=g) @ basis + 5.0)
    c = pca.finalize()
    assert (c.explained_variance[:2] > 0).all() and (c.explained_variance[2:] == 0).all()
    # values one rounding step apart: no variance float32 inputs can carry
    pca = ExactCovariance(4, 2, "cpu")
    level = torch.tensor([1.5, -300.0, 7.0, 0.1])
    for _ in range(3):
        jitter = torch.rand(20, 4, generator=g) < 0.5
        pca.update(torch.where(jitter, torch.nextafter(level, level + 1), level))
    c = pca.finalize()
    assert (c.explained_variance == 0).all() and (c.explained_variance_ratio == 0).all()


def test_allocation_never_keeps_zero_ratios():
    ratios = {"a": torch.tensor([0.6, 0.0, 0.0]), "b": torch.tensor([0.5, 0.3, 0.0])}
    assert allocate(ratios, budget=3, rho=1) == {"a": 1, "b": 2}
    assert allocate({"a": torch.zeros(4)}, budget=2, rho=2) == {"a": 0}


def test_no_warning_beyond_convergence_for_degenerate_layers():
    # a dead layer converges at once (it needs no component): it must not hold up calibration
    model = DeadBranch().eval()
    batches = [torch.randn(64, 8) * torch.logspace(0, -2, 8) for _ in range(40)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = evagraph.transform(model, batches, budget=2, rho=2, progress=False)
    assert report.converged and report.steps < 40 and report.ranks["b"] == 0


@pytest.mark.parametrize("factor", [1e20, 1e-30])
@pytest.mark.parametrize("statistic", ["exact", "lowrank"])
def test_badly_scaled_data_gives_the_same_adapters(factor, statistic):
    # without biases the model is homogeneous: every layer's input scales with the data
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU(),
        nn.Linear(32, 4, bias=False),
    ).eval()  # fmt: skip
    batches = [torch.randn(64, 16) for _ in range(6)]
    run = lambda data: quiet(  # noqa: E731
        evagraph.transform, model, data, budget=2, progress=False, statistic=statistic
    )
    plain, plain_report = run(batches)
    scaled, scaled_report = run([b * factor for b in batches])
    assert scaled_report.ranks == plain_report.ranks
    for name, lora in loras(scaled).items():
        cos = (lora.lora_A.weight * loras(plain)[name].lora_A.weight).sum(1).abs()
        assert torch.all(cos > 0.999), name


class RoutesNothingToOneLayer(nn.Module):
    """Sends only the rows its gate picks to ``rare`` (HiggsAudio's audio MLP sees audio tokens
    only): on data without such rows that layer receives no row at all."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.rare, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        picked = x[:, 0] > 100.0  # never, on this data
        h = h.index_put((picked,), self.rare(h[picked]))
        return self.head(h)


def test_a_layer_the_model_sends_no_row_gets_rank_0_with_the_reason():
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 8, generator=g) for _ in range(4)]
    model = RoutesNothingToOneLayer().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted, report = evagraph.transform(model, data, budget=2, rho=2, progress=False)
    assert report.ranks["rare"] == 0 and report.ranks["a"] > 0
    assert "saw 0 row(s) of calibration data" in report.skipped["rare"]
    with torch.no_grad():
        torch.testing.assert_close(adapted(data[0]), model(data[0]))
