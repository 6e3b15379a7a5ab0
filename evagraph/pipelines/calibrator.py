"""The convergence loop's state: ``Calibrator``, which the pipelines drive one named step at
a time, and which ``finish``es into the ``EvaState``: per decomposition (group of layers
sharing an input), the top-k right-singular vectors of the mean-centred activation rows,
their explained variance and ratio, and per layer whether and when it converged.

Each group streams its rows into a statistic from ``evagraph.stats`` (exact for narrow rows,
a rank-max(2k + 4, k + 12) incremental SVD for wide ones), which gives current components after
every batch.
Convergence follows the EVA spec: after each batch, component i of a group has converged
when |cos(current_i, previous_i)| >= tau; a layer has converged when the components its
current rank allotment (the allocation pass, re-run every batch) needs have; groups whose
layers all converged stop being probed (and their statistics leave the GPU), and start again
if an allotment grows (whole-graph; block by block a layer needs every component with
variance: ``all_components``). Per batch there is one host-device sync for all groups.

Data parallel (a ``Sync``), each group has one owner process (``Sync.owners``, balancing the
statistics' per-minibatch cost): the other processes reduce their rows' products to it, and
only it updates the statistic, solves it and compares consecutive estimates. After each
batch every process packs the flags, cosines and ratios of the groups it owns (zeros for the
others), and one all-reduce gives every process the same numbers, so all take the same
decisions (graph slicing, allocation, stopping) in step; a closing group's final components
travel from its owner to all, so every process finishes with the same ``EvaState``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import CalibrationSettings
from ..errors import ConfigError, ConvergenceWarning, DataError, EvagraphError
from ..passes.allocate import allocate
from ..passes.probe import ProbeFailure, needed_nodes, slice_to_probes
from ..runtime import batch_failed
from ..state import EvaState
from ..stats import (
    Components,
    Statistic,
    Sync,
    conv_stride,
    flush_all,
    make_statistic,
    update_cost,
)
from .base import Traced

# A new cut of the graph is made when it drops at least this share of the current one's nodes.
_RESLICE = 0.1


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


class Calibrator:
    """The convergence loop's state between batches; a pipeline drives it one named step at a
    time (``Whole.run``: forward, estimate, allocate, update_convergence per batch) and
    ``finish``es it into the ``EvaState``."""

    def __init__(
        self,
        traced: Traced,
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
        ``sync``: data parallel; each statistic reduces to its owner process, whose flags
        and ratios every process then reads."""
        self.traced, self.probed = traced, traced.probed
        probed = traced.probed
        self.settings, self.device = settings, device
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
        k = settings.max_components
        costs = {g: update_cost(settings.statistic, probed.dims[g], k) for g in self.groups}
        self.owners = sync.owners(costs) if sync is not None else dict.fromkeys(costs, 0)
        if not lazy:
            for g in self.groups:
                self.open(g)
        self.ranks = {m: min(k, probed.dims[g]) for m, g in self.layer_group.items()}
        self.converged_at: dict[str, int | None] = dict.fromkeys(self.layer_group)
        self._sliced: tuple[frozenset[str], torch.nn.Module | None] = (frozenset(), None)

    def open(self, g: str) -> None:
        """Create group ``g``'s statistic and feed it its probes' rows."""
        k = self.settings.max_components
        grp = self.groups[g]
        grp.stat = make_statistic(
            self.settings.statistic, self.probed.dims[g], k, self.device, self.sync, self.owners[g]
        )
        expert = self.probed.experts.get(g)
        for p in self.probed.group_probes[g]:
            probe = self.probed.probes[p]
            probe.sinks_for(expert).append(grp.stat.update)
            probe.max_rows = self.settings.max_rows
            if probe.conv is not None:
                probe.keep_every(self._conv_stride(g, probe.conv.groups, probe.conv.ndim))

    def _conv_stride(self, g: str, conv_groups: int, spatial: int) -> int:
        """The output-position spacing of group ``g``'s conv rows (``conv_stride``)."""
        settings = self.settings
        if settings.conv_stride is not None:
            return settings.conv_stride
        dim, layers = self.probed.dims[g], self.traced.layer_graph.layers
        macs = sum(layers[m].out_features for m in self.groups[g].layers) * dim // conv_groups
        return conv_stride(settings.statistic, dim, settings.max_components, macs, spatial)

    def open_new(self, groups: list[str]) -> None:
        """Open those of ``groups`` that were neither opened nor closed yet."""
        for g in groups:
            if self.groups[g].stat is None and self.groups[g].final is None:
                self.open(g)

    def is_open(self, g: str) -> bool:
        return self.groups[g].stat is not None

    def close(self, g: str) -> None:
        """Finalise group ``g``: its components stay, its statistic and sinks go. With
        ``all_components`` a group whose inputs showed no variance has nothing to converge
        on: its layers count as converged (rank 0 whatever the budget)."""
        grp = self.groups[g]
        if self.all_components and grp.ratios is not None and not bool((grp.ratios > 0).any()):
            for m in grp.layers:
                self.converged_at[m] = self.converged_at[m] or grp.seen
        for p in self.probed.group_probes[g]:
            sinks = self.probed.probes[p].sinks_for(self.probed.experts.get(g))
            sinks[:] = [s for s in sinks if getattr(s, "__self__", None) is not grp.stat]
        grp.final = self._final(g)
        grp.n_rows = int(round(float(grp.stat.count)))
        if grp.final is None:  # fewer than 2 rows (one sample, a router): rank 0, reported
            grp.final = _no_components(self.probed.dims[g], self.settings.max_components)
            grp.final.n_rows = grp.n_rows
        grp.stat = None

    def owns(self, g: str) -> bool:
        """Whether this process holds group ``g``'s statistic (always, unless data parallel)."""
        return self.sync is None or self.owners[g] == self.sync.rank

    def _final(self, g: str) -> Components | None:
        """Group ``g``'s final components: its owner's, on every process."""
        stat = self.groups[g].stat
        final = stat.finalize() if self.owns(g) else None
        if self.sync is None:
            return final
        if final is not None:  # pickled: a CUDA tensor would unpickle on the owner's GPU
            final = Components(**{k: _to(v, "cpu") for k, v in vars(final).items()})
        final = self.sync.share(final, self.owners[g])
        if final is None:
            return None
        return Components(**{k: _to(v, stat.count.device) for k, v in vars(final).items()})

    def active(self) -> list[str]:
        """Groups with an unconverged layer, in graph order."""
        return [
            g
            for g, grp in self.groups.items()
            if any(self.converged_at[m] is None for m in grp.layers)
        ]

    def unconverged(self, groups: list[str]) -> list[str]:
        """Those of ``groups`` that are open and have an unconverged layer."""
        return [
            g
            for g in groups
            if self.is_open(g) and any(self.converged_at[m] is None for m in self.groups[g].layers)
        ]

    def switch_probes(self, active: list[str], probes: list[str] | None = None) -> set[str]:
        """Switch on the probes (of ``probes``, default all) that feed a group in ``active``,
        and off the others of them; returns those switched on."""
        names = self.probed.probes if probes is None else probes
        live = {p for p in names if any(g in active for g in self.probe_groups[p])}
        for p in names:
            self.probed.probes[p].active = p in live
        return live

    def module_for(self, active: list[str]) -> torch.nn.Module:
        """Switch probes on for the active groups only; the graph cut to what they need.

        The last cut is kept while it holds every node the live probes need and a new one
        would drop less than ``_RESLICE`` of its nodes (the probes it holds beyond them are
        switched off): a cut copies the graph and generates its code, 0.1-0.4 s at
        SmolLM2's 30 blocks, once each time a layer converged (38 of 57 minibatches there).
        """
        live = self.switch_probes(active)
        needed = needed_nodes(self.probed, live)
        nodes, module = self._sliced
        if module is None or not needed <= nodes or len(needed) < (1 - _RESLICE) * len(nodes):
            self._sliced = (needed, slice_to_probes(self.probed, live))
        return self._sliced[1]

    def estimate(self, active: list[str], step: int) -> None:
        """New components of the active groups; per-component convergence against the last.

        One host sync for all groups: NaN/Inf flags, row counts, cosines and ratios travel
        together, in one slot per group. Data parallel, a group's owner fills its slot and the
        others leave it 0, so one all-reduce (a sum) gives every process the owners' numbers.
        """
        flush_all(self.groups[g].stat for g in active)
        now: dict[str, torch.Tensor] = {}
        parts = []
        for g in active:
            self.groups[g].consume(step)
            parts.append(self._slot(g, step, now))
        host = torch.cat(parts)
        if self.sync is not None:
            (host,) = self.sync.sum(host)
        host = host.cpu()
        at = 0
        for g in active:
            grp = self.groups[g]
            size = grp.stat.k
            finite, rows, k = host[at : at + 3].tolist()
            cos, ratios = host[at + 3 : at + 3 + size], host[at + 3 + size : at + 3 + 2 * size]
            at += 3 + 2 * size
            if finite != 1:
                raise DataError(
                    f"NaN or Inf in the activations entering layer(s) "
                    f"{', '.join(grp.layers)} at calibration batch {step}: check "
                    "the data and the weights of the layers before them"
                )
            if g in self.probed.experts:  # its row count decides whether it may have a rank
                grp.n_rows = int(rows)
            if k:
                grp.ratios = ratios[: int(k)].clone()
                grp.component_ok = cos[: int(k)] >= self.settings.tau
                grp.components = now.get(g)  # the owner's only: it alone compares

    def _slot(self, g: str, step: int, now: dict[str, torch.Tensor]) -> torch.Tensor:
        """Group ``g``'s numbers after ``step``: [finite, rows, k, cos (k_max), ratios
        (k_max)]; zeros on a process that does not own it (see ``estimate``)."""
        grp = self.groups[g]
        size = grp.stat.k
        slot = torch.zeros(3 + 2 * size, device=grp.stat.count.device)
        if not self.owns(g):
            return slot
        slot[0] = grp.stat.finite()
        slot[1] = grp.stat.count
        est = grp.stat.estimate()
        if est is not None:
            vecs, ratios = est
            k = len(ratios)
            # Only a comparison with the previous minibatch's estimate can declare
            # convergence (the spec's criterion, applied at this batch).
            if grp.components is not None and grp.runs[-1][0] < step:
                slot[3 : 3 + k] = (vecs * grp.components).sum(1).abs()
            slot[2:3].fill_(k)  # ``slot[2] = k`` copies k from the host: a sync on CUDA
            slot[3 + size : 3 + size + k] = ratios
            now[g] = vecs
        return slot

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
        """Disconnect the statistics from the probes (the probed graph is done with)."""
        for probe in self.probed.probes.values():
            probe.sinks.clear()
            for sinks in probe.expert_sinks.values():
                sinks.clear()
            probe.active = False

    def steps(self) -> int:
        """Minibatches consumed by the group that consumed most."""
        return max((grp.seen for grp in self.groups.values()), default=0)

    def snapshot(self) -> dict | None:
        """The state of the closed groups and the layers' convergence, as tensors, numbers and
        strings (what ``torch.load(weights_only=True)`` restores); None while a group is open,
        whose statistic it would not hold."""
        if any(grp.stat is not None for grp in self.groups.values()):
            return None
        groups = {}
        for g, grp in self.groups.items():
            if grp.final is None:
                continue
            groups[g] = {
                "final": vars(grp.final),
                "n_rows": grp.n_rows,
                "seen": grp.seen,
                "runs": grp.runs,
                "component_ok": grp.component_ok,
                "ratios": grp.ratios,
            }
        converged_at = {m: at for m, at in self.converged_at.items() if at is not None}
        return {"groups": groups, "converged_at": converged_at}

    def restore(self, snapshot: dict) -> None:
        """Continue from a ``snapshot``; a malformed one raises KeyError, TypeError or
        ValueError (the caller says which file it came from)."""
        for g, rec in snapshot["groups"].items():
            grp = self.groups[g]
            grp.final = Components(**rec["final"])
            grp.n_rows, grp.seen, grp.runs = rec["n_rows"], rec["seen"], rec["runs"]
            grp.component_ok, grp.ratios = rec["component_ok"], rec["ratios"]
        unknown = set(snapshot["converged_at"]) - set(self.converged_at)
        if unknown:
            raise KeyError(sorted(unknown)[0])
        self.converged_at.update(snapshot["converged_at"])

    def finish(self, steps: int) -> EvaState:
        """The statistics after ``steps`` minibatches: final components (solved tightly), and
        the errors and warnings about what was seen."""
        settings = self.settings
        for g, grp in self.groups.items():
            if grp.stat is not None:
                self.close(g)
        final = {g: grp.final for g, grp in self.groups.items()}
        ok = {m: at is not None for m, at in self.converged_at.items()}
        self._check_seen(final, ok)
        unconverged = [m for m, v in ok.items() if not v]
        if unconverged:
            # Data parallel, every process decides alike; one shows the warning (the others
            # still raise it if warnings are errors: --fail-unconverged).
            quiet = self.sync is not None and not self.sync.main
            with warnings.catch_warnings(record=True) if quiet else contextlib.nullcontext():
                _warn_unconverged(steps, unconverged, settings.tau)
        flags = {}
        for g, grp in self.groups.items():
            k = min(settings.max_components, self.probed.dims[g])
            flags[g] = torch.zeros(k, dtype=torch.bool)
            flags[g][: len(grp.component_ok)] = grp.component_ok[:k]
        traced = self.traced
        return EvaState(
            settings=settings.to_dict(),
            layers={name: traced.layer_graph.layers[name] for name in traced.selection.targets},
            layer_group=self.layer_group,
            components=final,
            component_converged=flags,
            converged=ok,
            converged_at=dict(self.converged_at),
            batches={g: grp.runs for g, grp in self.groups.items()},
            steps=steps,
            unconverged=unconverged,
            skipped=traced.selection.skipped,
            depth=dict(traced.layer_graph.graph.nodes(data="depth")),
            capture=traced.capture,
        )

    def _check_seen(self, final: dict[str, Components], ok: dict[str, bool]) -> None:
        """Raise ``DataError`` if the data was too little for the budget, or had no variance."""
        settings = self.settings
        # n centred rows span at most n - 1 directions: fewer than r + 1 rows cannot give a layer
        # the average rank, which is a data problem, not a degenerate statistic. Groups that
        # converged had what they needed (e.g. no variance: rank 0 after one minibatch).
        # An expert the router sent few rows to is the model's routing, not the data's fault:
        # it gets rank 0 (the allocation and the report say why). So does a layer the model
        # sent no row at all while others had enough (HiggsAudio's audio MLP on text).
        enough = any(grp.n_rows > settings.budget for grp in self.groups.values())
        few = {
            g: n
            for g, grp in self.groups.items()
            if (n := grp.n_rows) <= settings.budget
            and not all(ok[m] for m in grp.layers)
            and g not in self.probed.experts
            and not (n == 0 and enough)
        }
        if few:
            g, n = min(few.items(), key=lambda item: item[1])
            layers = ", ".join(self.groups[g].layers)
            raise DataError(
                f"layer(s) {layers} saw only {n} activation row(s): a PCA "
                f"of n rows has at most n - 1 components, fewer than budget={settings.budget}; "
                "provide more calibration data or lower the budget"
            )
        # No variance at any target layer: an error rather than a model without adapters, which
        # would have nothing to train (and fail, or do nothing, far from the cause: the data).
        if not any(
            c is not None and bool((c.explained_variance > 0).any()) for c in final.values()
        ):
            raise DataError(
                "the activations entering every target layer have zero variance (constant, zero, "
                "or entirely masked inputs): EVA has no direction to initialise LoRA with; check "
                "the calibration data (and attention_mask) and the layers before the targets"
            )


def _no_components(d: int, k: int) -> Components:
    """Components of no variance (a group that saw fewer than 2 rows): what allocation reads as
    nothing to allot, of the usual shapes so the state and report treat it as any group."""
    k = min(k, d)
    zero = torch.zeros(k, dtype=torch.float64)
    return Components(torch.eye(k, d), zero, zero.float(), zero.clone(), torch.zeros(d), 0)


def _to(value: Any, device: torch.device | str) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


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
