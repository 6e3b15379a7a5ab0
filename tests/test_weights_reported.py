"""Issue 29 item 8: every weight a matmul or convolution uses is adapted or listed with a
reason that names it: transposed convolutions (module or functional, fx or export capture),
routers that cast their weight before ``F.linear`` (adapted through the cast), and weights
computed in the graph (named by the parameter they come from)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet
from test_artifacts import train_b
from torch import nn

import evagraph


class Router(nn.Module):
    """An MoE router as several transformers models write it: the weight cast in forward."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 16).to(dtype))

    def forward(self, h):
        return F.linear(h.float(), self.weight.float())


class Model(nn.Module):
    def __init__(self, *, untraceable: bool, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.untraceable = untraceable
        self.inp = nn.Linear(16, 16)
        self.router = Router(dtype)
        self.up = nn.ConvTranspose1d(16, 8, 2, stride=2)
        self.kernel = nn.Parameter(torch.randn(16, 4, 3))  # a functional transposed conv
        self.scaled = nn.Parameter(torch.randn(5, 16))  # used as 2 * W: computed in the graph
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.inp(x)
        if self.untraceable and h.shape[-1] != 16:  # fx cannot follow it: export captures
            h = h * 2
        u = self.up(h.unsqueeze(-1)).mean() + F.conv_transpose1d(h.unsqueeze(-1), self.kernel)
        s = F.linear(h, self.scaled * 2).mean()
        return self.head(self.router(h)) + u.mean() + s


@pytest.mark.parametrize("untraceable", [False, True], ids=["fx", "export"])
def test_weights_are_adapted_or_named_in_the_report(untraceable):
    torch.manual_seed(0)
    model = Model(untraceable=untraceable).eval()
    x = torch.randn(64, 16)
    adapted, report = quiet(evagraph.transform, model, list(x.split(16)), budget=2, progress=False)
    assert report.capture == ("export" if untraceable else "fx")
    ranks = report.ranks
    assert ranks.get("router", 0) > 0  # adapted through the cast, in weight space
    assert report.skipped["up"] == "transposed convolution is not adapted"
    assert "transposed convolution is not adapted" in report.skipped["kernel"]
    assert "computed in the graph from scaled" in report.skipped["scaled"]
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), model(x))
        train_b(adapted)
        trained = adapted(x)
        merged = evagraph.merge(adapted)
        torch.testing.assert_close(merged(x), trained, atol=1e-2, rtol=1e-2)  # bf16 router
