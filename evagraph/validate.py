"""Checks of untrusted JSON values (adapter manifests, EVA state files): ``expect`` reads a
key and raises ``ModelLoadError`` naming the file, the entry and what the value must be.
Shared by ``artifacts``, ``state`` and the layer kinds (``layers``), which import nothing
else of each other for it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .errors import ModelLoadError


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# What a JSON value must be, by the words the error uses.
_VALUE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "an object": lambda v: isinstance(v, dict),
    "a list": lambda v: isinstance(v, list),
    "a string": lambda v: isinstance(v, str),
    "a non-empty string": lambda v: isinstance(v, str) and bool(v),
    "null or a string": lambda v: v is None or isinstance(v, str),
    "a boolean": lambda v: isinstance(v, bool),
    "an integer >= 0": lambda v: is_int(v) and v >= 0,
    "an integer >= 1": lambda v: is_int(v) and v >= 1,
    "null or an integer >= 0": lambda v: v is None or (is_int(v) and v >= 0),
    "a finite number": _is_number,
    "a finite number > 0": lambda v: _is_number(v) and v > 0,
    "a finite number >= 1": lambda v: _is_number(v) and v >= 1,
    "a finite number in (0, 1]": lambda v: _is_number(v) and 0 < v <= 1,
    "a finite number in [0, 1)": lambda v: _is_number(v) and 0 <= v < 1,
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
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
_MISSING = object()


def expect(d: dict, key: str, what: str, source: str, where: str, default: Any = _MISSING) -> Any:
    """``d[key]``, which must be ``what`` (a key of ``_VALUE_CHECKS``); else ModelLoadError."""
    if key not in d:
        if default is not _MISSING:
            return default
        raise ModelLoadError(f"{source}: {where}: missing {key!r}")
    value = d[key]
    if not _VALUE_CHECKS[what](value):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ModelLoadError(f"{source}: {where}: {key!r} must be {what}, got {shown}")
    return value
