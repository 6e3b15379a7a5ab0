"""Streaming statistics of activation rows: what the calibration pipelines accumulate.

``make_statistic(kind, dim, k, device)`` returns the statistic for one decomposition:
``ExactCovariance`` (a ``d x d`` second moment: the exact PCA of every row seen) for narrow
rows or when asked for, else ``IncrementalSVD`` (a rank-max(2k + 4, k + 12) streaming SVD: O(d k)
memory and O(N d k) work per batch, for wide layers). Both follow the ``Statistic`` protocol
(update, merge, estimate, finalize) and finalise to ``Components``. ``update_cost(kind, dim,
k)`` is a statistic's relative work per minibatch beside the rows' products (what a
data-parallel run balances over the processes that own the statistics).
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


# A convolution's statistic may cost this share of the layer's own multiply-adds: its input
# rows (one per output position, C_in * prod(kernel) wide) are many and their neighbours
# nearly alike, so rows at a coarser grid of positions keep the components (see
# ``conv_stride``) at a fraction of the cost.
_CONV_SHARE = 0.25


def uses_exact(kind: str, dim: int, k: int) -> bool:
    """Whether ``make_statistic(kind, dim, k, ...)`` gives the exact statistic."""
    if kind not in KINDS:
        raise ValueError(f"statistic must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind == "exact" or (kind == "auto" and dim <= _EXACT_MAX_PER_COMPONENT * k)


def row_cost(kind: str, dim: int, k: int) -> int:
    """Multiply-adds per row of the statistic ``make_statistic`` gives: ``d^2`` for the
    exact one, about ``6 q d`` for the low-rank one (three passes of ``2q`` columns)."""
    return dim * dim if uses_exact(kind, dim, k) else 6 * sketch_rank(k) * dim


def conv_stride(kind: str, dim: int, k: int, layer_macs: int, spatial: int) -> int:
    """The spacing of the output positions whose rows a convolution's statistic takes along
    each of its ``spatial`` dimensions: the smallest that brings the statistic's cost under
    ``_CONV_SHARE`` of the layers' ``layer_macs`` multiply-adds per position, at most 4 (one
    position in 16 of a 2d map)."""
    stride = 1
    while stride < 4 and row_cost(kind, dim, k) > _CONV_SHARE * layer_macs * stride**spatial:
        stride += 1
    return stride


def make_statistic(
    kind: str,
    dim: int,
    k: int,
    device: torch.device | str,
    sync: Sync | None = None,
    owner: int = 0,
) -> Statistic:
    """The statistic for rows of width ``dim`` with ``k`` components; ``kind`` in ``KINDS``.
    ``sync``: reduce each update over the processes of a data-parallel run to ``owner``."""
    if uses_exact(kind, dim, k):
        return ExactCovariance(dim, k, device, sync=sync, owner=owner)
    return IncrementalSVD(dim, k, device, sync=sync, owner=owner)


def update_cost(kind: str, dim: int, k: int) -> float:
    """Relative multiply-adds per minibatch of the owner's work: the exact statistic adds
    and solves a ``d x d`` matrix (``d^2`` per pass), the sketch takes a QR of ``d x 3q``
    and forms ``q x d`` factors (``d q^2``-ish)."""
    if uses_exact(kind, dim, k):
        return float(dim * dim) * min(k, dim)
    q = min(sketch_rank(min(k, dim)), dim)
    return float(dim) * 9 * q * q


__all__ = [
    "KINDS",
    "Components",
    "ExactCovariance",
    "IncrementalSVD",
    "Statistic",
    "Sync",
    "conv_stride",
    "flush_all",
    "make_statistic",
    "row_cost",
    "sketch_rank",
    "update_cost",
    "uses_exact",
]
