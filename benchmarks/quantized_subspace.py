"""How far EVA's components from a quantized model are from the float model's.

Calibrates a random Llama (hidden 256, 2 layers; embeddings near a rank-16 subspace, so the
activations have principal directions to find) in float32, then the same model quantized by
bitsandbytes (nf4, fp4, int8) and torchao (int8 weight-only), on the same batches, and prints
per scheme the subspace similarity of each decomposition's top k components to the float
model's: ||V_q V_f^T||_F^2 / k, the mean squared cosine of the principal angles (1: the same
subspace, k/d: unrelated). As a yardstick, the float model calibrated on other batches of the
same distribution. Run: ``python benchmarks/quantized_subspace.py`` (CPU, about a minute).
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import evagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_quantized import quantize  # noqa: E402  (the tests' quantization of a Llama)


def batches(seed: int, n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 512, (4, 64), generator=g)} for _ in range(n)]


def state(model: nn.Module, data: list) -> evagraph.EvaState:
    # min_batches: every decomposition sees all the batches (one that converged at another
    # step would have seen other rows, whatever the quantization did)
    return evagraph.calibrate(model, data, budget=4, rho=2, min_batches=len(data), progress=False)


def similarity(a: evagraph.EvaState, b: evagraph.EvaState) -> dict[str, float]:
    """Per decomposition (named by its first layer): ||V_a V_b^T||_F^2 / k."""
    out = {}
    for group, layers in a.groups.items():
        other = b.layer_group[layers[0]]
        va, vb = a.components[group].components, b.components[other].components
        k = min(len(va), len(vb))
        out[layers[0]] = float((va[:k] @ vb[:k].T).square().sum() / k)
    return out


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # embeddings near a rank-16 subspace: activations with a spectrum
        low = torch.randn(512, 16) @ torch.randn(16, 256)
        model.model.embed_tokens.weight.copy_(low + 0.1 * torch.randn(512, 256))
    data = batches(1)
    reference = state(model, data)
    rows = {"float32, other batches": similarity(reference, state(model, batches(2)))}
    for scheme in ("nf4", "fp4", "int8", "torchao-int8"):
        rows[scheme] = similarity(reference, state(quantize(copy.deepcopy(model), scheme), data))
    print(f"subspace similarity to the float model's top {reference.max_components} components")
    print(f"{'':24} {'mean':>6} {'min':>6}  (over {len(reference.groups)} decompositions)")
    for name, sims in rows.items():
        values = list(sims.values())
        print(f"{name:24} {sum(values) / len(values):6.3f} {min(values):6.3f}")


if __name__ == "__main__":
    main()
