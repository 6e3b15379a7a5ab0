"""Side-by-side benchmark of EVA calibration: plain forward passes, evagraph, PEFT.

    python benchmarks/calibration.py                       # the reference config, CPU
    python benchmarks/calibration.py --hidden 1024 --layers 8 --device cuda --dtype bfloat16

One run times, on the same model, data and settings: (a) plain forward passes over the
batches evagraph consumed, (b) evagraph's calibration (``evagraph.calibrate``), (c) PEFT's
``get_eva_state_dict`` with its defaults. Each runs in its own process, so peak memory
(CPU: peak RSS above the process's state after loading model and data; CUDA: peak
allocated) is its own. Components are then compared with the exact PCA (float64) of the
rows each method saw. A table goes to stdout and to ``--out`` (default
benchmarks/results.md) with the machine and the command.

Model: Llama-style (``LlamaForCausalLM``, random init, ``use_cache=False``); data: token
batches drawn from a Zipf-like distribution; targets: all seven projection types.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args, data_seed: int | None = None):
    """The model, and ``args.batches`` batches drawn with ``data_seed`` (default: the seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, use_cache=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval().to(args.device, getattr(torch, args.dtype))
    g = torch.Generator().manual_seed(args.seed if data_seed is None else data_seed)
    p = 1.0 / torch.arange(1, args.vocab + 1).float() ** 1.1
    batches = []
    for _ in range(args.batches):
        ids = torch.multinomial(p, args.batch * args.seq, replacement=True, generator=g)
        ids = ids.reshape(args.batch, args.seq).to(args.device)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return model, batches


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_mb(device, rss0_kb):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0_kb) / 1024


def worker(args) -> dict:
    """Run one method in this process and return its measurements."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, batches = build(args)
    _sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict = {}
    if args.worker == "forward":
        with torch.no_grad():
            model(**batches[0])  # warm-up, as both methods get one
            _sync(args.device)
            t = time.perf_counter()
            for b in batches[: args.steps]:
                model(**b)
            _sync(args.device)
            out["seconds"] = time.perf_counter() - t
        out["forwards"] = args.steps
    elif args.worker == "evagraph":
        import evagraph

        t = time.perf_counter()
        state = evagraph.calibrate(
            model, batches, budget=args.r, rho=args.rho, tau=args.tau, progress=False,
            targets=[f"*.{n}" for n in TARGETS],
        )  # fmt: skip
        _sync(args.device)
        out["seconds"] = time.perf_counter() - t
        out["forwards"] = state.steps
        ranks = state.ranks(args.r, args.rho)
        out["ranks"] = ranks
        out["components"] = {
            m: state.components[g].components[: ranks[m]].float().cpu().tolist()
            for m, g in state.layer_group.items()
        }
        out["batches"] = {m: state.batches[g] for m, g in state.layer_group.items()}
        out["converged"] = not state.unconverged
    elif args.worker == "peft":
        import peft
        from peft.tuners.lora import eva

        seen: dict[str, list[int]] = {}
        calls = [0]
        original = eva.SVDHook.__call__

        def record(self, module, inputs, output):  # which forward fed which layer
            seen.setdefault(self.name, []).append(calls[0] - 1)
            return original(self, module, inputs, output)

        def forward_fn(m, inputs):
            calls[0] += 1
            return m(**inputs)

        eva.SVDHook.__call__ = record
        config = peft.LoraConfig(
            r=args.r, target_modules=TARGETS, init_lora_weights="eva",
            eva_config=peft.EvaConfig(rho=args.rho, tau=args.tau),
        )  # fmt: skip
        t = time.perf_counter()
        state = peft.get_eva_state_dict(
            model, batches, config, forward_fn=forward_fn, show_progress_bar=False
        )
        _sync(args.device)
        out["seconds"] = time.perf_counter() - t
        out["forwards"] = calls[0]
        out["ranks"] = {k: v.shape[0] for k, v in state.items()}
        out["components"] = {k: v.float().cpu().tolist() for k, v in state.items()}
        # PEFT cycles the data: forward i used batch i - 1 mod n (forward 0 hashes inputs)
        out["batch_ids"] = {k: [(i - 1) % len(batches) for i in v] for k, v in seen.items()}
        out["converged"] = True
    out["peak_mb"] = _peak_mb(args.device, rss0)
    return out


def run_worker(name: str, argv: list[str], steps: int | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, __file__, *argv, "--worker", name, "--result", path]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    subprocess.run(cmd, check=True)
    result = json.loads(Path(path).read_text())
    os.unlink(path)
    return result


def exact_similarities(args, ranks: dict, components: dict, batch_ids: dict) -> dict[str, float]:
    """Subspace similarity of each layer's components to the exact PCA of the rows it saw."""
    model, batches = build(args)
    model = model.float()
    sims = {}
    names = [n for n in ranks if ranks[n] > 0]
    grams: dict[str, list] = {n: [0, 0.0, 0.0] for n in names}  # rows, sum, x^T x (float64)
    current: list = [None]

    cache: list = [None, None]  # layers reading one tensor (q/k/v) share its x^T x

    def hook(name):
        def fn(module, inputs):
            if current[0] in batch_ids[name]:
                if cache[0] is not inputs[0]:  # identity, and held so it cannot be reused
                    x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                    cache[:] = [inputs[0], (x.shape[0], x.sum(0), x.T @ x)]
                rows, total, xtx = cache[1]
                times = batch_ids[name].count(current[0])  # PEFT may see a batch twice
                g = grams[name]
                g[0] += times * rows
                g[1] = g[1] + times * total
                g[2] = g[2] + times * xtx

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for i, b in enumerate(batches):
            current[0] = i
            if any(i in batch_ids[n] for n in names):
                model(**b)
    for h in handles:
        h.remove()
    for n in names:
        reference, _ = exact_pca(*grams[n], ranks[n])
        sims[n] = similarity(torch.tensor(components[n]).to(reference.device), reference)
    return sims


def exact_pca(rows: int, total: torch.Tensor, xtx: torch.Tensor, k: int):
    """Top-k components (rows) and explained-variance ratios of the rows whose count, sum and
    ``x^T x`` (float64) are given: the exact PCA methods are compared with."""
    mean = total / rows
    cov = (xtx - rows * torch.outer(mean, mean)) / (rows - 1)
    ev, vecs = torch.linalg.eigh(cov)
    return vecs.flip(1)[:, :k].T, ev.flip(0)[:k] / ev.sum()


def similarity(components: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the spans of two sets of rows
    (``reference`` orthonormal): 1.0 for the same subspace."""
    q, _ = torch.linalg.qr(components.double().T)
    return float(torch.linalg.svdvals(q.T @ reference.T).pow(2).mean())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    import peft

    import evagraph

    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, "
        f"peft {peft.__version__}, evagraph {evagraph.__version__}"
    )


def header(title: str, model: str) -> list[str]:
    """A results section's heading: title, the command that ran (this script's own
    arguments), the machine and the model line."""
    script = Path(sys.argv[0]).name
    cmd = f"python benchmarks/{script} {shlex.join(sys.argv[1:])}".rstrip()
    return [f"### {title}", "", f"- command: `{cmd}`", f"- machine: {machine()}", model, ""]


def model_line(args, extra: str) -> str:
    return (
        f"- model: Llama-style, {args.layers} layers, hidden {args.hidden}, intermediate "
        f"{args.intermediate}, {args.heads} heads, vocab {args.vocab}, {args.dtype}, "
        f"{args.device}; batches {args.batch} x {args.seq} Zipf tokens; r={args.r}, "
        f"rho={args.rho}, tau={args.tau}; {extra}"
    )


def publish(lines: list[str], out: str | Path) -> None:
    """Print a results section and append it to ``out``."""
    text = "\n".join(lines) + "\n"
    print(text)
    with Path(out).open("a") as f:
        f.write("\n" + text)


def parser(**kwargs) -> argparse.ArgumentParser:
    """The model, data and settings options (shared with the other benchmark scripts)."""
    p = argparse.ArgumentParser(**kwargs)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", type=int, default=200, help="calibration batches available")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rho", type=float, default=2.0)
    p.add_argument("--tau", type=float, default=0.99)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--methods", default="evagraph,peft", help="which of evagraph,peft to run")
    p.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    p.add_argument("--title", default=None, help="heading for this run in --out")
    p.add_argument("--no-quality", action="store_true", help="skip the exact-PCA comparison")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main() -> None:
    p = parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    args = p.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return

    argv = [a for a in sys.argv[1:]]
    methods = args.methods.split(",")
    results = {}
    for m in methods:
        print(f"running {m} ...", file=sys.stderr, flush=True)
        results[m] = run_worker(m, argv)
    for m in methods:
        results[f"forward ({m})"] = run_worker("forward", argv, steps=results[m]["forwards"])
        print(
            f"{m}: {results[m]['seconds']:.1f} s, {results[m]['forwards']} forwards, "
            f"plain {results[f'forward ({m})']['seconds']:.1f} s, "
            f"peak {results[m]['peak_mb']:.0f} MB",
            file=sys.stderr,
            flush=True,
        )
    if not args.no_quality:
        for m in methods:
            r = results[m]
            ids = r.get("batch_ids") or {
                n: [i for a, b in runs for i in range(a, b)] for n, runs in r["batches"].items()
            }
            if m == "peft":  # layers PEFT shares a hook with: use the hook's batches
                for n in r["ranks"]:
                    ids.setdefault(n, next(iter(ids.values())))
            r["sims"] = exact_similarities(args, r["ranks"], r["components"], ids)

    title = args.title or "Calibration: evagraph vs PEFT"
    lines = [
        *header(title, model_line(args, f"targets: {', '.join(TARGETS)}")),
        "| method | wall s | forward passes | s / forward | x plain forwards | peak MB "
        "| mean subspace sim. to exact PCA | converged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        r, f = results[m], results[f"forward ({m})"]
        sim = f"{sum(r['sims'].values()) / len(r['sims']):.6f}" if "sims" in r else "not measured"
        lines.append(
            f"| {m} | {r['seconds']:.1f} | {r['forwards']} | {r['seconds'] / r['forwards']:.3f} "
            f"| {r['seconds'] / f['seconds']:.2f} | {r['peak_mb']:.0f} | {sim} "
            f"| {'yes' if r['converged'] else 'no (bound hit)'} |"
        )
        lines.append(
            f"| plain forward x {f['forwards']} | {f['seconds']:.1f} | {f['forwards']} "
            f"| {f['seconds'] / f['forwards']:.3f} | 1.00 | {f['peak_mb']:.0f} | | |"
        )
    if "evagraph" in results and "peft" in results:
        ours, theirs = results["evagraph"], results["peft"]
        equal = sum(ours["ranks"][n] == theirs["ranks"].get(n) for n in ours["ranks"])
        lines += [
            "",
            f"- evagraph vs PEFT: **{theirs['seconds'] / ours['seconds']:.1f}x faster**, "
            f"peak memory {ours['peak_mb']:.0f} MB vs {theirs['peak_mb']:.0f} MB, "
            f"per-layer ranks equal for {equal}/{len(ours['ranks'])} layers.",
        ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
