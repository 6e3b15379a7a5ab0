"""The pipeline as three calls: ``calibrate`` (model -> statistics), ``adapt`` (statistics ->
adapted model) and ``transform`` (both).

Their settings are keyword arguments named as the fields of ``CalibrationSettings`` (what the
statistics depend on) and ``AdapterSettings`` (what turns them into adapters), in
``evagraph.config``; each is validated there and reported from where it came from.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .artifacts import attach_adapters
from .config import AdapterSettings, CalibrationSettings, settings_from
from .data import batch_failed, call_model, resolve_device, to_device
from .errors import CaptureError, DataError
from .lora import refuse_adapted, share_weights_copy
from .passes import incremental_svd
from .passes.capture import capture
from .passes.layer_graph import LayerGraph, build_layer_graph
from .passes.probe import insert_probes
from .passes.rewrite import init_adapters, layer_scaling
from .passes.select import select_targets
from .report import LayerReport, Report
from .state import EvaState


def _set_training(module: nn.Module, mode: bool) -> None:
    # Modules unlifted from torch.export refuse train()/eval(): their mode is baked in.
    with contextlib.suppress(NotImplementedError):
        module.train(mode)


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _check_batch_fits(model: nn.Module, batch: Any, forward_fn: Callable | None) -> None:
    """Raise DataError if ``model`` fails eagerly on ``batch``: a capture failure is then the
    data's fault (wrong keys, shapes, dtypes), not the model's."""
    try:
        with torch.no_grad():
            (forward_fn or call_model)(model, batch)
    except Exception as err:
        raise batch_failed(0, err) from err


def _calibrate(
    work: nn.Module,
    dataloader: Iterable[Any],
    settings: CalibrationSettings,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    progress: bool,
) -> tuple[EvaState, LayerGraph]:
    dev = _model_device(work)
    batches = iter(dataloader)
    first = next(batches, None)
    if first is None:
        raise DataError("the calibration data is empty: the dataloader yielded no batch")
    first = to_device(first, dev)
    total = len(dataloader) if hasattr(dataloader, "__len__") else None

    # Eval mode before capture: torch.export bakes the mode (dropout) into its graph.
    was_training = work.training
    _set_training(work, False)
    try:
        try:
            captured = capture(work, first)
        except CaptureError:
            _check_batch_fits(work, first, forward_fn)
            raise
        if captured.method == "graph":
            # A loaded .pt2 checks its input shapes in a hook of its own module, which the
            # probed copy of its graph does not carry: run that check once, on the model.
            _check_batch_fits(work, first, forward_fn)
        if forward_fn is not None and captured.method == "export":
            raise CaptureError(
                "forward_fn needs a model torch.fx can trace; torch.export captures the model "
                "as called with the batch itself (dict -> keyword arguments), so pass batches "
                "in that form instead of a forward_fn"
            )
        layer_graph = build_layer_graph(captured.gm, work)
        selection = select_targets(layer_graph, settings.targets, settings.exclude)
        label_value = settings.label_mask_value if settings.use_label_mask else None
        probed = insert_probes(layer_graph, selection, label_value)
        calibration = incremental_svd.calibrate(
            probed,
            (to_device(b, dev) for b in itertools.chain([first], batches)),
            settings,
            forward_fn or call_model,
            device=dev,
            total=total,
            progress=progress,
        )
    finally:
        _set_training(work, was_training)

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
    return state, layer_graph


def _adapt(
    work: nn.Module,
    state: EvaState,
    settings: AdapterSettings,
    layer_graph: LayerGraph | None = None,
    example: Any = None,
) -> tuple[nn.Module, Report]:
    ranks = state.ranks(settings.budget, settings.rho)
    per_layer = {m: state.components[g] for m, g in state.layer_group.items()}
    adapters = init_adapters(work, state.layers, ranks, per_layer, settings)
    was_training = work.training
    adapted = attach_adapters(work, adapters, example, state.source, layer_graph)
    _set_training(adapted, was_training)

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
    for n, r in ranks.items():
        if r:
            continue
        dead = not bool((state.components[state.layer_group[n]].explained_variance > 0).any())
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


def calibrate(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
    **settings: Any,
) -> EvaState:
    """Run the calibration only: the statistics ``adapt`` turns into adapters (see transform).

    ``settings``: the fields of ``CalibrationSettings`` (budget, rho, tau, targets, exclude,
    max_steps, min_batches, use_label_mask, label_mask_value, statistic). The model is not
    modified (if ``device`` differs from the model's, a copy is moved).
    """
    refuse_adapted(model)
    (calibration,) = settings_from(settings, CalibrationSettings)
    work = model
    if device is not None and resolve_device(device) != _model_device(model):
        work = copy.deepcopy(model).to(device)
    return _calibrate(work, dataloader, calibration, forward_fn, progress)[0]


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
    state.check_model(model)
    work = model if inplace else share_weights_copy(model)
    return _adapt(work, state, adapter, example=example)


def transform(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
    inplace: bool = False,
    return_state: bool = False,
    **settings: Any,
) -> tuple[nn.Module, Report] | tuple[nn.Module, Report, EvaState]:
    """Return ``model`` with EVA-initialised LoRA adapters, and a report of what was done.

    ``dataloader`` yields calibration batches: a tensor, a tuple/list of positional inputs, or
    a dict of keyword inputs (``forward_fn(model, batch)`` overrides how a batch is called).
    ``settings``: the fields of ``CalibrationSettings`` and ``AdapterSettings`` (budget, rho,
    tau, alpha, targets, exclude, ...; see ``evagraph.config``). Calibration runs in eval mode
    on ``device`` (default: where the model is), and the adapted model is returned there. With
    ``return_state`` the statistics (``EvaState``) come back as a third value.

    No weight is copied: the adapters are spliced into a copy of the module tree that shares
    the model's base weights (frozen in the copy; the model's own parameters keep their
    ``requires_grad``; see ``lora.share_weights_copy``), so the model is left as it was. Only
    a ``device`` other than the model's puts new tensors there. ``inplace=True`` splices into
    the model's own module tree instead.
    """
    refuse_adapted(model)
    calibration, adapter = settings_from(settings, CalibrationSettings, AdapterSettings)
    device = resolve_device(device) if device is not None else None
    work = model if inplace else share_weights_copy(model)
    if device is not None:
        work.to(device)
    state, layer_graph = _calibrate(work, dataloader, calibration, forward_fn, progress)
    adapted, report = _adapt(work, state, adapter, layer_graph)
    return (adapted, report, state) if return_state else (adapted, report)
