"""Checks of untrusted saved values (adapter manifests and weights, EVA state files, reports,
PEFT state dicts), each in one place: ``expect`` reads a JSON key, ``check_settings`` a saved
settings object, ``check_tensor`` a tensor, ``check_orthonormal_rows`` / ``check_descending``
what a PCA's components and variances must be; ``load_json`` and ``read_safetensors`` read a
file as one error. Each raises one line (``ModelLoadError`` unless told another
``EvagraphError``) naming the file, the entry and what the value must be. Shared by the
adapter files (``formats.adapter``), ``state``, ``report``, ``formats.peft`` and the layer
kinds (``layers``), which import nothing else of each other for it."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import torch

from .config import AdapterSettings, CalibrationSettings
from .errors import ConfigError, EvagraphError, ModelLoadError, first_line

# Integers evagraph saves are widths, ranks, counts and steps: int64 holds them all. Bigger
# JSON integers (Python's are unbounded) are no file of evagraph's, and would overflow where
# they meet a float (a chart's scale) or a tensor shape.
_INT_LIMIT = 2**63


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -_INT_LIMIT <= v < _INT_LIMIT


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_ratio(v: Any) -> bool:
    return _is_number(v) and 0 <= v <= 1


# What a JSON value must be, by the words the error uses.
_VALUE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "an object": lambda v: isinstance(v, dict),
    "a list": lambda v: isinstance(v, list),
    "a string": lambda v: isinstance(v, str),
    "a non-empty string": lambda v: isinstance(v, str) and bool(v),
    "null or a string": lambda v: v is None or isinstance(v, str),
    "null, a string or a finite number >= 0": lambda v: (
        v is None or isinstance(v, str) or (_is_number(v) and v >= 0)
    ),
    "a boolean": lambda v: isinstance(v, bool),
    "an integer": is_int,
    "an integer >= 0": lambda v: is_int(v) and v >= 0,
    "an integer >= 1": lambda v: is_int(v) and v >= 1,
    "null or an integer": lambda v: v is None or is_int(v),
    "null or an integer >= 0": lambda v: v is None or (is_int(v) and v >= 0),
    "a finite number": _is_number,
    "a finite number >= 0": lambda v: _is_number(v) and v >= 0,
    "a finite number > 0": lambda v: _is_number(v) and v > 0,
    "a finite number >= 1": lambda v: _is_number(v) and v >= 1,
    "a finite number in (0, 1]": lambda v: _is_number(v) and 0 < v <= 1,
    "a finite number in [0, 1)": lambda v: _is_number(v) and 0 <= v < 1,
    "a list of numbers in [0, 1]": lambda v: isinstance(v, list) and all(map(_is_ratio, v)),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "null or a list of strings": lambda v: v is None or _VALUE_CHECKS["a list of strings"](v),
    "a list of integers >= 1": lambda v: (
        isinstance(v, list) and all(is_int(x) and x >= 1 for x in v)
    ),
    "'linear' or 'conv'": lambda v: v in ("linear", "conv"),
    "a list of [start, stop) runs": lambda v: (
        isinstance(v, list)
        and all(
            isinstance(r, list) and len(r) == 2 and all(is_int(i) for i in r) and 0 <= r[0] <= r[1]
            for r in v
        )
    ),
}
REQUIRED: Any = object()  # expect's default: the key must be there


def expect(
    d: dict,
    key: str,
    what: str,
    source: str,
    where: str,
    default: Any = REQUIRED,
    error: type[EvagraphError] = ModelLoadError,
) -> Any:
    """``d[key]``, which must be ``what`` (a key of ``_VALUE_CHECKS``); else ``error``."""
    if key not in d:
        if default is not REQUIRED:
            return default
        raise error(f"{source}: {where}: missing {key!r}")
    value = d[key]
    if not _VALUE_CHECKS[what](value):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise error(f"{source}: {where}: {key!r} must be {what}, got {shown}")
    return value


# --- Saved settings: the fields of CalibrationSettings / AdapterSettings as ``to_dict`` writes
# them. Their JSON types come from the dataclasses' annotations (a new setting of a type
# missing below fails at import, naming it), their ranges from the dataclasses' own checks,
# run on the saved values.
_SETTING_TYPES: dict[Any, str] = {
    bool: "a boolean",  # JSON true/false: "false" or 0 would read as true, or as a number
    int: "an integer",
    float: "a finite number",
    str: "a string",
    int | None: "null or an integer",
    tuple[str, ...]: "a list of strings",
    tuple[str, ...] | None: "null or a list of strings",
}


def _field_checks(cls: type) -> dict[str, str]:
    hints = get_type_hints(cls)  # resolved: the annotations are strings (future annotations)
    missing = [f"{cls.__name__}.{f.name}: {hints[f.name]}" for f in fields(cls)
               if hints[f.name] not in _SETTING_TYPES]  # fmt: skip
    if missing:
        raise TypeError(f"validate._SETTING_TYPES has no JSON check for {', '.join(missing)}")
    return {f.name: _SETTING_TYPES[hints[f.name]] for f in fields(cls)}


SETTINGS_CLASSES = {"calibration": CalibrationSettings, "adapter": AdapterSettings}
_SETTING_CHECKS = {cls: _field_checks(cls) for cls in SETTINGS_CLASSES.values()}


def _check_settings_of(
    d: dict, cls: type, source: str, where: str, error: type[EvagraphError]
) -> None:
    known = [name for name in _SETTING_CHECKS[cls] if name in d]
    for name in known:
        expect(d, name, _SETTING_CHECKS[cls][name], source, where, error=error)
    try:
        settings = cls(**{name: d[name] for name in known})
    except ConfigError as err:
        raise error(f"{source}: {where}: {err}") from None
    # k = round(budget x rho) components per decomposition: rho = 1e308 passes the class's
    # own checks but makes k infinite (an OverflowError wherever k is computed).
    if {"budget", "rho"} <= set(known) and not settings.budget * settings.rho < _INT_LIMIT:
        raise error(
            f"{source}: {where}: budget {settings.budget} x rho {settings.rho:.4g} is no "
            "number of components"
        )


def check_settings(
    settings: Any, source: str, where: str = "settings", error: type[EvagraphError] = ModelLoadError
) -> dict:
    """A saved settings object: flat (an EVA state's calibration settings), or with
    ``calibration`` and ``adapter`` sections (reports, the CLI's adapter.json). The keys that
    are settings must have their type and range; other keys are left alone (a caller's own)."""
    if not isinstance(settings, dict):
        raise error(f"{source}: {where} must be an object, got {settings!r:.40}")
    for section, cls in SETTINGS_CLASSES.items():
        if section in settings:
            expect(settings, section, "an object", source, where, error=error)
            _check_settings_of(settings[section], cls, source, f"{where}.{section}", error)
        _check_settings_of(settings, cls, source, where, error)
    return settings


# --- Tensors.


def check_tensor(
    t: Any,
    name: str,
    source: str,
    shape: tuple[int, ...] | None = None,
    error: type[EvagraphError] = ModelLoadError,
) -> torch.Tensor:
    """``t``, which must be a tensor of floating dtype, of ``shape`` if given, with no NaN or
    Inf: integer or complex weights would fail (or silently truncate) at the first forward."""
    if not isinstance(t, torch.Tensor):
        raise error(f"{source}: {name} must be a tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != shape:
        raise error(f"{source}: {name} has shape {tuple(t.shape)}, expected {shape}")
    if not t.is_floating_point():
        raise error(f"{source}: {name} has dtype {t.dtype}, not a float type")
    if not bool(torch.isfinite(t).all()):
        raise error(f"{source}: {name} holds NaN or Inf")
    return t


def orthonormal_tolerance(dtype: torch.dtype) -> float:
    """How far ``C @ C.T`` of unit rows stored in ``dtype`` may be from the identity.

    Rounding each entry of a unit vector to ``dtype`` moves a Gram entry by at most about
    its eps; evagraph's float32 components are within 1e-6 (measured: 6e-7 for the
    low-rank statistic). 8 eps (bf16: 0.06), at least 1e-3, accepts any honest storage and
    refuses what matters: scaled rows (a 1000x larger initial adapter) and zero rows.
    """
    return max(1e-3, 8 * torch.finfo(dtype).eps)


def check_orthonormal_rows(
    t: torch.Tensor, name: str, source: str, error: type[EvagraphError] = ModelLoadError
) -> None:
    """Rows of ``t`` (a float matrix) orthonormal within ``orthonormal_tolerance``: EVA's A
    is the top principal directions, which are; all-zero rows would leave A = 0 = B, an
    adapter that never trains."""
    if not len(t):
        return
    rows = t.reshape(len(t), -1).double()
    norms = rows.norm(dim=1)
    tol = orthonormal_tolerance(t.dtype)
    worst = int((norms - 1).abs().argmax())
    if abs(float(norms[worst]) - 1) > tol:
        raise error(
            f"{source}: {name} row {worst} has norm {float(norms[worst]):.4g}, expected 1 "
            "(orthonormal principal directions)"
        )
    off = (rows @ rows.T - torch.eye(len(rows), dtype=torch.float64)).abs()
    if float(off.max()) > tol:
        i, j = divmod(int(off.argmax()), len(rows))
        raise error(
            f"{source}: {name} rows {i} and {j} have dot product {float(rows[i] @ rows[j]):.4g}, "
            "expected 0 (orthonormal principal directions)"
        )


def check_descending(
    t: torch.Tensor, name: str, source: str, error: type[EvagraphError] = ModelLoadError
) -> None:
    """Values of ``t`` non-negative and non-increasing (within a relative 1e-5 of the first:
    rounding), as the variances of principal components in order are."""
    v = t.double()
    if bool((v < 0).any()):
        raise error(f"{source}: {name} holds a negative value")
    if len(v) > 1:
        rises = ((v[1:] - v[:-1]) > 1e-5 * v[0]).nonzero()
        if len(rises):
            i = int(rises[0])  # the first: where the order breaks
            raise error(
                f"{source}: {name} increases at index {i + 1} ({float(v[i]):.4g} then "
                f"{float(v[i + 1]):.4g}): principal components come in decreasing variance"
            )


# --- Reading untrusted files: JSON without duplicate keys, safetensors as one error.


def load_json(text: str, source: str) -> Any:
    """Parse ``text``; duplicate keys (which json would resolve silently) are an error."""

    def unique(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise ModelLoadError(f"{source}: duplicate entry {key!r}")
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=unique)
    except (ValueError, RecursionError) as err:
        raise ModelLoadError(f"{source} is not valid JSON: {first_line(err)}") from err


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors and the metadata of a safetensors file; any failure is a ModelLoadError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as err:  # SafetensorError, OSError, ...: all the file's fault
        raise ModelLoadError(f"cannot read {what} {path}: {first_line(err)}") from err
    return tensors, metadata
