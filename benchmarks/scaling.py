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
from calibration import (  # noqa: E402
    QUALITY,
    compare,
    header,
    parser,
    publish,
    quality,
    side_by_side,
    worker_argv,
)


def point(hidden: int, base: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    args = argparse.Namespace(**vars(base))
    args.hidden, args.heads = hidden, max(1, hidden // 64)
    args.intermediate = round(2.7 * hidden / 64) * 64
    print(f"hidden {hidden} ...", file=sys.stderr, flush=True)
    return args, compare(args, worker_argv(args))


def reused(args: argparse.Namespace, res: dict) -> tuple[argparse.Namespace, dict]:
    """A width measured by an earlier run, with the quality figures it lacks computed."""
    if not args.no_quality and any(
        k not in res[m].get("quality", {}) for m in ("evagraph", "peft") for k in QUALITY
    ):
        print(f"hidden {args.hidden}: quality ...", file=sys.stderr, flush=True)
        for m, q in quality(args, res).items():
            res[m]["quality"] = q
    return args, res


def _same_settings(a: dict, b: dict) -> bool:
    # width-dependent fields and bookkeeping differ between rows of one run
    skip = {"hidden", "heads", "intermediate", "widths", "resume", "json", "out", "title"}
    return all(a.get(k) == v for k, v in b.items() if k not in skip)


def main() -> None:
    p = parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.set_defaults(layers=2, batch=4, seq=128, r=8, rho=2.0, vocab=32000)
    p.add_argument("--widths", default="512,1024,2048,4096", help="hidden sizes to run")
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the widths already in --json that were measured with the same settings "
        "(computing any quality figures they lack)",
    )
    base = p.parse_args()
    done = {}
    if base.resume and base.json and Path(base.json).exists():
        for a, r in json.loads(Path(base.json).read_text()):
            if _same_settings(a, vars(base)):
                done[a["hidden"]] = (argparse.Namespace(**a), r)
    rows = []
    for h in base.widths.split(","):
        rows.append(reused(*done[int(h)]) if int(h) in done else point(int(h), base))
        if base.json:  # each width as it finishes: a long run keeps what it measured
            kept = [w for h, w in done.items() if h not in {a.hidden for a, _ in rows}]
            Path(base.json).write_text(json.dumps([[vars(a), r] for a, r in rows + kept]))

    model = (
        f"- model: Llama-style, {base.layers} layers, intermediate = 2.7 x hidden, heads = "
        f"hidden / 64, vocab {base.vocab}, {base.dtype}, {base.device}; batches {base.batch} x "
        f"{base.seq} Zipf tokens; r={base.r}, rho={base.rho}, tau={base.tau}; all seven "
        f"projection types; quality against {base.heldout} held-out minibatches"
    )
    lines = [
        *header("Calibration over widths: evagraph vs PEFT", model),
        *side_by_side(
            "hidden / inter.", [(f"{a.hidden} / {a.intermediate}", res) for a, res in rows]
        ),
    ]
    publish(lines, base.out)


if __name__ == "__main__":
    main()
