"""The pipeline as three calls: ``calibrate`` (model -> statistics), ``adapt`` (statistics ->
adapted model) and ``transform`` (both).

Their settings are keyword arguments named as the fields of ``CalibrationSettings`` (what the
statistics depend on) and ``AdapterSettings`` (what turns them into adapters), in
``evagraph.config``; each is validated there and reported from where it came from.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .artifacts import attach_adapters
from .config import AdapterSettings, CalibrationSettings, parse_size, settings_from
from .errors import CaptureError, ConfigError, DataError
from .lora import refuse_adapted, share_weights_copy
from .onload import Onloader, ShardedCheckpoint, execution_device, has_offloaded_weights
from .passes import incremental_svd
from .passes.capture import capture
from .passes.layer_graph import LayerGraph, build_layer_graph
from .passes.partition import partition
from .passes.probe import insert_probes
from .passes.rewrite import init_adapters, layer_scaling
from .passes.select import select_targets
from .passes.sequential import calibrate_sequential
from .report import LayerReport, Report
from .runtime import (
    call_model,
    check_batch_fits,
    check_shapes,
    input_shapes,
    model_device,
    resolve_device,
    samples_and_tokens,
    set_training,
    to_device,
)
from .state import EvaState


@dataclass
class _Sequential:
    """Block-by-block calibration (``passes.sequential``): how it runs.

    max_bytes: bound on the weights resident at once (None: one block at a time). weights: the
    checkpoint the model's meta-device weights are read from. work_dir / resume / fingerprint:
    where the activations and progress live, and whether to continue the run saved there.
    """

    max_bytes: int | None = None
    weights: ShardedCheckpoint | None = None
    work_dir: Path | None = None
    resume: bool = False
    fingerprint: dict | None = None


class _Consumed:
    """Samples and tokens of each batch as calibration draws it (the global batch, before a
    data-parallel process takes its slice), totalled over the batches it consumed."""

    def __init__(self) -> None:
        self.per_batch: list[tuple[int, int | None]] = []

    def counting(self, batches: Iterable[Any]) -> Iterable[Any]:
        for batch in batches:
            self.per_batch.append(samples_and_tokens(batch))
            yield batch

    def totals(self, steps: int) -> dict:
        used = self.per_batch[:steps]  # a loop that stops has drawn one batch more
        tokens = [t for _, t in used]
        return {
            "samples": sum(s for s, _ in used),
            "tokens": None if not used or None in tokens else sum(tokens),
        }


def _versions() -> dict:
    """The versions of evagraph and the libraries that shape its results."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("evagraph", "torch", "transformers", "timm", "peft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _weight_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _plan(
    model: nn.Module,
    sequential: bool | None,
    max_memory: str | int | None,
    weights: str | Path | None,
    work_dir: str | Path | None,
    resume: bool,
    fingerprint: dict | None = None,
) -> _Sequential | None:
    """Whole-graph (None) or block-by-block calibration, from the user's arguments and the
    model: offloaded weights or a model over ``max_memory`` need block by block."""
    max_bytes = parse_size(max_memory)
    if resume and work_dir is None:
        raise ConfigError("resume needs the work_dir the interrupted calibration used")
    offloaded = has_offloaded_weights(model) or weights is not None
    if sequential is None:
        too_big = max_bytes is not None and _weight_bytes(model) > max_bytes
        sequential = offloaded or too_big
    elif not sequential and offloaded:
        raise ConfigError(
            "the model's weights are not all resident (meta device, accelerate offload or "
            "a weights checkpoint): only block-by-block calibration can run it "
            "(sequential=True, --sequential)"
        )
    if not sequential:
        return None
    return _Sequential(
        max_bytes,
        ShardedCheckpoint(weights) if weights is not None else None,
        Path(work_dir) if work_dir is not None else None,
        resume,
        fingerprint,
    )


def _calibrate(
    work: nn.Module,
    dataloader: Iterable[Any],
    settings: CalibrationSettings,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    progress: bool,
    plan: _Sequential | None = None,
    device: torch.device | None = None,
) -> tuple[EvaState, LayerGraph | None, dict]:
    """The statistics of ``work`` on ``dataloader``: whole-graph, or block by block (``plan``)
    on ``device``. Returns the state, for whole-graph runs the layer graph, and the samples
    and tokens of the batches calibration consumed."""
    if plan is not None and forward_fn is not None:
        raise ConfigError(
            "forward_fn cannot be used with block-by-block calibration: the blocks are called "
            "with the graph's own inputs; pass batches the model takes as they are"
        )
    dev = device or (plan is not None and execution_device(work)) or model_device(work)
    if dev.type == "meta":  # a skeleton: its blocks run where the user has not said, the CPU
        dev = torch.device("cpu")
    sync = distributed.current()
    progress = progress and (sync is None or sync.main)
    batches = iter(dataloader)
    first = next(batches, None)
    if first is None:
        raise DataError("the calibration data is empty: the dataloader yielded no batch")
    first = to_device(first, dev)
    total = len(dataloader) if hasattr(dataloader, "__len__") else None
    consumed = _Consumed()

    # Eval mode before capture: torch.export bakes the mode (dropout) into its graph.
    was_training = work.training
    set_training(work, False)
    onloader = Onloader(work, dev, plan.weights) if plan is not None else None
    with onloader.installed() if onloader is not None else contextlib.nullcontext():
        try:
            try:
                captured = capture(work, first)
            except CaptureError:
                if plan is None:
                    check_batch_fits(work, first, forward_fn)
                raise
            if captured.method == "graph":
                # A loaded .pt2 checks its input shapes in a hook of its own module, which
                # the probed copy of its graph does not carry: run that check once, on the model.
                check_batch_fits(work, first, forward_fn)
            if forward_fn is not None and captured.method == "export":
                raise CaptureError(
                    "forward_fn needs a model torch.fx can trace; torch.export captures the "
                    "model as called with the batch itself (dict -> keyword arguments), so "
                    "pass batches in that form instead of a forward_fn"
                )
            layer_graph = build_layer_graph(captured.gm, work)
            selection = select_targets(layer_graph, settings.targets, settings.exclude)
            label_value = settings.label_mask_value if settings.use_label_mask else None
            probed = insert_probes(layer_graph, selection, label_value)
            stream = consumed.counting(itertools.chain([first], batches))
            if sync is not None:  # this process's slice of each global batch
                stream = sync.shards(stream)
            if captured.static is not None:
                source = f"{type(work).__name__}, captured for one input shape,"
                stream = check_shapes(source, input_shapes(first), stream)
            stream = (to_device(b, dev) for b in stream)
            if plan is None:
                calibration = incremental_svd.calibrate(
                    probed,
                    stream,
                    settings,
                    forward_fn or call_model,
                    device=dev,
                    total=total,
                    progress=progress,
                    sync=sync,
                )
            else:
                calibration = calibrate_sequential(
                    probed,
                    partition(probed, plan.max_bytes),
                    stream,
                    settings,
                    onloader,
                    device=dev,
                    work_dir=plan.work_dir,
                    resume=plan.resume,
                    fingerprint=plan.fingerprint,
                    progress=progress,
                    sync=sync,
                )
        finally:
            set_training(work, was_training)

    state = EvaState(
        settings=settings.to_dict(),
        layers={name: layer_graph.layers[name] for name in selection.targets},
        layer_group=calibration.layer_group,
        components=calibration.stats,
        component_converged=calibration.component_converged,
        converged=calibration.converged,
        converged_at=calibration.converged_at,
        batches=calibration.batches,
        steps=calibration.steps,
        unconverged=calibration.unconverged,
        skipped=selection.skipped,
        depth=dict(layer_graph.graph.nodes(data="depth")),
        capture=captured.method,
    )
    # The graph of a block-by-block run holds placeholders, not the model's weights.
    return state, layer_graph if plan is None else None, consumed.totals(calibration.steps)


def _adapt(
    work: nn.Module,
    state: EvaState,
    settings: AdapterSettings,
    layer_graph: LayerGraph | None = None,
    example: Any = None,
    device: torch.device | None = None,
) -> tuple[nn.Module, Report]:
    ranks = state.ranks(settings.budget, settings.rho)
    per_layer = {m: state.components[g] for m, g in state.layer_group.items()}
    adapters = init_adapters(work, state.layers, ranks, per_layer, settings, device)
    was_training = work.training
    adapted = attach_adapters(work, adapters, example, state.source, layer_graph)
    set_training(adapted, was_training)

    layers = []
    for name, layer in state.layers.items():
        group, rank = state.layer_group[name], ranks[name]
        alpha_l, scale = layer_scaling(rank, settings) if rank else (0.0, 0.0)
        layers.append(
            LayerReport(
                name=name,
                kind=layer.kind,
                op=layer.op,
                in_features=layer.in_features,
                out_features=layer.out_features,
                rank=rank,
                alpha=alpha_l,
                scaling=scale,
                group=group,
                depth=state.depth.get(name, 0),
                explained_variance_ratio=state.components[group].explained_variance_ratio.tolist(),
                converged=bool(state.component_converged[group][:rank].all()),
                steps_to_converge=state.converged_at.get(name),
            )
        )
    skipped = dict(state.skipped)
    few = state.few_rows(settings.budget)
    for n, r in ranks.items():
        if r:
            continue
        if n in few:
            skipped[n] = (
                f"rank 0: the router sent this expert {few[n]} row(s), too few for a rank "
                f"(more than budget={settings.budget} needed)"
            )
            continue
        found = state.components[state.layer_group[n]]
        if found.n_rows < 2:
            skipped[n] = (
                f"rank 0: it saw {found.n_rows} row(s) of calibration data, too few for a PCA "
                "(more data needed)"
            )
            continue
        dead = not bool((found.explained_variance > 0).any())
        skipped[n] = (
            "rank 0: its inputs have no variance (constant, zero or masked)"
            if dead
            else "rank 0: its variance did not make the global cut"
        )
    graph_mode = any(state.layers[n].module is None for n in adapters)
    report = Report(
        settings={"calibration": dict(state.settings), "adapter": settings.to_dict()},
        layers=layers,
        skipped=skipped,
        groups=state.groups,
        rows={g: c.n_rows for g, c in state.components.items()},
        batches=state.batches,
        steps=state.steps,
        unconverged=[layer.name for layer in layers if layer.rank and not layer.converged],
        capture=state.capture,
        rewrite="graph" if graph_mode else "module",
    )
    return adapted, report


_BLOCK_DOC = """
    Block-by-block calibration (see README, "Models larger than memory") runs one block of
    the graph at a time with only its weights resident: ``sequential=True`` forces it;
    ``max_memory`` (bytes, or ``"600MB"``, ``"40GB"``) bounds the weights resident at once
    and switches it on when the model's weights exceed it; models with weights on the meta
    device (accelerate ``cpu_offload``/``disk_offload``/``device_map`` offload, or a skeleton
    whose ``weights`` are a Hugging Face directory's safetensors) always use it. Activations
    between blocks are kept in host memory, or in ``work_dir``, which also makes the run
    resumable (``resume=True`` continues the run saved there from its last finished block).
"""


def calibrate(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
    sequential: bool | None = None,
    max_memory: str | int | None = None,
    weights: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    **settings: Any,
) -> EvaState:
    """Run the calibration only: the statistics ``adapt`` turns into adapters (see transform).

    ``settings``: the fields of ``CalibrationSettings`` (budget, rho, tau, targets, exclude,
    max_steps, min_batches, use_label_mask, label_mask_value, statistic). The model is not
    modified. If ``device`` differs from the model's, calibration runs block by block there:
    each block's weights are moved for its turn, never the whole model.
    """
    refuse_adapted(model)
    (calibration,) = settings_from(settings, CalibrationSettings)
    device = resolve_device(device) if device is not None else None
    if device is not None and device != model_device(model):
        if sequential is False:
            raise ConfigError(
                f"device {device} is not where the model is ({model_device(model)}): calibrate "
                "moves one block at a time there (sequential); move the model yourself to "
                "calibrate it whole on that device"
            )
        sequential = True
    plan = _plan(model, sequential, max_memory, weights, work_dir, resume)
    return _calibrate(model, dataloader, calibration, forward_fn, progress, plan, device)[0]


calibrate.__doc__ += _BLOCK_DOC


def adapt(
    model: nn.Module,
    state: EvaState,
    *,
    example: Any = None,
    inplace: bool = False,
    **settings: Any,
) -> tuple[nn.Module, Report]:
    """Adapters from saved statistics: allocation and initialisation only, no data needed.

    ``settings``: the fields of ``AdapterSettings`` (budget, rho, alpha,
    adjust_scaling_factors, whiten, dropout); budget and rho default to the calibration's,
    and ``round(budget * rho)`` may not exceed the components the state holds. The state's
    layers must be the model's (same names, kinds and shapes). ``example`` (one batch) is
    needed only if a layer is an op in a graph and the model is not a GraphModule. The
    result shares the model's weights (see ``transform``).
    """
    refuse_adapted(model)
    defaults = {k: state.settings[k] for k in ("budget", "rho") if k in state.settings}
    (adapter,) = settings_from(settings, AdapterSettings, defaults=defaults)
    start = time.monotonic()
    state.check_model(model)
    work = model if inplace else share_weights_copy(model)
    adapted, report = _adapt(work, state, adapter, example=example)
    report.run = {**_versions(), "elapsed_s": round(time.monotonic() - start, 3)}
    return adapted, report


def transform(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
    inplace: bool = False,
    return_state: bool = False,
    sequential: bool | None = None,
    max_memory: str | int | None = None,
    weights: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    fingerprint: dict | None = None,
    **settings: Any,
) -> tuple[nn.Module, Report] | tuple[nn.Module, Report, EvaState]:
    """Return ``model`` with EVA-initialised LoRA adapters, and a report of what was done.

    ``dataloader`` yields calibration batches: a tensor, a tuple/list of positional inputs, or
    a dict of keyword inputs (``forward_fn(model, batch)`` overrides how a batch is called).
    ``settings``: the fields of ``CalibrationSettings`` and ``AdapterSettings`` (budget, rho,
    tau, alpha, targets, exclude, ...; see ``evagraph.config``). Calibration runs in eval mode
    on ``device`` (default: where the model is), and the adapted model is returned there. With
    ``return_state`` the statistics (``EvaState``) come back as a third value. Block by block,
    the model stays where it is and only each block's weights visit ``device``; adapters of
    layers whose weights are on the meta device are created on accelerate's execution device,
    or the CPU.

    No weight is copied: the adapters are spliced into a copy of the module tree that shares
    the model's base weights (frozen in the copy; the model's own parameters keep their
    ``requires_grad``; see ``lora.share_weights_copy``), so the model is left as it was. Only
    a ``device`` other than the model's puts new tensors there. ``inplace=True`` splices into
    the model's own module tree instead.
    """
    start = time.monotonic()
    refuse_adapted(model)
    calibration, adapter = settings_from(settings, CalibrationSettings, AdapterSettings)
    device = resolve_device(device) if device is not None else None
    plan = _plan(model, sequential, max_memory, weights, work_dir, resume, fingerprint)
    work = model if inplace else share_weights_copy(model)
    if device is not None and plan is None:
        work.to(device)
    state, layer_graph, consumed = _calibrate(
        work, dataloader, calibration, forward_fn, progress, plan, device
    )
    home = execution_device(work) or torch.device("cpu")
    adapted, report = _adapt(work, state, adapter, layer_graph, device=home)
    report.run = {**_versions(), **consumed, "elapsed_s": round(time.monotonic() - start, 3)}
    return (adapted, report, state) if return_state else (adapted, report)


transform.__doc__ += _BLOCK_DOC
