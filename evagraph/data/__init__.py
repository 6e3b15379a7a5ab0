"""Calibration data: what ``--data`` names, read into minibatches.

``open_data(path, batch_size, ...)`` is the one dispatch from what ``--data`` names to batches,
by what it is (``data_kind``): a ``.pt``/``.safetensors`` file of tensors
(``tensors.load_calibration``: a list of minibatches); text for a language model
(``text.text_batches``: ``.txt``, ``.jsonl``/``.json``, ``.csv``, ``.parquet`` or a
``datasets`` ``save_to_disk`` directory, tokenized lazily into ``{"input_ids",
"attention_mask"}`` batches); or a folder of images (``images.image_batches``, decoded one
batch at a time and preprocessed as the model expects: timm data config, Hugging Face image
processor, or ``image_size``/``mean``/``std``). Each data source has its module here; how a
model is called with a batch is ``evagraph.runtime``'s business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .images import ImageBatches, image_batches
from .tensors import load_calibration
from .text import TextBatches, is_text_source, load_tokenizer, text_batches

__all__ = [
    "ImageBatches",
    "TextBatches",
    "check_options",
    "data_kind",
    "image_batches",
    "load_calibration",
    "load_tokenizer",
    "open_data",
    "text_batches",
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
