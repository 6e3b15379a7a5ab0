"""Peak memory of ``evagraph compile`` on a model several times larger than ``--max-memory``.

Builds a random-init Llama saved as a Hugging Face directory (safetensors shards) and a file
of token batches, then compiles it twice, each in its own process: whole-graph (the model
loaded, as without ``--max-memory``) and block by block (``--max-memory``). Reports per mode
the peak RSS of the process (``resource.getrusage``), the RSS after imports (what a process
holds before any model), wall time, and the adapters' agreement between the two modes.

    python benchmarks/onload.py --workdir /tmp/onload                 # ~1.8 GB fp32, 600MB
    python benchmarks/onload.py --layers 4 --hidden 256 --max-memory 20MB   # a quick look
    python benchmarks/onload.py --project     # Llama-3-8B / 70B on one 80 GB GPU, from shapes
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    # ru_maxrss survives exec: a child of a large parent would report the parent's peak, so
    # the parent stays small (the model is built in a process of its own).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def make(workdir: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = workdir / "llama"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
            vocab_size=vocab, tie_word_embeddings=False,
        )  # fmt: skip
        LlamaForCausalLM(cfg).save_pretrained(model_dir, max_shard_size="500MB")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (32, 32), generator=g)
    save_file({"input_ids": tokens}, workdir / "data.safetensors")
    return model_dir


def child(args: argparse.Namespace) -> None:
    """One compile in this process; prints a JSON line of its figures."""
    from evagraph.cli import main

    base = _rss_mb()
    argv = [
        "compile", str(args.model), "--data", str(args.data), "-o", str(args.out), "--quiet",
        "--batch-size", "4", "--max-steps", str(args.steps), "--budget", "8", "--force",
        "--device", "cpu",
    ]  # fmt: skip
    if args.bound:
        argv += ["--max-memory", args.bound]
    start = time.perf_counter()
    try:
        main.main(args=argv, standalone_mode=False)
    finally:
        wall = time.perf_counter() - start
        print(json.dumps({"base_mb": base, "peak_mb": _rss_mb(), "wall_s": wall}))


def _run(mode: str, model: Path, data: Path, out: Path, steps: int, max_memory: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--data", str(data)]
    cmd += ["--out", str(out), "--steps", str(steps)]
    if mode == "block":
        cmd += ["--bound", max_memory]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _agreement(a: Path, b: Path) -> float:
    """Smallest |cos| between the two modes' adapter A rows (1 = same directions)."""
    from safetensors.torch import load_file

    ta, tb = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    worst = 1.0
    for k, va in ta.items():
        if "lora_A" not in k or k not in tb or tb[k].shape != va.shape:
            continue
        cos = (va.flatten(1) * tb[k].flatten(1)).sum(1).abs()
        cos = cos / (va.flatten(1).norm(dim=1) * tb[k].flatten(1).norm(dim=1)).clamp_min(1e-12)
        worst = min(worst, float(cos.min()))
    return worst


# (hidden, intermediate, layers, kv width, vocab) of real models.
SHAPES = {
    "Llama-3-8B": (4096, 14336, 32, 1024, 128256),
    "Llama-3-70B": (8192, 28672, 80, 1024, 128256),
}


def projection(batch: int = 8, seq: int = 2048, batches: int = 64, k: int = 32) -> list[str]:
    """Block-by-block memory for real shapes in bf16 on one GPU, from the shapes alone.

    Device: the largest block's weights, one batch's largest transient (the MLP's
    intermediate activations, twice: gate and up) and the block's statistics (four
    decompositions of the low-rank statistic, ``benchmarks/memory.py``). Host: the values
    passed between blocks for every batch (hidden states, bf16; rotary cos/sin).
    """
    sys.path.insert(0, str(Path(__file__).parent))
    from memory import evagraph_bytes

    gb = 2**30
    rows = [
        f"- bf16 weights; {batches} calibration batches of {batch} x {seq} tokens; k = {k}",
        "",
        "| model | whole model GB | largest block GB (layer / embedding) | device peak GB | "
        "host cache GB |",
        "|---|---|---|---|---|",
    ]
    for name, (h, inter, layers, kv, vocab) in SHAPES.items():
        layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * inter)
        embed = 2 * vocab * h
        whole = layers * layer + 2 * embed
        stats = sum(evagraph_bytes(d, k) for d in (h, h, h, inter))
        transient = 2 * 2 * batch * seq * inter + 4 * 2 * batch * seq * h
        device = max(layer, embed) + transient + stats
        host = batches * (2 * batch * seq * h + 2 * 2 * batch * seq * 128)
        rows.append(
            f"| {name} | {whole / gb:.1f} | {layer / gb:.2f} / {embed / gb:.2f} | "
            f"{device / gb:.1f} | {host / gb:.1f} |"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/evagraph-onload"))
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=38)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--max-memory", default="600MB")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--project", action="store_true", help="only the 8B / 70B projection")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bound", default=None, help=argparse.SUPPRESS)  # the child's --max-memory
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.project:
        print("\n".join(projection()))
        return
    if args.make:
        make(args.workdir, args.hidden, args.intermediate, args.layers, args.vocab)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate)]
    sizes += ["--layers", str(args.layers), "--vocab", str(args.vocab)]
    built = subprocess.run(
        [sys.executable, __file__, "--make", "--workdir", str(args.workdir)] + sizes
    )
    if built.returncode:
        raise SystemExit("building the model failed")
    model = args.workdir / "llama"
    on_disk = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    rows = {}
    for mode in ("whole", "block"):
        out = args.workdir / f"out-{mode}"
        data = args.workdir / "data.safetensors"
        rows[mode] = _run(mode, model, data, out, args.steps, args.max_memory)
    agree = _agreement(args.workdir / "out-whole", args.workdir / "out-block")
    print(f"model on disk: {on_disk:.0f} MiB; --max-memory {args.max_memory}; "
          f"{args.steps} batches of 4 x 32 tokens; CPU")  # fmt: skip
    print("| mode | peak RSS MB | RSS after imports MB | peak - imports MB | wall s |")
    print("|---|---|---|---|---|")
    for mode, r in rows.items():
        name = "whole-graph (model loaded)"
        if mode == "block":
            name = f"block by block (--max-memory {args.max_memory})"
        print(f"| {name} | {r['peak_mb']:.0f} | {r['base_mb']:.0f} | "
              f"{r['peak_mb'] - r['base_mb']:.0f} | {r['wall_s']:.1f} |")  # fmt: skip
    print(f"adapters: smallest |cos| between the modes' A rows: {agree:.6f}")
    if not args.workdir.name.startswith("keep"):
        for mode in ("whole", "block"):
            shutil.rmtree(args.workdir / f"out-{mode}", ignore_errors=True)


if __name__ == "__main__":
    main()
