"""How calibration cost grows: evagraph vs PEFT over hidden size and over depth.

    python benchmarks/scaling.py                          # CPU grid below, appends to results.md
    python benchmarks/scaling.py --hidden 1024,2048,4096 --layers 8,16 --device cuda

Each point runs ``benchmarks/calibration.py``'s workers (each method in its own process, same
model, data and settings), without the exact-PCA comparison: wall time, forward passes, the
time of one plain forward pass (measured over evagraph's batches) and the speed-up. Hidden
sizes run at the reference depth; depths at the first hidden size of the depth sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from calibration import header, publish, run_worker  # noqa: E402


def point(hidden: int, layers: int, args: argparse.Namespace) -> dict:
    argv = [
        f"--hidden={hidden}",
        f"--intermediate={2 * hidden}",
        f"--layers={layers}",
        f"--heads={max(1, hidden // 64)}",
        f"--device={args.device}",
        f"--dtype={args.dtype}",
        f"--batches={args.batches}",
    ]
    row = {"hidden": hidden, "layers": layers}
    for m in ("evagraph", "peft"):
        print(f"hidden {hidden}, {layers} layers: {m} ...", file=sys.stderr, flush=True)
        row[m] = run_worker(m, argv)
    row["forward"] = run_worker("forward", argv, steps=row["evagraph"]["forwards"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", default="128,256,512", help="hidden sizes at --depth-at layers")
    p.add_argument("--layers", default="2,4,8", help="depths at --width-at hidden")
    p.add_argument("--depth-at", type=int, default=4, help="depth of the hidden-size sweep")
    p.add_argument("--width-at", type=int, default=256, help="hidden size of the depth sweep")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    args = p.parse_args()

    grid = [(int(h), args.depth_at) for h in args.hidden.split(",")]
    grid += [(args.width_at, int(n)) for n in args.layers.split(",")]
    rows, seen = [], set()
    for hidden, layers in grid:
        if (hidden, layers) not in seen:  # the two sweeps may share a point
            seen.add((hidden, layers))
            rows.append(point(hidden, layers, args))

    model = (
        "- model: Llama-style, intermediate = 2 x hidden, heads = hidden / 64, vocab 8000, "
        f"{args.dtype}, {args.device}; batches 8 x 128 Zipf tokens; r=16, rho=2, tau=0.99; "
        "all seven projection types"
    )
    lines = [
        *header("Scaling: calibration time vs hidden size and depth", model),
        "| hidden | layers | plain s / forward | evagraph s (forwards) | evagraph x plain "
        "| PEFT s (forwards) | PEFT x plain | PEFT / evagraph |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, q, f = r["evagraph"], r["peft"], r["forward"]
        per = f["seconds"] / f["forwards"]
        lines.append(
            f"| {r['hidden']} | {r['layers']} | {per:.3f} "
            f"| {e['seconds']:.1f} ({e['forwards']}) | {e['seconds'] / (per * e['forwards']):.2f} "
            f"| {q['seconds']:.1f} ({q['forwards']}) | {q['seconds'] / (per * q['forwards']):.2f} "
            f"| {q['seconds'] / e['seconds']:.1f}x |"
        )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
