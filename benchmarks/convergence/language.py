"""Language: does EVA-initialised LoRA fine-tune faster than random-init LoRA at equal budget?

1. Pretrain a tiny Llama-style byte-level LM on the Python standard library's own .py files
   (cached in .cache/, so re-runs skip it).
2. Fine-tune it with LoRA on a different corpus that every Python install ships: the English
   licence texts and package descriptions in site-packages/*.dist-info (held-out split by
   document), comparing initialisations (see common.METHODS) with the same optimizer, lr,
   steps and batches in the same order, per seed.

    python benchmarks/convergence/language.py            # full run, writes language.json
    python benchmarks/convergence/language.py --quick    # smoke test, a minute

Everything is on CPU and derived from files already on disk; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np
import torch
from common import (
    HERE,
    Timer,
    b_grad_norm,
    check_against_peft,
    compare_methods,
    eva_transform,
    parser,
    seed_all,
    write_results,
)
from transformers import LlamaConfig, LlamaForCausalLM

BOS, EOS, PAD = 256, 257, 258  # byte-level tokenizer: ids 0..255 are the bytes themselves
VOCAB = 259
TARGETS = ["*q_proj", "*k_proj", "*v_proj", "*o_proj", "*gate_proj", "*up_proj", "*down_proj"]


# ----------------------------------------------------------------------------- data


def encode(docs: list[bytes]) -> torch.Tensor:
    """One token stream: BOS doc EOS BOS doc EOS ..."""
    parts = [np.array([BOS, *d, EOS], dtype=np.int16) for d in docs]
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def stdlib_sources() -> list[bytes]:
    """The standard library's .py files, without its test suite and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in sorted(root.rglob("*.py")):
        parts = set(p.relative_to(root).parts)
        if parts & {"site-packages", "test", "tests", "idlelib"}:
            continue
        docs.append(p.read_bytes())
    return docs


def prose_documents() -> list[bytes]:
    """Licence texts and package descriptions (METADATA bodies, no headers) of installed
    distributions: English prose, deduplicated (many packages ship the same licence)."""
    roots = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    seen: dict[str, bytes] = {}
    for root in roots:
        for info in sorted(Path(root).glob("*.dist-info")):
            for p in sorted(info.rglob("*")):
                name = p.name.upper()
                if not p.is_file():
                    continue
                if name == "METADATA":
                    # Email-style headers (Name:, Requires-Dist:, ...) end at the first blank line.
                    text = p.read_bytes().replace(b"\r\n", b"\n").split(b"\n\n", 1)
                    text = text[1] if len(text) == 2 else b""
                elif name.startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")):
                    text = p.read_bytes().replace(b"\r\n", b"\n")
                else:
                    continue
                if len(text) >= 200:
                    seen.setdefault(hashlib.sha1(text).hexdigest(), text)
    return [seen[h] for h in sorted(seen)]


def split_heldout(docs: list[bytes], every: int = 8) -> tuple[list[bytes], list[bytes]]:
    """Held-out documents chosen by content hash: stable across machines for shared files."""
    held = [d for d in docs if int(hashlib.sha1(d).hexdigest(), 16) % every == 0]
    train = [d for d in docs if int(hashlib.sha1(d).hexdigest(), 16) % every != 0]
    return train, held


def windows(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def random_starts(stream: torch.Tensor, n: int, length: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, len(stream) - length, (n,), generator=g)


def lm_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss  # HF shifts the labels itself


# ----------------------------------------------------------------------------- pretraining


def make_model(args: argparse.Namespace) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def pretrain(args: argparse.Namespace, stream: torch.Tensor) -> tuple[LlamaForCausalLM, dict]:
    """Pretrain on the stdlib (or load the cached checkpoint for the same settings)."""
    key = f"{args.hidden}-{args.intermediate}-{args.layers}-{args.heads}-{args.seq}-"
    key += f"{args.pretrain_steps}-{args.pretrain_lr}-{len(stream)}"
    path = HERE / ".cache" / f"pretrained-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    seed_all(1234)
    model = make_model(args)
    if path.exists():
        ckpt = torch.load(path)
        model.load_state_dict(ckpt["state_dict"])
        print(f"pretrained model loaded from {path.relative_to(HERE)}")
        return model, {**ckpt["meta"], "cached": True}

    timer, g = Timer(), torch.Generator().manual_seed(1234)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.1)
    warmup = max(1, args.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.45 * (1 + np.cos(np.pi * s / args.pretrain_steps)))
        ),
    )
    model.train()
    losses = []
    for step in range(args.pretrain_steps):
        x = windows(stream, random_starts(stream, args.pretrain_batch, args.seq, g), args.seq)
        loss = lm_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == args.pretrain_steps - 1:
            print(f"pretrain step {step:5d} loss {loss.item():.3f} ({timer()} s)")
    meta = {
        "steps": args.pretrain_steps,
        "final_loss_mean_last_50": float(np.mean(losses[-50:])),
        "wall_s": timer(),
        "params": sum(p.numel() for p in model.parameters()),
    }
    path.parent.mkdir(exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return model, {**meta, "cached": False}


# ----------------------------------------------------------------------------- fine-tuning


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, held: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = [lm_loss(model, held[i : i + batch]).item() for i in range(0, len(held), batch)]
    model.train()
    return float(np.mean(losses))


def finetune(
    model: torch.nn.Module,
    train_stream: torch.Tensor,
    starts: torch.Tensor,
    held: torch.Tensor,
    args: argparse.Namespace,
) -> dict:
    """AdamW on the trainable (LoRA) parameters; batch k of every method is the same."""
    timer = Timer()
    batch = lambda step: windows(train_stream, starts[step], args.seq)  # noqa: E731
    model.train()
    grad0 = b_grad_norm(model, lambda m: lm_loss(m, batch(0)))  # before any optimizer step
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    eval_at = sorted({s for s in args.eval_at if s < args.steps} | {args.steps})
    train_loss, held_loss = [], {}
    for step in range(args.steps):
        if step in eval_at:
            held_loss[step] = heldout_loss(model, held, args.batch)
        loss = lm_loss(model, batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_loss.append(loss.item())
    held_loss[args.steps] = heldout_loss(model, held, args.batch)
    return {
        "train_loss": train_loss,
        "heldout_loss": held_loss,
        "b_grad_norm_step0": grad0,
        "wall_s": timer(),
    }


def eva(
    base: torch.nn.Module, calib: list[dict], args: argparse.Namespace, rho: float
) -> tuple[torch.nn.Module, dict]:
    return eva_transform(base, calib, args, rho, TARGETS)


def run_seed(
    base: torch.nn.Module,
    train_stream: torch.Tensor,
    held: torch.Tensor,
    seed: int,
    args: argparse.Namespace,
) -> dict:
    g = torch.Generator().manual_seed(seed)
    starts = random_starts(train_stream, args.steps * args.batch, args.seq, g)
    starts = starts.reshape(args.steps, args.batch)
    calib = [
        {"input_ids": x, "attention_mask": torch.ones_like(x)}
        for x in windows(
            train_stream,
            random_starts(train_stream, args.calib_batches * args.batch, args.seq, g),
            args.seq,
        ).split(args.batch)
    ]

    def summary(res: dict) -> str:
        h = res["heldout_loss"]
        return (
            f"held-out {h[0]:.3f} -> {h[args.steps]:.3f}  "
            f"train(last 25) {np.mean(res['train_loss'][-25:]):.3f}  "
            f"|dL/dB|_0 {res['b_grad_norm_step0']:.4f}  params {res['trainable_params']}  "
            f"({res['wall_s']} s)"
        )

    return compare_methods(
        args.methods,
        seed,
        lambda rho: eva(base, calib, args, rho=rho),
        lambda model: finetune(model, train_stream, starts, held, args),
        summary,
    )


def main() -> None:
    p = parser(
        __doc__, "language", steps=300, rank=8, alpha=8.0, batch=16, calib_batches=64,
        eval_at=[0, 25, 50, 100, 200, 300], pretrain_steps=800,
    )  # fmt: skip
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--heldout-windows", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=352)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.pretrain_steps = args.seeds[:1], 30, 60
        args.calib_batches, args.heldout_windows, args.eval_at = 8, 16, [0, 10, 20]
    torch.set_num_threads(args.threads)
    timer = Timer()

    pre_docs, ft_docs = stdlib_sources(), prose_documents()
    ft_train_docs, ft_held_docs = split_heldout(ft_docs)
    pre_stream, train_stream = encode(pre_docs), encode(ft_train_docs)
    held_stream = encode(ft_held_docs)
    n_held = min(args.heldout_windows, len(held_stream) // args.seq)
    held = held_stream[: n_held * args.seq].reshape(n_held, args.seq)  # fixed, non-overlapping
    corpus = {
        "pretrain": {"documents": len(pre_docs), "tokens": len(pre_stream)},
        "finetune_train": {"documents": len(ft_train_docs), "tokens": len(train_stream)},
        "finetune_heldout": {
            "documents": len(ft_held_docs),
            "tokens": len(held_stream),
            "evaluated_tokens": n_held * args.seq,
        },
    }
    print(json.dumps(corpus))

    base, pre_meta = pretrain(args, pre_stream)
    for param in base.parameters():
        param.requires_grad_(False)
    base.eval()

    # Check once that the rank-r structure is PEFT's LoRA (shapes, module types, scale).
    probe, _ = eva(base, [{"input_ids": held[:2], "attention_mask": torch.ones_like(held[:2])}],
                   args, rho=1)  # fmt: skip
    peft_check = check_against_peft(probe, base, args.rank, args.alpha)
    print("PEFT structure check:", peft_check)

    results = {}
    for seed in args.seeds:
        results[str(seed)] = run_seed(base, train_stream, held, seed, args)

    write_results(
        "language",
        args,
        results,
        timer,
        corpus=corpus,
        model={
            "params": sum(p.numel() for p in base.parameters()),
            "config": {
                "hidden": args.hidden,
                "intermediate": args.intermediate,
                "layers": args.layers,
                "heads": args.heads,
                "vocab": VOCAB,
                "seq": args.seq,
            },  # fmt: skip
        },
        pretrain=pre_meta,
        peft_check=peft_check,
    )


if __name__ == "__main__":
    main()
