"""Where a minibatch of the low-rank statistic goes on a device: products against solves.

    python benchmarks/solver_latency.py                       # ViT-S's 48 layers, CUDA if any
    python benchmarks/solver_latency.py --dims 64 --blocks 1 --rows 64 --repeats 2   # toy

On an H100 evagraph's calibration of ViT-S cost 35x its 5 ms forward per minibatch
(``benchmarks/results.md``, "On CUDA"), far more than its arithmetic; this times, for the
statistic's shapes of every layer of a model (``--dims`` per block, ``--blocks`` blocks,
``--rows`` rows per minibatch, k components: sketch rank q = ``sketch_rank(k)``), each kind
of work one minibatch of ``IncrementalSVD`` does, so that the next GPU lease can say which
to change:

- ``products``: the three skinny products over the rows (``rows @ [V, probe]``,
  ``rows^T @ z``, ``rows @ basis``), every layer;
- ``gram of the coordinates (float64)``: each layer's ``rows x (3q + 1)`` coordinates'
  second moment, in float64 as ``_absorb`` takes it;
- ``qr, one per layer``: Householder QR of the ``d x (3q + 1)`` matrix, as now;
- ``qr, batched by shape``: the same QRs stacked per width, one call each;
- ``cholesky qr2, one per layer``: CholeskyQR2 (two rounds of Gram, Cholesky and triangular
  solve: GEMMs instead of Householder panels), float64 Gram;
- ``eigh, batched``: the ``(3q + 1)``-square eigenproblems of all layers in one call, as
  ``flush_all`` does on a GPU;
- ``eigh, on the host``: the same, copied to the CPU, solved in float64 and copied back.

Milliseconds per minibatch (all layers), best of ``--repeats`` after one warm-up; on CUDA wall
seconds around ``synchronize``, on the CPU process seconds of one thread. Prints a markdown table
(``--out`` appends it).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from evagraph.stats import sketch_rank


def _timer(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":

        def clock() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return clock
    return time.process_time


def cholesky_qr2(a: torch.Tensor) -> torch.Tensor:
    """Q of ``a`` (tall, full column rank) by two rounds of Cholesky QR in float64 Gram."""
    q = a
    for _ in range(2):
        r = torch.linalg.cholesky(q.T.double() @ q.double()).T
        q = torch.linalg.solve_triangular(r.float(), q, upper=True, left=False)
    return q


def work(dims: list[int], rows: int, k: int, device: torch.device) -> dict[str, Callable]:
    """The kinds of work of one minibatch over layers of input widths ``dims``."""
    q = sketch_rank(k)
    g = torch.Generator(device=device).manual_seed(0)
    layers = []
    for d in dims:
        x = torch.randn(rows, d, device=device, generator=g)
        v = torch.linalg.qr(torch.randn(d, q, device=device, generator=g)).Q.T.contiguous()
        probe = torch.randn(d, q, device=device, generator=g)
        panel = torch.randn(d, min(3 * q + 1, d), device=device, generator=g)  # as _basis
        gram = torch.randn(3 * q + 1, 3 * q + 1, device=device, generator=g, dtype=torch.float64)
        layers.append((x, v, probe, panel, gram @ gram.T))
    by_width: dict[int, list[torch.Tensor]] = {}
    for layer in layers:
        by_width.setdefault(layer[3].shape[0], []).append(layer[3])
    stacks = [torch.stack(panels) for panels in by_width.values()]
    grams = torch.stack([layer[4] for layer in layers])

    def products() -> None:
        for x, v, probe, panel, _ in layers:
            both = x @ torch.cat([v.T, probe], 1)
            x.T @ both
            x @ panel[:, q:]  # the basis: the panel's columns past V's

    coords = [torch.randn(rows, 3 * q + 1, device=device, generator=g) for _ in layers]

    def eigh_host() -> None:
        evals, evecs = torch.linalg.eigh(grams.cpu())
        evals.to(device, non_blocking=True), evecs.to(device, non_blocking=True)

    return {
        "products": products,
        "gram of the coordinates (float64)": lambda: [c.double().T @ c.double() for c in coords],
        "qr, one per layer": lambda: [torch.linalg.qr(layer[3]) for layer in layers],
        "qr, batched by shape": lambda: [torch.linalg.qr(s) for s in stacks],
        "cholesky qr2, one per layer": lambda: [cholesky_qr2(layer[3]) for layer in layers],
        "eigh, batched": lambda: torch.linalg.eigh(grams),
        "eigh, on the host": eigh_host,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[384, 384, 384, 1536],
                   help="a block's input widths (ViT-S: qkv, proj, fc1, fc2)")  # fmt: skip
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--rows", type=int, default=8 * 197, help="rows a layer sees per minibatch")
    p.add_argument("--k", type=int, default=32, help="components (budget x rho)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="append the table to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as limit.py: process seconds of one thread
    clock = _timer(device)
    kinds = work(args.dims * args.blocks, args.rows, args.k, device)
    lines = [
        "## Solver latency: a minibatch of the low-rank statistic (`benchmarks/solver_latency.py`)",
        "",
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else platform.machine()}, "
        f"torch {torch.__version__}; {args.blocks} blocks of widths {args.dims}, {args.rows} "
        f"rows, k = {args.k} (sketch rank {sketch_rank(args.k)}); float32 rows; best of "
        f"{args.repeats} after a warm-up",
        "",
        "| work | ms per minibatch (all layers) |",
        "|---|---|",
    ]
    for name, fn in kinds.items():
        fn()  # warm-up: library loading and kernel selection
        best = float("inf")
        for _ in range(args.repeats):
            start = clock()
            fn()
            best = min(best, clock() - start)
        lines.append(f"| {name} | {best * 1e3:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with Path(args.out).open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
