"""How calibration cost and quality grow with layer width: evagraph vs PEFT, side by side.

    python benchmarks/scaling.py                    # widths 512,1024,2048,4096, CPU
    python benchmarks/scaling.py --hidden 2048,4096 --layers 4 --device cuda --dtype bfloat16

Each width runs ``benchmarks/calibration.py``'s comparison (each method in its own process on
the same model, data and settings; plain forward passes over the same batches; quality
against the exact PCA of the rows each method saw and of held-out minibatches) on a
Llama-style model with intermediate = 2.7 x hidden (a multiple of 64), heads = hidden / 64,
batches of 4 x 128 Zipf tokens, r = 8, rho = 2, tau = 0.99, and appends one table, a row
per width, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from calibration import compare, header, parser, publish, worker_argv  # noqa: E402


def point(hidden: int, base: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    args = argparse.Namespace(**vars(base))
    args.hidden, args.heads = hidden, max(1, hidden // 64)
    args.intermediate = round(2.7 * hidden / 64) * 64
    print(f"hidden {hidden} ...", file=sys.stderr, flush=True)
    return args, compare(args, worker_argv(args))


def main() -> None:
    p = parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.set_defaults(layers=2, batch=4, seq=128, r=8, rho=2.0, vocab=32000)
    p.add_argument("--widths", default="512,1024,2048,4096", help="hidden sizes to run")
    base = p.parse_args()
    rows = []
    for h in base.widths.split(","):
        rows.append(point(int(h), base))
        if base.json:  # each width as it finishes: a long run keeps what it measured
            Path(base.json).write_text(json.dumps([[vars(a), r] for a, r in rows]))

    model = (
        f"- model: Llama-style, {base.layers} layers, intermediate = 2.7 x hidden, heads = "
        f"hidden / 64, vocab {base.vocab}, {base.dtype}, {base.device}; batches {base.batch} x "
        f"{base.seq} Zipf tokens; r={base.r}, rho={base.rho}, tau={base.tau}; all seven "
        f"projection types; quality against {base.heldout} held-out minibatches"
    )
    lines = [
        *header("Calibration over widths: evagraph vs PEFT", model),
        "| hidden / inter. | method | wall s | forward passes | plain forwards s | x plain "
        "| peak MB | sim. to PCA of rows seen | sim. to held-out PCA | PEFT / evagraph |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for args, res in rows:
        speedup = res["peft"]["seconds"] / res["evagraph"]["seconds"]
        for m in ("evagraph", "peft"):
            r, q = res[m], res[m].get("quality", {})
            seen, held = (f"{q[k]:.4f}" if k in q else "-" for k in ("seen", "heldout"))
            lines.append(
                f"| {args.hidden} / {args.intermediate} | {m} | {r['seconds']:.1f} "
                f"| {r['forwards']} | {r['plain_seconds']:.1f} "
                f"| {r['seconds'] / r['plain_seconds']:.2f} | {r['peak_mb']:.0f} | {seen} "
                f"| {held} | {f'**{speedup:.1f}x**' if m == 'evagraph' else ''} |"
            )
    publish(lines, base.out)


if __name__ == "__main__":
    main()
