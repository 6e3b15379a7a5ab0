"""Where evagraph's calibration time goes, to convergence: capture, graph, statistics.

    python benchmarks/time_split.py --model smollm2 --text stdlib --batch 4 --seq 128 \\
        --batches 114 --r 8 --rho 2 --threads 1

Runs ``evagraph.calibrate`` once, in this process, on ``calibration.py``'s model and data
(same options), and times its parts in CPU seconds by wrapping them: the passes up to the
probes (``trace``: capture, layer graph, selection, probes), the minibatches' runs through the
probed graph (``forward``, which includes the statistics' updates made by its probes), the
updates themselves (either statistic) and inside them the low-rank statistic's QR and small
eigendecompositions, the convergence checks (``estimate``, where the exact statistic solves)
and the graph cuts (``module_for``). "graph only" is ``forward`` less the updates: the
model's own work on the part of the graph still needed. The wrappers cost a few
microseconds a call, nothing next to these parts.
"""

from __future__ import annotations

import functools
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from calibration import TARGETS, build, parser  # noqa: E402


def _timed(owner: object, name: str, key: str, totals: Counter) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] += time.process_time() - start

    setattr(owner, name, wrapper)


def main() -> None:
    p = parser(description=__doc__)
    args = p.parse_args()
    if args.device != "cpu":  # CPU seconds say nothing of work queued on an accelerator
        p.error("time_split.py times CPU work: run it with --device cpu")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, batches = build(args)

    import evagraph
    from evagraph.pipelines import base, calibrator
    from evagraph.stats import exact, lowrank

    totals: Counter = Counter()
    _timed(base, "trace", "trace", totals)
    _timed(calibrator.Calibrator, "forward", "forward", totals)
    _timed(calibrator.Calibrator, "estimate", "estimate", totals)
    _timed(calibrator.Calibrator, "module_for", "module_for", totals)
    _timed(lowrank.IncrementalSVD, "update", "update", totals)
    _timed(exact.ExactCovariance, "update", "update", totals)
    _timed(lowrank.IncrementalSVD, "_basis", "qr", totals)
    _timed(lowrank.IncrementalSVD, "flush", "eigh", totals)
    start = time.process_time()
    state = evagraph.calibrate(
        model, batches, budget=args.r, rho=args.rho, tau=args.tau, progress=False,
        targets=[f"*.{n}" for n in TARGETS], statistic=args.statistic, max_rows=args.max_rows,
    )  # fmt: skip
    total = time.process_time() - start
    parts = [
        ("trace (capture, layer graph, probes)", totals["trace"]),
        ("graph only (forward less updates)", totals["forward"] - totals["update"]),
        ("statistic updates", totals["update"]),
        ("  of which QR (low-rank statistic)", totals["qr"]),
        ("  of which eigh (low-rank statistic)", totals["eigh"]),
        ("convergence checks", totals["estimate"]),
        ("graph cuts", totals["module_for"]),
        ("rest", total - totals["trace"] - totals["forward"] - totals["estimate"]
         - totals["module_for"]),
    ]  # fmt: skip
    print("| part | CPU s | share |\n|---|---|---|")
    for name, seconds in parts:
        print(f"| {name} | {seconds:.2f} | {seconds / total:.0%} |")
    print(f"| total, {state.steps} minibatches | {total:.2f} | 100% |")


if __name__ == "__main__":
    main()
