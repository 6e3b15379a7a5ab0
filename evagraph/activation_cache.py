"""The values that pass between blocks in block-by-block calibration, one set per batch.

``ActivationCache`` keeps, for each calibration batch, the named values (activations, masks,
position tensors) that the next block reads. They live in host memory up to ``max_bytes``
and in files beyond it (or always in files when a ``directory`` is given, which is what makes
a calibration resumable). Two generations are kept: the block being calibrated reads one and
writes the other, so an interrupted block leaves the last finished block's outputs intact.

Every file is hashed (sha256) as it is written, and checked against that digest as it is
read: a file changed on disk (by hand, by another process, by a failing disk) is refused in
one line instead of silently feeding the next block. A resumed run hands the cache the
digests its saved progress recorded (``expect``); ``digests`` gives them to be recorded.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import ConfigError, first_line

Values = dict[str, Any]


class _HashingWriter:
    """A file as torch.save sees it, hashed on the way: torch writes a zip archive front to
    back (this object has no ``seek``), so the digest is the file's without reading it back."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self._sha = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def save_hashed(obj: Any, path: Path) -> str:
    """``torch.save(obj)`` to ``path``, whole or not at all (a temporary file renamed over it);
    returns the file's sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
    os.replace(tmp, path)
    return writer.hexdigest()


def read_verified(path: Path, sha256: str) -> bytes:
    """The bytes of ``path``, read once, if their sha256 is ``sha256`` (else a one-line
    ``ConfigError`` naming the file)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is missing (it was written, then removed); start again without --resume"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from err
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ConfigError(f"{path} was changed since it was written; start again without --resume")
    return data


def load_verified(path: Path, sha256: str) -> Any:
    """``torch.load(weights_only=True)`` of ``path``'s bytes, checked against ``sha256`` first.
    One read, so the bytes hashed are the bytes loaded; they are held until loaded (twice
    one file's size at most, whatever the number of batches)."""
    data = read_verified(path, sha256)
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as err:  # the digest matched: a file evagraph never wrote this way
        raise ConfigError(f"cannot read {path}: {first_line(err)}") from err


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
        # sha256 of each batch's file, per generation: 64 characters a batch.
        self._sha: list[dict[int, str]] = [{}, {}]

    def _directory(self) -> Path:
        if self._dir is None:  # spill over: a private temporary directory
            self._dir = Path(tempfile.mkdtemp(prefix="evagraph-activations-"))
        return self._dir

    @staticmethod
    def relative(generation: int, batch: int) -> str:
        """The file of ``batch`` in ``generation``, relative to the cache's directory."""
        return f"gen{generation % 2}/{batch}.pt"

    def _file(self, generation: int, batch: int) -> Path:
        return self._directory() / self.relative(generation, batch)

    def digests(self, generation: int) -> dict[int, str]:
        """The sha256 of every file of ``generation``, by batch (batches held in memory have
        none)."""
        return dict(self._sha[generation % 2])

    def expect(self, generation: int, digests: dict[int, str]) -> None:
        """The files of ``generation`` are already there (a resumed run): their digests, as
        recorded when they were written."""
        self._sha[generation % 2] = dict(digests)

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
        self._sha[generation % 2][batch] = save_hashed(values, path)

    def read(self, generation: int, batch: int, device: torch.device) -> Values:
        ram = self._ram[generation % 2]
        if batch in ram:
            return _to(ram[batch], device)
        path = self._file(generation, batch)
        sha = self._sha[generation % 2].get(batch)
        if sha is None:  # every file is written or expected with its digest
            raise ConfigError(f"{path} was not written by this calibration")
        return _to(load_verified(path, sha), device)

    def drop(self, generation: int) -> None:
        """Forget a generation that nothing reads any more."""
        ram = self._ram[generation % 2]
        self.ram_bytes -= sum(_nbytes(v) for v in ram.values())
        ram.clear()
        self._sha[generation % 2] = {}
        if self._dir is not None:
            shutil.rmtree(self._dir / f"gen{generation % 2}", ignore_errors=True)

    def close(self) -> None:
        """Remove a spill-over directory (a persistent one is its owner's to remove)."""
        self._ram = [{}, {}]
        self._sha = [{}, {}]
        if self._dir is not None and not self.persistent:
            shutil.rmtree(self._dir, ignore_errors=True)
