"""Calibration batches: calling a model with one, moving one to a device, reading a file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import DataError


def call_model(model: torch.nn.Module, batch: Any) -> Any:
    """Default forward: a mapping is keyword inputs, a tuple/list positional, a tensor the input."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def batch_failed(index: int, err: Exception) -> DataError:
    """The error for a batch the model could not run: the first line of what it raised."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return DataError(
        f"the model failed on calibration batch {index}: {type(err).__name__}: {first}"
    )


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def load_calibration(path: str | Path, batch_size: int) -> list[Any]:
    """Read a ``.pt`` / ``.safetensors`` file of a tensor or a dict of tensors into minibatches.

    The first dimension is samples. A file holding a single tensor yields positional inputs;
    a dict of several tensors yields keyword inputs named by its keys.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration data file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"cannot read calibration data {path}: {err}") from err
    if isinstance(data, Mapping) and len(data) == 1:
        data = next(iter(data.values()))
    if isinstance(data, torch.Tensor):
        tensors, keyed = {"": data}, False
    elif (
        isinstance(data, Mapping)
        and data
        and all(isinstance(v, torch.Tensor) for v in data.values())
    ):
        tensors, keyed = dict(data), True
    else:
        raise DataError(f"{path} must hold a tensor or a non-empty dict of tensors")
    sizes = {k: (v.shape[0] if v.dim() else 0) for k, v in tensors.items()}
    n = min(sizes.values(), default=0)
    if n == 0:
        raise DataError(f"{path} holds no samples (a first dimension of 0)")
    if len(set(sizes.values())) != 1:
        raise DataError(f"{path}: tensors need the same first dimension (samples), got {sizes}")
    batches = []
    for start in range(0, n, batch_size):
        part = {k: v[start : start + batch_size] for k, v in tensors.items()}
        batches.append(part if keyed else part[""])
    return batches
