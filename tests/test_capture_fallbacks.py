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


@pytest.mark.slow
def test_dbrx_data_dependent_guard_is_a_capture_error():
    """DBRX loops over the experts its tokens were routed to: no static shape decides that,
    so export is not retried and the error names the loop."""
    T = pytest.importorskip("transformers")
    config = T.DbrxConfig(
        d_model=32,
        n_heads=4,
        n_layers=1,
        max_seq_len=64,
        vocab_size=100,
        attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
    )
    model = T.DbrxForCausalLM(config).eval()
    data = [{"input_ids": torch.randint(3, 100, (2, 8))}]
    with pytest.raises(evagraph.CaptureError, match=r"data-dependent.*`for expert_idx in"):
        evagraph.transform(model, data, budget=2, progress=False)
