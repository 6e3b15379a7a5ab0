"""The copy that builds a convolution's rows, both ways, on a model's real conv inputs.

    python benchmarks/conv_copy.py              # resnet18, resnet50, convnext_tiny at 224
    python benchmarks/conv_copy.py --models resnet18 --size 64 --batch 2 --repeats 1

``evagraph.layers.conv_rows`` copies each output position's window of every input channel into
one row. Gathered straight from the (N, C, H, W) input, a row is assembled from runs of one
kernel row (3 values for a 3x3 conv); copied channels-last first (runs of C) and then
transposed within each row's (kernel, C) block, it is not. This times both copies
(``_unfold(..., channels_last=False/True)``, padding included) and ``conv_rows`` itself
(channels-last for kernels of up to 9 positions on the CPU, else gathered) on the inputs
of every conv evagraph adapts in a random-init timm model (Gaussian images at ``--size``,
``--batch`` a minibatch), at the output-position spacing calibration uses (``conv_stride``
at budget 16, rho 2: k = 32, and ``Probe`` keeping at least 8 positions along each
dimension), beside the model's own forward of the same minibatch. The copies alternate
(A B A B), ``--repeats`` rounds, best round each; CPU seconds of one thread. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import torch
from torch import nn

from evagraph.layers import _unfold, conv_rows, module_kind
from evagraph.passes.probe import Probe
from evagraph.stats import conv_stride


def conv_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, object]]:
    """(input, row geometry) of every conv calibration adapts (groups == 1), as it unfolds it."""
    seen: list[tuple[torch.Tensor, object]] = []

    def hook(conv: nn.Conv2d):
        def fn(module: nn.Module, args: tuple) -> None:
            _, spec = module_kind(conv)
            dim = conv.in_channels * math.prod(conv.kernel_size)
            probe = Probe("conv", spec)
            probe.keep_every(conv_stride("auto", dim, 32, conv.out_channels * dim, 2))
            seen.append((args[0].detach(), probe._row_conv(args[0])))

        return fn

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    handles = [m.register_forward_pre_hook(hook(m)) for m in convs]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def rows_seconds(inputs: list[tuple[torch.Tensor, object]], channels_last: bool | None) -> float:
    """One minibatch's rows by one copy (None: ``conv_rows``' own choice per conv)."""
    start = time.process_time()
    for x, spec in inputs:
        if channels_last is None:
            conv_rows(x, spec)
        else:
            _unfold(x, spec, channels_last)
    return time.process_time() - start


def main() -> None:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "convnext_tiny"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lines = [
        f"`{' '.join(['python benchmarks/conv_copy.py', *sys.argv[1:]])}`; "
        f"{platform.machine()}, torch {torch.__version__}, one thread, CPU seconds per "
        f"minibatch of {args.batch} x {args.size} x {args.size}, best of {args.repeats} "
        "alternated rounds.",
        "",
        "| model | convs | rows per minibatch (M values) | forward s | gathered s (x fwd) "
        "| channels-last s (x fwd) | conv_rows' choice s (x fwd) | choice / gathered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(args.batch, 3, args.size, args.size)
        inputs = conv_inputs(model, x)
        values = sum(conv_rows(t, s).numel() for t, s in inputs)
        copies = {"gathered": False, "channels-last": True, "choice": None}
        best = dict.fromkeys(["forward", *copies], math.inf)
        for _ in range(args.repeats):
            start = time.process_time()
            with torch.no_grad():
                model(x)
            best["forward"] = min(best["forward"], time.process_time() - start)
            for label, how in copies.items():
                best[label] = min(best[label], rows_seconds(inputs, how))
        fwd, g, c, h = (best[k] for k in ("forward", "gathered", "channels-last", "choice"))
        lines.append(
            f"| {name} | {len(inputs)} | {values / 1e6:.1f} | {fwd:.3f} | {g:.3f} ({g / fwd:.2f}) "
            f"| {c:.3f} ({c / fwd:.2f}) | {h:.3f} ({h / fwd:.2f}) | {h / g:.2f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
