"""Statistics memory at real model shapes: evagraph (now and before) against PEFT's EVA.

    python benchmarks/memory.py                 # the projection table + a CPU check

What each method keeps per decomposition (one per distinct layer input: q/k/v share one,
gate/up another, as both methods deduplicate) while calibrating, in bytes, at k = round(r x
rho) components:
- evagraph, low-rank statistic (``IncrementalSVD``, every Llama projection input is wider
  than 8k): V (q x d, float32; q = max(2k + 4, k + 12)), sigma (q, float64), mean (d, float64)
  and two scalars;
- evagraph before (``ExactCovariance``: a ``d x d`` float32 second moment, sum, shift);
- PEFT (``IncrementalPCA`` of rank k): components_ (k x d, float32), mean_ and var_ (d,
  float64), three k-vectors and two scalars.
The formulas are checked against the tensors a real statistic of each kind holds after
calibrating one batch of one layer of the given width (``--check-width``), on the CPU.
Transient buffers (one batch's rows, which both methods copy while updating) are not counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from calibration import header, publish  # noqa: E402

from evagraph.stats import sketch_rank  # noqa: E402

# (hidden, intermediate, layers) of real models.
MODELS = {
    "Llama-3.2-1B": (2048, 8192, 16),
    "Llama-3-8B": (4096, 14336, 32),
    "Llama-3-70B": (8192, 28672, 80),
}


def widths(hidden: int, intermediate: int) -> list[int]:
    """Row widths of one decoder layer's decompositions: q/k/v, o, gate/up, down."""
    return [hidden, hidden, hidden, intermediate]


def evagraph_bytes(d: int, k: int) -> int:
    q = sketch_rank(k)
    return 4 * q * d + 8 * q + 8 * d + 2 * 8


def before_bytes(d: int, k: int) -> int:
    return 4 * d * d + 4 * d + 4 * d + 8 + 4


def peft_bytes(d: int, k: int) -> int:
    return 4 * k * d + 8 * 2 * d + 4 * 3 * k + 8 + 4


def tensor_bytes(obj) -> int:
    return sum(v.numel() * v.element_size() for v in vars(obj).values() if torch.is_tensor(v))


def measured(d: int, k: int, rows: int = 512) -> dict[str, int]:
    """Bytes held by a real statistic of each kind after one batch of ``rows`` rows."""
    from peft.utils.incremental_pca import IncrementalPCA

    from evagraph.stats import ExactCovariance, IncrementalSVD

    x = torch.randn(rows, d)
    ours, before = IncrementalSVD(d, k, "cpu"), ExactCovariance(d, k, "cpu")
    ours.update(x)
    before.update(x)
    peft = IncrementalPCA(n_components=k, copy=True, lowrank=True, lowrank_seed=42)
    peft.partial_fit(x)
    return {
        "evagraph": tensor_bytes(ours),
        "before": tensor_bytes(before),
        "peft": tensor_bytes(peft),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rho", type=float, default=2.0)
    p.add_argument("--check-width", type=int, default=4096)
    p.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    args = p.parse_args()
    k = round(args.r * args.rho)

    gb = 2**30
    lines = [
        *header(
            "Statistics memory at real shapes: evagraph vs PEFT",
            f"- k = round({args.r} x {args.rho}) = {k} components per decomposition; four "
            "decompositions per decoder layer (q/k/v, o, gate/up, down); all layers at once",
        ),
        "| model | evagraph GB | PEFT GB | evagraph / PEFT | evagraph before (d x d) GB |",
        "|---|---|---|---|---|",
    ]
    for name, (hidden, inter, layers) in MODELS.items():
        ds = widths(hidden, inter)
        ours = layers * sum(evagraph_bytes(d, k) for d in ds) / gb
        theirs = layers * sum(peft_bytes(d, k) for d in ds) / gb
        old = layers * sum(before_bytes(d, k) for d in ds) / gb
        lines.append(f"| {name} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f}x | {old:.1f} |")
    d = args.check_width
    real = measured(d, k)
    lines += [
        "",
        f"Check at d = {d} (bytes of the tensors each statistic holds after one batch):",
        "",
    ]
    lines += ["| statistic | formula | measured |", "|---|---|---|"]
    for key, formula in (
        ("evagraph", evagraph_bytes),
        ("before", before_bytes),
        ("peft", peft_bytes),
    ):
        lines.append(f"| {key} | {formula(d, k):,} | {real[key]:,} |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
