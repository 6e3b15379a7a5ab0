"""Vision: EVA vs random-init LoRA on a small CNN, with convolutions adapted.

Data: scikit-learn's bundled 8x8 handwritten digits (``load_digits``, on disk with sklearn).
1. Pretrain a small CNN (3 conv layers + 1 linear + head) on digits 0-4.
2. Replace the head by a fresh one for digits 5-9 (trained fully in every method) and
   fine-tune with LoRA on conv1-3 and fc, comparing initialisations (see common.METHODS) with
   the same optimizer, lr, steps, head init and batches in the same order, per seed.

    python benchmarks/convergence/vision.py            # full run, writes vision.json
    python benchmarks/convergence/vision.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    Timer,
    b_grad_norm,
    check_against_peft,
    compare_methods,
    eva_transform,
    parser,
    seed_all,
    write_results,
)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

TARGETS = ["conv1", "conv2", "conv3", "fc"]  # fc sits after pooling, so name it explicitly


class SmallCNN(nn.Module):
    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 2 * 2, 64)
        self.head = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))  # 8x8
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 4x4
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 2x2
        x = F.relu(self.fc(x.flatten(1)))
        return self.head(x)


def digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pretraining set (0-4) and fine-tuning train/test sets (5-9, labels shifted to 0-4)."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    old, new = y < 5, y >= 5
    idx = np.arange(int(new.sum()))
    tr, te = train_test_split(idx, test_size=0.5, random_state=0, stratify=y[new].numpy())
    x_new, y_new = x[new], y[new] - 5
    return {
        "pretrain": (x[old], y[old]),
        "train": (x_new[tr], y_new[tr]),
        "test": (x_new[te], y_new[te]),
    }


def pretrain(data: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace) -> dict:
    seed_all(0)
    model, (x, y) = SmallCNN(), data
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(args.pretrain_steps):
        i = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"pretrained on digits 0-4: train accuracy {acc:.3f}")
    return {"model": model, "train_accuracy": acc, "samples": len(x)}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def finetune(model: nn.Module, data: dict, order: torch.Tensor, args: argparse.Namespace) -> dict:
    timer = Timer()
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    loss_of = lambda m, i: F.cross_entropy(m(xtr[i]), ytr[i])  # noqa: E731
    model.train()
    grad0 = b_grad_norm(model, lambda m: loss_of(m, order[0]))  # before any optimizer step
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    eval_at = sorted({s for s in args.eval_at if s < args.steps} | {args.steps})
    train_loss, test = [], {}
    for step in range(args.steps):
        if step in eval_at:
            test[step] = evaluate(model, xte, yte)
        loss = loss_of(model, order[step])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_loss.append(loss.item())
    test[args.steps] = evaluate(model, xte, yte)
    return {
        "train_loss": train_loss,
        "heldout_loss": {s: v[0] for s, v in test.items()},
        "test_accuracy": {s: v[1] for s, v in test.items()},
        "b_grad_norm_step0": grad0,
        "wall_s": timer(),
    }


def eva(base: nn.Module, calib: list[torch.Tensor], args: argparse.Namespace, rho: float):
    adapted, info = eva_transform(base, calib, args, rho, TARGETS)
    adapted.head.requires_grad_(True)  # the new head is trained fully in every method
    return adapted, info


def run_seed(pretrained: nn.Module, data: dict, seed: int, args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(seed)
    xtr = data["train"][0]
    order = torch.randint(0, len(xtr), (args.steps, args.batch), generator=g)
    calib = list(xtr[torch.randperm(len(xtr), generator=g)].split(args.batch))[: args.calib_batches]
    base = copy.deepcopy(pretrained)
    torch.manual_seed(seed)
    base.head = nn.Linear(64, 5)  # new classes, new head: same init for every method
    base.requires_grad_(False)

    def summary(res: dict) -> str:
        acc = res["test_accuracy"]
        return (
            f"test acc {acc[0]:.3f} -> {acc[args.steps]:.3f}  "
            f"train(last 25) {np.mean(res['train_loss'][-25:]):.4f}  "
            f"|dL/dB|_0 {res['b_grad_norm_step0']:.4f}  params {res['trainable_params']}"
        )

    return compare_methods(
        args.methods,
        seed,
        lambda rho: eva(base, calib, args, rho=rho),
        lambda model: finetune(model, data, order, args),
        summary,
    )


def main() -> None:
    p = parser(
        __doc__,
        "vision",
        steps=200,
        rank=4,
        alpha=4.0,
        batch=32,
        calib_batches=14,
        eval_at=[0, 10, 25, 50, 100, 150],
        pretrain_steps=600,
    )  # fmt: skip  (rank 4: conv1 has only 9 inputs)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.pretrain_steps, args.eval_at = args.seeds[:1], 30, 50, [0, 10]
    torch.set_num_threads(args.threads)
    timer = Timer()

    data = digits()
    pre = pretrain(data["pretrain"], args)
    probe_base = copy.deepcopy(pre["model"]).requires_grad_(False)
    probe, _ = eva(probe_base, [data["train"][0][:64]], args, rho=1)
    peft_check = check_against_peft(probe, probe_base, args.rank, args.alpha)
    print("PEFT structure check:", peft_check)

    results = {str(s): run_seed(pre["model"], data, s, args) for s in args.seeds}
    write_results(
        "vision",
        args,
        results,
        timer,
        data={k: len(v[0]) for k, v in data.items()},
        model={"params": sum(p.numel() for p in pre["model"].parameters())},
        pretrain={"train_accuracy": pre["train_accuracy"], "steps": args.pretrain_steps},
        peft_check=peft_check,
    )


if __name__ == "__main__":
    main()
