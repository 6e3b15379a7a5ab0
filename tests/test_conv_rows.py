import dataclasses

import pytest
import torch
from conftest import exact_pca, quiet
from torch import nn

import evagraph
from evagraph.layers import _unfold, module_kind
from evagraph.passes.probe import Probe, conv_rows
from evagraph.stats import conv_stride, row_cost


def check(conv: nn.Module, x: torch.Tensor) -> None:
    _, spec = module_kind(conv)
    rows = conv_rows(x, spec)
    w = conv.weight.reshape(conv.out_channels, -1)
    out = conv(x)
    expected = out.movedim(1, -1).reshape(-1, conv.out_channels)
    torch.testing.assert_close(rows @ w.T + conv.bias, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(3, 5), stride=(2, 1), padding=(2, 1), dilation=(2, 3)),
        dict(kernel_size=4, padding="same", dilation=2),
        dict(kernel_size=3, padding=2, padding_mode="reflect"),
        dict(kernel_size=3, padding=1, padding_mode="circular", stride=2),
    ],
)
def test_conv2d_rows_reproduce_conv_output(kwargs):
    check(nn.Conv2d(3, 5, **kwargs), torch.randn(2, 3, 11, 14))


def test_conv1d_and_conv3d_rows():
    check(nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2), torch.randn(2, 4, 17))
    check(nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 1), padding=1), torch.randn(2, 2, 5, 7, 6))


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((2, 3, 11, 14), dict(kernel_size=3, stride=2, padding=1)),
        ((2, 6, 9, 8), dict(kernel_size=(3, 2), dilation=(2, 1))),
        ((2, 4, 12, 12), dict(kernel_size=7, padding=3)),
        ((3, 5, 17), dict(kernel_size=3, stride=2, dilation=2)),
        ((2, 2, 5, 7, 6), dict(kernel_size=(2, 3, 3), stride=(1, 2, 1))),
        ((1, 64, 64, 64), dict(kernel_size=3, padding=1)),  # rows of several blocks
    ],
)
def test_both_copies_of_the_rows_are_identical(shape, kwargs):
    """``conv_rows`` copies small kernels' windows channels-last on the CPU (faster there)
    and others directly: the two give the same rows, value for value."""
    x = torch.randn(*shape)
    conv = getattr(nn, f"Conv{len(shape) - 2}d")(shape[1], 4, **kwargs)
    _, spec = module_kind(conv)
    direct = _unfold(x, spec, channels_last=False)
    torch.testing.assert_close(_unfold(x, spec, channels_last=True), direct, rtol=0, atol=0)
    assert torch.equal(conv_rows(x, spec), direct)


@pytest.mark.parametrize("every", [2, 3])
def test_rows_every_nth_position_are_those_of_the_full_unfold(every):
    """``Probe.keep_every``: the conv's stride times n unfolds exactly the rows of every n-th
    output position (along each spatial dimension) of the full unfold."""
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2)
    x = torch.randn(2, 3, 15, 13)
    _, spec = module_kind(conv)
    full = conv_rows(x, spec).reshape(2, *conv(x).shape[2:], -1)
    strided = dataclasses.replace(spec, stride=tuple(s * every for s in spec.stride))
    expected = full[:, ::every, ::every].reshape(-1, full.shape[-1])
    torch.testing.assert_close(conv_rows(x, strided), expected, rtol=0, atol=0)


def test_conv_stride_follows_the_statistics_cost_against_the_layers():
    # A thin conv (64 -> 64, 3x3): the statistic of its 576-wide rows costs more than the
    # layer; a wide one (64 -> 2048, 1x1) far less.
    assert conv_stride("auto", 576, 32, 576 * 64, 2) == 4
    assert conv_stride("auto", 64, 32, 64 * 2048, 2) == 1
    stride = conv_stride("auto", 4608, 32, 4608 * 512, 2)
    assert row_cost("auto", 4608, 32) <= 0.25 * 4608 * 512 * stride**2
    assert row_cost("auto", 4608, 32) > 0.25 * 4608 * 512 * (stride - 1) ** 2
    assert conv_stride("auto", 576, 32, 576 * 64, 1) == 4  # capped, 1d as 2d


def test_small_maps_keep_at_least_8_positions_along_each_dimension():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    _, spec = module_kind(conv)
    probe = Probe("conv", spec)
    probe.keep_every(4)
    assert probe._row_conv(torch.randn(1, 3, 56, 56)).stride == (4, 4)  # 14 x 14 kept
    assert probe._row_conv(torch.randn(1, 3, 24, 40)).stride == (3, 4)  # 8 x 10
    assert probe._row_conv(torch.randn(1, 3, 14, 7)).stride == (1, 1)  # all


@pytest.mark.parametrize("stride", [None, 1, 2])
def test_calibrated_conv_components_are_the_pca_of_the_rows_at_the_stride(stride):
    """With ``conv_stride`` (or the one chosen per layer) the components are the exact PCA
    of the rows at every n-th output position: the rows left out are never seen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 64, 1))
    batches = [torch.randn(2, 3, 40, 40) for _ in range(3)]  # 40 positions: 4 fit 8 times
    state = quiet(
        evagraph.calibrate, model, batches, budget=4, rho=2, statistic="exact",
        conv_stride=stride, progress=False,
    )  # fmt: skip
    assert state.settings["conv_stride"] == stride
    _, spec = module_kind(model[0])
    every = stride or conv_stride("exact", 27, 8, 27 * 4, 2)
    assert every == (stride or 4)  # 27-wide rows of a 4-channel layer: the cap
    strided = dataclasses.replace(spec, stride=(every, every))
    rows = torch.cat([conv_rows(b, strided) for b in batches])
    ref, _ = exact_pca(rows, 8)
    got = state.components[state.layer_group["0"]]
    assert got.n_rows == rows.shape[0]
    cos = (got.components[:8].double() @ ref.double().T).diagonal().abs()
    assert cos.min() > 0.999
