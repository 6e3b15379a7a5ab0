"""Host syncs per minibatch of evagraph's calibration on CUDA, and where they happen.

    python benchmarks/host_syncs.py                  # on a machine with CUDA
    python benchmarks/host_syncs.py --hidden 32 --layers 1 --n0 1 --n1 2   # toy, any device

Counts the synchronizing CUDA calls (``torch.cuda.set_sync_debug_mode``, each one a warning)
during ``evagraph.calibrate`` over ``--n0`` and then ``--n1`` minibatches of a Llama in
bfloat16 at tau 0.99999 (nothing converges), so that the difference over ``n1 - n0`` is the
marginal number per minibatch; prints it with the evagraph source lines that synced, most
frequent first. A sync stalls the host until the GPU drains its queue, so the fewer per
minibatch, the more of the statistic's kernels overlap the next block's forward. Without
CUDA it prints that there is nothing to count.
"""

from __future__ import annotations

import argparse
import collections
import warnings

import torch

import evagraph


def count(model, batches, n: int) -> collections.Counter:
    """Synchronizing calls by source line (evagraph's own frames) over ``n`` minibatches."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            evagraph.calibrate(model, batches[:n], tau=0.99999, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    lines = collections.Counter()
    for w in caught:
        if "synchronizing" in str(w.message):
            lines[f"{w.filename.split('site-packages/')[-1]}:{w.lineno}"] += 1
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--n0", type=int, default=2)
    p.add_argument("--n1", type=int, default=6)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to count")
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(args.hidden // 64, 1)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        use_cache=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval().to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    batches = [
        {"input_ids": torch.randint(0, 32000, (4, 128), generator=g).cuda()} for _ in range(args.n1)
    ]
    first, second = count(model, batches, args.n0), count(model, batches, args.n1)
    per = (sum(second.values()) - sum(first.values())) / (args.n1 - args.n0)
    print(f"{config.hidden_size} / {config.intermediate_size} x {args.layers} layers, bfloat16: "
          f"{sum(first.values())} syncs over {args.n0} minibatches, {sum(second.values())} over "
          f"{args.n1}: {per:.1f} per minibatch")  # fmt: skip
    marginal = second - first
    for line, n in (marginal or second).most_common(15):
        print(f"  {n:4d}  {line}")


if __name__ == "__main__":
    main()
