"""Exceptions evagraph raises on ordinary mistakes, so callers can catch them by kind."""


class EvagraphError(Exception):
    """Base class: every error evagraph raises on purpose derives from it."""


class ConfigError(EvagraphError, ValueError):
    """A setting is out of range or contradicts another (budget, rho, tau, patterns...)."""


class CaptureError(EvagraphError):
    """The model could not be captured as a graph."""


class DataError(EvagraphError):
    """The calibration data is missing, empty, or does not fit the model."""


class ModelLoadError(EvagraphError):
    """A model file could not be loaded (or would need an explicit opt-in to be loaded)."""


class ReportLoadError(ModelLoadError, ValueError):
    """A file is not a report evagraph wrote (also a ValueError, which ``Report.load`` raised
    before)."""


class OutputError(EvagraphError, OSError):
    """The output location cannot be written (not a directory, no permission, read-only)."""


class EvagraphWarning(UserWarning):
    """Base class of evagraph's own warnings (the CLI labels them ``evagraph: warning:``;
    other libraries' warnings keep their own name)."""


class ConvergenceWarning(EvagraphWarning):
    """Calibration stopped before every layer's components converged."""


def first_line(err: BaseException, *, typed: bool = False) -> str:
    """``err``'s message on one line, for a one-line error: its first line, or its type's name
    when it has none. ``typed``: prefixed with the type's name (``RuntimeError: ...``), for
    errors from other code, whose message alone may not say what went wrong."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    if typed:
        return type(err).__name__ + (f": {line}" if line else "")
    return line or type(err).__name__
