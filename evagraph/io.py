"""Model files in and compile outputs out: loading safely, writing nothing half-way."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError


def load_model(path: str | Path, *, allow_pickle: bool = False) -> tuple[nn.Module, str]:
    """Load MODEL; return (module, format) with format ``"pt2"`` or ``"pickle"``.

    A ``.pt2`` torch.export archive loads as a graph of ATen ops and runs no code from the
    file. A whole-module pickle (``torch.save(model)``) executes code while loading, so it is
    refused unless ``allow_pickle``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    if path.suffix == ".pt2":
        try:
            return torch.export.load(str(path)).module(), "pt2"
        except Exception as err:
            raise ModelLoadError(f"cannot load torch.export archive {path}: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            raise ModelLoadError(
                f"{path} holds pickled Python objects (e.g. a whole-module pickle from "
                "torch.save(model)): loading it runs code from the file. "
                "Pass --allow-pickle (allow_pickle=True) only if you trust it, or save the "
                "model with torch.export to a .pt2 archive."
            ) from err
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:
            raise ModelLoadError(f"cannot unpickle {path}: {err2}") from err2
    except Exception as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from err
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(
            f"{path} holds a {type(obj).__name__}, not a model (a state_dict has no "
            "architecture): save it with torch.save(model) or torch.export"
        )
    return obj, "pickle"


def save_model(model: nn.Module, fmt: str, directory: Path, example: Any) -> Path:
    """Write the adapted model in ``fmt`` (same as it came in); return the file path."""
    if fmt == "pt2":
        args, kwargs = (
            ((), dict(example))
            if isinstance(example, dict)
            else (tuple(example), {})
            if isinstance(example, (tuple, list))
            else ((example,), {})
        )
        exported = torch.export.export(model, args, kwargs, strict=False)
        out = directory / "model.pt2"
        torch.export.save(exported, str(out))
    else:
        out = directory / "model.pt"
        torch.save(model, out)
    return out


@contextmanager
def atomic_directory(target: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` only if the block succeeds.

    Refuses a ``target`` that exists and is not empty unless ``force``. On any error (or
    KeyboardInterrupt) the temporary directory is removed and ``target`` is left as it was.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise FileExistsError(f"output directory {target} exists and is not empty (use --force)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the output private
    try:
        yield tmp
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
            os.replace(tmp, target)
            if backup.is_dir():
                shutil.rmtree(backup, ignore_errors=True)
            else:
                backup.unlink()
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
