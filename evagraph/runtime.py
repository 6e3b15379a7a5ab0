"""Running a model on calibration batches: where it runs, how a batch is passed, whose fault
a failure is, and what a batch holds.

A batch is a tensor (the one input), a tuple/list (positional inputs) or a mapping (keyword
inputs). Every pipeline, the onloading runtime (``onload``) and data parallelism
(``distributed``) run the model through these helpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DataError, first_line


def call_model(model: torch.nn.Module, batch: Any) -> Any:
    """Default forward: a mapping is keyword inputs, a tuple/list positional, a tensor the input."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def batch_failed(index: int, err: Exception) -> DataError:
    """The error for a batch the model could not run: the first line of what it raised."""
    return DataError(
        f"the model failed on calibration batch {index}: {first_line(err, typed=True)}"
    )


def check_batch_fits(model: nn.Module, batch: Any, forward_fn: Callable | None = None) -> None:
    """Raise DataError if ``model`` fails eagerly on ``batch``: a capture failure is then the
    data's fault (wrong keys, shapes, dtypes), not the model's."""
    try:
        with torch.no_grad():
            (forward_fn or call_model)(model, batch)
    except Exception as err:
        raise batch_failed(0, err) from err


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``spec`` as a device this machine has (None: cuda if available, else cpu).

    Raises ``ConfigError`` naming the device, so a typo fails before any slow loading.
    """
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device {str(spec)!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)"
        ) from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu ...
    available = getattr(backend, "is_available", None)
    if not callable(available):  # meta, lazy ...: no data can be run there
        raise ConfigError(f"device {str(spec)!r} cannot run a model on data (use cpu or cuda)")
    if not available():
        raise ConfigError(
            f"device {str(spec)!r} is not available on this machine "
            f"(torch.{device.type}.is_available() is False)"
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise ConfigError(
            f"device {str(spec)!r} does not exist: this machine has {count()} "
            f"{device.type} device(s)"
        )
    return device


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter is (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def set_training(module: nn.Module, mode: bool) -> None:
    """``module.train(mode)``, where the module allows it."""
    # Modules unlifted from torch.export refuse train()/eval(): their mode is baked in.
    with contextlib.suppress(NotImplementedError):
        module.train(mode)


def input_shapes(batch: Any) -> dict[str, tuple[int, ...]]:
    """The tensor inputs of one batch by name (keyword, or ``#i`` by position) with their
    shapes: what a graph captured for that batch's shapes only takes (``check_shapes``)."""
    if isinstance(batch, Mapping):
        named = batch.items()
    else:
        inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
        named = ((f"#{i}", v) for i, v in enumerate(inputs))
    return {k: tuple(v.shape) for k, v in named if isinstance(v, torch.Tensor)}


def samples_and_tokens(batch: Any) -> tuple[int, int | None]:
    """How many samples a batch holds (its first tensor's first dimension) and, for token
    batches (``input_ids``), how many tokens (``attention_mask`` ones where it has one)."""
    if isinstance(batch, Mapping):
        tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
        mask, ids = batch.get("attention_mask"), batch.get("input_ids")
    else:
        inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
        tensors, mask, ids = [v for v in inputs if isinstance(v, torch.Tensor)], None, None
    samples = int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 0
    if isinstance(mask, torch.Tensor):
        return samples, int(mask.count_nonzero())
    return samples, int(ids.numel()) if isinstance(ids, torch.Tensor) else None


def check_shapes(
    source: str, shapes: Mapping[str, tuple[int | None, ...]], batches: Iterable[Any]
) -> Iterator[Any]:
    """``batches``, each checked as it is drawn: a one-line ``DataError`` for the first whose
    tensors do not have the ``shapes`` that ``source`` takes (``None``: a dynamic dimension).
    Inputs are matched by keyword for dict batches, else by position, in ``shapes``' order."""

    def shown(shape: tuple) -> str:
        dims = ["*" if d is None else str(d) for d in shape]
        return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"

    for i, batch in enumerate(batches):
        if isinstance(batch, Mapping):
            pairs = [(name, batch[name]) for name in shapes if name in batch]
        else:
            inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
            pairs = list(zip(shapes, inputs))
        for name, tensor in pairs:
            expected, got = shapes[name], tuple(getattr(tensor, "shape", ()))
            if len(got) != len(expected) or any(
                e is not None and e != g for e, g in zip(expected, got)
            ):
                raise DataError(
                    f"{source} expects input {name} of shape {shown(expected)}; calibration "
                    f"batch {i} has {shown(got)}"
                )
        yield batch
