"""Capture fallbacks: torch.export with static shapes when dynamic shapes fail."""

import warnings

import pytest
import torch
from torch import nn

import evagraph
from evagraph.passes.capture import capture


class SizeBound(nn.Module):
    """Exports only for static sizes: a stand-in for shape logic export cannot solve (timm's
    CPUBone pads to a multiple of its stride), and untraceable by fx (a branch on a size)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        if not isinstance(x.shape[0], int):
            raise NotImplementedError("cannot solve this inequality")
        if x.shape[0] > 1:
            x = x * 2
        return self.head(torch.tanh(self.a(x)))


def batches(n=4, rows=6):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(rows, 16, generator=g) for _ in range(n)]


def test_static_shapes_when_dynamic_export_fails():
    model, data = SizeBound().eval(), batches()
    with pytest.warns(UserWarning, match=r"for inputs of any shape \(NotImplementedError: cann"):
        adapted, report = evagraph.transform(model, data, budget=2, rho=1, progress=False)
    assert report.capture == "export" and [r.name for r in report.layers] == ["a"]
    with torch.no_grad():
        torch.testing.assert_close(adapted(data[0]), model(data[0]))
    # the example tensors are not left marked dynamic for a later export or compile
    assert not hasattr(data[0], "_dynamo_dynamic_indices")
    assert capture(model, data[0]).static is not None

    with (
        warnings.catch_warnings(),
        pytest.raises(
            evagraph.DataError,
            match=r"SizeBound, captured for one input shape, expects input #0 of shape "
            r"\(6, 16\); calibration batch 2 has \(5, 16\)",
        ),
    ):
        warnings.simplefilter("ignore")
        evagraph.transform(model, data[:2] + [data[2][:5]], budget=2, progress=False, tau=1.0)


def test_dict_batches_are_checked_by_keyword():
    class Keyword(SizeBound):
        def forward(self, features, scale=None):
            return super().forward(features)

    model, data = Keyword().eval(), [{"features": x} for x in batches()]
    data[3] = {"features": data[3]["features"][:, :8]}
    with (
        warnings.catch_warnings(),
        pytest.raises(evagraph.DataError, match=r"input features of shape \(6, 16\); .* \(6, 8\)"),
    ):
        warnings.simplefilter("ignore")
        evagraph.transform(model, data, budget=2, progress=False, tau=1.0)


@pytest.mark.slow
def test_timm_cpubone_static_shapes():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("cpubone_nano", pretrained=False, num_classes=5).eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted, report = evagraph.transform(model, data, budget=2, rho=1, progress=False)
    assert any("for inputs of any shape" in str(w.message) for w in caught)
    assert report.capture == "export" and report.layers
    with torch.no_grad():
        torch.testing.assert_close(adapted(data[0]), model(data[0]))


class Routed(nn.Module):
    """Loops over the rows its input picks (a stand-in for DBRX's experts): a guard on tensor
    values, which no shape decides."""

    def __init__(self, same_shape: bool = True) -> None:
        super().__init__()
        self.w, self.same_shape = nn.Parameter(torch.randn(4, 16)), same_shape

    def forward(self, x, scale=1.0):
        out = torch.zeros_like(x)
        for i in (x[:, 0] > 0).nonzero():
            out[i] = x[i] * self.w[i % 4] * scale
        return out if self.same_shape else out.sum(0)


class WithRouted(nn.Module):
    def __init__(self, same_shape: bool = True) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(16, 16), nn.Linear(16, 3)
        self.routed = Routed(same_shape)

    def forward(self, x):
        return self.head(self.routed(torch.tanh(self.a(x)), scale=2.0))


def test_data_dependent_module_is_kept_opaque():
    """Export is retried with the module that guards on tensor values as one call_module node
    (its output is shaped like its input), for inputs of any shape."""
    model, data = WithRouted().eval(), batches()
    captured = capture(model, data[0])
    assert captured.method == "export" and captured.static is None
    calls = [n for n in captured.gm.graph.nodes if n.op == "call_module"]
    assert [(n.target, n.kwargs) for n in calls if n.target == "routed"] == [
        ("routed", {"scale": 2.0})
    ]
    assert captured.gm.get_submodule("routed") is model.routed
    with torch.no_grad():
        for x in [*data, torch.randn(3, 16)]:
            torch.testing.assert_close(captured.gm(x), model(x))
    assert "forward" not in model.routed.__dict__  # the class's forward is back

    adapted, report = evagraph.transform(model, data, budget=2, rho=1, progress=False)
    assert {r.name for r in report.layers} == {"a"}
    assert report.skipped["routed.w"] == (
        "a 2-D parameter inside Routed routed, which the captured graph calls as one opaque "
        "module: not adapted"
    )
    with torch.no_grad():
        torch.testing.assert_close(adapted(data[0]), model(data[0]))


def test_data_dependent_guard_is_a_capture_error():
    """Where no module shaped like its input holds the guard (here: its output is summed to
    another shape), export is not retried and the error names the loop."""
    loop = r"data-dependent.*test_capture_fallbacks.py:\d+ in forward: `for i in"
    with pytest.raises(evagraph.CaptureError, match=loop):
        evagraph.transform(WithRouted(same_shape=False).eval(), batches(), budget=2, progress=False)


class BranchOnValues(nn.Module):
    """Branches on tensor values in its own forward, outside any submodule (FSMT's
    ``make_padding_mask``: ``if not padding_mask.any(): padding_mask = None``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        mask = x[:, :1].eq(0)
        if not mask.any():
            mask = None
        h = torch.tanh(self.a(x))
        if mask is not None:
            h = h.masked_fill(mask, 0.0)
        return self.head(h)


@pytest.mark.parametrize("sequential", [False, True])
def test_branch_on_values_in_the_models_own_forward(sequential):
    """Captured taking the first batch's branch (with a warning naming it); a batch that takes
    the other branch fails with a DataError naming the branch, in either pipeline, rather than
    being calibrated through the wrong one."""
    model, data = BranchOnValues().eval(), batches()
    where = r"test_capture_fallbacks.py:\d+ in forward: `if not mask.any\(\):`"
    with pytest.warns(evagraph.EvagraphWarning, match=f"for all input values.*{where}"):
        adapted, report = evagraph.transform(
            model, data, budget=2, rho=1, progress=False, sequential=sequential
        )
    assert report.capture == "export" and {r.name for r in report.layers} == {"a"}
    with torch.no_grad():
        torch.testing.assert_close(adapted(data[0]), model(data[0]))

    padded = data[1].clone()
    padded[2, 0] = 0.0  # this batch takes the other branch
    decided = f"calibration batch 1: .*first such decision at {where}"
    with pytest.raises(evagraph.DataError, match=decided):
        evagraph.transform(
            model, [data[0], padded], budget=2, rho=1, progress=False, sequential=sequential
        )
