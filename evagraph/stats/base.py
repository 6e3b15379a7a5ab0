"""What every streaming statistic shares: the ``Statistic`` protocol, the ``Components`` it
finalises to, and the row preparation (masking, centring, scaling) both statistics use.

A statistic is an observer in the sense of ``torch.ao.quantization``: ``update`` consumes
activation rows (with optional 0/1 weights that exclude padding), ``estimate`` gives the
current top-k components and explained-variance ratios cheaply (on the device, no host
sync), ``finalize`` the final ``Components``, and ``merge`` adds another statistic of the
same kind, so that statistics computed on separate shards of the data combine into the one
statistic of all of it. Under data parallelism a statistic made with a ``Sync`` and an
``owner`` process reduces inside each ``update`` (sums of products of the rows, never the
rows) to its owner, which alone holds the statistic of the global batch and may be asked for
``estimate``/``finalize``; every process keeps the row count, and what its next update's
products need (the shift, the sketch's basis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Components:
    """PCA of one decomposition's rows. ``components`` rows are orthonormal, sign-fixed.

    Variances are float64, so data of any scale (1e-30 .. 1e30) keeps representable values.
    """

    components: torch.Tensor  # (k, d) float32
    explained_variance: torch.Tensor  # (k,) s_i^2 / (n - 1)
    explained_variance_ratio: torch.Tensor  # (k,) over the total variance of the rows
    singular_values: torch.Tensor  # (k,) of the centred row matrix
    mean: torch.Tensor  # (d,)
    n_rows: int

    def lora_A(self, rank: int, whiten: bool = False) -> torch.Tensor:
        """EVA's ``A`` for a layer of ``rank``: the top ``rank`` components; ``whiten``: each
        divided by the square root of its singular value."""
        A = self.components[:rank]
        if whiten:
            A = A / self.singular_values[:rank].clamp_min(1e-12).sqrt()[:, None]
        return A


class Sync(Protocol):
    """The collectives a statistic needs under data parallelism (``evagraph.distributed``):
    element-wise sums over all processes, sums to one, a broadcast from one."""

    rank: int

    def sum(self, *tensors: torch.Tensor) -> list[torch.Tensor]: ...

    def reduce(self, dst: int, *tensors: torch.Tensor) -> list[torch.Tensor] | None: ...

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor: ...


class Statistic(Protocol):
    """A mergeable streaming PCA of activation rows (see the module docstring)."""

    dim: int
    k: int
    count: torch.Tensor  # rows seen (weighted), float64, on the statistic's device

    def update(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None: ...

    def merge(self, other: Statistic) -> None: ...

    def estimate(self) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def finalize(self) -> Components | None: ...

    def finite(self) -> torch.Tensor: ...

    def to(self, device: torch.device | str) -> None: ...


def power_of_two_scale(amax: torch.Tensor) -> torch.Tensor:
    """``2**-e`` with ``amax * 2**-e`` in [0.5, 1): multiplying by it is exact, and keeps
    squares and products of data at 1e-30 or 1e30 representable in float32 (1 for 0).

    ``e`` is clamped to [-125, 125] so that the scale itself is a normal float32: subnormal
    data (8e-41 needs 2**133, which overflows) is scaled to about 1e-3 instead of 0.5.
    """
    exponent = torch.frexp(amax.float()).exponent.clamp(-125, 125)
    return torch.ldexp(torch.ones((), device=amax.device), -exponent)


def shared_scale(
    sync: Sync, amax: torch.Tensor, *sums: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """In one all-reduce (a float64 sum, so one collective whatever it carries): a stand-in
    for the largest ``amax`` over the processes, of the same ``power_of_two_scale``, and the
    sums of ``sums`` over the processes (float64). The scale depends only on amax's
    exponent, which travels as a one-hot over the exponents (none for 0): the highest bin
    set anywhere is the largest's. Fewer collectives matter more than bytes: each costs a
    fixed latency (NCCL) or CPU time (gloo's threads)."""
    exponents = torch.arange(-125, 126, device=amax.device)  # power_of_two_scale's clamp
    e = torch.frexp(amax.float()).exponent.clamp(-125, 125)
    one_hot = ((exponents == e) & (amax != 0)).double()
    parts = [one_hot, *(t.double().reshape(-1) for t in sums)]
    (flat,) = sync.sum(torch.cat(parts))
    out = flat.split([t.numel() for t in parts])
    top = torch.where(out[0] > 0, exponents, -1000).max()
    # 2**(e - 1) has exponent e (frexp: mantissa in [0.5, 1)); 0 when no process had data.
    stand_in = torch.where(
        top > -1000, torch.ldexp(torch.ones((), device=amax.device), top - 1), 0.0
    )
    return stand_in, [o.view(t.shape) for o, t in zip(out[1:], sums)]


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """The largest magnitude in ``x`` (0 for no rows), without a temporary of its size.

    ``aminmax``, not ``vector_norm(x, inf)``: on the CPU the latter is 10-16x slower (1.6 ms
    against 0.1 ms for 512 x 576 float32 rows, one thread), which was a fifth of the
    low-rank statistic's time per batch on SmolLM2.
    """
    if x.numel() == 0:  # a shape, known on the host: no sync
        return x.new_zeros(())
    lo, hi = torch.aminmax(x)
    return torch.maximum(hi, -lo)


def masked_rows(rows: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Rows as float32 with excluded rows (weight 0) set to 0; a copy whenever masked.

    Set, not multiplied: padding rows may hold NaN/Inf (a softmax over a fully masked row),
    and 0 * NaN would poison the sums.
    """
    x = rows.to(torch.float32)
    if weights is not None:
        x = x.clone() if x is rows else x
        drop = ~(weights > 0)
        if x.device.type == "cpu":  # broadcast masked_fill is 8x slower there; no sync cost
            x.index_fill_(0, drop.nonzero().squeeze(1), 0.0)
        else:  # no host sync on an accelerator
            x.masked_fill_(drop[:, None], 0.0)
    return x


def row_count(rows: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Rows kept, as a float64 tensor on the rows' device (no host sync).

    ``torch.full``, not ``torch.tensor``: the latter copies the number from host memory, which
    on CUDA is a synchronizing copy (seen with ``benchmarks/host_syncs.py`` on an H100).
    """
    if weights is None:
        return torch.full((), rows.shape[0], dtype=torch.float64, device=rows.device)
    return (weights > 0).sum().to(torch.float64)


# Variances below either floor are rounding noise, set to exactly 0 so that allocation never
# takes their (arbitrary) directions as components: float32 arithmetic resolves eigenvalues
# to about 1e-7 of the largest (measured: 2e-8 over 400 rows, 1.3e-7 over 200k rows), and
# float32 inputs carry no variance below their own rounding, (eps * mean)^2 along a direction.
_NOISE_RTOL = 1e-5


def without_noise(ev: torch.Tensor, vecs: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``ev`` (float64) with the variances that are rounding noise set to 0."""
    eps = torch.finfo(torch.float32).eps
    along = vecs.double().pow(2) @ mean.double().pow(2)
    floor = torch.maximum(_NOISE_RTOL * ev.max().clamp_min(0), eps**2 * along)
    return torch.where(ev > floor, ev, 0.0)


def explained(
    ev: torch.Tensor, vecs: torch.Tensor, mean: torch.Tensor, total: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(variances without noise, ratios over ``total``), float64 and float32."""
    ev = without_noise(ev.double(), vecs, mean)
    ratio = ev / total.double().clamp_min(torch.finfo(torch.float64).tiny)
    return ev, ratio.float()


def sign_fixed(vecs: torch.Tensor) -> torch.Tensor:
    """sklearn's ``svd_flip`` for V: the largest-magnitude entry of each row is positive."""
    pivot = vecs.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(vecs.gather(1, pivot))
    return vecs * torch.where(signs == 0, 1.0, signs)


def components(
    vecs: torch.Tensor, ev: torch.Tensor, mean: torch.Tensor, count: torch.Tensor, total
) -> Components:
    """Final ``Components`` from top eigenpairs (``ev`` float64, true units) of the covariance
    of ``count`` rows whose total variance is ``total``."""
    n = float(count)
    ev, ratio = explained(ev, vecs, mean, total)
    return Components(
        components=sign_fixed(vecs.float()).contiguous(),
        explained_variance=ev,
        explained_variance_ratio=ratio,
        singular_values=(ev * max(n - 1, 0.0)).sqrt(),
        mean=mean.float(),
        n_rows=int(round(n)),
    )
