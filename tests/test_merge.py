"""merge folds LoRA into the base weights with identical outputs; unmerge restores it."""

import warnings

import pytest
import torch
from conftest import SharedMLP, SmallCNN
from test_artifacts import train_b
from test_models import build, call

import evagraph
from evagraph.lora import LoraAdapter, LoraLayer


def adapt(model, batches):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        adapted, _ = evagraph.transform(model, batches, budget=2, progress=False)
    train_b(adapted)
    return adapted


def no_lora(model):
    return not any(isinstance(m, (LoraAdapter, LoraLayer)) for m in model.modules())


def check_round_trip(model, adapted, batch, tmp_path):
    merged = evagraph.merge(adapted)
    assert no_lora(merged) and type(merged) is type(adapted)
    with torch.no_grad():
        expected = call(adapted, batch)
        torch.testing.assert_close(call(merged, batch), expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(call(model, batch), expected, atol=1e-4)
    # unmerge from the adapted model, and from a saved adapter directory
    evagraph.save_adapter(adapted, tmp_path / "adapter")
    for source in (adapted, tmp_path / "adapter"):
        restored = evagraph.unmerge(merged, source)
        with torch.no_grad():
            torch.testing.assert_close(call(restored, batch), expected, atol=1e-5, rtol=1e-4)
        trainable = {n for n, p in restored.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in adapted.named_parameters() if p.requires_grad}
        base = dict(model.named_parameters())
        for n, p in restored.named_parameters():
            if not p.requires_grad:
                key = n.replace(".base_layer", "")
                torch.testing.assert_close(p, base[key], atol=1e-5, rtol=1e-5)


def test_merge_linear(tmp_path):
    model = SharedMLP().eval()
    batches = [torch.randn(8, 16) for _ in range(4)]
    check_round_trip(model, adapt(model, batches), batches[0], tmp_path)


def test_merge_convolutions(tmp_path):
    model = SmallCNN().eval()  # stride, dilation, padding="same", Conv1d and Conv2d
    batches = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    check_round_trip(model, adapt(model, batches), batches[0], tmp_path)


@pytest.mark.slow
def test_merge_hf_conv1d(tmp_path):
    model, batches = build("hf", "gpt2")
    check_round_trip(model, adapt(model, batches), batches[0], tmp_path)


def test_merge_graph_splice(tmp_path):
    model = SharedMLP().eval()
    x = torch.randn(8, 16)
    graph_model = torch.export.export(model, (x,)).module()
    adapted = adapt(graph_model, [x, x * 2, x + 1])
    merged = evagraph.merge(adapted)
    assert no_lora(merged)
    torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-4)
    restored = evagraph.unmerge(merged, adapted)
    torch.testing.assert_close(restored(x), adapted(x), atol=1e-5, rtol=1e-4)


def test_merge_without_adapters_is_an_error():
    with pytest.raises(evagraph.ConfigError, match="no evagraph LoRA adapters"):
        evagraph.merge(SharedMLP())
