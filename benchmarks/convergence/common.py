"""Helpers shared by language.py and vision.py: the options and the results file they share,
seeding, the LoRA baselines' initialisation, the step-0 gradient norm of B, trainable
parameter counts and smoothing."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import evagraph
from evagraph.lora import LoraAdapter

# The four initialisations compared. All share the adapters evagraph builds (same layers,
# module types, conv geometry, B = 0 and scale alpha / r); only A and the ranks differ.
METHODS = {
    "lora": "LoRA, random A (PEFT default: Kaiming-uniform a=sqrt(5)), rank r everywhere",
    "eva_rho1": "EVA, rho=1 (rank r everywhere)",
    "eva_rho2": "EVA, rho=2 (ranks redistributed, at most 2r)",
    "orth": "control: random orthonormal A, rank r everywhere (same row norm as EVA)",
}


HERE = Path(__file__).resolve().parent


def parser(doc: str, experiment: str, **defaults) -> argparse.ArgumentParser:
    """The options both experiments take; ``defaults`` sets each experiment's values."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, help="fine-tuning steps")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--rank", type=int, help="LoRA budget r")
    p.add_argument("--alpha", type=float)
    p.add_argument("--tau", type=float, default=0.99)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int)
    p.add_argument("--calib-batches", type=int, help="most EVA calibration batches")
    p.add_argument("--eval-at", type=int, nargs="+")
    p.add_argument("--pretrain-steps", type=int)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription)")
    p.add_argument("--out", type=Path, help=f"default: {experiment}.json next to this")
    p.set_defaults(**defaults)
    return p


def write_results(experiment: str, args: argparse.Namespace, results: dict, timer: Timer,
                  **sections) -> None:  # fmt: skip
    """Write ``<experiment>.json`` (``-quick`` with --quick, or --out): the settings, the
    experiment's own ``sections``, the machine and the per-seed results."""
    path = args.out or HERE / f"{experiment}{'-quick' if args.quick else ''}.json"
    out = {
        "experiment": experiment,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "methods": {m: METHODS[m] for m in args.methods},
        **sections,
        "machine": machine(),
        "results": results,
        "wall_s": timer(),
    }
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({timer()} s)")


def eva_transform(
    base: nn.Module, calib: list, args: argparse.Namespace, rho: float, targets: list[str]
) -> tuple[nn.Module, dict]:
    """``evagraph.transform`` with the experiment's settings; its ConvergenceWarnings are
    recorded (not raised) in the returned info, with the calibration's time, steps and ranks."""
    timer = Timer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", evagraph.ConvergenceWarning)
        adapted, report = evagraph.transform(
            base, calib, budget=args.rank, rho=rho, alpha=args.alpha, targets=targets,
            tau=args.tau, progress=False,
        )  # fmt: skip
    info = {
        "calibration_wall_s": timer(),
        "calibration_batches": report.steps,
        "unconverged": report.unconverged,
        "warnings": [str(w.message) for w in caught],
        "ranks": report.ranks,
        "capture": report.capture,
    }
    return adapted, info


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Not torch.use_deterministic_algorithms: it made these CPU runs ~10x slower. CPU kernels
    # give the same results run to run for the same thread count anyway.


def compare_methods(
    methods: list[str],
    seed: int,
    eva: Callable[[int], tuple[nn.Module, dict]],
    finetune: Callable[[nn.Module], dict],
    summary: Callable[[dict], str],
) -> dict[str, dict]:
    """Build each method's model and fine-tune it from the same seed; results per method.

    ``eva(rho)`` returns (adapted model, info). The random baselines reuse EVA rho=1's
    adapters (rank r everywhere) with A re-initialised, so structure and scaling are identical
    by construction. ``summary(result)`` is the progress line printed after each method.
    """
    eva1, eva1_info = eva(1)
    models, infos = {}, {}
    for method in methods:
        if method == "eva_rho1":
            models[method], infos[method] = eva1, eva1_info
        elif method == "eva_rho2":
            models[method], infos[method] = eva(2)
        else:
            models[method] = copy.deepcopy(eva1)
            reinit_random_(models[method], seed, orthonormal=method == "orth")
            infos[method] = {"ranks": eva1_info["ranks"]}

    out = {}
    for method in methods:
        seed_all(seed)
        model = models[method]
        res = finetune(model)
        res.update(infos[method], trainable_params=n_trainable(model), lora_params=n_lora(model))
        res["total_rank"] = sum(ad.rank for ad in adapters(model))
        out[method] = res
        print(f"seed {seed} {method:9s} {summary(res)}")
    return out


def adapters(model: nn.Module) -> list[LoraAdapter]:
    return [m for m in model.modules() if isinstance(m, LoraAdapter)]


def reinit_random_(model: nn.Module, seed: int, orthonormal: bool = False) -> None:
    """Re-initialise every adapter's A at random, B = 0 (structure and scaling untouched).

    Default: PEFT's LoRA init (``kaiming_uniform_(a=sqrt(5))`` on lora_A, the same call PEFT
    makes for Linear and Conv2d). ``orthonormal``: rows of A random orthonormal, the baseline of
    the paper's Theorem 3.1 (unit row norm like EVA's, but directions not from the data).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in adapters(model):
            w = ad.lora_A.weight
            if orthonormal:
                flat = w.reshape(w.shape[0], -1)
                q, _ = torch.linalg.qr(torch.randn(flat.shape[1], flat.shape[0], generator=g))
                w.copy_(q.T.reshape(w.shape))
            else:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
            ad.lora_B.weight.zero_()


def b_grad_norm(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> float:
    """||dL/dB||_F over all adapters' B, on one batch, leaving no gradients behind."""
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    sq = sum(float(ad.lora_B.weight.grad.pow(2).sum()) for ad in adapters(model))
    model.zero_grad(set_to_none=True)
    return math.sqrt(sq)


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def n_lora(model: nn.Module) -> int:
    return sum(ad.lora_A.weight.numel() + ad.lora_B.weight.numel() for ad in adapters(model))


def check_against_peft(adapted: nn.Module, base: nn.Module, r: int, alpha: float) -> str:
    """Check the rank-r adapters have PEFT LoRA's shapes and scaling for the same layers.

    Builds PEFT's ``get_peft_model`` on the same layers and compares every lora_A / lora_B
    weight shape and scale; raises if anything differs. Returns a one-line summary.
    """
    from peft import LoraConfig, get_peft_model

    ours = {ad.layer_name: ad for ad in adapters(adapted)}
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(ours), lora_dropout=0.0)
    peft_model = get_peft_model(_deepcopy(base), cfg)
    compared = 0
    for name, module in peft_model.base_model.model.named_modules():
        if name not in ours or not hasattr(module, "lora_A"):
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        ad = ours[name]
        if a.shape != ad.lora_A.weight.shape or b.shape != ad.lora_B.weight.shape:
            raise AssertionError(
                f"{name}: PEFT {a.shape}/{b.shape} vs ours {ad.lora_A.weight.shape}"
            )
        if not math.isclose(module.scaling["default"], ad.scaling):
            raise AssertionError(f"{name}: PEFT scale {module.scaling['default']} vs {ad.scaling}")
        if type(module.lora_A["default"]) is not type(ad.lora_A):
            raise AssertionError(f"{name}: PEFT {type(module.lora_A['default'])} vs ours")
        compared += 1
    if compared != len(ours):
        raise AssertionError(f"PEFT adapted {compared} of our {len(ours)} layers")
    return f"{compared} layers: same A/B shapes, module types and scale as PEFT LoraConfig(r={r})"


def _deepcopy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def trailing_mean(xs: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each step (fewer at the start)."""
    c = np.cumsum([0.0, *xs])
    return [
        float((c[i + 1] - c[max(0, i + 1 - window)]) / min(window, i + 1)) for i in range(len(xs))
    ]


def first_step_at_most(curve: list[float], target: float) -> int | None:
    """1-based optimizer step after which ``curve`` first reaches ``target`` (None: never)."""
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)


def machine() -> dict:
    import peft
    import transformers

    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "evagraph": evagraph.__version__,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 1)
