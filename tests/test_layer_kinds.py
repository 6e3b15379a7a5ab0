"""Layers that are linear/conv modules but not plainly that op: subclasses overriding forward
(MoE routers, weight-standardised and TF-"same" convs) and grouped convs, and how transform,
merge, unmerge and the report treat them."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evagraph
from evagraph.errors import ConfigError
from evagraph.lora import LoraAdapter
from evagraph.passes.layer_graph import _module_layer

T = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d  # noqa: E402


def _transform(model, batches, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        return evagraph.transform(model, batches, budget=2, rho=2, progress=False, **kw)


def _call(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


def _perturb_b(adapted):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in adapted.modules():
            if isinstance(m, LoraAdapter):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def _check_adapted(model, adapted, report, batch):
    """Class kept, output unchanged at init, only LoRA trainable; every layer module reported."""
    assert type(adapted) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(_call(adapted, batch), _call(model, batch), atol=1e-5, rtol=1e-5)
    lora = {id(p) for m in adapted.modules() if isinstance(m, LoraAdapter) for p in m.parameters()}
    assert lora and {id(p) for p in adapted.parameters() if p.requires_grad} == lora
    layers = {n for n, m in model.named_modules() if _module_layer(m) is not None}
    assert layers == {layer.name for layer in report.layers} | set(report.skipped)


@pytest.mark.slow
def test_llama4_router_returning_a_tuple_is_skipped():
    torch.manual_seed(0)
    config = T.Llama4TextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=1,
    )  # fmt: skip
    model = T.Llama4ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 100, (2, 8), generator=g)} for _ in range(3)]
    adapted, report = _transform(model, batches)
    _check_adapted(model, adapted, report, batches[0])
    for i in range(2):
        assert report.skipped[f"model.layers.{i}.feed_forward.router"] == (
            "nn.Linear subclass Llama4Router overrides forward and returns a tuple, not the "
            "layer's output: not adapted"
        )
    assert "model.layers.0.feed_forward.shared_expert.up_proj" in {r.name for r in report.layers}
    _perturb_b(adapted)
    merged = evagraph.merge(adapted)
    assert type(merged) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(
            _call(merged, batches[0]), _call(adapted, batches[0]), atol=1e-4, rtol=1e-4
        )
