"""The values that pass between blocks in block-by-block calibration, one set per batch.

``ActivationCache`` keeps, for each calibration batch, the named values (activations, masks,
position tensors) that the next block reads. They live in host memory up to ``max_bytes``
and in files beyond it (or always in files when a ``directory`` is given, which is what makes
a calibration resumable). Two generations are kept: the block being calibrated reads one and
writes the other, so an interrupted block leaves the last finished block's outputs intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

Values = dict[str, Any]


def _nbytes(values: Values) -> int:
    total = 0
    for v in values.values():
        for t in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _to(values: Values, device: torch.device) -> Values:
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, (tuple, list)):
            return type(v)(move(x) for x in v)
        return v

    return {k: move(v) for k, v in values.items()}


def default_max_bytes() -> int:
    """Half the machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class ActivationCache:
    """Per-batch values in two generations (``read`` from one, ``write`` to the other)."""

    def __init__(self, directory: str | Path | None = None, max_bytes: int | None = None) -> None:
        self.persistent = directory is not None
        self._dir = Path(directory) if directory is not None else None
        self.max_bytes = 0 if self.persistent else (max_bytes or default_max_bytes())
        self._ram: list[dict[int, Values]] = [{}, {}]
        self.ram_bytes = 0

    def _directory(self) -> Path:
        if self._dir is None:  # spill over: a private temporary directory
            self._dir = Path(tempfile.mkdtemp(prefix="evagraph-activations-"))
        return self._dir

    def _file(self, generation: int, batch: int) -> Path:
        return self._directory() / f"gen{generation % 2}" / f"{batch}.pt"

    def write(self, generation: int, batch: int, values: Values) -> None:
        values = _to(values, torch.device("cpu"))
        ram = self._ram[generation % 2]
        if batch in ram:
            self.ram_bytes -= _nbytes(ram.pop(batch))
        size = _nbytes(values)
        if self.ram_bytes + size <= self.max_bytes:
            ram[batch] = values
            self.ram_bytes += size
            return
        path = self._file(generation, batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(values, tmp)
        os.replace(tmp, path)  # a file is whole or absent

    def read(self, generation: int, batch: int, device: torch.device) -> Values:
        ram = self._ram[generation % 2]
        if batch in ram:
            return _to(ram[batch], device)
        values = torch.load(self._file(generation, batch), weights_only=True, map_location="cpu")
        return _to(values, device)

    def drop(self, generation: int) -> None:
        """Forget a generation that nothing reads any more."""
        ram = self._ram[generation % 2]
        self.ram_bytes -= sum(_nbytes(v) for v in ram.values())
        ram.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir / f"gen{generation % 2}", ignore_errors=True)

    def close(self) -> None:
        """Remove a spill-over directory (a persistent one is its owner's to remove)."""
        self._ram = [{}, {}]
        if self._dir is not None and not self.persistent:
            shutil.rmtree(self._dir, ignore_errors=True)
