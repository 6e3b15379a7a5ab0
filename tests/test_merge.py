"""merge folds LoRA into the base weights with identical outputs; unmerge restores it."""

import warnings

import pytest
import torch
from conftest import SharedMLP, SmallCNN, assert_shares, loras
from test_artifacts import train_b
from test_degenerate import TwinLayers
from test_models import build, call

import evagraph
from evagraph.lora import LoraAdapter, LoraLayer


def adapt(model, batches, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        adapted, _ = evagraph.transform(model, batches, budget=2, progress=False, **settings)
    train_b(adapted)
    return adapted


def no_lora(model):
    return not any(isinstance(m, (LoraAdapter, LoraLayer)) for m in model.modules())


def check_round_trip(model, adapted, batch, tmp_path):
    with torch.no_grad():
        before = call(model, batch), call(adapted, batch)
    merged = evagraph.merge(adapted)
    assert no_lora(merged) and type(merged) is type(adapted)
    # only the folded layers' weights are new tensors; the rest is adapted's own
    folded = {a.base_weight for a in loras(adapted).values()}
    assert_shares(adapted, merged, new=folded)
    with torch.no_grad():
        expected = call(adapted, batch)
        torch.testing.assert_close(call(merged, batch), expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(call(model, batch), expected, atol=1e-4)
    # unmerge from the adapted model, and from a saved adapter directory
    evagraph.save_adapter(adapted, tmp_path / "adapter")
    for source in (adapted, tmp_path / "adapter"):
        restored = evagraph.unmerge(merged, source)
        assert_shares(merged, restored, new=folded)
        with torch.no_grad():
            torch.testing.assert_close(call(restored, batch), expected, atol=1e-5, rtol=1e-4)
        trainable = {n for n, p in restored.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in adapted.named_parameters() if p.requires_grad}
        base = dict(model.named_parameters())
        for n, p in restored.named_parameters():
            if not p.requires_grad:
                key = n.replace(".base_layer", "")
                torch.testing.assert_close(p, base[key], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # nothing was written into the weights they share
        assert all(map(torch.equal, (call(model, batch), call(adapted, batch)), before))


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
    expected = adapted(x)
    merged = evagraph.merge(adapted)
    assert no_lora(merged)
    folded = {a.base_weight for a in loras(adapted).values()}
    assert folded and all("." in name for name in folded)  # spliced: weights of the graph
    assert_shares(adapted, merged, new=folded)
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-4)
    restored = evagraph.unmerge(merged, adapted)
    assert_shares(merged, restored, new=folded)
    torch.testing.assert_close(restored(x), expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(adapted(x), expected) and torch.equal(merged(x), merged(x))


def test_merge_unties_a_weight_shared_with_a_layer_without_adapter():
    model = TwinLayers(tied=True).eval()  # b.weight is a.weight; only a is adapted
    batches = [torch.randn(16, 8) for _ in range(3)]
    adapted = adapt(model, batches, targets=["a"])
    x = batches[0]
    with torch.no_grad():
        expected = adapted(x)
        merged = evagraph.merge(adapted)
        assert merged.b.weight.data_ptr() == model.a.weight.data_ptr() != merged.a.weight.data_ptr()
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
        restored = evagraph.unmerge(merged, adapted)
        torch.testing.assert_close(restored(x), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(adapted(x), expected)


def test_merge_without_adapters_is_an_error():
    with pytest.raises(evagraph.ConfigError, match="no evagraph LoRA adapters"):
        evagraph.merge(SharedMLP())
