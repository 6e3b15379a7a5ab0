"""The low-rank statistic: a streaming incremental SVD of rank ``q = max(2k + 4, k + 12)`` for
wide layers (``sketch_rank``).

``IncrementalSVD(dim, k, device)`` keeps the mean, the row count, the total variance
(exact) and a rank-``q`` factor ``diag(s) V`` of the centred rows seen so far: O(d q)
memory instead of the exact statistic's O(d^2). Each update absorbs a batch as in
sklearn's ``IncrementalPCA`` (Ross et al. 2008: the old factor, the batch's centred rows and
a mean-correction row, re-decomposed and truncated to ``q``), but in O(N d q) rather than an
SVD of the whole stacked matrix (Brand 2006): the batch's rows are split into their part in
``span(V)`` (coefficients P) and a residual R, and the new directions are taken from the
range of ``R^T [P, R G]`` for a Gaussian ``G`` of ``q`` columns: ``R^T P`` holds the
directions in which the current components turn out of ``span(V)`` (their first-order
perturbation by the batch), ``R^T R G`` the batch's dominant new directions (a randomized
range finder, Halko et al. 2011). Per batch: about ``5 q`` multiply-adds per row and column
(skinny products), one QR of ``d x 3q`` and one eigendecomposition of a ``3q x 3q`` matrix
(float64), which can be deferred and batched across statistics (``flush_all``), so that a
GPU pays one small solve per batch, not one per layer.

Why these choices (measured on a random-init Llama, hidden 1024, 150 minibatches of 4 x 128
Zipf tokens, k = 16; mean squared principal-angle cosine against the exact PCA of the same
rows, top 16 / top 4): PEFT's IncrementalPCA (rank k) 0.81-0.87; q = 2k with ``R^T R G``
only 0.95-0.98 / 0.998-0.9998; adding ``R^T P`` (chosen) 0.97-0.99 / 0.9993-0.9999 at the
same time per batch; a second power iteration 0.96-0.98 at 1.4x; an exact residual (no range
finder) 0.97-0.98 at 10x; q = 4k 0.99. On a hidden-64 Llama, the top 3 of 8: R^T R G only
0.977-0.991, with R^T P 0.999-1.0 (PEFT 0.9993-0.9999). The sketch is ``2k + 4`` wide, which
keeps the statistics within 2x PEFT's memory (which keeps k) at every k from 8 up, with a
little to spare (1.83x at k = 8, 1.90x at k = 16, 1.94x at k = 32; 2k + 6 would reach 2x),
and at least ``k + 12`` for layers with few components,
whose statistics are small anyway: on timm's vit_tiny and convnext_atto at k = 4 the
variance along A misses the exact PCA's by 1.3% with 2k + 4 = 12 directions, 0.5-0.65% with
16, 0.05-0.24% with 20. Wider is smoother: a
sketch smooths its estimates (the old rows' energy outside it is gone, so its components
turn less from batch to batch than the exact PCA's), which lets the tau criterion stop
before the exact PCA has settled. On the input of a hidden-4096 Llama's ``o_proj`` (k = 16,
top 10 components), the exact PCA's consecutive estimates first all pass tau = 0.99 after
49 minibatches, a rank-32 sketch's after 31, a rank-36, -48 or -64 sketch's after 43 (PEFT's
rank-16 IncrementalPCA: 48).
The random probe is as wide as the sketch for the same reason, although the three passes over
the rows cost in proportion to ``q`` plus its width: a probe of ``q / 2`` (a quarter fewer
products) left SmolLM2 unchanged (57 minibatches, 0.9985 to the exact PCA, held-out 0.3127
against 0.3124; ``q / 4``: 0.9980), but on the flat spectrum of
``test_sketch_does_not_stop_the_criterion_much_before_the_exact_pca`` (10 seeds) it stopped
the criterion after 0.78x the exact PCA's minibatches, against 0.87x: less of each batch's new
energy enters, so the estimates turn less. Dropping the third pass (the batch's Gram in the
new basis taken from the first two products, a Nystrom approximation) was up to a third
faster on 1576-row batches, no faster on SmolLM2's 512-row ones, and less accurate on 9 of its
12 sampled layers (top-8 |cos|, e.g. 0.9803 -> 0.9700).
The top-k of the sketch are the components; their variances are the sketch's singular
values, and ratios are over the exact total variance.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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

_REORTHONORMALISE = 16  # solves between QRs of V: drift stays below 1e-6


def sketch_rank(k: int) -> int:
    """The sketch's rank for ``k`` components (see the module docstring)."""
    return max(2 * k + 4, k + 12)


@dataclass
class _Pending:
    """An absorbed batch whose small eigenproblem is not solved yet (see ``flush``)."""

    gram: torch.Tensor  # (q0 + c, q0 + c) float64: the stacked factor's Gram in the new basis
    basis: torch.Tensor  # (c, d) float32: the new orthonormal directions beside V


class IncrementalSVD:
    """Rank-``sketch_rank(k)`` streaming PCA of rows of width ``dim`` (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        k: int,
        device: torch.device | str,
        *,
        rank: int | None = None,
        defer: bool | None = None,
        sync: Sync | None = None,
        owner: int = 0,
    ) -> None:
        self.dim, self.k = dim, min(k, dim)
        self.sync = sync  # data parallel: each update adds the rows of every process
        self.owner = owner  # data parallel: the process that holds the factor and solves
        self.owns = sync is None or sync.rank == owner
        self._stale = False  # data parallel: V is the owner's to broadcast before next use
        self.rank = min(rank or sketch_rank(self.k), dim)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.total = torch.zeros((), dtype=torch.float64, device=device)  # sum |x - mean|^2
        self.V = torch.zeros(0, dim, device=device)  # orthonormal rows
        self.sigma = torch.zeros(0, dtype=torch.float64, device=device)  # true units
        self._gen = torch.Generator(device=device).manual_seed(0)
        self._pending: _Pending | None = None
        self._solves = 0
        # On a GPU the small eigenproblem waits for ``flush_all`` (one host sync per batch);
        # on the CPU it is solved at once, so no second factor is ever held.
        self.defer = torch.device(device).type != "cpu" if defer is None else defer

    # -- absorbing data ---------------------------------------------------------------------

    def update(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        sync = self.sync
        if rows.shape[0] == 0 and sync is None:  # under sync the collectives still run
            return
        x = masked_rows(rows, weights)
        n = row_count(rows, weights)
        # Scale first (exact, a power of two), so sums and products stay in float32's range.
        # Reductions through vector_norm: no row-sized temporary besides our one copy.
        amax = abs_max(x)
        if sync is not None:  # one scale for all processes: their sums add up exactly
            amax, n, raw = self._shared(sync, amax, n, x)
        scale = power_of_two_scale(amax)
        x = x * scale if x is rows else x.mul_(scale)
        total = x.sum(0) if sync is None else (raw * scale.double()).float()
        centre = total / n.clamp_min(1).float()
        x.sub_(centre)
        if weights is not None:
            x.mul_((weights > 0)[:, None])
        scale64 = scale.double()
        square = torch.linalg.vector_norm(x).double().square() / scale64**2
        self._absorb(x, scale64, n, centre.double() / scale64, square, sync)

    def merge(self, other: IncrementalSVD) -> None:
        """Add ``other``'s rows, as represented by its factor (exact where its rows have rank
        at most q, as are the mean, count and total variance always)."""
        other.flush()
        factor = other.sigma.float()[:, None] * other.V
        scale = power_of_two_scale(factor.abs().amax())
        self._absorb(factor * scale, scale.double(), other.count, other.mean, other.total)

    def _absorb(
        self,
        rows: torch.Tensor,
        scale: torch.Tensor,
        n_new: torch.Tensor,
        mean_new: torch.Tensor,
        total_new: torch.Tensor,
        sync: Sync | None = None,
    ) -> None:
        """Absorb centred ``rows`` (float32, ``scale`` times true units) of ``n_new`` rows whose
        mean is ``mean_new`` and total squared deviation ``total_new`` (float64, true units).

        With ``sync`` the rows are this process's part of a global batch (``n_new`` and
        ``mean_new`` are the global batch's): the two products that sum over rows, ``y`` and
        the small Gram (with ``total_new``), are reduced to the owner, which alone takes the
        QR, solves and holds ``sigma``; it broadcasts the new directions (``basis``, which
        every process's Gram needs), and ``V`` travels with the next update's count
        (``_shared``). Every process draws the same random probe.
        """
        self.flush()
        n_old, V = self.count, self.V
        n = n_old + n_new
        # The mean-correction row of the stacked matrix (sklearn's IncrementalPCA).
        corr = (n_old * n_new / n.clamp_min(1)).sqrt() * (self.mean - mean_new)
        self.mean = self.mean + (n_new / n.clamp_min(1)) * (mean_new - self.mean)
        self.count = n

        # New directions: the dominant part of the rows outside span(V) (a randomized range
        # finder on the residual R = rows - coef V), and the mean correction.
        q0 = V.shape[0]
        # The first batch fills the whole sketch: oversample its range as well.
        width = min(self.rank if q0 else 2 * self.rank, self.dim - q0)
        if width > 0:
            probe = torch.randn(self.dim, width, device=V.device, generator=self._gen)
            both = rows @ torch.cat([V.T, probe], 1)  # one pass over the rows for both
            coef = both[:, :q0]
            # R^T coef: the directions in which the current components turn out of span(V)
            # (their first-order perturbation by this batch); R^T R probe: the dominant new
            # directions. One pass over the rows for both.
            z = torch.cat([coef, both[:, q0:] - coef @ (V @ probe)], 1)  # [coef, R probe]
            rows_z, coef_z = rows.T @ z, coef.T @ z
            if sync is None:
                basis = self._basis(rows_z, coef_z, corr)
            else:
                basis = self._shared_basis(sync, rows_z, coef_z, corr)
        else:
            coef, basis = rows @ V.T, torch.zeros(self.dim, 0, device=V.device)

        # The stacked matrix in the basis [V; basis^T], whose Gram is small: (q0 + c)^2.
        coords = torch.cat([coef, rows @ basis], 1).double() / scale
        corr_coords = torch.cat([V.double() @ corr, basis.T.double() @ corr])
        gram = coords.T @ coords
        if sync is not None:
            sums = sync.reduce(self.owner, gram, total_new)
            self._stale = True
            if sums is None:  # another process's factor: V's shape after its solve
                self.V = torch.empty(min(self.rank, gram.shape[0]), self.dim, device=V.device)
                return
            gram, total_new = sums
        self.total = self.total + total_new + corr.pow(2).sum()
        gram += torch.outer(corr_coords, corr_coords)
        gram[:q0, :q0] += torch.diag(self.sigma.pow(2))
        # NaN/Inf rows poison the mean and total, which ``finite`` reports; the solve must
        # not fail before the caller gets to ask.
        gram = torch.nan_to_num(gram, nan=0.0, posinf=0.0, neginf=0.0)
        self._pending = _Pending(gram, basis.T.contiguous())
        if not self.defer:
            self.flush()

    def _shared(
        self, sync: Sync, amax: torch.Tensor, n: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The global batch's scale stand-in, count and (unscaled, float64) sum, in one
        all-reduce that also carries the owner's V from its last solve (the others add 0)."""
        self.flush()
        carry = []
        if self._stale:
            carry = [self.V if self.owns else torch.zeros_like(self.V)]
            self._stale = False
        amax, sums = shared_scale(sync, amax, n, x.sum(0, dtype=torch.float64), *carry)
        if carry:
            self.V = sums[2].float()
        return amax, sums[0], sums[1]

    def _basis(
        self, rows_z: torch.Tensor, coef_z: torch.Tensor, corr: torch.Tensor
    ) -> torch.Tensor:
        """The new orthonormal directions beside V (d x c) from the batch's products."""
        V, q0 = self.V, self.V.shape[0]
        y = rows_z - V.T @ coef_z
        unit = (corr / corr.norm().clamp_min(torch.finfo(torch.float64).tiny)).float()
        # One QR of [V^T, y]: its later columns are orthonormal and orthogonal to V even
        # where y is rank-deficient (a batch of fewer rows than the sketch).
        return torch.linalg.qr(torch.cat([V.T, y, unit[:, None]], 1)).Q[:, q0 : self.dim]

    def _shared_basis(
        self, sync: Sync, rows_z: torch.Tensor, coef_z: torch.Tensor, corr: torch.Tensor
    ) -> torch.Tensor:
        """``_basis`` of every process's summed products: the owner's QR, broadcast."""
        sums = sync.reduce(self.owner, rows_z, coef_z)
        if sums is not None:
            basis = self._basis(*sums, corr).contiguous()
        else:  # the QR's shape: [V^T, y, unit] has 2 q0 + width + 1 columns
            q0 = self.V.shape[0]
            c = min(self.dim, q0 + rows_z.shape[1] + 1) - q0
            basis = torch.empty(self.dim, c, device=rows_z.device)
        return sync.broadcast(basis, self.owner)

    # -- solving ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Solve the pending small eigenproblem now (``flush_all`` batches many)."""
        if self._pending is not None:
            evals, evecs = torch.linalg.eigh(self._pending.gram)
            self._solved(evals, evecs)

    def _solved(self, evals: torch.Tensor, evecs: torch.Tensor) -> None:
        pending, self._pending = self._pending, None
        top = min(self.rank, evals.shape[0])
        evals, evecs = evals.flip(0)[:top], evecs.flip(1)[:, :top]
        V = evecs.T.float() @ torch.cat([self.V, pending.basis])
        self._solves += 1
        if self._solves % _REORTHONORMALISE == 0:  # float32 drift, keeping each direction
            q, r = torch.linalg.qr(V.T)
            V = (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)).T
        self.V = V.contiguous()
        self.sigma = evals.clamp_min(0).sqrt()

    # -- reading ----------------------------------------------------------------------------

    def _top(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(self.k, self.V.shape[0])
        return self.V[:k], self.sigma[:k].pow(2) / (self.count - 1).clamp_min(1)

    def estimate(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Current top-k components (k x d) and explained-variance ratios, or None before data."""
        self.flush()
        if self.V.shape[0] == 0:
            return None
        vecs, ev = self._top()
        return vecs, explained(ev, vecs, self.mean, self._variance())[1]

    def _variance(self) -> torch.Tensor:
        return self.total / (self.count - 1).clamp_min(1)

    def finalize(self) -> Components | None:
        """The sketch's top-k components; None before two rows."""
        self.flush()
        if self.V.shape[0] == 0 or float(self.count) < 2:
            return None
        vecs, ev = self._top()
        return components(vecs, ev, self.mean, self.count, self._variance())

    def finite(self) -> torch.Tensor:
        """False once NaN or Inf reached the statistic (one device tensor, no sync)."""
        return torch.isfinite(self.mean).all() & torch.isfinite(self.total)

    def to(self, device: torch.device | str) -> None:
        """Move the buffers (e.g. off the GPU while the group is converged)."""
        self.flush()
        for name in ("count", "mean", "total", "V", "sigma"):
            setattr(self, name, getattr(self, name).to(device))
        if self._gen.device != self.V.device:  # a generator lives on one device
            seed = int(torch.randint(2**62, (), device=self._gen.device, generator=self._gen))
            self._gen = torch.Generator(device=self.V.device).manual_seed(seed)


def flush_all(stats: Iterable[object]) -> None:
    """Solve the pending eigenproblems of several statistics, batched by size: one small
    ``eigh`` call (and on a GPU one host sync) for all layers of a batch, not one each."""
    by_size: dict[tuple, list[IncrementalSVD]] = {}
    for stat in stats:
        if isinstance(stat, IncrementalSVD) and stat._pending is not None:
            gram = stat._pending.gram
            by_size.setdefault((gram.shape[0], gram.device), []).append(stat)
    for same in by_size.values():
        evals, evecs = torch.linalg.eigh(torch.stack([s._pending.gram for s in same]))
        for stat, ev, vecs in zip(same, evals, evecs):
            stat._solved(ev, vecs)
