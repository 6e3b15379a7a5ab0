"""Image data: a folder of images -> calibration batches preprocessed as the model expects.

Takes a folder of images (flat, or class sub-folders at any depth; any format PIL reads,
converted to RGB) and how to preprocess them: a timm model (its data config's eval
transform), a Hugging Face vision model (its image processor), or ``image_size``/``mean``/
``std`` for anything else. Returns ``ImageBatches``: a sized, re-iterable iterable of float
batches ``[B, C, H, W]``, or ``{"pixel_values": ...}`` (the processor's output) for a model
whose forward takes ``pixel_values``. Images are decoded one batch at a time, so memory does
not grow with the folder.
"""

from __future__ import annotations

import inspect
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError, EvagraphWarning, first_line

Batch = torch.Tensor | dict[str, torch.Tensor]


class ImageBatches:
    """Batches of ``files`` decoded and preprocessed when iterated (each pass the same order).

    ``transform(PIL image) -> [C, H, W] tensor`` per image, or ``processor(images=[...],
    return_tensors="pt")`` per batch (a Hugging Face image processor). ``key``: the forward
    argument a batch is passed as (``"pixel_values"``), or None for a positional tensor.
    """

    def __init__(
        self,
        files: Sequence[Path],
        batch_size: int,
        *,
        transform: Callable[[Any], torch.Tensor] | None = None,
        processor: Any = None,
        key: str | None = None,
    ) -> None:
        self.files = list(files)
        self.batch_size = batch_size
        self.transform = transform
        self.processor = processor
        self.key = key

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self.files), self.batch_size):
            images = []
            for path in self.files[start : start + self.batch_size]:
                try:
                    images.append(_decode(path))
                except Exception as err:  # the header read, the pixels did not (truncated)
                    warnings.warn(
                        f"skipped image {path}: {first_line(err, typed=True)}",
                        EvagraphWarning,
                        stacklevel=2,
                    )
            if images:
                yield self._batch(images)

    def _batch(self, images: list) -> Batch:
        if self.processor is not None:
            out = self.processor(images=images, return_tensors="pt")
            batch = {k: v for k, v in dict(out).items() if isinstance(v, torch.Tensor)}
            if self.key is None and len(batch) == 1:  # a model that takes the pixels positionally
                return next(iter(batch.values()))
            return batch
        pixels = torch.stack([self.transform(img) for img in images])
        return {self.key: pixels} if self.key else pixels


def image_batches(
    folder: str | Path,
    model: torch.nn.Module | None = None,
    *,
    batch_size: int = 8,
    transform: Callable[[Any], torch.Tensor] | None = None,
    processor: Any = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_samples: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> ImageBatches:
    """Calibration batches of the images under ``folder``, preprocessed as ``model`` expects.

    The preprocessing, first that applies: ``transform`` (a callable from a PIL image to a
    ``[C, H, W]`` tensor, e.g. a torchvision transform; a Hugging Face image processor is
    taken as ``processor``); ``processor`` (a Hugging Face image processor, or the model
    directory to load one from with ``AutoImageProcessor``); a timm ``model``: its data
    config's eval transform (``image_size``/``mean``/``std``, if given, override the config);
    a Hugging Face ``model`` loaded from a directory with ``preprocessor_config.json``: that
    processor; else ``image_size`` (resize the shorter side, centre crop) with ``mean`` and
    ``std`` (per RGB channel), or a ``ConfigError`` asking for them. A processor directory's
    own code (``auto_map``) runs only with ``trust_remote_code``.

    Files are taken in sorted order (hidden ones left out), or shuffled with ``seed``; the
    first ``num_samples`` are used. Files PIL cannot open are skipped with one warning; a
    folder with none it can is a ``DataError``. Batches are tensors ``[B, C, H, W]``, or dicts
    ``{"pixel_values": ...}`` for a model whose forward takes ``pixel_values``.
    """
    _positive(batch_size, "batch_size")
    if num_samples is not None:
        _positive(num_samples, "num_samples")
    # The preprocessing first: a mistake there fails before the folder is read.
    if _is_processor(transform):
        transform, processor = None, transform
    if processor is not None or (transform is None and _hf_directory(model) is not None):
        if image_size is not None or mean is not None or std is not None:
            raise ConfigError(
                "image_size/mean/std are for models without an image processor: a Hugging "
                "Face image processor fixes its own size and normalisation"
            )
        processor = _load_processor(
            processor if processor is not None else _hf_directory(model), trust_remote_code
        )
    elif transform is None:
        transform = _transform_for(model, image_size, mean, std)
    files = _images_in(Path(folder))
    if shuffle:
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
        files = [files[i] for i in order.tolist()]
    if num_samples is not None:
        files = files[:num_samples]
    return ImageBatches(
        files, batch_size, transform=transform, processor=processor, key=_input_key(model)
    )


def _positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _images_in(folder: Path) -> list[Path]:
    """The files under ``folder`` that PIL can open (header only: pixels are read later)."""
    from PIL import Image

    if not folder.exists():
        raise DataError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of images")
    # Sorted by relative path, so the order is the same on every machine and file system.
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    files = [p for p in files if not any(s.startswith(".") for s in p.relative_to(folder).parts)]
    if not files:
        raise DataError(f"image folder {folder} holds no files")
    readable, failed = [], []
    for path in files:
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 - the header parsed: an image PIL knows
            readable.append(path)
        except Exception as err:
            failed.append((path, err))
    if not readable:
        path, err = failed[0]
        raise DataError(
            f"image folder {folder}: none of its {len(files)} file(s) is an image PIL can read "
            f"(e.g. {path.relative_to(folder)}: {first_line(err, typed=True)})"
        )
    if failed:
        names = ", ".join(str(p.relative_to(folder)) for p, _ in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        warnings.warn(
            f"image folder {folder}: skipped {len(failed)} file(s) PIL cannot read as an image "
            f"({names}{more})",
            EvagraphWarning,
            stacklevel=3,
        )
    return readable


def _decode(path: Path):
    """The image at ``path`` as RGB (grayscale, palette, RGBA, CMYK ... converted; the first
    frame of an animation)."""
    from PIL import Image

    with Image.open(path) as img:
        img.seek(0)
        return img.convert("RGB")


def _input_key(model: torch.nn.Module | None) -> str | None:
    """``"pixel_values"`` if the model's forward takes its images by that name (Hugging Face
    vision models), else None: the batch is passed positionally."""
    if model is None:
        return None
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return "pixel_values" if "pixel_values" in params else None


def _is_processor(obj: Any) -> bool:
    if obj is None or "transformers" not in sys.modules:
        return False
    from transformers import ProcessorMixin
    from transformers.image_processing_base import ImageProcessingMixin

    return isinstance(obj, (ImageProcessingMixin, ProcessorMixin))


def _hf_directory(model: torch.nn.Module | None) -> Path | None:
    """The directory a Hugging Face ``model`` was loaded from, if it has an image processor."""
    path = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if not path or not Path(path).is_dir():
        return None
    return Path(path) if (Path(path) / "preprocessor_config.json").is_file() else None


def _load_processor(processor: Any, trust_remote_code: bool = False) -> Any:
    """``processor`` itself, or the image processor saved in the directory it names."""
    if not isinstance(processor, (str, Path)):
        return processor
    from transformers import AutoImageProcessor

    try:
        # Code shipped with a processor (auto_map) is refused, not run (nor asked about),
        # unless the user trusts it.
        return AutoImageProcessor.from_pretrained(
            str(processor), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as err:
        raise ConfigError(
            f"cannot load an image processor from {processor}: {first_line(err, typed=True)}"
        ) from err


def _transform_for(
    model: torch.nn.Module | None,
    image_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> Callable[[Any], torch.Tensor]:
    """The eval transform of a timm ``model`` (with the given values overriding its config),
    else resize + centre crop to ``image_size`` and normalise with ``mean``/``std``."""
    if image_size is not None:
        _positive(image_size, "image_size")
    mean, std = _channels(mean, "mean"), _channels(std, "std")
    if std is not None and min(std) <= 0:
        raise ConfigError(f"std must be positive for every channel, got {list(std)}")
    if isinstance(getattr(model, "pretrained_cfg", None), dict):  # a timm model
        from timm.data import create_transform, resolve_model_data_config

        overrides = {"img_size": image_size, "mean": mean, "std": std}
        config = resolve_model_data_config(
            model, args={k: v for k, v in overrides.items() if v is not None}
        )
        return create_transform(**config, is_training=False)
    given = {"image_size": image_size, "mean": mean, "std": std}
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ConfigError(
            "the images' preprocessing is unknown for this model (not a timm or Hugging Face "
            "vision model): give image_size, mean and std (--image-size, --mean, --std; "
            f"missing: {', '.join(missing)})"
        )
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(image_size, antialias=True),  # the shorter side
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def _channels(values: Sequence[float] | None, name: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be 3 numbers (R, G, B), got {values!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{name} must be 3 finite numbers (R, G, B), got {list(values)}")
    return values
