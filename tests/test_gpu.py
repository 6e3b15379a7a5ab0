"""CUDA paths: skipped without a GPU (see conftest)."""

import pytest
import torch
from conftest import SharedMLP, SmallCNN, correlated

import evagraph
from evagraph.lora import LoraAdapter
from evagraph.stats import ExactCovariance, IncrementalSVD, flush_all

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("cls", [ExactCovariance, IncrementalSVD])
def test_statistics_on_cuda_match_cpu(cls):
    x = correlated(3000, 64, rank=8)
    results = []
    for device in ("cpu", "cuda"):
        pca = cls(64, 6, device)
        for chunk in x.to(device).split(700):
            pca.update(chunk)
            flush_all([pca])
        results.append(pca.finalize())
    cpu, gpu = results
    assert gpu.components.device.type == "cuda"
    torch.testing.assert_close(
        gpu.explained_variance_ratio.cpu(), cpu.explained_variance_ratio, rtol=1e-3, atol=1e-5
    )
    cos = (gpu.components.cpu() * cpu.components).sum(1).abs()
    assert torch.all(cos > 0.999)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_on_cuda_keeps_outputs_and_accumulates_in_fp32(dtype):
    model = SharedMLP().to("cuda", dtype).eval()
    batches = [b.to("cuda", dtype) for b in correlated(64, 16).split(8)]
    adapted, report = evagraph.transform(model, batches, budget=2, rho=2, progress=False)
    for m in adapted.modules():
        if isinstance(m, LoraAdapter):
            assert m.lora_A.weight.device.type == "cuda"
            assert m.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(adapted(batches[0]), model(batches[0]))
    assert sum(report.ranks.values()) == 2 * len(report.layers)


def test_cnn_on_cuda():
    model = SmallCNN().cuda().eval()
    batches = [torch.randn(4, 3, 16, 16, device="cuda") for _ in range(4)]
    adapted, _ = evagraph.transform(model, batches, budget=2, rho=2, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(adapted(batches[0]), model(batches[0]), atol=1e-4, rtol=1e-4)


def test_block_by_block_on_cuda_moves_blocks_and_matches_cpu():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    batches = [{"input_ids": torch.randint(0, 64, (2, 12))} for _ in range(4)]
    cpu = evagraph.calibrate(model, batches, tau=1.0, sequential=True, progress=False)
    torch.cuda.reset_peak_memory_stats()
    gpu = evagraph.calibrate(model, batches, tau=1.0, device="cuda", progress=False)
    # The model stayed on the CPU; each block visited the GPU in turn.
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.cuda.max_memory_allocated() > 0
    for g, c in cpu.components.items():
        cos = (gpu.components[g].components.cpu() * c.components).sum(1).abs()
        assert torch.all(cos[c.explained_variance > 0] > 0.999), g
