"""How calibration cost and quality grow with layer width: evagraph vs PEFT, side by side.

    python benchmarks/scaling.py                    # widths 512,1024,2048,4096, CPU
    python benchmarks/scaling.py --widths 2048,4096 --layers 4 --device cuda --dtype bfloat16
    python benchmarks/scaling.py --widths 1024,2048 --seeds 0,1,2  # quality over three seeds

Each width runs ``benchmarks/calibration.py``'s comparison (each method in its own process on
the same model, data and settings; plain forward passes over the same batches; quality
against the exact PCA of the rows each method saw and of held-out minibatches) on a
Llama-style model with intermediate = 2.7 x hidden (a multiple of 64), heads = hidden / 64,
batches of 4 x 128 Zipf tokens, r = 8, rho = 2, tau = 0.99, and appends one table, a row
per width, to ``--out``. With ``--seeds`` each width runs once per seed (another random model
and other calibration and held-out draws), and a second table gives each method's held-out
similarity averaged over the seeds: one seed's figure moves by a hundredth when a layer
stops a few minibatches earlier or later, as much as the gap between the methods.
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


def point(hidden: int, seed: int, base: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    args = argparse.Namespace(**vars(base))
    args.hidden, args.heads, args.seed = hidden, max(1, hidden // 64), seed
    args.intermediate = round(2.7 * hidden / 64) * 64
    print(f"hidden {hidden}, seed {seed} ...", file=sys.stderr, flush=True)
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
    skip = {"hidden", "heads", "intermediate", "seed", "seeds", "widths", "resume", "json"}
    skip |= {"out", "title"}
    return all(a.get(k) == v for k, v in b.items() if k not in skip)


def main() -> None:
    p = parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.set_defaults(layers=2, batch=4, seq=128, r=8, rho=2.0, vocab=32000)
    p.add_argument("--widths", default="512,1024,2048,4096", help="hidden sizes to run")
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the widths and seeds already in --json that were measured with the same "
        "settings (computing any quality figures they lack)",
    )
    p.add_argument("--seeds", default=None, help="seeds to run each width with (default: --seed)")
    base = p.parse_args()
    seeds = [int(s) for s in base.seeds.split(",")] if base.seeds else [base.seed]
    done = {}
    if base.resume and base.json and Path(base.json).exists():
        for a, r in json.loads(Path(base.json).read_text()):
            if _same_settings(a, vars(base)):
                done[a["hidden"], a["seed"]] = (argparse.Namespace(**a), r)
    rows = []
    for h in base.widths.split(","):
        for s in seeds:
            key = (int(h), s)
            rows.append(reused(*done[key]) if key in done else point(*key, base))
            if base.json:  # each run as it finishes: a long sweep keeps what it measured
                ran = {(a.hidden, a.seed) for a, _ in rows}
                kept = [w for k, w in done.items() if k not in ran]
                Path(base.json).write_text(json.dumps([[vars(a), r] for a, r in rows + kept]))

    model = (
        f"- model: Llama-style, {base.layers} layers, intermediate = 2.7 x hidden, heads = "
        f"hidden / 64, vocab {base.vocab}, {base.dtype}, {base.device}; batches {base.batch} x "
        f"{base.seq} Zipf tokens; r={base.r}, rho={base.rho}, tau={base.tau}; all seven "
        f"projection types; quality against {base.heldout} held-out minibatches"
        + (f"; seeds {base.seeds}" if len(seeds) > 1 else "")
    )

    def label(a: argparse.Namespace) -> str:
        return f"{a.hidden} / {a.intermediate}" + (f", seed {a.seed}" if len(seeds) > 1 else "")

    lines = [
        *header("Calibration over widths: evagraph vs PEFT", model),
        *side_by_side("hidden / inter.", [(label(a), res) for a, res in rows]),
    ]
    if len(seeds) > 1 and not base.no_quality:
        lines += ["", *over_seeds(rows)]
    publish(lines, base.out)


def over_seeds(rows: list[tuple[argparse.Namespace, dict]]) -> list[str]:
    """Held-out similarity per width, averaged over the seeds, and the per-seed differences
    (evagraph minus PEFT) from which it comes."""
    lines = [
        "| hidden | seeds | held-out, own ranks: evagraph / PEFT (mean) | differences per seed "
        "| held-out, same ranks: evagraph / PEFT (mean) | differences per seed |",
        "|---|---|---|---|---|---|",
    ]
    for h in dict.fromkeys(a.hidden for a, _ in rows):
        runs = [r for a, r in rows if a.hidden == h]
        cells = []
        for k in ("heldout", "heldout_common"):
            e, p = ([r[m]["quality"][k] for r in runs] for m in ("evagraph", "peft"))
            diffs = ", ".join(f"{x - y:+.4f}" for x, y in zip(e, p))
            cells += [f"{sum(e) / len(e):.4f} / {sum(p) / len(p):.4f}", diffs]
        lines.append(f"| {h} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
