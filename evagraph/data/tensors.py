"""Calibration data as a file of tensors: a ``.pt`` or ``.safetensors`` holding a tensor or a
dict of tensors, first dimension = samples, cut into minibatches."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, first_line


def load_calibration(path: str | Path, batch_size: int) -> list[Any]:
    """Read a ``.pt`` / ``.safetensors`` file of a tensor or a dict of tensors into minibatches.

    The first dimension is samples. A file holding a single tensor yields positional inputs;
    a dict of several tensors yields keyword inputs named by its keys.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration data file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"calibration data {path} is an empty file (0 bytes)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The safe unpickler names the class it refused; its own text runs to many lines.
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found is None:
            raise DataError(
                f"cannot read calibration data {path}: {first_line(err, typed=True)}"
            ) from err
        raise DataError(
            f"calibration data {path} holds pickled Python objects ({found.group(1)}), not "
            "only tensors; they are not loaded, as unpickling them runs code from the file"
        ) from err
    except Exception as err:
        raise DataError(
            f"cannot read calibration data {path}: {first_line(err, typed=True)}"
        ) from err
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
    scalars = [k for k, v in tensors.items() if v.dim() == 0]
    if scalars:
        what = f"tensor {scalars[0]!r}" if keyed else "its tensor"
        raise DataError(f"{path}: {what} is a scalar (0-dim): it has no sample dimension")
    sizes = {k: v.shape[0] for k, v in tensors.items()}
    n = min(sizes.values())
    if n == 0:
        raise DataError(f"{path} holds no samples (a first dimension of 0)")
    if len(set(sizes.values())) != 1:
        raise DataError(f"{path}: tensors need the same first dimension (samples), got {sizes}")
    batches = []
    for start in range(0, n, batch_size):
        # Copies, not views: a view would carry the whole file's storage into anything that
        # serialises a batch (an exported .pt2 keeps its example batch).
        part = {k: v[start : start + batch_size].clone() for k, v in tensors.items()}
        batches.append(part if keyed else part[""])
    return batches
