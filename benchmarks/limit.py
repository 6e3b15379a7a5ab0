"""Calibration against its physical limit: cost per minibatch next to the plain forward pass.

    python benchmarks/limit.py                         # every case, CPU, writes results.md
    python benchmarks/limit.py --cases resnet18 smollm2 --repeats 1 --no-write

For each case (model, data, targets) three methods run, each in its own process, alternated
(forward, evagraph, peft, forward, evagraph, peft, ... ``--repeats`` rounds) so that load on
the machine weighs on all alike; CPU seconds (``time.process_time``), one torch thread:

- forward: the plain forward pass of the same batches (no_grad), seconds per batch;
- evagraph: ``evagraph.calibrate`` over ``--n0`` and then ``--n1`` batches at tau = 0.99999,
  so that no layer converges and nothing is sliced away: the difference divided by
  ``n1 - n0`` is the *marginal* cost of a minibatch with every statistic updated (the worst
  case; fixed costs, capture and the final solve, cancel). Timers around evagraph's own
  functions split it into parts (below);
- peft: PEFT's ``get_eva_state_dict`` the same way (linear targets only: PEFT's EVA does
  not take convolutions), where PEFT's EVA applies. PEFT cycles the data until its layers
  converge, so its run is stopped after its hashing forward and ``n`` minibatches.

Parts of evagraph's minibatch (self CPU time per minibatch, as a fraction of the plain
forward): ``rows``: the probe's row preparation and the statistic's masking, scaling and
centring; ``products``: the statistics' products over the rows (and the exact statistic's
second moment); ``qr``, ``eigh``: the decompositions (the exact statistic's solver included);
``estimate``: current components and convergence flags; ``allocate``: the rank allocation
pass. The rest of the minibatch is the probed graph itself. On the CPU there is no host sync
to count.

``--device cuda`` (``benchmarks/gpu_suite.py`` runs it): the models in bfloat16 (but
llama8b_f32), wall seconds after ``torch.cuda.synchronize``, all of the GPU's host threads;
the parts are not split there (their kernels run asynchronously). ``benchmarks/host_syncs.py``
counts the host syncs. On every device each method calibrates once before it is timed: the
first calls import and load what later calls reuse (without it the marginal came out negative
on an H100, and on a loaded CPU for the tiny cases).

Cases: timm's resnet18, resnet50, convnext_tiny, vit_small and vit_base at 224 (random init,
Gaussian images, batch 8: PEFT does convs not, so for the CNNs only evagraph runs); a
2-layer Llama of Llama-3-8B widths (4096 / 14336, 32 / 8 heads, vocab 32000) in bfloat16
and float32 on 4 x 128 uniform tokens, a quarter of each batch's tokens padding; and the
real SmolLM2-135M-Instruct (``benchmarks/real.py``) on real English text, 4 x 128 packed.
Budget 8 and rho 2 (k = 16 components) for the language models, 16 and 2 for vision.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/real.py

LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "convnext_tiny": "convnext_tiny",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
CASES = [*VISION, "llama8b_bf16", "llama8b_f32", "smollm2"]
TINY = ["tiny_resnet", "tiny_llama"]  # the same paths at toy sizes (the test's)
CONVS = {"resnet18", "resnet50", "convnext_tiny", "tiny_resnet"}  # PEFT's EVA takes no conv


def build(case: str, n: int) -> tuple[torch.nn.Module, list, dict]:
    """The model, ``n`` batches and the calibrate() keywords of ``case``."""
    torch.manual_seed(0)
    if case in VISION or case == "tiny_resnet":
        import timm

        model = timm.create_model(VISION.get(case, "resnet18"), pretrained=False).eval()
        g = torch.Generator().manual_seed(1)
        size, images, budget = (224, 8, 16) if case in VISION else (64, 4, 4)
        batches = [torch.randn(images, 3, size, size, generator=g) for _ in range(n)]
        targets = ["*.qkv", "*.proj", "*.fc1", "*.fc2"] if case.startswith("vit") else None
        return model, batches, {"budget": budget, "rho": 2, "targets": targets}
    targets = [f"*.{t}" for t in LLM_TARGETS]
    if case == "smollm2":
        import real
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(real.model_dir("float32")).eval()
        model.config.use_cache = False
        return model, real.token_batches("calibration", n, 4, 128), {"targets": targets}
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=8, use_cache=False,
    )  # fmt: skip
    if case == "tiny_llama":
        config = LlamaConfig(
            vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, use_cache=False,
        )  # fmt: skip
    model = LlamaForCausalLM(config).eval().to(dtype)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 32000, (4, 128), generator=g)
        mask = torch.ones(4, 128, dtype=torch.long)
        for i, length in enumerate(torch.randint(64, 129, (4,), generator=g).tolist()):
            mask[i, length:] = 0  # right padding: a quarter of the tokens on average
        batches.append({"input_ids": ids, "attention_mask": mask})
    return model, batches, {"targets": targets}


class _Enough(Exception):
    """Raised in PEFT's forward once it had its minibatches."""


def _clock(device: str) -> float:
    """CPU seconds on the CPU; on CUDA wall seconds after the queued kernels finished."""
    if device == "cpu":
        return time.process_time()
    torch.cuda.synchronize()
    return time.perf_counter()


def _to(batch, device: str, dtype: torch.dtype | None):
    """A batch on ``device``; images (float tensors) in the model's ``dtype``."""
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return batch.to(device, dtype)


def _call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _timers() -> collections.Counter:
    """Wrap evagraph's parts in CPU timers of their self time (a part's time excludes the
    parts it calls); returns the accumulator."""
    from evagraph.passes import probe
    from evagraph.pipelines import calibrator
    from evagraph.stats import exact, lowrank

    acc: collections.Counter = collections.Counter()
    inner = [0.0]  # time of the timed parts called by the one running

    def wrap(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            outer, inner[0] = inner[0], 0.0
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.process_time() - start
                acc[label] += spent - inner[0]
                inner[0] = outer + spent

        setattr(owner, name, timed)

    wrap(probe.Probe, "forward", "rows")
    wrap(lowrank.IncrementalSVD, "update", "rows")  # masking, scaling, centring
    wrap(exact.ExactCovariance, "update", "products")
    wrap(lowrank.IncrementalSVD, "_absorb", "products")
    wrap(lowrank.IncrementalSVD, "_solved", "products")
    wrap(torch.linalg, "qr", "qr")
    wrap(torch.linalg, "eigh", "eigh")
    wrap(calibrator.Calibrator, "estimate", "estimate")
    wrap(calibrator.Calibrator, "allocate", "allocate")
    return acc


def worker(args) -> dict:
    device = args.device
    if device == "cpu":
        torch.set_num_threads(1)
    model, batches, kwargs = build(args.case, args.n1)
    if device != "cpu":  # on CUDA in bfloat16, but a case that names float32
        dtype = torch.float32 if args.case.endswith("f32") else torch.bfloat16
        model = model.to(device, dtype)
        batches = [_to(b, device, dtype) for b in batches]
    clock = functools.partial(_clock, device)
    out: dict = {}
    with torch.no_grad():
        _call(model, batches[0])  # warm-up
    if args.worker == "forward":
        start = clock()
        with torch.no_grad():
            for batch in batches[: args.n1 - args.n0]:
                _call(model, batch)
        out["per_batch"] = (clock() - start) / (args.n1 - args.n0)
        return out
    if args.worker == "evagraph":
        import evagraph

        # On CUDA the parts' host times would not hold their (asynchronous) kernels.
        acc = _timers() if device == "cpu" else collections.Counter()

        def run(n: int) -> tuple[float, int, dict]:
            acc.clear()
            start = clock()
            state = evagraph.calibrate(
                model, batches[:n], tau=0.99999, progress=False,
                conv_stride=args.conv_stride, max_rows=args.max_rows, **kwargs,
            )  # fmt: skip
            return clock() - start, state.steps, dict(acc)
    else:
        import peft

        config = peft.LoraConfig(
            r=kwargs.get("budget", 8), target_modules=_peft_targets(args.case),
            init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2, tau=0.99999),
        )  # fmt: skip

        def run(n: int) -> tuple[float, int, dict]:
            start = clock()
            forwards = peft_minibatches(model, batches[:n], config, n, vision=args.case in VISION)
            return clock() - start, forwards, {}

    # Not per batch: the first calls import torch.export's machinery (and on CUDA load
    # cuSOLVER/cuBLAS and their kernels); left in the first timed run, they made the marginal
    # negative on an H100 and on a loaded CPU.
    run(args.n0)
    t0, s0, p0 = run(args.n0)
    t1, s1, p1 = run(args.n1)
    steps = s1 - s0
    out["per_batch"] = (t1 - t0) / steps
    out["parts"] = {k: (p1[k] - p0.get(k, 0.0)) / steps for k in p1}
    out["steps"] = [s0, s1]
    return out


def _peft_targets(case: str) -> list[str]:
    return ["qkv", "proj", "fc1", "fc2"] if case.startswith("vit") else LLM_TARGETS


def peft_minibatches(model, batches: list, config, n: int, vision: bool = False) -> int:
    """PEFT's ``get_eva_state_dict`` on ``model`` stopped after its hashing forward and ``n``
    minibatches (it cycles the data until its layers converge); returns the forwards run.

    Stopped by an exception, PEFT leaves its SVD hooks on the model (it removes them only on
    the way out of a finished run), and every later run in the process would pay for them
    again on each forward: they are removed here. (Until stop 43 they were not, which
    inflated PEFT's marginal in this benchmark's tables by about twice its SVD work.)
    """
    from peft.tuners.lora import eva

    calls = [0]

    def forward_fn(m, inputs):
        if calls[0] == n + 1:
            raise _Enough
        calls[0] += 1
        return _call(m, inputs)

    # Images: every row counts (its defaults take a language model's attention mask).
    options = {"prepare_model_inputs_fn": None, "prepare_layer_inputs_fn": None} if vision else {}
    try:
        with contextlib.suppress(_Enough):
            eva.get_eva_state_dict(
                model, batches, config, forward_fn=forward_fn, show_progress_bar=False, **options
            )
    finally:
        for module in model.modules():
            for key, hook in list(module._forward_hooks.items()):
                if isinstance(hook, eva._Hook):
                    del module._forward_hooks[key]
    return calls[0]


def run_worker(argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    subprocess.run([sys.executable, __file__, *argv, "--result", path], check=True)
    result = json.loads(Path(path).read_text())
    os.unlink(path)
    return result


def parts_row(parts: dict, forward: float) -> str:
    """The split of evagraph's minibatch, each part over the plain forward."""
    if not parts:
        return "n/a (CUDA: asynchronous)"
    names = ("rows", "products", "qr", "eigh", "estimate", "allocate")
    return " ".join(f"{k} {parts.get(k, 0.0) / forward:.2f}" for k in names)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES + TINY)
    parser.add_argument("--n0", type=int, default=2, help="batches of the first run")
    parser.add_argument("--n1", type=int, default=5, help="batches of the second run")
    parser.add_argument("--repeats", type=int, default=2, help="alternated rounds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.md"))
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--json", help="also write the raw measurements here")
    parser.add_argument(
        "--device", default="cpu", help="cuda: bfloat16 (but llama8b_f32), wall seconds"
    )
    parser.add_argument(
        "--conv-stride", type=int, help="evagraph's conv_stride (default: chosen per layer)"
    )
    parser.add_argument("--max-rows", type=int, help="evagraph's max_rows (default: every row)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["forward", "evagraph", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return
    raw: dict = {}
    for case in args.cases:
        methods = ["forward", "evagraph"] + ([] if case in CONVS else ["peft"])
        runs: dict = {m: [] for m in methods}
        for _ in range(args.repeats):
            for m in methods:
                common = ["--case", case, "--n0", str(args.n0), "--n1", str(args.n1)]
                common += ["--device", args.device]
                if args.conv_stride is not None:
                    common += ["--conv-stride", str(args.conv_stride)]
                if args.max_rows is not None:
                    common += ["--max-rows", str(args.max_rows)]
                runs[m].append(run_worker([*common, "--worker", m]))
                print(case, m, f"{runs[m][-1]['per_batch']:.3f} s", flush=True)
        raw[case] = runs
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    table = render(raw, args)
    print(table)
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write("\n" + table)


def _best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["per_batch"])  # the least disturbed by load


def render(raw: dict, args, cmd: str | None = None) -> str:
    """The markdown table of ``raw`` (case -> method -> runs), headed by the command."""
    cmd = cmd or "python benchmarks/limit.py " + shlex.join(sys.argv[1:])
    where = "CPU, one thread per process, CPU seconds"
    if args.device != "cpu":
        where = f"{torch.cuda.get_device_name()}, bfloat16 (llama8b_f32: float32), wall seconds"
    lines = [
        "## Calibration against the forward pass (`benchmarks/limit.py`)",
        "",
        f"`{cmd}`; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {where}, seconds per minibatch "
        f"(marginal: runs of {args.n0} and {args.n1} minibatches, tau 0.99999 so nothing "
        f"converges or is sliced away), best of {args.repeats} alternated rounds.",
        "",
        "| case | forward s | evagraph s (x fwd) | statistics (x fwd) | PEFT s (x fwd) | "
        "evagraph vs PEFT | evagraph's parts (x fwd) |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, runs in raw.items():
        fwd = _best(runs["forward"])["per_batch"]
        eva = _best(runs["evagraph"])
        peft = _best(runs["peft"])["per_batch"] if "peft" in runs else None
        peft_cell = f"{peft:.3f} ({peft / fwd:.2f}x)" if peft else "n/a (convs)"
        speed = f"{peft / eva['per_batch']:.2f}x faster" if peft else "n/a"
        stats = f"{sum(eva['parts'].values()) / fwd:.2f}" if eva["parts"] else "n/a"
        lines.append(
            f"| {case} | {fwd:.3f} | {eva['per_batch']:.3f} ({eva['per_batch'] / fwd:.2f}x) "
            f"| {stats} | {peft_cell} | {speed} | {parts_row(eva['parts'], fwd)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
