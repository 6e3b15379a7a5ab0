"""Calibration pipelines: how the batches go through a model to give its statistics.

``whole`` runs each batch through the whole captured graph; ``blockwise`` runs every batch
through one block at a time with only that block's weights resident. ``choose`` picks one
for a model (the command line and the Python API both ask it); ``PIPELINES`` holds them by
name, so a third pipeline is one new module registering a ``Pipeline`` subclass. Both drive
the convergence loop's ``Calibrator`` and return the ``EvaState``.
"""

from .base import PIPELINES, Pipeline, Traced, register, trace
from .blockwise import Blockwise
from .calibrator import Calibrator
from .choose import choose, read_lazily
from .whole import Whole

__all__ = [
    "PIPELINES",
    "Blockwise",
    "Calibrator",
    "Pipeline",
    "Traced",
    "Whole",
    "choose",
    "read_lazily",
    "register",
    "trace",
]
