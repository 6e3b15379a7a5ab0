"""The exact statistic: a ``d x d`` second moment, whose PCA is exact for every row seen.

``ExactCovariance(dim, k, device)`` keeps, for a shift ``c`` (the first batch's mean), the
row count, ``sum(x - c)`` and ``sum((x - c)(x - c)^T)``, which avoids the cancellation of the
plain ``E[xx^T] - mu mu^T`` form. Sums are held in float32 scaled by a power of two that
follows the largest deviation seen, so data at 1e-30 or 1e30 neither underflows nor
overflows. Two statistics merge exactly (the other's sums are re-expressed around this
shift). Cost per row is ``d^2`` and memory ``d^2``: the right choice only for narrow layers
(``evagraph.stats.make_statistic`` decides); wide layers use ``IncrementalSVD``.

Data parallel (``sync`` and ``owner``): every process all-reduces the count and the largest
deviation (one collective; the first batch's mean in one more), and reduces its rows' sums to
the owner, the one process that holds the ``d x d`` sums and solves them.
"""

from __future__ import annotations

import torch

from .base import (
    Components,
    Sync,
    abs_max,
    components,
    explained,
    masked_rows,
    power_of_two_scale,
    row_count,
    shared_scale,
)
from .eigen import top_eigenpairs


class ExactCovariance:
    """Exact streaming PCA of rows of width ``dim``; ``k`` components (see module doc)."""

    def __init__(
        self,
        dim: int,
        k: int,
        device: torch.device | str,
        *,
        sync: Sync | None = None,
        owner: int = 0,
    ) -> None:
        self.dim, self.k = dim, min(k, dim)
        self.sync = sync  # data parallel: each update adds the rows of every process
        self.owner = owner  # data parallel: the process that holds the sums
        self.owns = sync is None or sync.rank == owner
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.shift: torch.Tensor | None = None  # float32 (d,), true units
        self.scale = torch.full((), float("inf"), device=device)  # sums are scale * true
        held = dim if self.owns else 0  # another process's sums: nothing held here
        self.sum = torch.zeros(held, device=device)
        self.gram = torch.zeros(held, held, device=device)
        self._basis: torch.Tensor | None = None  # eigensolver warm start

    def _rescale(self, scale: torch.Tensor) -> None:
        # Powers of two: exact. The first update multiplies zeros by 0 (scale was inf).
        ratio = scale / self.scale
        self.gram.mul_(ratio * ratio)
        self.sum.mul_(ratio)
        self.scale = scale

    def update(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        sync = self.sync
        if rows.shape[0] == 0 and sync is None:  # under sync the collectives still run
            return
        x = masked_rows(rows, weights)
        n = row_count(rows, weights)
        first = self.shift is None
        if first:  # mean of the kept rows: masked outliers must not move it
            total = x.sum(0)
            if sync is not None:
                n, total = sync.sum(n, total)
            self.shift = total / n.clamp_min(1).float()
        x = x - self.shift if x is rows else x.sub_(self.shift)  # never modify the activation
        if weights is not None:
            x.mul_((weights > 0)[:, None])
        amax = abs_max(x)
        if sync is not None:  # one scale for all processes: their sums add up exactly
            amax, counts = shared_scale(sync, amax, *([] if first else [n]))
            n = n if first else counts[0]
        self._rescale(torch.minimum(self.scale, power_of_two_scale(amax)))
        x.mul_(self.scale)
        self.count += n
        if sync is None:
            self.sum += x.sum(0)
            self.gram.addmm_(x.T, x)
        else:
            sums = sync.reduce(self.owner, x.sum(0), x.T @ x)
            if sums is not None:
                self.sum += sums[0]
                self.gram += sums[1]

    def merge(self, other: ExactCovariance) -> None:
        """Add ``other``'s rows: the sums are re-expressed around this shift (float64)."""
        if other.shift is None:
            return
        if self.shift is None:
            self.shift = other.shift.clone()
        delta = (other.shift - self.shift).double()
        s = other.sum.double() / other.scale.double()
        g = other.gram.double() / other.scale.double() ** 2
        n = other.count
        g = g + torch.outer(s, delta) + torch.outer(delta, s) + n * torch.outer(delta, delta)
        s = s + n * delta
        scale = torch.minimum(self.scale, power_of_two_scale(s.abs().amax() / n.clamp_min(1)))
        self._rescale(scale)
        self.count += n
        self.sum += (s * scale.double()).float()
        self.gram += (g * scale.double() ** 2).float()

    def _covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Covariance in scaled units (float32, symmetrised) and the mean (true units)."""
        n = self.count.clamp_min(2).float()
        centre = self.sum / n
        cov = torch.outer(centre, centre).mul_(n)
        torch.sub(self.gram, cov, out=cov).div_(n - 1)
        cov = (cov + cov.T).div_(2)
        # NaN/Inf rows poison the sums, which ``finite`` reports; the solve must not fail
        # before the caller gets to ask.
        return cov.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), self.shift + centre / self.scale

    def _total(self, cov: torch.Tensor) -> torch.Tensor:
        return torch.diagonal(cov).double().sum() / self.scale.double() ** 2

    def estimate(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Current top-k components (k x d) and explained-variance ratios, or None before data."""
        if self.shift is None:
            return None
        cov, mean = self._covariance()
        ev, vecs, self._basis = top_eigenpairs(cov, self.k, self._basis)
        return vecs, explained(
            ev.double() / self.scale.double() ** 2, vecs, mean, self._total(cov)
        )[1]

    def finalize(self) -> Components | None:
        """The PCA of all rows seen, solved in float64 to 1e-9; None before two rows."""
        if self.shift is None or float(self.count) < 2:
            return None
        cov, mean = self._covariance()
        ev, vecs, _ = top_eigenpairs(cov.double(), self.k, self._basis, tol=1e-9)
        ev = ev / self.scale.double() ** 2
        return components(vecs, ev, mean, self.count, self._total(cov))

    def finite(self) -> torch.Tensor:
        """False once NaN or Inf reached the sums (one device tensor, no sync)."""
        return torch.isfinite(self.sum).all()

    def to(self, device: torch.device | str) -> None:
        """Move the buffers (e.g. off the GPU while the group is converged)."""
        for name in ("count", "scale", "sum", "gram", "shift", "_basis"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
