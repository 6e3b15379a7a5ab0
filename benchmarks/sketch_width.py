"""Accuracy against cost of each statistic on the same rows: the exact one and the low-rank
sketch at several widths, layer by layer.

    python benchmarks/sketch_width.py                          # SmolLM2 on real text
    python benchmarks/sketch_width.py --model toy --batches 4  # random-init Llama, a smoke run

On SmolLM2's real activations the default sketch (rank q = 2k + 4) misses |cos| 0.999 to the
exact PCA at the allotted rank on some layers (``tests/test_real_model.py``, strict xfail):
the spectrum is flat past the first few components, so what the sketch drops at each update
is large against the gaps. This measures what closing that would cost. Each layer's input
rows (hooked on the first layer of each group sharing an input: q_proj for q/k/v, o_proj,
gate_proj for gate/up, down_proj) are fed minibatch by minibatch, as calibration does (an
update and an ``estimate`` per minibatch, the tau criterion's), to ``ExactCovariance`` and to
``IncrementalSVD`` at each ``--widths`` rank; the components after the last minibatch are
compared one by one with the exact float64 PCA of the same rows (min |cos| over the top
``--ranks``) and as spans (mean squared cosine of the principal angles, top k). Milliseconds
per minibatch are process seconds of one thread. Prints a markdown table (``--out`` appends).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from evagraph.stats import ExactCovariance, IncrementalSVD, sketch_rank

GROUP_HEADS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def _model_and_batches(args: argparse.Namespace) -> tuple[torch.nn.Module, list[dict], str]:
    if args.model == "toy":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256)  # fmt: skip
        g = torch.Generator().manual_seed(0)
        batches = [
            {"input_ids": torch.randint(256, (args.batch, args.seq), generator=g)}
            for _ in range(args.batches)
        ]
        return LlamaForCausalLM(cfg).eval(), batches, "random-init Llama (hidden 64, 2 layers)"
    sys.path.insert(0, str(Path(__file__).parent))
    import real
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real.model_dir("float32"), dtype=torch.float32)
    batches = real.token_batches("calibration", args.batches, args.batch, args.seq, seed=0)
    return model.eval(), batches, "SmolLM2-135M-Instruct (float32), stdlib docstrings"


def collect_rows(
    model: torch.nn.Module, batches: list[dict], blocks: list[int]
) -> dict[str, list[torch.Tensor]]:
    """Each group's input rows, one tensor per minibatch, for the given decoder blocks."""
    names = [f"model.layers.{b}.{h}" for b in blocks for h in GROUP_HEADS]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name: str):
        def fn(module: torch.nn.Module, inputs: tuple) -> None:
            rows[name].append(inputs[0].reshape(-1, inputs[0].shape[-1]).detach().clone())

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    return rows


def measure(
    rows: list[torch.Tensor], stat: ExactCovariance | IncrementalSVD, ranks: list[int]
) -> dict[str, float]:
    """Feed ``rows`` minibatch by minibatch (update, estimate); compare with the exact PCA."""
    start = time.process_time()
    for x in rows:
        stat.update(x)
        stat.estimate()
    ms = (time.process_time() - start) / len(rows) * 1e3
    got = stat.finalize().components.double()
    x = torch.cat(rows).double()
    x = x - x.mean(0)
    ref = torch.linalg.eigh(x.T @ x)[1].flip(1)[:, : got.shape[0]].T
    cos = (got * ref).sum(1).abs()
    out = {f"min cos top {r}": float(cos[:r].min()) for r in ranks}
    out["span top k"] = float(torch.linalg.svdvals(got @ ref.T).pow(2).mean())
    out["ms"] = ms
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "toy"), default="smollm2")
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 14, 29])
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--k", type=int, default=16, help="components (budget x rho)")
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="sketch ranks q (default: 1, 1.5, 2, 3 x sketch_rank(k))")  # fmt: skip
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.model == "toy":
        args.blocks = [b for b in args.blocks if b < 2] or [0]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    q = sketch_rank(args.k)
    widths = args.widths or [q, q * 3 // 2, 2 * q, 3 * q]
    ranks = [r for r in args.ranks if r <= args.k]
    model, batches, what = _model_and_batches(args)
    rows = collect_rows(model, batches, args.blocks)
    del model

    cols = [f"min cos top {r}" for r in ranks] + ["span top k", "ms"]
    cpu = platform.processor() or platform.machine()
    head = [c.replace("ms", "ms / minibatch") for c in cols]
    lines = [
        f"{what}; {args.batches} minibatches of {args.batch} x {args.seq} tokens; k = {args.k}; "
        f"update and estimate per minibatch, one thread ({cpu}); "
        f"`python benchmarks/sketch_width.py {' '.join(sys.argv[1:])}`",
        "",
        "| layer | d | statistic | " + " | ".join(head) + " |",
        "|" + "---|" * (3 + len(cols)),
    ]
    for name, chunks in rows.items():
        d = chunks[0].shape[1]
        stats = [("exact", ExactCovariance(d, args.k, "cpu"))]
        stats += [(f"sketch q = {w}", IncrementalSVD(d, args.k, "cpu", rank=w)) for w in widths]
        for label, stat in stats:
            got = measure(chunks, stat, ranks)
            cells = [f"{got[c]:.4f}" if c != "ms" else f"{got[c]:.2f}" for c in cols]
            lines.append(f"| {name} | {d} | {label} | " + " | ".join(cells) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
