"""Peak memory of calibrating and training LoRA on a 4-bit (and 8-bit) base vs a float one.

Takes the real SmolLM2-135M-Instruct (float32, ``benchmarks/real.py``) and real text (the
standard library's docstrings), and runs each case in a fresh process of its own:

- calibration, ``budget`` / ``rho`` over the seven projections, on ``--calib`` batches:
  ``calibrate float`` (``transform`` of the float model, which saves the adapter the training
  cases use), ``float -> nf4`` (the documented QLoRA path: calibrate the float model, free it,
  load the nf4 base with ``BitsAndBytesConfig`` on the CPU, ``adapt`` it with that state) and
  ``calibrate nf4`` (``transform`` of the nf4-loaded model itself);
- training, ``--steps`` AdamW steps on the LoRA parameters only (plain loop, causal LM loss,
  the same ``--batch`` x ``--seq`` batches), of the float adapter applied to the float, nf4 and
  int8 bases (``evagraph.quantized.load_config``: what ``compile --quantize`` loads with).

Returns (prints, and appends to ``benchmarks/results.md``) a table: per case, the bytes of the
base's weights (parameters, buffers and bitsandbytes' quantization scales), the anonymous RSS
(RssAnon) the loaded model adds, and the peaks above the process's RSS after its imports:
anonymous RSS (sampled every 5 ms) and the kernel's peak RSS (VmHWM, reset after the imports
by ``/proc/self/clear_refs``), which also counts the pages of the checkpoint file that
transformers maps (a float32 model's weights are used in place from that mapping, so they show
there, not in the anonymous RSS); wall and CPU seconds, and the median seconds per step after
the first, and the mean training loss (the same batches for every base).

    python benchmarks/quantized_memory.py            # CPU, ~25 minutes on 2 busy cores
    python benchmarks/quantized_memory.py --steps 3 --calib 2 --no-publish  # a quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

CALIBRATION = ("calibrate float", "float -> nf4", "calibrate nf4")
TRAINING = ("train float", "train nf4", "train int8")
TARGETS = [
    f"*.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
]


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(key + ":")))


def load(scheme: str) -> nn.Module:
    """SmolLM2 as ``scheme`` ("float", "nf4", "int8"), float32 outside the quantized linears
    (bitsandbytes' compute dtype is float32 too: only the storage differs)."""
    import real
    import torch
    from transformers import AutoModelForCausalLM

    from evagraph.quantized import load_config

    extra = {} if scheme == "float" else {"quantization_config": load_config(scheme)}
    model = AutoModelForCausalLM.from_pretrained(
        real.model_dir("float32"), dtype=torch.float32, **extra
    )
    model.config.use_cache = False
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each tensor once: SmolLM2 ties its
    embeddings), plus the scales bitsandbytes keeps beside its packed weights."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)  # 4-bit
        while state is not None:  # double quantization nests a state for the scales
            tensors[id(state.absmax)] = state.absmax
            state = getattr(state, "state2", None)
        scb = getattr(getattr(m, "weight", None), "SCB", None)  # 8-bit row scales
        if scb is not None:
            tensors[id(scb)] = scb
    return sum(t.numel() * t.element_size() for t in tensors.values())


def batches(path: Path) -> list[dict]:
    from safetensors.torch import load_file

    data = load_file(str(path))
    n = data["input_ids"].shape[0]
    return [{k: v[i] for k, v in data.items()} for i in range(n)]


def calibrate_case(case: str, work: Path, args: argparse.Namespace) -> dict:
    import evagraph

    settings = {"budget": args.r, "rho": args.rho, "targets": TARGETS, "progress": False}
    calib = batches(work / "calib.safetensors")
    out: dict = {}
    start = time.perf_counter()
    if case == "float -> nf4":
        model = load("float")
        state = evagraph.calibrate(model, calib, **settings)
        del model
        gc.collect()
        model = load("nf4")
        out["anon_model_mb"] = _status_kb("RssAnon") / 1024
        adapted, report = evagraph.adapt(model, state)
    else:
        model = load("float" if case == "calibrate float" else "nf4")
        out["anon_model_mb"] = _status_kb("RssAnon") / 1024
        adapted, report = evagraph.transform(model, calib, **settings)
        if case == "calibrate float":
            evagraph.save_adapter(adapted, work / "adapter")
    out["seconds"] = time.perf_counter() - start
    out["weight_bytes"] = weight_bytes(model)
    out["adapted"] = sum(r > 0 for r in report.ranks.values())
    return out


def train_case(case: str, work: Path, args: argparse.Namespace) -> dict:
    import torch

    import evagraph

    model = load(case.split()[-1])
    out = {"anon_model_mb": _status_kb("RssAnon") / 1024, "weight_bytes": weight_bytes(model)}
    adapted = evagraph.apply_adapter(model, work / "adapter").train()
    params = [p for p in adapted.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses, times = [], []
    for batch in batches(work / "train.safetensors")[: args.steps]:
        start = time.perf_counter()
        loss = adapted(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    steady = sorted(times[1:] or times)  # the first step also warms up
    out.update(seconds=sum(times), step_s=steady[len(steady) // 2], steps_s=times, losses=losses)
    out["lora_params"] = sum(p.numel() for p in params)
    return out


class AnonPeak:
    """The peak of the process's anonymous RSS (RssAnon: heap, tensors), sampled every
    ``interval`` seconds by a thread. The kernel's VmHWM also counts file-backed pages, and
    transformers maps the checkpoint: its pages touched while loading (and the float weights
    used in place, never copied) stay in the RSS as reclaimable page cache."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.peak, self.interval = _status_kb("RssAnon"), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _status_kb("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_kb("RssAnon"))


def child(case: str, work: Path, args: argparse.Namespace) -> None:
    """One case in this process; prints a JSON line of its figures (MB above the RSS after
    the imports, which are the same in every case)."""
    import bitsandbytes  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import evagraph  # noqa: F401

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here
    rss0, anon0 = _status_kb("VmRSS"), _status_kb("RssAnon")
    sampler, cpu0 = AnonPeak(), time.process_time()
    run = calibrate_case if case in CALIBRATION else train_case
    out = run(case, work, args)
    out["cpu_s"] = time.process_time() - cpu0
    out["peak_anon_mb"] = (sampler.stop() - anon0) / 1024
    out["peak_mb"] = (_status_kb("VmHWM") - rss0) / 1024
    out["anon_model_mb"] -= anon0 / 1024
    out["rss_imports_mb"] = rss0 / 1024
    print(json.dumps({"case": case, **out}))


def prepare(work: Path, args: argparse.Namespace) -> None:
    """The token batches (calibration and fine-tuning splits), saved for the children."""
    import real
    import torch
    from safetensors.torch import save_file

    for name, split, n in (("calib", "calibration", args.calib), ("train", "finetune", 16)):
        got = real.token_batches(split, n, args.batch, args.seq)
        stacked = {k: torch.stack([b[k] for b in got]).contiguous() for k in got[0]}
        save_file(stacked, str(work / f"{name}.safetensors"))


def table(results: list[dict], args: argparse.Namespace) -> list[str]:
    from calibration import header

    lines = [
        "## Quantized bases: memory (issue 33)",
        "",
        *header(
            "Quantized bases: memory, SmolLM2-135M-Instruct on CPU",
            f"- model: SmolLM2-135M-Instruct (float32; nf4 and int8 loaded by bitsandbytes "
            f"{_version('bitsandbytes')} with compute dtype float32, embeddings and lm_head "
            f"float32); calibration: {args.calib} batches of {args.batch} x {args.seq} tokens "
            f"of stdlib docstrings, r={args.r}, rho={args.rho}, the 7 projections of 30 "
            f"blocks; training: {args.steps} AdamW steps, LoRA parameters only, batch "
            f"{args.batch} x {args.seq}; {args.threads} threads; each case a fresh process",
        ),
        "| case | base weights MB | anon. RSS after loading MB | peak anon. RSS MB "
        "| peak RSS MB (with mapped file pages) | wall s | CPU s | s / step | mean loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        step = f"{r['step_s']:.2f}" if "step_s" in r else "-"
        loss = f"{sum(r['losses']) / len(r['losses']):.3f}" if "losses" in r else "-"
        lines.append(
            f"| {r['case']} | {r['weight_bytes'] / 2**20:.0f} | {r['anon_model_mb']:.0f} | "
            f"{r['peak_anon_mb']:.0f} | {r['peak_mb']:.0f} | {r['seconds']:.1f} | "
            f"{r['cpu_s']:.1f} | {step} | {loss} |"
        )
    return lines


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calib", type=int, default=4, help="calibration batches")
    p.add_argument("--steps", type=int, default=10, help="training steps")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--rho", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", nargs="*", default=[*CALIBRATION, *TRAINING])
    p.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    p.add_argument("--no-publish", action="store_true", help="print only")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, Path(args.work), args)
    results = []
    with tempfile.TemporaryDirectory(prefix="qmem-") as tmp:
        work = Path(tmp)
        prepare(work, args)
        for case in ["calibrate float", *(c for c in args.cases if c != "calibrate float")]:
            # (calibrate float first: it writes the adapter the training cases apply)
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", case, "--work", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    lines = table(results, args)
    if args.no_publish:
        print("\n".join(lines))
    else:
        from calibration import publish

        publish(lines, args.out)


if __name__ == "__main__":
    main()
