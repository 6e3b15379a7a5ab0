"""Conv row subsampling (``conv_stride``): minibatches to converge and components, every row
against the rows of every n-th output position.

    python benchmarks/conv_rows.py                     # resnet18 at 224, 8 images a batch
    python benchmarks/conv_rows.py --model convnext_tiny --batches 40

Calibrates the same random-init timm model on the same Gaussian images twice, at tau 0.99,
budget 16, rho 2: with ``conv_stride=1`` (every row) and with the default (per layer, see
the README's ``conv_stride``). Reports per run the minibatches consumed and CPU seconds, and
per conv layer the mean squared cosine of the principal angles between the two runs' top-r
components (r the rank the every-row run gave the layer), beside the same similarity between
two every-row runs on disjoint halves of the images (the noise floor of the data itself).
"""

from __future__ import annotations

import argparse
import time

import torch


def calibrate(model, batches, stride):
    import evagraph

    start = time.process_time()
    state = evagraph.calibrate(model, batches, budget=16, rho=2, conv_stride=stride, progress=False)
    return state, time.process_time() - start


def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, _ = torch.linalg.qr(a.double().T)
    qb, _ = torch.linalg.qr(b.double().T)
    return float(torch.linalg.svdvals(qa.T @ qb).pow(2).mean())


def main() -> None:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch, 3, 224, 224, generator=g) for _ in range(args.batches)]
    full, t_full = calibrate(model, batches, 1)
    auto, t_auto = calibrate(model, batches, None)
    half_a, _ = calibrate(model, batches[0::2], 1)
    half_b, _ = calibrate(model, batches[1::2], 1)
    print(f"every row: {full.steps} minibatches, {t_full:.0f} CPU s")
    print(f"default stride: {auto.steps} minibatches, {t_auto:.0f} CPU s")
    ranks = full.ranks(16, 2)
    sims, floors = [], []
    for m, r in ranks.items():
        if r == 0 or full.layers[m].kind != "conv":
            continue
        comp = {s: st.components[st.layer_group[m]].components[:r] for s, st in
                (("full", full), ("auto", auto), ("a", half_a), ("b", half_b))}  # fmt: skip
        sims.append(similarity(comp["full"], comp["auto"]))
        floors.append(similarity(comp["a"], comp["b"]))
    print(
        f"{len(sims)} conv layers: similarity every-row vs default stride mean "
        f"{sum(sims) / len(sims):.4f} (min {min(sims):.4f}); two halves of the data, every "
        f"row: mean {sum(floors) / len(floors):.4f} (min {min(floors):.4f})"
    )


if __name__ == "__main__":
    main()
