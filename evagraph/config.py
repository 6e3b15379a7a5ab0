"""Settings, each defined once: what the statistics depend on, and what turns them into adapters.

``CalibrationSettings`` (budget, rho, tau, targets, ...: what ``calibrate`` needs and the saved
statistics record) and ``AdapterSettings`` (budget, rho, alpha, ...: what ``adapt`` needs) are
validated on construction. The Python API takes their fields as keyword arguments
(``settings_from``) and the command line derives its options from them (each field's
``metadata["help"]``), so a setting's name, default, check and help live here only.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any, get_type_hints

from .errors import ConfigError
from .stats import KINDS


def patterns(value: str | Iterable[str] | None, what: str = "targets") -> tuple[str, ...] | None:
    """The user's ``targets`` / ``exclude`` as a tuple of glob patterns (None stays None).

    A string is one pattern: ``tuple("stem")`` would silently make it four one-letter ones.
    Raises ``ConfigError`` naming ``what`` for anything but None, a str or strs.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise ConfigError(
            f"{what} must be a glob pattern or a list of them, got {type(value).__name__}"
        )
    found = tuple(value)
    for p in found:
        if not isinstance(p, str):
            raise ConfigError(f"{what} patterns must be strings, got {p!r:.40}")
    return found


def _setting(default: Any, help: str, **cli: Any) -> Any:
    """A settings field: its default, its help text, and how the CLI spells it (``flag``:
    the option's name when not ``--field-name``; ``cli=False``: not on the command line)."""
    return field(default=default, metadata={"help": help, **cli})


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class _Ranks:
    budget: int = _setting(
        8, "Average LoRA rank per target layer (r); the global budget is r x layers."
    )
    rho: float = _setting(
        2.0, "Rank redistribution: a layer may take up to round(r x rho); 1 = uniform."
    )

    def __post_init__(self) -> None:
        for f in fields(self):  # "no" and 2 are truthy: a flag must say what it means
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"{f.name} must be True or False, got {getattr(self, f.name)!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget <= 0:
            raise ConfigError(f"budget must be a positive integer, got {self.budget!r}")
        if _finite("rho", self.rho) < 1:
            raise ConfigError(f"rho must be >= 1, got {self.rho!r}")
        if not math.isfinite(self.budget * self.rho):  # k = round(budget * rho) must exist
            raise ConfigError(f"budget x rho must be finite, got {self.budget} x {self.rho!r}")

    @property
    def max_components(self) -> int:
        """k = round(budget * rho): components fitted per decomposition, the per-layer cap."""
        return round(self.budget * self.rho)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class CalibrationSettings(_Ranks):
    """What the statistics depend on: ``calibrate``'s settings, saved with an ``EvaState``."""

    tau: float = _setting(
        0.99, "Cosine similarity at which components count as converged, in (0, 1]."
    )
    targets: tuple[str, ...] | None = _setting(
        None,
        "Glob(s) of layer names to adapt, e.g. '*.q_proj' (repeatable or comma-separated). "
        "[default: every linear/conv layer but the model's head]",
    )
    exclude: tuple[str, ...] = _setting((), "Glob(s) of layer names never to adapt.")
    max_steps: int | None = _setting(
        None, "Bound on calibration minibatches; unconverged layers are reported."
    )
    min_batches: int = _setting(1, "Minibatches a layer must see before it may count as converged.")
    use_label_mask: bool = _setting(
        True,
        "Keep rows whose labels are -100 (by default they are left out, as in PEFT).",
        flag="--no-label-mask",
    )
    label_mask_value: int = _setting(-100, "The label value of rows left out.", cli=False)
    statistic: str = _setting(
        "auto",
        "exact: a d x d second moment per decomposition (the exact PCA of the rows seen); "
        "lowrank: a rank-max(2k + 4, k + 12) incremental SVD (O(d k) memory and work); auto: exact "
        "for rows up to 8k wide, lowrank beyond.",
        choices=KINDS,
    )
    conv_stride: int | None = _setting(
        None,
        "A convolution's statistic takes the rows of every n-th output position along each "
        "spatial dimension; 1: every row. [default: per layer, the smallest n (at most 4) at "
        "which the statistic costs at most a quarter of the layer]",
    )
    max_rows: int | None = _setting(
        None,
        "At most this many rows of each minibatch reach each statistic: every n-th row, n the "
        "smallest that leaves at most this many (as the EVA authors' vision code fits on a "
        "fixed number of tokens per step); fewer rows per minibatch, so usually more "
        "minibatches to converge. Not applied to fused MoE experts' rows. [default: every row]",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "targets", patterns(self.targets, "targets"))
        object.__setattr__(self, "exclude", patterns(self.exclude, "exclude") or ())
        if not 0 < _finite("tau", self.tau) <= 1:
            raise ConfigError(f"tau must be in (0, 1], got {self.tau!r}")
        for name in ("max_steps", "min_batches", "label_mask_value", "conv_stride", "max_rows"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max_steps must be positive, got {self.max_steps!r}")
        for name in ("conv_stride", "max_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.min_batches < 1:
            raise ConfigError(f"min_batches must be >= 1, got {self.min_batches!r}")
        if not isinstance(self.statistic, str) or self.statistic not in KINDS:
            raise ConfigError(
                f"statistic must be one of {', '.join(KINDS)}, got {self.statistic!r}"
            )


@dataclass(frozen=True)
class AdapterSettings(_Ranks):
    """What turns statistics into adapters: ``adapt``'s settings (allocation and init)."""

    alpha: float = _setting(8.0, "LoRA alpha.")
    adjust_scaling_factors: bool = _setting(
        True,
        "Scale adapters by alpha/rank instead of alpha/r (the authors' variant).",
        flag="--no-adjust-scaling",
    )
    whiten: bool = _setting(False, "Divide A's rows by sqrt of their singular values.")
    dropout: float = _setting(0.0, "LoRA dropout.")
    use_dora: bool = _setting(
        False,
        "DoRA: a trainable magnitude per output (the base weight's row norms, so the output "
        "is the base model's at init) times the direction of W + scale x B A, as PEFT's "
        "use_dora; linear, conv and HF Conv1D modules only.",
        flag="--dora",
    )
    use_rslora: bool = _setting(
        False,
        "rsLoRA (PEFT's use_rslora): divide a layer's alpha by sqrt(rank) instead of rank; "
        "with the default adjusted scaling the scale is then alpha x sqrt(rank) / r.",
        flag="--rslora",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _finite("alpha", self.alpha) > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0 <= _finite("dropout", self.dropout) < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def layer_scaling(self, rank: int) -> tuple[float, float]:
        """(alpha, scale) of a layer of ``rank`` > 0, by the spec's rule: alpha scaled by
        ``rank / budget`` (``adjust_scaling_factors``, PEFT's EVA) or kept, and scale =
        alpha / rank, or alpha / sqrt(rank) with ``use_rslora`` (PEFT's order: alpha is
        adjusted first, then divided).
        """
        alpha = self.alpha * rank / self.budget if self.adjust_scaling_factors else self.alpha
        return alpha, alpha / scale_divisor(rank, self.use_rslora)


def scale_divisor(rank: int, rslora: bool) -> float:
    """What LoRA's alpha is divided by to give a layer of ``rank`` its scale: the rank, or its
    square root for rsLoRA (PEFT's ``use_rslora``)."""
    return math.sqrt(rank) if rslora else rank


def settings_from(
    options: dict[str, Any], *classes: type, defaults: dict[str, Any] | None = None
) -> tuple[Any, ...]:
    """One settings object per class in ``classes``, from keyword ``options`` over
    ``defaults`` (a field in several classes, as budget and rho, goes to each).

    Raises ``ConfigError`` naming an option that is no field of ``classes``.
    """
    names = {f.name for cls in classes for f in fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)}; the settings here are "
            f"{', '.join(sorted(names))}"
        )
    given = {**(defaults or {}), **options}
    return tuple(
        cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given}) for cls in classes
    )


def cli_fields() -> list[Field]:
    """The settings the command line offers: the fields of both settings classes (budget and
    rho, fields of both, once), each with its type resolved and its metadata (``help``, and
    ``flag`` / ``choices`` where the option differs from the field)."""
    found: dict[str, Field] = {}
    for cls in (CalibrationSettings, AdapterSettings):
        hints = get_type_hints(cls)
        for f in fields(cls):
            if f.name not in found and f.metadata.get("cli") is not False:
                f = copy.copy(f)  # the dataclass's own field keeps its annotation
                f.type = hints[f.name]  # resolved, for the option's type
                found[f.name] = f
    return list(found.values())


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_size(value: str | int | None, what: str = "max_memory") -> int | None:
    """Bytes from ``600MB``, ``40GB``, ``1.5GiB`` or an int (None stays None)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(f"{what} must be a size such as 600MB, 40GB or 1.5GiB, got {value!r}")
        size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return size
