"""The GPU suite, in one command: the GPU-marked tests, then evagraph vs PEFT on CUDA in bf16.

    python benchmarks/gpu_suite.py              # on a machine with CUDA (about 10 minutes)
    python benchmarks/gpu_suite.py --smoke      # tiny shapes on whatever device there is

Runs ``pytest -m gpu`` and then ``benchmarks/calibration.py``'s side-by-side comparison at
two shapes: a 1B-class model (hidden 2048, intermediate 8192, 8 layers; Llama-3.2-1B's
widths) and Llama-3-8B's widths (hidden 4096, intermediate 14336, 2 layers), bfloat16,
batches of 4 x 128 tokens, r = 8, rho = 2, each method in its own process. Reports wall
time, forward passes, ``torch.cuda.max_memory_allocated`` per method and quality (against
the exact PCA of the rows seen and of held-out minibatches), and appends its table to
``--out`` (default benchmarks/results.md). ``--smoke`` runs the same code at toy sizes and
skips the tests, so the suite can be checked without a GPU (``tests/test_benchmarks.py``).
Then ``benchmarks/host_syncs.py`` (host syncs per minibatch, to stdout); last,
``benchmarks/limit.py --device cuda``: every case of its matrix (vision models at 224, the
8B-width Llama, SmolLM2), calibration per minibatch against the plain forward on CUDA, PEFT
beside it, appended to the same file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
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


def main() -> None:
    p = parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.set_defaults(batch=4, seq=128, r=8, rho=2.0, vocab=32000, dtype="bfloat16", heldout=32)
    p.add_argument("--smoke", action="store_true", help="toy shapes, no tests: any device")
    base = p.parse_args()
    cuda = torch.cuda.is_available()
    base.device = "cuda" if cuda else "cpu"
    if not cuda:
        base.dtype = "float32"  # bf16 matmuls on a CPU measure nothing of interest
    if not base.smoke:
        if not cuda:
            sys.exit("the GPU suite needs CUDA (use --smoke to check it runs without)")
        tests = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", str(ROOT / "tests")]
        print("GPU tests:", " ".join(tests), file=sys.stderr, flush=True)
        subprocess.run(tests, check=True, cwd=ROOT)

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
    if not base.smoke:  # host syncs per minibatch, by source line (stdout)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_syncs.py")], cwd=ROOT)
    # Then issue 32's matrix (``limit.py``): calibration per minibatch against the forward.
    cases = ["tiny_llama"] if base.smoke else []  # the toy case only, on any device
    limit = [sys.executable, str(ROOT / "benchmarks" / "limit.py"), "--device", base.device]
    limit += ["--repeats", "1" if base.smoke else "2", f"--out={base.out}"]
    subprocess.run(limit + (["--cases", *cases] if cases else []), check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
