"""Calibration batches: calling a model with one, moving one to a device, reading data.

``open_data(path, batch_size, ...)`` is the one dispatch from what ``--data`` names to batches,
by what it is (``data_kind``): a ``.pt``/``.safetensors`` file of tensors (``load_calibration``,
here: a list of minibatches); text for a language model (``text.text_batches``: ``.txt``,
``.jsonl``/``.json``, ``.csv``, ``.parquet`` or a ``datasets`` ``save_to_disk`` directory,
tokenized lazily into ``{"input_ids", "attention_mask"}`` batches); or a folder of images
(``images.image_batches``, decoded one batch at a time and preprocessed as the model
expects: timm data config, Hugging Face image processor, or ``image_size``/``mean``/``std``).
Each data source has its module here.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError, first_line
from .images import ImageBatches, image_batches
from .text import TextBatches, is_text_source, text_batches

__all__ = [
    "ImageBatches",
    "TextBatches",
    "batch_failed",
    "call_model",
    "check_shapes",
    "data_kind",
    "image_batches",
    "load_calibration",
    "open_data",
    "resolve_device",
    "samples_and_tokens",
    "text_batches",
    "to_device",
]

# The options each kind of data takes (``num_samples`` and ``shuffle``: text and images).
_OPTIONS = {
    "tensors": (),
    "text": ("max_length", "text_column", "one_per_line", "pack", "num_samples", "shuffle"),
    "images": ("image_size", "mean", "std", "num_samples", "shuffle"),
}


def data_kind(path: str | Path) -> str:
    """``"text"``, ``"images"`` (a folder that is not a saved dataset) or ``"tensors"``."""
    path = Path(path)
    if path.is_dir():
        saved = ("state.json", "dataset_dict.json", "dataset_info.json")
        return "text" if any((path / name).is_file() for name in saved) else "images"
    return "text" if is_text_source(path) else "tensors"


def check_options(path: str | Path, tokenizer: Any = None, **options: Any) -> str:
    """The kind of ``path``; ``ConfigError`` for options given (not None/False) that it does
    not take, named as the CLI's flags."""
    kind = data_kind(path)
    given = [k for k, v in options.items() if v is not None and v is not False]
    wrong = [k for k in given if k not in _OPTIONS[kind]]
    wrong += ["tokenizer"] if tokenizer is not None and kind != "text" else []
    if wrong:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in wrong)
        what = {"tensors": "a file of tensors", "text": "text", "images": "a folder of images"}
        raise ConfigError(f"{flags}: not an option for {what[kind]} ({path})")
    return kind


def open_data(
    path: str | Path,
    batch_size: int,
    *,
    model: torch.nn.Module | None = None,
    processor: Any = None,
    tokenizer: Any = None,
    default_tokenizer: str | Path | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    **options: Any,
) -> Any:
    """The calibration batches in ``path``, read by what it is (the CLI's ``--data``).

    Tensors: ``load_calibration``. Text: ``text_batches`` with ``tokenizer`` (a tokenizer, or
    a directory to load one from with ``AutoTokenizer``; ``default_tokenizer`` when None, e.g.
    the model's directory). Images: ``image_batches`` for ``model`` (``processor``: a Hugging
    Face image processor or the directory holding one). ``trust_remote_code``: a tokenizer or
    image processor directory may run code it ships (``auto_map``); without it, never.
    ``options``: the reader's keyword options the caller set; options for another kind of
    data are refused (``ConfigError``).
    """
    path = Path(path)
    kind = check_options(path, tokenizer, **options)
    options = {k: v for k, v in options.items() if v is not None}
    if kind == "tensors":
        return load_calibration(path, batch_size)
    if kind == "images":
        return image_batches(
            path, model, batch_size=batch_size, processor=processor, seed=seed,
            trust_remote_code=trust_remote_code, **options,
        )  # fmt: skip
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer
    if tokenizer is None:
        raise ConfigError(
            f"calibration data {path} is text: give the tokenizer to encode it (--tokenizer "
            "PATH; the default, the MODEL directory, is not a Hugging Face model directory)"
        )
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    return text_batches(path, tokenizer, batch_size=batch_size, seed=seed, **options)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` from a local directory, as a one-line error.

    Code shipped with the tokenizer (``auto_map`` in its ``tokenizer_config.json`` or
    ``config.json``) runs only with ``trust_remote_code``; without it transformers is told so
    explicitly, as otherwise it would ask on stdin whether to run the code.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"tokenizer {path}: not a directory (save_pretrained writes one)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as err:
        reason = first_line(err, typed=True)
        if "custom code" in reason or "trust_remote_code" in reason:
            reason = (
                "it ships its own code (auto_map), which runs only with --trust-remote-code "
                "(trust_remote_code=True): pass it only if you trust the directory"
            )
        raise ConfigError(f"cannot load a tokenizer from {path}: {reason}") from err


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
