"""Incremental-SVD pass: a probed graph and minibatches -> converged principal components.

Takes the ``ProbedGraph`` from the probe pass, an iterable of batches and the settings, and
returns a ``Calibration``: per decomposition (group of layers sharing an input), the top-k
right-singular vectors of the mean-centred activation rows, their explained variance and
ratio, and per layer whether and when it converged.

Statistics are streamed as a shifted second moment (one GEMM per batch per probe, on the
model's device, float32): the decomposition after any batch is the *exact* PCA of every row
seen so far, rows of small batches included, rather than a randomised approximation merged
batch by batch. Convergence follows the EVA spec: after each batch, component i of a group has
converged when |cos(current_i, previous_i)| >= tau; a layer has converged when the components
its current rank allotment (the allocation pass, re-run every batch) needs have; groups whose
layers all converged stop being probed, and start again if an allotment grows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import EvaSettings
from ..data import batch_failed
from ..errors import ConvergenceWarning, DataError, EvagraphError
from .allocate import allocate
from .probe import ProbedGraph, slice_to_probes


@dataclass
class Components:
    """PCA of one decomposition's rows. ``components`` rows are orthonormal, sign-fixed."""

    components: torch.Tensor  # (k, d)
    explained_variance: torch.Tensor  # (k,) s_i^2 / (n - 1)
    explained_variance_ratio: torch.Tensor  # (k,) over the total variance of the rows
    singular_values: torch.Tensor  # (k,) of the centred row matrix
    mean: torch.Tensor  # (d,)
    n_rows: int


class StreamingPCA:
    """Exact streaming PCA from a shifted second-moment accumulator.

    Keeps ``count``, ``sum(x - c)`` and ``sum((x - c)(x - c)^T)`` for a shift ``c`` (the first
    batch's mean), which avoids the cancellation of the plain ``E[xx^T] - mu mu^T`` form.
    Per-row weights (0/1) exclude masked rows without a data-dependent index (no device sync).
    """

    def __init__(self, dim: int, k: int, device: torch.device) -> None:
        self.dim, self.k = dim, min(k, dim)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float32, device=device)
        self.gram = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.shift: torch.Tensor | None = None
        self._basis: torch.Tensor | None = None  # eigensolver warm start
        self.resolved = self.k  # components of the last decomposition solved to tolerance

    def update(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        x = rows.to(torch.float32)
        if weights is not None:
            # where, not a product: padding rows may hold NaN/Inf (a softmax over a fully
            # masked row), and 0 * NaN would poison the sums.
            x = torch.where(weights[:, None] > 0, x, 0.0)
        if self.shift is None:  # mean of the kept rows: masked outliers must not move it
            if weights is None:
                self.shift = x.mean(0)
            else:
                self.shift = (x * weights[:, None]).sum(0) / weights.sum().clamp_min(1)
        # In place on our own copy (the same kernels, so the same bits): one row-sized
        # temporary per update instead of three, allocated mid-forward where peak RSS is.
        if weights is None:
            x = x - self.shift  # x may be the activation itself: never modify it
            self.count += x.shape[0]
        else:
            x.sub_(self.shift).mul_(weights[:, None])
            self.count += weights.sum()
        self.sum += x.sum(0)
        self.gram.addmm_(x.T, x)

    def _covariance(self, n: float) -> tuple[torch.Tensor, torch.Tensor]:
        centre = self.sum / n
        # (gram - n c c^T) / (n - 1), symmetrised, with two d x d temporaries instead of five
        # (the same ops in the same order: bit-identical).
        cov = torch.outer(centre, centre).mul_(n)
        torch.sub(self.gram, cov, out=cov).div_(n - 1)
        return (cov + cov.T).div_(2), centre

    def decompose(self, precise: bool = False, resolve: int | None = None) -> Components | None:
        """The PCA of all rows so far, or None while fewer than two rows have been seen.

        Wide layers use an iterative eigensolver warm-started from the last call's Ritz
        basis, to a residual of 1e-5 of the largest eigenvalue (enough to resolve tau) for
        the first ``resolve`` components (default all k; the rest are Ritz approximations);
        ``precise`` solves all k in float64 to 1e-9, for the final components.
        """
        n = float(self.count)
        if n < 2:
            return None
        cov, centre = self._covariance(n)
        if precise:
            ev, vecs, _ = top_eigenpairs(cov.double(), self.k, self._basis, tol=1e-9)
            ev, vecs = ev.float(), vecs.float()
            self.resolved = self.k
        else:
            ev, vecs, self._basis = top_eigenpairs(
                cov, self.k, self._basis, tol=1e-5, resolve=resolve
            )
            dense = self._basis is None  # every pair exact
            self.resolved = self.k if dense or resolve is None else max(1, min(resolve, self.k))
        ev = _without_noise(ev, vecs, self.shift + centre)
        # sklearn's svd_flip for V: the largest-magnitude entry of each component is positive.
        pivot = vecs.abs().argmax(dim=1, keepdim=True)
        signs = torch.sign(vecs.gather(1, pivot))
        vecs = vecs * torch.where(signs == 0, 1.0, signs)
        total = torch.diagonal(cov).sum().clamp_min(torch.finfo(torch.float32).tiny)
        return Components(
            components=vecs,
            explained_variance=ev,
            explained_variance_ratio=ev / total,
            singular_values=(ev * (n - 1)).sqrt(),
            mean=self.shift + centre,
            n_rows=int(round(n)),
        )


# Variances below either floor are rounding noise, set to exactly 0 so that allocation never
# takes their (arbitrary) directions as components: float32 second moments resolve eigenvalues
# to about 1e-7 of the largest (measured: 2e-8 over 400 rows, 1.3e-7 over 200k rows), and
# float32 inputs carry no variance below their own rounding, (eps * mean)^2 along a direction.
_NOISE_RTOL = 1e-5


def _without_noise(ev: torch.Tensor, vecs: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(torch.float32).eps
    floor = torch.maximum(_NOISE_RTOL * ev.max().clamp_min(0), eps**2 * (vecs.pow(2) @ mean.pow(2)))
    return torch.where(ev > floor, ev, 0.0)


def _refresh_ratios(pca: StreamingPCA, last: Components) -> Components:
    """``last`` with its variances re-estimated on the current covariance (Rayleigh quotients
    of its components): current ratios for allocation without an eigendecomposition."""
    n = float(pca.count)
    cov, _ = pca._covariance(n)
    ev = ((last.components @ cov) * last.components).sum(dim=1)
    ev = _without_noise(ev, last.components, pca.shift + pca.sum / n)
    total = torch.diagonal(cov).sum().clamp_min(torch.finfo(torch.float32).tiny)
    return replace(last, explained_variance=ev, explained_variance_ratio=ev / total,
                   singular_values=(ev * (n - 1)).sqrt(), n_rows=int(round(n)))  # fmt: skip


def top_eigenpairs(
    cov: torch.Tensor,
    k: int,
    basis: torch.Tensor | None = None,
    tol: float = 1e-5,
    max_iter: int = 300,
    resolve: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k eigenvalues (descending), eigenvectors (rows) and the solver's basis for next time.

    Narrow matrices (d <= 4k + 8): dense ``eigh`` in float64, robust to the repeated zero
    eigenvalues of rank-deficient data. Wider: subspace iteration with Rayleigh-Ritz on 2k + 4
    vectors, warm-started from ``basis`` (the previous call's), run until every wanted Ritz
    pair's residual ``|C v - l v|`` is below ``tol * l_max``: O(d^2 k) per iteration instead
    of O(d^3), and a warm start needs few iterations when one minibatch moved C a little.
    Only the first ``resolve`` pairs (default k) must meet ``tol``: the leading pairs converge
    faster (their ratio to the unwanted spectrum is larger), so fewer iterations.
    """
    d = cov.shape[0]
    q = min(d, 2 * k + 4)
    if d <= 2 * q:
        evals, evecs = torch.linalg.eigh(cov.double())
        top = evecs.flip(1)[:, :k].T.to(cov.dtype).contiguous()
        return evals.flip(0)[:k].to(cov.dtype), top, None
    wanted = k if resolve is None else max(1, min(resolve, k))
    if basis is None:
        gen = torch.Generator(device=cov.device).manual_seed(0)
        basis, _ = torch.linalg.qr(torch.randn(d, q, generator=gen, device=cov.device))
    basis = basis.to(cov.dtype)
    best, best_at = float("inf"), 0
    for i in range(max_iter):
        z = cov @ basis
        small = basis.T @ z
        evals, s = torch.linalg.eigh(((small + small.T) / 2).double())
        evals, s = evals.flip(0).to(cov.dtype), s.flip(1).to(cov.dtype)
        ritz = basis @ s
        zs = z @ s
        resid = float((zs[:, :wanted] - ritz[:, :wanted] * evals[:wanted]).norm(dim=0).max())
        scale = float(evals[0].abs().clamp_min(1e-30))
        # Converged, or stalled at the precision of the dtype: no new best residual for 8
        # iterations (slow but steady progress keeps going, up to max_iter).
        if resid <= tol * scale or i - best_at >= 8:
            break
        if resid < best:
            best, best_at = resid, i
        basis, _ = torch.linalg.qr(zs)
    return evals[:k], ritz[:, :k].T.contiguous(), ritz


@dataclass
class Calibration:
    """Result of the incremental-SVD pass.

    stats: group id -> Components. layer_group: target layer -> group id. converged: layer ->
    whether its needed components converged. converged_at: layer -> minibatch (1-based) at
    which it last became converged, None if it is not. batches: group -> the minibatches
    (0-based) it consumed, as [start, stop) runs; a group pauses while its layers are
    converged and resumes if an allotment grows. steps: minibatches run in all.
    """

    stats: dict[str, Components]
    layer_group: dict[str, str]
    converged: dict[str, bool]
    converged_at: dict[str, int | None]
    batches: dict[str, list[list[int]]]  # group -> consumed minibatches as [start, stop) runs
    component_converged: dict[str, torch.Tensor]  # group -> per-component flags at the end
    steps: int
    unconverged: list[str] = field(default_factory=list)


def _schedule(sim: torch.Tensor, tau: float, gap: int, max_gap: int = 8) -> int:
    """Minibatches until a group's next decomposition.

    Every minibatch's rows are accumulated either way; only the eigendecomposition (the
    costly part) is deferred while the group is far from converging. The angle its least
    stable needed component moved since the last check, divided by the minibatches between
    (an optimistic per-minibatch estimate, so it errs towards checking sooner), is compared
    with the angle ``arccos(tau)`` the criterion allows: beyond four times that, the gap
    doubles (up to ``max_gap``); otherwise it is 1. A check after a gap never declares
    convergence (see ``calibrate``), so a layer converges only when its needed components
    pass the per-minibatch criterion. Deferred groups keep current ratios (Rayleigh
    quotients), so allocation sees what it would every batch; but groups pause at other
    points than with every-batch checks, so near-ties in the allotment can fall the other
    way and step counts move by a few batches either way (bundled example: 9 vs 13).
    """
    worst = float(sim.min()) if sim.numel() else 1.0
    per_batch = math.acos(min(1.0, max(-1.0, worst))) / gap
    return min(2 * gap, max_gap) if per_batch > 4 * math.acos(tau) else 1


def calibrate(
    probed: ProbedGraph,
    batches: Iterable[Any],
    settings: EvaSettings,
    forward: Callable[[torch.nn.Module, Any], Any],
    *,
    device: torch.device,
    total: int | None = None,
    progress: bool = True,
    slicing: bool = True,
) -> Calibration:
    """Stream ``batches`` through ``probed.gm`` until every target layer converges.

    ``forward(module, batch)`` runs one batch (already on ``device``). Stops when all layers
    converged, the batches run out, or ``settings.max_steps`` is reached; the last two warn
    with ``ConvergenceWarning`` naming the unconverged layers. With ``slicing`` each batch
    runs only the part of the graph that feeds probes still in use (``slice_to_probes``),
    so a custom ``forward`` must return nothing it relies on (the model's outputs are cut).
    """
    k = settings.max_components
    pcas = {g: StreamingPCA(probed.dims[g], k, device) for g in probed.groups}
    layer_group = {layer: g for g, members in probed.groups.items() for layer in members}
    probe_groups: dict[str, list[str]] = {p: [] for p in probed.probes}
    for g, names in probed.group_probes.items():
        for p in names:
            probe_groups[p].append(g)
            probed.probes[p].sinks.append(pcas[g].update)

    stats: dict[str, Components | None] = dict.fromkeys(pcas)
    comp_ok = {g: torch.zeros(pca.k, dtype=torch.bool) for g, pca in pcas.items()}
    seen = dict.fromkeys(pcas, 0)
    runs: dict[str, list[list[int]]] = {g: [] for g in pcas}
    checked = dict.fromkeys(pcas, 0)  # step of each group's last decomposition
    next_check = dict.fromkeys(pcas, 0)
    gap = dict.fromkeys(pcas, 1)
    ranks = {layer: pcas[g].k for layer, g in layer_group.items()}
    ok = dict.fromkeys(layer_group, False)
    converged_at: dict[str, int | None] = dict.fromkeys(layer_group)
    steps = 0
    sliced: dict[frozenset, torch.nn.Module] = {}
    if settings.max_steps is not None:
        total = settings.max_steps if total is None else min(total, settings.max_steps)
    bar = tqdm(total=total, desc="EVA calibration", unit="batch", disable=not progress)
    try:
        for batch in batches:
            if settings.max_steps is not None and steps >= settings.max_steps:
                break
            active = {g for g, members in probed.groups.items() if not all(ok[m] for m in members)}
            if not active:
                break
            live = {p for p in probed.probes if any(g in active for g in probe_groups[p])}
            for p, probe in probed.probes.items():
                probe.active = p in live
            key = frozenset(live)
            if key not in sliced:  # run only what the unconverged probes need
                sliced.clear()
                sliced[key] = slice_to_probes(probed, live) if slicing else probed.gm
            try:
                # no_grad: calibration only reads activations. With grad on (the model's
                # weights require it), autograd keeps every tensor the graph saves for
                # backward alive until the outputs are dropped: +130 MB of peak RSS on the
                # benchmark's Llama (4 x 512), for values that are bit-identical either way.
                with torch.no_grad():
                    forward(sliced[key], batch)
            except EvagraphError:
                raise
            except Exception as err:
                raise batch_failed(steps, err) from err
            steps += 1
            order = [g for g in probed.groups if g in active]  # graph order: first NaN named
            # One device sync per batch for all groups (NaN/Inf reaches the running sums).
            finite = torch.stack([torch.isfinite(pcas[g].sum).all() for g in order])
            if not bool(finite.all()):
                g = order[int((~finite).nonzero()[0])]
                raise DataError(
                    f"NaN or Inf in the activations entering layer(s) "
                    f"{', '.join(probed.groups[g])} at calibration batch {steps - 1}: check "
                    "the data and the weights of the layers before them"
                )
            for g in order:
                seen[g] += 1
                if runs[g] and runs[g][-1][1] == steps - 1:
                    runs[g][-1][1] = steps
                else:
                    runs[g].append([steps - 1, steps])
                if steps < next_check[g] and stats[g] is not None:
                    # Decomposition deferred (see _schedule); the ratios stay current, so
                    # allocation below decides the needed components as every batch would.
                    stats[g] = _refresh_ratios(pcas[g], stats[g])
                    continue
                needed = max(ranks[m] for m in probed.groups[g])
                before = pcas[g].resolved
                # Only the components the allotment needs are solved tightly (the rest are
                # approximations, never declared converged: a grown allotment waits for the
                # next check, which solves more).
                old, new = stats[g], pcas[g].decompose(resolve=needed)
                if new is None:
                    continue
                if old is not None:
                    sim = (new.components * old.components).sum(dim=1).abs().cpu()
                    consecutive = checked[g] == steps - 1
                    exact = torch.arange(sim.numel()) < min(before, pcas[g].resolved)
                    # Only a comparison with the previous minibatch's estimate can declare
                    # convergence: the spec's criterion, applied at this batch.
                    comp_ok[g] = (
                        (sim >= settings.tau) & exact
                        if consecutive
                        else torch.zeros_like(sim, dtype=torch.bool)
                    )
                    gap[g] = _schedule(sim[:needed], settings.tau, gap[g])
                next_check[g] = steps + gap[g]
                checked[g] = steps
                stats[g] = new
            if all(s is not None for s in stats.values()):
                ranks = allocate(
                    {m: stats[g].explained_variance_ratio for m, g in layer_group.items()},
                    settings.budget,
                    settings.rho,
                    list(probed.groups.values()),
                )
            # No rank anywhere means no variance seen yet (constant or all-padding batches so
            # far): nothing is converged, or such a first minibatch would end calibration.
            anything = any(ranks.values())
            for m, g in layer_group.items():
                now = seen[g] >= settings.min_batches and bool(comp_ok[g][: ranks[m]].all())
                now = now and anything
                if now != ok[m]:
                    converged_at[m] = steps if now else None
                ok[m] = now
            bar.update(1)
            bar.set_postfix_str(f"{sum(ok.values())}/{len(ok)} layers converged")
    finally:
        bar.close()
        for probe in probed.probes.values():
            probe.sinks.clear()
            probe.active = False

    if steps == 0:
        raise DataError("the calibration data is empty: no batch was produced")
    # One tight solve per group: the loop's tolerance only has to resolve tau.
    for g, pca in pcas.items():
        if stats[g] is not None:
            stats[g] = pca.decompose(precise=True)
    # n centred rows span at most n - 1 directions: fewer than r + 1 rows cannot give a layer
    # the average rank, which is a data problem, not a degenerate statistic. Groups that
    # converged had what they needed (e.g. no variance: rank 0 after one minibatch).
    few = {
        g: n
        for g, p in pcas.items()
        if (n := int(round(float(p.count)))) <= settings.budget
        and not all(ok[m] for m in probed.groups[g])
    }
    if few:
        g, n = min(few.items(), key=lambda item: item[1])
        raise DataError(
            f"layer(s) {', '.join(probed.groups[g])} saw only {n} activation row(s): a PCA of "
            f"n rows has at most n - 1 components, fewer than budget={settings.budget}; "
            "provide more calibration data or lower the budget"
        )
    # No variance at any target layer: an error rather than a model without adapters, which
    # would have nothing to train (and fail, or do nothing, far from the cause: the data).
    if not any(bool((s.explained_variance > 0).any()) for s in stats.values()):
        raise DataError(
            "the activations entering every target layer have zero variance (constant, zero, "
            "or entirely masked inputs): EVA has no direction to initialise LoRA with; check "
            "the calibration data (and attention_mask) and the layers before the targets"
        )
    unconverged = [m for m, v in ok.items() if not v]
    if unconverged:
        shown = ", ".join(unconverged[:8]) + (" ..." if len(unconverged) > 8 else "")
        warnings.warn(
            f"calibration stopped after {steps} minibatch(es) with {len(unconverged)} layer(s) "
            f"not converged at tau={settings.tau}: {shown}. Their components are the exact PCA "
            "of the rows seen; pass more data or raise max_steps to converge.",
            ConvergenceWarning,
            stacklevel=3,
        )
    return Calibration(
        stats, layer_group, dict(ok), converged_at, runs, comp_ok, steps, unconverged
    )
