"""Export round trips: pt2 archives and adapters re-applied to a fresh base model."""

import warnings

import pytest
import torch
from conftest import SharedMLP, assert_shares, quiet
from test_models import build, call

import evagraph
from evagraph.formats.pt2 import load_exported_program
from evagraph.lora import LoraAdapter


def train_b(model):
    """Give every B non-zero values, so a round trip that dropped an adapter would show."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoraAdapter):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def adapt(source, name):
    model, batches = build(source, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        adapted, report = evagraph.transform(model, batches, budget=2, progress=False)
    train_b(adapted)
    return model, adapted, report, batches


@pytest.mark.slow
@pytest.mark.parametrize("source,name", [("hf", "llama"), ("timm", "resnet18")])
def test_pt2_round_trip(tmp_path, source, name):
    model, adapted, _, batches = adapt(source, name)
    path = evagraph.export(adapted, batches[0], tmp_path / "adapted.pt2")
    loaded = load_exported_program(path).module()
    if source == "hf":  # other batch and sequence sizes than the example
        x = {"input_ids": torch.randint(3, 100, (3, 11)), "attention_mask": torch.ones(3, 11)}
        x["attention_mask"] = x["attention_mask"].long()
    else:
        x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = call(adapted, x)
        torch.testing.assert_close(call(loaded, x), expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(expected, call(model, x), atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("source,name", [("hf", "gpt2"), ("timm", "convnext_atto")])
def test_adapter_reapplies_to_fresh_base(tmp_path, source, name):
    model, adapted, report, batches = adapt(source, name)
    evagraph.save_adapter(adapted, tmp_path / "adapter", report.settings)
    fresh, _ = build(source, name)  # same seed: same base weights, a different object
    reapplied = evagraph.apply_adapter(fresh, tmp_path / "adapter")
    assert type(reapplied) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(call(reapplied, batches[0]), call(adapted, batches[0]))
    assert {n for n, p in reapplied.named_parameters() if p.requires_grad} == {
        n for n, p in adapted.named_parameters() if p.requires_grad
    }


def test_adapter_reapplies_to_a_graph(tmp_path):
    model = SharedMLP().eval()
    x = torch.randn(4, 16)
    program = torch.export.export(model, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        adapted, report = evagraph.transform(program.module(), [x, x + 1, x * 2], progress=False)
    assert report.rewrite == "graph"
    train_b(adapted)
    evagraph.save_adapter(adapted, tmp_path / "a")
    base = program.module()
    reapplied = evagraph.apply_adapter(base, tmp_path / "a")
    assert_shares(base, reapplied)
    torch.testing.assert_close(reapplied(x), adapted(x))


def test_adapter_reapplies_without_copying_weights(tmp_path):
    x = torch.randn(4, 16)
    adapted, _ = quiet(evagraph.transform, SharedMLP().eval(), [x, x + 1, x * 2], progress=False)
    train_b(adapted)
    evagraph.save_adapter(adapted, tmp_path / "a")
    fresh = SharedMLP().eval()
    with torch.no_grad():
        before = fresh(x)
    reapplied = evagraph.apply_adapter(fresh, tmp_path / "a")
    assert_shares(fresh, reapplied)
    assert all(p.requires_grad for p in fresh.parameters())
    with torch.no_grad():
        assert torch.equal(fresh(x), before) and not torch.allclose(reapplied(x), before)
