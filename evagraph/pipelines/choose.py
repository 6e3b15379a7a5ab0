"""Which pipeline calibrates a model: the one decision between whole-graph and block-by-block
calibration, for the Python API and the command line alike. The pipelines are taken from the
registry by name (``PIPELINES["whole"]``, ``PIPELINES["blockwise"]``), so a pipeline
registered under one of those names runs wherever that one would."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import nn

from ..config import parse_size
from ..errors import ConfigError
from ..onload import ShardedCheckpoint, has_offloaded_weights
from ..runtime import model_device
from .base import PIPELINES, Pipeline


def choose(
    model: nn.Module,
    *,
    sequential: bool | None = None,
    max_memory: str | int | None = None,
    device: torch.device | None = None,
    weights: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    fingerprint: dict | None = None,
) -> Pipeline:
    """The ``"whole"`` or the ``"blockwise"`` pipeline for ``model``, from the caller's
    arguments.

    Block by block when ``sequential`` says so; when it is None, when the model's weights are
    not all resident (accelerate offload, the meta device, or ``weights``: a Hugging Face
    directory to read them from) or exceed ``max_memory`` (bytes, or ``"40GB"``). ``device``:
    where calibration must run without moving the model (``calibrate``, which leaves the
    model as it is): a model elsewhere visits it one block at a time. ``transform`` passes
    None, as it moves its copy of the model there instead. ``work_dir``, ``resume`` and
    ``fingerprint``: the block-by-block run's (see ``Blockwise``).
    """
    if device is not None and device != model_device(model):
        if sequential is False:
            raise ConfigError(
                f"device {device} is not where the model is ({model_device(model)}): calibrate "
                "moves one block at a time there (sequential); move the model yourself to "
                "calibrate it whole on that device"
            )
        sequential = True
    max_bytes = parse_size(max_memory)
    if resume and work_dir is None:
        raise ConfigError("resume needs the work_dir the interrupted calibration used")
    offloaded = has_offloaded_weights(model) or weights is not None
    if sequential is None:
        sequential = offloaded or _over(weight_bytes(model), max_bytes)
    elif not sequential and offloaded:
        raise ConfigError(
            "the model's weights are not all resident (meta device, accelerate offload or "
            "a weights checkpoint): only block-by-block calibration can run it "
            "(sequential=True, --sequential)"
        )
    if not sequential:
        return PIPELINES["whole"]()
    return PIPELINES["blockwise"](
        max_bytes=max_bytes,
        weights=ShardedCheckpoint(weights) if weights is not None else None,
        work_dir=Path(work_dir) if work_dir is not None else None,
        resume=resume,
        fingerprint=fingerprint,
    )


def read_lazily(path: str | Path, *, sequential: bool, max_memory: int | None) -> bool:
    """Whether the model at ``path`` (not loaded yet) is a Hugging Face directory to calibrate
    block by block without ever loading it whole: its safetensors are read one block at a
    time (``choose(..., weights=path)``). So it is when block by block is forced, or when its
    weights on disk exceed ``max_memory`` (bytes)."""
    on_disk = hf_weight_bytes(path)
    return on_disk is not None and (sequential or _over(on_disk, max_memory))


def _over(size: int, max_bytes: int | None) -> bool:
    return max_bytes is not None and size > max_bytes


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (each tensor once)."""
    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def hf_weight_bytes(path: str | Path) -> int | None:
    """Bytes of a Hugging Face directory's safetensors weights (None: not such a directory)."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        return None
    files = list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None
