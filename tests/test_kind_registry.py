"""The layer-kind registry covers every kind: each is recognised, and its adapter's A/B and
merge delta have the base weight's shape."""

import pytest
import torch
from torch import nn

from evagraph.layers import CONV, EXPERT, HF_CONV1D, KINDS, LINEAR, Layer, kind_of, layer_of_module
from evagraph.lora import LoraAdapter

pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _adapter(layer: Layer, rank: int = 2) -> LoraAdapter:
    A = torch.randn(rank, layer.in_features)
    adapter = LoraAdapter.build(
        A, layer.out_features, layer.conv, 0.5, layer_name=layer.name, base_weight=layer.weight,
        weight_transposed=layer.weight_transposed, host=layer.host, expert=layer.expert,
    )  # fmt: skip
    with torch.no_grad():
        adapter.lora_B.weight.normal_()
    return adapter


@pytest.mark.parametrize(
    "module, kind",
    [(nn.Linear(6, 4), LINEAR), (nn.Conv2d(3, 4, (3, 2)), CONV), (Conv1D(4, 6), HF_CONV1D)],
)
def test_module_kinds_round_trip(module, kind):
    layer = layer_of_module("m", module)
    assert kind_of(layer) is kind
    adapter = _adapter(layer)
    assert kind_of(adapter) is kind
    delta = adapter.delta_weight()
    assert delta.shape == module.weight.shape == kind.weight_shape(layer)
    # The delta is what the adapter adds: base + delta computes base(x) + adapter(x).
    x = torch.randn(2, 3, 5, 5) if kind is CONV else torch.randn(2, 6)
    with torch.no_grad():
        merged = torch.func.functional_call(module, {"weight": module.weight + delta}, (x,))
        torch.testing.assert_close(merged, module(x) + adapter(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_expert_kind(transposed):
    E, out_f, in_f = 3, 4, 6
    weight = torch.zeros(E, in_f, out_f) if transposed else torch.zeros(E, out_f, in_f)
    layer = Layer("experts.w[1]", "linear", "grouped_mm", in_f, out_f, "experts.w")
    layer.weight_transposed, layer.host, layer.expert = transposed, "experts", 1
    assert kind_of(layer) is EXPERT
    adapter = _adapter(layer)
    assert kind_of(adapter) is EXPERT
    assert adapter.delta_weight().shape == weight.shape[1:] == EXPERT.weight_shape(layer)
    assert EXPERT.expected_weight(layer, weight, "test") == tuple(weight.shape)


def test_every_kind_is_registered_once():
    assert len({k.name for k in KINDS}) == len(KINDS) == 5
    assert {k.serial for k in KINDS} == {"linear", "conv"}  # the saved Layer.kind values
