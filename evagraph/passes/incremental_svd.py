"""Incremental-SVD pass: a probed graph and minibatches -> converged principal components.

Takes the ``ProbedGraph`` from the probe pass, an iterable of batches and the settings, and
returns a ``Calibration``: per decomposition (group of layers sharing an input), the top-k
right-singular vectors of the mean-centred activation rows, their explained variance and
ratio, and per layer whether and when it converged.

Each group streams its rows into a statistic from ``evagraph.stats`` (exact for narrow rows,
a rank-max(2k + 4, k + 12) incremental SVD for wide ones), which gives current components after
every batch.
Convergence follows the EVA spec: after each batch, component i of a group has converged
when |cos(current_i, previous_i)| >= tau; a layer has converged when the components its
current rank allotment (the allocation pass, re-run every batch) needs have; groups whose
layers all converged stop being probed (and their statistics leave the GPU), and start again
if an allotment grows. Per batch there is one host-device sync for all groups.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import CalibrationSettings
from ..errors import ConfigError, ConvergenceWarning, DataError, EvagraphError
from ..runtime import batch_failed
from ..stats import Components, Statistic, Sync, flush_all, make_statistic
from .allocate import allocate
from .probe import ProbedGraph, ProbeFailure, slice_to_probes


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


@dataclass
class _Group:
    """One decomposition while calibrating: its statistic and what the loop knows of it."""

    layers: list[str]
    stat: Statistic | None  # None before it is opened and after it is closed
    final: Components | None = None  # set when closed: all that stays of a finished group
    components: torch.Tensor | None = None  # last estimate (k x d), on the device
    ratios: torch.Tensor | None = None  # last explained-variance ratios (k,), on the host
    component_ok: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    seen: int = 0  # minibatches consumed
    n_rows: int = 0  # rows seen: set when closed, and after each minibatch for experts
    runs: list[list[int]] = field(default_factory=list)  # consumed minibatches, [start, stop)

    def consume(self, step: int) -> None:
        self.seen += 1
        if self.runs and self.runs[-1][1] == step:
            self.runs[-1][1] = step + 1
        else:
            self.runs.append([step, step + 1])


class _Calibrator:
    """The loop's state between batches; ``calibrate`` drives it one named step at a time."""

    def __init__(
        self,
        probed: ProbedGraph,
        settings: CalibrationSettings,
        device: torch.device,
        *,
        lazy: bool = False,
        all_components: bool = False,
        sync: Sync | None = None,
    ) -> None:
        """``lazy``: statistics exist only between ``open`` and ``close`` (block by block).
        ``all_components``: a layer converges when every component with variance has
        (instead of those its current allotment needs), so no allocation is needed.
        ``sync``: data parallel; statistics reduce over the processes, decisions follow
        process 0."""
        self.probed, self.settings, self.device = probed, settings, device
        self.sync = sync
        widest = max(probed.dims.values(), default=0)
        if settings.budget > widest:  # more rank than any layer has: sized buffers would be huge
            raise ConfigError(
                f"budget {settings.budget} is more than any target layer's rank can be: the "
                f"widest layer input has {widest} features, so the budget is at most {widest}"
            )
        self.all_components = all_components
        self.groups = {g: _Group(layers, None) for g, layers in probed.groups.items()}
        self.layer_group = {m: g for g, grp in self.groups.items() for m in grp.layers}
        self.probe_groups: dict[str, list[str]] = {p: [] for p in probed.probes}
        for g, names in probed.group_probes.items():
            for p in names:
                self.probe_groups[p].append(g)
        if not lazy:
            for g in self.groups:
                self.open(g)
        k = settings.max_components
        self.ranks = {m: min(k, probed.dims[g]) for m, g in self.layer_group.items()}
        self.converged_at: dict[str, int | None] = dict.fromkeys(self.layer_group)
        self._sliced: dict[frozenset, torch.nn.Module] = {}

    def open(self, g: str) -> None:
        """Create group ``g``'s statistic and feed it its probes' rows."""
        k = self.settings.max_components
        grp = self.groups[g]
        grp.stat = make_statistic(
            self.settings.statistic, self.probed.dims[g], k, self.device, self.sync
        )
        expert = self.probed.experts.get(g)
        for p in self.probed.group_probes[g]:
            self.probed.probes[p].sinks_for(expert).append(grp.stat.update)

    def close(self, g: str) -> None:
        """Finalise group ``g``: its components stay, its statistic and sinks go."""
        grp = self.groups[g]
        for p in self.probed.group_probes[g]:
            sinks = self.probed.probes[p].sinks_for(self.probed.experts.get(g))
            sinks[:] = [s for s in sinks if getattr(s, "__self__", None) is not grp.stat]
        grp.final = grp.stat.finalize()
        grp.n_rows = int(round(float(grp.stat.count)))
        if grp.final is None:  # fewer than 2 rows (one sample, a router): rank 0, reported
            grp.final = _no_components(self.probed.dims[g], self.settings.max_components)
            grp.final.n_rows = grp.n_rows
        grp.stat = None

    def active(self) -> list[str]:
        """Groups with an unconverged layer, in graph order."""
        return [
            g
            for g, grp in self.groups.items()
            if any(self.converged_at[m] is None for m in grp.layers)
        ]

    def module_for(self, active: list[str], slicing: bool) -> torch.nn.Module:
        """Switch probes on for the active groups only; the graph cut to what they need."""
        live = {p for p in self.probed.probes if any(g in active for g in self.probe_groups[p])}
        for p, probe in self.probed.probes.items():
            probe.active = p in live
        key = frozenset(live)
        if key not in self._sliced:  # run only what the unconverged probes need
            self._sliced.clear()
            self._sliced[key] = slice_to_probes(self.probed, live) if slicing else self.probed.gm
        return self._sliced[key]

    def estimate(self, active: list[str], step: int) -> None:
        """New components of the active groups; per-component convergence against the last.

        One host sync for all groups: NaN/Inf flags, cosines and ratios travel together.
        """
        flush_all(self.groups[g].stat for g in active)
        parts, sizes, now = [], [], {}
        for g in active:
            grp = self.groups[g]
            grp.consume(step)
            est = grp.stat.estimate()
            finite = grp.stat.finite().reshape(1).float()
            if g in self.probed.experts:  # its row count decides whether it may have a rank
                finite = torch.cat([finite, grp.stat.count.reshape(1).float()])
            if est is None:
                parts.append(finite)
                sizes.append((g, 0))
                continue
            vecs, ratios = est
            # Only a comparison with the previous minibatch's estimate can declare
            # convergence (the spec's criterion, applied at this batch).
            consecutive = grp.components is not None and grp.runs[-1][0] < step
            cos = (vecs * grp.components).sum(1).abs() if consecutive else torch.zeros_like(ratios)
            parts += [finite, cos.float(), ratios.float()]
            sizes.append((g, len(ratios)))
            now[g] = vecs
        host = torch.cat(parts)
        if self.sync is not None:  # the same decisions everywhere, whatever the rounding
            host = self.sync.broadcast(host)
        host = host.cpu()
        at = 0
        for g, k in sizes:
            if host[at] != 1:
                raise DataError(
                    f"NaN or Inf in the activations entering layer(s) "
                    f"{', '.join(self.groups[g].layers)} at calibration batch {step}: check "
                    "the data and the weights of the layers before them"
                )
            if g in self.probed.experts:
                at += 1
                self.groups[g].n_rows = int(host[at])
            if k:
                grp = self.groups[g]
                cos, grp.ratios = host[at + 1 : at + 1 + k], host[at + 1 + k : at + 1 + 2 * k]
                grp.component_ok = cos >= self.settings.tau
                grp.components = now[g]
            at += 1 + 2 * k

    def allocate(self) -> None:
        """The current allotment, once every group has ratios (an expert no row was routed
        to yet counts as having no variance: it may never get one)."""
        experts = self.probed.experts
        if all(grp.ratios is not None or g in experts for g, grp in self.groups.items()):
            none = torch.zeros(min(self.settings.max_components, max(self.probed.dims.values())))
            few = {g for g in experts if self.groups[g].n_rows <= self.settings.budget}
            self.ranks = allocate(
                {
                    m: none if g in few or (r := self.groups[g].ratios) is None else r
                    for m, g in self.layer_group.items()
                },
                self.settings.budget,
                self.settings.rho,
                [grp.layers for grp in self.groups.values()],
            )

    def update_convergence(self, step: int) -> None:
        """Which layers have converged after ``step`` (0-based); groups off/on the device."""
        # No rank anywhere means no variance seen yet (constant or all-padding batches so
        # far): nothing is converged, or such a first minibatch would end calibration.
        anything = any(self.ranks.values())
        for m, g in self.layer_group.items():
            grp = self.groups[g]
            if grp.stat is None:  # not opened yet, or closed: its state is final
                continue
            need = self.ranks[m]
            if self.all_components:  # components without variance are never allotted
                need = int((grp.ratios > 0).sum()) if grp.ratios is not None else -1
                anything = need > 0
            ok = grp.component_ok[:need]
            now = (
                anything
                and grp.seen >= self.settings.min_batches
                and len(ok) == need
                and bool(ok.all())
            )
            if now != (self.converged_at[m] is not None):
                self.converged_at[m] = step + 1 if now else None
        if self.device.type != "cpu":  # memory follows the work
            active = set(self.active())
            for g, grp in self.groups.items():
                if grp.stat is not None:
                    grp.stat.to(self.device if g in active else "cpu")

    def forward(self, module: torch.nn.Module, batch: Any, forward: Callable, step: int) -> None:
        """Run one batch through ``module`` (see ``_forward``). Data parallel, every process
        then learns whether any failed, and all raise: a failed process first feeds the probes
        it did not reach, so its peers' collectives complete."""
        if self.sync is None:
            _forward(module, batch, forward, step)
            return
        for probe in self.probed.probes.values():
            probe.fired = False
        error = None
        try:
            _forward(module, batch, forward, step)
        except Exception as err:
            error = err
            for node in module.graph.nodes:  # in the order the peers call them
                if node.op == "call_module" and node.target in self.probed.probes:
                    self.probed.probes[node.target].replay(self.device)
        self.sync.settle(error)

    def detach(self) -> None:
        for probe in self.probed.probes.values():
            probe.sinks.clear()
            for sinks in probe.expert_sinks.values():
                sinks.clear()
            probe.active = False


def calibrate(
    probed: ProbedGraph,
    batches: Iterable[Any],
    settings: CalibrationSettings,
    forward: Callable[[torch.nn.Module, Any], Any],
    *,
    device: torch.device,
    total: int | None = None,
    progress: bool = True,
    slicing: bool = True,
    sync: Sync | None = None,
) -> Calibration:
    """Stream ``batches`` through ``probed.gm`` until every target layer converges.

    ``forward(module, batch)`` runs one batch (already on ``device``). Stops when all layers
    converged, the batches run out, or ``settings.max_steps`` is reached; the last two warn
    with ``ConvergenceWarning`` naming the unconverged layers. With ``slicing`` each batch
    runs only the part of the graph that feeds probes still in use (``slice_to_probes``),
    so a custom ``forward`` must return nothing it relies on (the model's outputs are cut).
    ``sync``: data parallel (``evagraph.distributed``); ``batches`` are this process's slices.
    """
    run = _Calibrator(probed, settings, device, sync=sync)
    steps = 0
    if settings.max_steps is not None:
        total = settings.max_steps if total is None else min(total, settings.max_steps)
    bar = tqdm(total=total, desc="EVA calibration", unit="batch", disable=not progress)
    ever: set[str] = set()  # layers that converged at some point
    try:
        for batch in batches:
            active = run.active()
            if not active or (settings.max_steps is not None and steps >= settings.max_steps):
                break
            run.forward(run.module_for(active, slicing), batch, forward, steps)
            run.estimate(active, steps)
            run.allocate()
            run.update_convergence(steps)
            steps += 1
            bar.update(1)
            now = {m for m, at in run.converged_at.items() if at is not None}
            ever |= now
            # A grown allotment re-opens a converged layer: the count goes down, and says why.
            again = f", {len(ever - now)} re-opened (allotment grew)" if ever - now else ""
            bar.set_postfix_str(f"{len(now)}/{len(run.converged_at)} layers converged{again}")
    finally:
        bar.close()
        run.detach()
    if steps == 0:
        raise DataError("the calibration data is empty: no batch was produced")
    return _finish(run, steps)


def _no_components(d: int, k: int) -> Components:
    """Components of no variance (a group that saw fewer than 2 rows): what allocation reads as
    nothing to allot, of the usual shapes so the state and report treat it as any group."""
    k = min(k, d)
    zero = torch.zeros(k, dtype=torch.float64)
    return Components(torch.eye(k, d), zero, zero.float(), zero.clone(), torch.zeros(d), 0)


def _forward(module: torch.nn.Module, batch: Any, forward: Callable, step: int) -> None:
    """Run one batch. The model's own exceptions are the data's fault (``DataError``);
    evagraph's (from a probe or a statistic) propagate as they are."""
    try:
        # no_grad: calibration only reads activations. With grad on (the model's weights
        # require it), autograd keeps every tensor the graph saves for backward alive until
        # the outputs are dropped: +130 MB of peak RSS on the benchmark's Llama (4 x 512).
        with torch.no_grad():
            forward(module, batch)
    except ProbeFailure as failure:
        raise failure.__cause__ from None
    except EvagraphError:
        raise
    except Exception as err:
        raise batch_failed(step, err) from err


def _warn_unconverged(steps: int, unconverged: list[str], tau: float) -> None:
    shown = ", ".join(unconverged[:8]) + (" ..." if len(unconverged) > 8 else "")
    warnings.warn(
        f"calibration stopped after {steps} minibatch(es) with {len(unconverged)} layer(s) "
        f"not converged at tau={tau}: {shown}. Their components are the PCA of "
        "the rows seen; pass more data (or raise max_steps, --max-steps, if it is set) to "
        "converge.",
        ConvergenceWarning,
        stacklevel=5,
    )


def _finish(run: _Calibrator, steps: int) -> Calibration:
    """Final components (solved tightly), and the errors and warnings about what was seen."""
    settings = run.settings
    for g, grp in run.groups.items():
        if grp.stat is not None:
            run.close(g)
    final = {g: grp.final for g, grp in run.groups.items()}
    ok = {m: at is not None for m, at in run.converged_at.items()}
    # n centred rows span at most n - 1 directions: fewer than r + 1 rows cannot give a layer
    # the average rank, which is a data problem, not a degenerate statistic. Groups that
    # converged had what they needed (e.g. no variance: rank 0 after one minibatch).
    # An expert the router sent few rows to is the model's routing, not the data's fault:
    # it gets rank 0 (the allocation and the report say why).
    few = {
        g: n
        for g, grp in run.groups.items()
        if (n := grp.n_rows) <= settings.budget
        and not all(ok[m] for m in grp.layers)
        and g not in run.probed.experts
    }
    if few:
        g, n = min(few.items(), key=lambda item: item[1])
        raise DataError(
            f"layer(s) {', '.join(run.groups[g].layers)} saw only {n} activation row(s): a PCA "
            f"of n rows has at most n - 1 components, fewer than budget={settings.budget}; "
            "provide more calibration data or lower the budget"
        )
    # No variance at any target layer: an error rather than a model without adapters, which
    # would have nothing to train (and fail, or do nothing, far from the cause: the data).
    if not any(c is not None and bool((c.explained_variance > 0).any()) for c in final.values()):
        raise DataError(
            "the activations entering every target layer have zero variance (constant, zero, "
            "or entirely masked inputs): EVA has no direction to initialise LoRA with; check "
            "the calibration data (and attention_mask) and the layers before the targets"
        )
    unconverged = [m for m, v in ok.items() if not v]
    if unconverged:
        # Data parallel, every process decides alike; one shows the warning (the others
        # still raise it if warnings are errors: --fail-unconverged).
        quiet = run.sync is not None and not run.sync.main
        with warnings.catch_warnings(record=True) if quiet else contextlib.nullcontext():
            _warn_unconverged(steps, unconverged, settings.tau)
    flags = {}
    for g, grp in run.groups.items():
        k = min(settings.max_components, run.probed.dims[g])
        flags[g] = torch.zeros(k, dtype=torch.bool)
        flags[g][: len(grp.component_ok)] = grp.component_ok[:k]
    return Calibration(
        final,
        run.layer_group,
        ok,
        dict(run.converged_at),
        {g: grp.runs for g, grp in run.groups.items()},
        flags,
        steps,
        unconverged,
    )
