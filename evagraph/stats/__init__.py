"""Streaming statistics of activation rows: what the calibration pipelines accumulate.

``make_statistic(kind, dim, k, device)`` returns the statistic for one decomposition:
``ExactCovariance`` (a ``d x d`` second moment: the exact PCA of every row seen) for narrow
rows or when asked for, else ``IncrementalSVD`` (a rank-max(2k + 4, k + 12) streaming SVD: O(d k)
memory and O(N d k) work per batch, for wide layers). Both follow the ``Statistic`` protocol
(update, merge, estimate, finalize) and finalise to ``Components``.
"""

from __future__ import annotations

import torch

from .base import Components, Statistic, Sync
from .exact import ExactCovariance
from .lowrank import IncrementalSVD, flush_all, sketch_rank

KINDS = ("auto", "exact", "lowrank")

# With "auto", rows up to 8k wide use the exact statistic: there it costs no more per row
# than the low-rank one (d^2 against about 12 k d multiply-adds), its eigendecomposition is
# a dense solve of at most a few milliseconds, and its memory (d^2) a few times the sketch's.
_EXACT_MAX_PER_COMPONENT = 8


def make_statistic(
    kind: str, dim: int, k: int, device: torch.device | str, sync: Sync | None = None
) -> Statistic:
    """The statistic for rows of width ``dim`` with ``k`` components; ``kind`` in ``KINDS``.
    ``sync``: reduce each update over the processes of a data-parallel run."""
    if kind not in KINDS:
        raise ValueError(f"statistic must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "exact" or (kind == "auto" and dim <= _EXACT_MAX_PER_COMPONENT * k):
        return ExactCovariance(dim, k, device, sync=sync)
    return IncrementalSVD(dim, k, device, sync=sync)


__all__ = [
    "KINDS",
    "Components",
    "ExactCovariance",
    "IncrementalSVD",
    "Statistic",
    "Sync",
    "flush_all",
    "make_statistic",
    "sketch_rank",
]
