"""The GPU suite, in one command: the GPU-marked tests, host syncs, the matrix, then evagraph
vs PEFT on CUDA in bf16, each stage under its own time limit and written as it finishes.

    python benchmarks/gpu_suite.py              # on a machine with CUDA (about 10 minutes)
    python benchmarks/gpu_suite.py --smoke      # tiny shapes on whatever device there is

Ordered by what a short GPU lease should bring back first (the first one, 9 minutes of an
H100, ran out before the side-by-side), every stage under ``--stage-timeout`` seconds and
appended to ``--out`` (default benchmarks/results.md) as soon as it ends, so that a lease cut
short still returns what ran:

1. ``pytest -m gpu`` on the CUDA test files (pass/fail summary);
2. ``benchmarks/host_syncs.py``: host syncs per minibatch, by source line; and
   ``benchmarks/solver_latency.py``: the statistic's products against its QR and eigh
   (per layer, batched, on the host) at ViT-S's shapes;
3. ``benchmarks/limit.py --device cuda``, one case at a time (vision models at 224, the
   8B-width Llama in bf16 and float32; SmolLM2 where its cache exists): calibration per
   minibatch against the plain forward on CUDA, PEFT beside it, as one table;
4. ``benchmarks/calibration.py``'s side by side at two shapes: a 1B-class model (hidden 2048,
   intermediate 8192, 8 layers; Llama-3.2-1B's widths) and Llama-3-8B's widths (hidden 4096,
   intermediate 14336, 2 layers), bfloat16, batches of 4 x 128 tokens, r = 8, rho = 2, each
   method in its own process: wall time, forward passes, ``torch.cuda.max_memory_allocated``
   per method and quality (against the exact PCA of the rows seen and of held-out
   minibatches).

``--smoke`` runs stages 3 and 4 at toy sizes and skips 1 and 2, so the suite can be checked
without a GPU (``tests/test_benchmarks.py``).

SmolLM2 on a lease: its GGUF file (98 MB) is over what one call carries (64 MiB with the
tree), and a lease cannot reach PyPI. Split it here (``split -b 45M FILE .gpu/gguf.``, an
ignored folder), carry ``.gpu/gguf.aa`` in one call that copies it outside the tree
(``mkdir -p /root/g && cp .gpu/gguf.aa /root/g/``), then, within the machine's 30 s warm
window, carry ``.gpu/gguf.ab`` and begin with ``G=/root/g/SmolLM2-135M-Instruct.Q4_1.gguf;
cat /root/g/gguf.aa .gpu/gguf.ab > $G && export EVAGRAPH_GGUF=$G`` (the ``gguf`` package
travels as a wheel); ``benchmarks/real.py`` converts it there.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from calibration import compare, header, parser, publish, side_by_side, worker_argv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "1B-class (Llama-3.2-1B widths)": dict(hidden=2048, intermediate=8192, layers=8, heads=32),
    "Llama-3-8B widths": dict(hidden=4096, intermediate=14336, layers=2, heads=32),
}
SMOKE = {"toy": dict(hidden=32, intermediate=64, layers=1, heads=2, vocab=200, seq=16)}


def _stage(name: str, cmd: list[str], timeout: float) -> str:
    """Run one stage's command; its output (stdout and stderr), or why it stopped."""
    print(f"{name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        return f"{out}\n(stopped after {timeout:.0f} s: --stage-timeout)"
    return done.stdout + (
        f"\n(exit {done.returncode})\n{done.stderr[-2000:]}" if done.returncode else ""
    )


def _real_available() -> bool:
    """Whether SmolLM2's float directory exists or can be made here (``benchmarks/real.py``)."""
    import real

    try:
        real.model_dir("float32")
    except Exception:  # the package, gguf or the file missing: the case is skipped, said why
        return False
    return True


def _matrix(base, timeout: float) -> list[str]:
    """``limit.py`` one case per process group, under the time limit each; one table."""
    import limit

    cases = ["tiny_llama"] if base.smoke else limit.CASES
    args = argparse.Namespace(n0=2, n1=8 if not base.smoke else 3, repeats=1, device=base.device)
    raw, missed = {}, []
    for case in cases:
        if case == "smollm2" and not base.smoke and not _real_available():
            missed.append(f"{case} (no cached model)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(ROOT / "benchmarks" / "limit.py"), "--device", base.device,
                   "--cases", case, "--repeats", "1", "--n0", str(args.n0), "--n1", str(args.n1),
                   "--no-write", "--json", f"{tmp}/raw.json"]  # fmt: skip
            log = _stage(f"matrix: {case}", cmd, timeout)
            if Path(f"{tmp}/raw.json").is_file():
                raw.update(json.loads(Path(f"{tmp}/raw.json").read_text()))
            else:
                missed.append(
                    f"{case} ({log.strip().splitlines()[-1] if log.strip() else 'no output'})"
                )
    cmd = f"python benchmarks/limit.py --device {base.device} --cases CASE --repeats 1 "
    cmd += f"--n0 {args.n0} --n1 {args.n1}"  # one process group per case (gpu_suite.py)
    table = limit.render(raw, args, cmd) if raw else "## Calibration against the forward pass\n"
    return [table, *(["Not measured: " + "; ".join(missed), ""] if missed else [])]


def main() -> None:
    p = parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.set_defaults(batch=4, seq=128, r=8, rho=2.0, vocab=32000, dtype="bfloat16", heldout=32)
    p.add_argument("--smoke", action="store_true", help="toy shapes, no tests: any device")
    p.add_argument("--stage-timeout", type=float, default=150, help="seconds per stage / case")
    base = p.parse_args()
    cuda = torch.cuda.is_available()
    base.device = "cuda" if cuda else "cpu"
    if not cuda:
        base.dtype = "float32"  # bf16 matmuls on a CPU measure nothing of interest
    limit_s = base.stage_timeout
    if not base.smoke:
        if not cuda:
            sys.exit("the GPU suite needs CUDA (use --smoke to check it runs without)")
        files = [str(ROOT / "tests" / f) for f in ("test_gpu.py", "test_quantized.py")]
        tests = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
        log = _stage("GPU tests", tests + files, limit_s)
        publish(["## GPU suite: tests", "", "```", *log.strip().splitlines()[-3:], "```"], base.out)
        syncs = _stage(
            "host syncs", [sys.executable, str(ROOT / "benchmarks" / "host_syncs.py")], limit_s
        )
        publish(
            ["## GPU suite: host syncs per minibatch", "", "```", syncs.strip(), "```"], base.out
        )
        cmd = [sys.executable, str(ROOT / "benchmarks" / "solver_latency.py")]
        publish([_stage("solver latency", cmd, limit_s).strip()], base.out)
    publish(_matrix(base, limit_s), base.out)

    lines = [
        *header(
            "GPU suite: evagraph vs PEFT" + (" (smoke run)" if base.smoke else ""),
            f"- {base.dtype}, {base.device}; batches {base.batch} x {base.seq} Zipf tokens, "
            f"vocab {base.vocab}; r={base.r}, rho={base.rho}, tau={base.tau}; quality "
            f"against {base.heldout} held-out minibatches; peak MB: "
            "torch.cuda.max_memory_allocated on CUDA",
        ),
    ]
    rows = []
    for name, shape in (SMOKE if base.smoke else SHAPES).items():
        args = argparse.Namespace(**{**vars(base), **shape})
        print(f"{name} ...", file=sys.stderr, flush=True)
        label = f"{name}: {args.hidden} / {args.intermediate} x {args.layers}"
        rows.append((label, compare(args, worker_argv(args))))
    lines += side_by_side("shape", rows)
    publish(lines, base.out)


if __name__ == "__main__":
    main()
