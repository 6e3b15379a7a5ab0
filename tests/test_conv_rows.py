import pytest
import torch
from torch import nn

from evagraph.layers import module_kind
from evagraph.passes.probe import conv_rows


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
