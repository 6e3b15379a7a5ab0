"""``transform``: the whole pipeline, model -> graph -> probes -> statistics -> ranks -> adapted."""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .config import EvaSettings
from .data import call_model, to_device
from .errors import CaptureError, DataError
from .passes.allocate import allocate
from .passes.capture import capture
from .passes.incremental_svd import calibrate
from .passes.layer_graph import build_layer_graph
from .passes.probe import insert_probes
from .passes.rewrite import init_adapters, layer_scaling, needs_graph_rewrite, rewrite
from .passes.select import select_targets
from .report import LayerReport, Report


def _set_training(module: nn.Module, mode: bool) -> None:
    # Modules unlifted from torch.export refuse train()/eval(): their mode is baked in.
    with contextlib.suppress(NotImplementedError):
        module.train(mode)


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def transform(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    budget: int = 8,
    rho: float = 2.0,
    tau: float = 0.99,
    alpha: float = 8.0,
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    device: str | torch.device | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    min_batches: int = 1,
    whiten: bool = False,
    dropout: float = 0.0,
    adjust_scaling_factors: bool = True,
    use_label_mask: bool = True,
    label_mask_value: int = -100,
    inplace: bool = False,
) -> tuple[nn.Module, Report]:
    """Return ``model`` with EVA-initialised LoRA adapters, and a report of what was done.

    ``dataloader`` yields calibration batches: a tensor, a tuple/list of positional inputs, or
    a dict of keyword inputs (``forward_fn(model, batch)`` overrides how a batch is called).
    See ``EvaSettings`` for budget, rho, tau, alpha, targets, exclude and the other options.
    The model is copied first unless ``inplace``; calibration runs in eval mode on ``device``
    (default: where the model is), and the adapted model is returned there.
    """
    settings = EvaSettings(
        budget=budget,
        rho=rho,
        tau=tau,
        alpha=alpha,
        adjust_scaling_factors=adjust_scaling_factors,
        whiten=whiten,
        dropout=dropout,
        max_steps=max_steps,
        min_batches=min_batches,
        targets=tuple(targets) if targets is not None else None,
        exclude=tuple(exclude),
        use_label_mask=use_label_mask,
        label_mask_value=label_mask_value,
    )
    work = model if inplace else copy.deepcopy(model)
    if device is not None:
        work.to(device)
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
        captured = capture(work, first)
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
        calibration = calibrate(
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

    ranks = allocate(
        calibration.ratios(), settings.budget, settings.rho, list(probed.groups.values())
    )
    layer_stats = {m: calibration.stats[g] for m, g in calibration.layer_group.items()}
    adapters = init_adapters(layer_graph, ranks, layer_stats, settings)
    adapted = rewrite(work, adapters, layer_graph)
    _set_training(adapted, was_training)

    depth = dict(layer_graph.graph.nodes(data="depth"))
    layers = []
    for name in selection.targets:
        layer, group = layer_graph.layers[name], calibration.layer_group[name]
        rank = ranks[name]
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
                depth=depth.get(name, 0),
                explained_variance_ratio=calibration.stats[group].explained_variance_ratio.tolist(),
                converged=calibration.converged[name],
                steps_to_converge=calibration.converged_at[name],
            )
        )
    skipped = dict(selection.skipped)
    skipped.update(
        {n: "rank 0: its variance did not make the global cut" for n, r in ranks.items() if r == 0}
    )
    report = Report(
        settings=settings.to_dict(),
        layers=layers,
        skipped=skipped,
        groups=probed.groups,
        rows={g: s.n_rows for g, s in calibration.stats.items()},
        batches=calibration.batches,
        steps=calibration.steps,
        unconverged=calibration.unconverged,
        capture=captured.method,
        rewrite="graph" if needs_graph_rewrite(layer_graph, adapters) else "module",
    )
    return adapted, report
