"""The pipeline as three calls: ``calibrate`` (model -> statistics), ``adapt`` (statistics ->
adapted model) and ``transform`` (both).

Their settings are keyword arguments named as the fields of ``CalibrationSettings`` (what the
statistics depend on) and ``AdapterSettings`` (what turns them into adapters), in
``evagraph.config``; each is validated there and reported from where it came from. How the
batches run (whole graph, or block by block) is a pipeline's business (``pipelines.choose``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attach import attach_adapters
from .config import AdapterSettings, CalibrationSettings, settings_from
from .errors import ConfigError
from .lora import refuse_adapted, share_weights_copy
from .onload import execution_device
from .passes.layer_graph import LayerGraph
from .passes.rewrite import init_adapters
from .pipelines import PIPELINES, Pipeline, choose
from .quantized import is_quantized_weight
from .report import Report
from .runtime import resolve_device, samples_and_tokens, set_training
from .state import EvaState


class _Consumed:
    """The batches, counting the samples and tokens of each as calibration draws it (the
    global batch, before a data-parallel process takes its slice); sized if they are."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches
        self.per_batch: list[tuple[int, int | None]] = []

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.per_batch.append(samples_and_tokens(batch))
            yield batch

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]  # TypeError: not sized

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


def _pipeline(pipeline: Pipeline | str | None, model: nn.Module, **options: Any) -> Pipeline:
    """The pipeline given (an instance, or a name in ``PIPELINES``), else ``choose``'s."""
    if pipeline is None:
        return choose(model, **options)
    given = [k for k, v in options.items() if k != "device" and v not in (None, False)]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: options of the chosen pipeline; with pipeline= give them to "
            "the pipeline itself"
        )
    if isinstance(pipeline, str):
        if pipeline not in PIPELINES:
            raise ConfigError(
                f"unknown pipeline {pipeline!r}; the pipelines are {', '.join(PIPELINES)}"
            )
        return PIPELINES[pipeline]()
    return pipeline


def _adapt(
    work: nn.Module,
    state: EvaState,
    settings: AdapterSettings,
    layer_graph: LayerGraph | None = None,
    example: Any = None,
    device: torch.device | None = None,
) -> tuple[nn.Module, Report]:
    """Adapters from ``state`` spliced into ``work`` (in place; into ``layer_graph`` when
    given, the capture the state was computed on), and their report."""
    ranks = state.ranks(settings)
    per_layer = {m: state.components[g] for m, g in state.layer_group.items()}
    adapters = init_adapters(work, state.layers, ranks, per_layer, settings, device)
    was_training = work.training
    adapted = attach_adapters(work, adapters, example, state.source, layer_graph)
    set_training(adapted, was_training)
    return adapted, Report.from_state(state, ranks, settings)


_BLOCK_DOC = """
    Block-by-block calibration (see README, "Models larger than memory") runs one block of
    the graph at a time with only its weights resident: ``sequential=True`` forces it;
    ``max_memory`` (bytes, or ``"600MB"``, ``"40GB"``) bounds the weights resident at once
    and switches it on when the model's weights exceed it; models with weights on the meta
    device (accelerate ``cpu_offload``/``disk_offload``/``device_map`` offload, or a skeleton
    whose ``weights`` are a Hugging Face directory's safetensors) always use it. Activations
    between blocks are kept in host memory, or in ``work_dir``, which also makes the run
    resumable (``resume=True`` continues the run saved there from its last finished block).
    ``pipeline``: a ``Pipeline`` (e.g. from ``pipelines.choose``) or the name of a registered
    one, instead of these options.
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
    pipeline: Pipeline | str | None = None,
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
    pipeline = _pipeline(
        pipeline, model, sequential=sequential, max_memory=max_memory, device=device,
        weights=weights, work_dir=work_dir, resume=resume,
    )  # fmt: skip
    return pipeline(model, dataloader, calibration, forward_fn=forward_fn, device=device,
                    progress=progress)  # fmt: skip


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
    adjust_scaling_factors, whiten, dropout, use_dora, use_rslora); budget and rho default to
    the calibration's, and ``round(budget * rho)`` may not exceed the components the state
    holds. The state's layers must be the model's (same names, kinds and shapes). ``example``
    (one batch) is needed only if a layer is an op in a graph and the model is not a
    GraphModule. The result shares the model's weights (see ``transform``).
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


def _refuse_dora(model: nn.Module) -> None:
    """Raise ``ConfigError`` now, not after calibration (``init_magnitude`` would refuse every
    layer), where DoRA cannot take the norms of the base weights: on the meta device, or
    quantized."""
    if any(p.is_meta for p in model.parameters()):
        raise ConfigError(
            "use_dora: DoRA's magnitudes are the norms of the base weights, and this model's "
            "are not resident (on the meta device: offloaded, or read from weights= block by "
            "block); load them, or adapt without use_dora"
        )
    name = next((n for n, p in model.named_parameters() if is_quantized_weight(p)), None)
    if name is not None:
        raise ConfigError(
            f"use_dora: DoRA's magnitudes are the norms of the base weights, and {name} is "
            f"{type(model.get_parameter(name)).__name__} (quantized): adapt without use_dora"
        )


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
    pipeline: Pipeline | str | None = None,
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
    if adapter.use_dora:
        _refuse_dora(model)
    device = resolve_device(device) if device is not None else None
    # device=None: a pipeline that runs the model where it is gets the copy moved there.
    pipeline = _pipeline(
        pipeline, model, sequential=sequential, max_memory=max_memory, weights=weights,
        work_dir=work_dir, resume=resume,
    )  # fmt: skip
    work = model if inplace else share_weights_copy(model)
    if device is not None and pipeline.resident:
        work.to(device)
    batches = _Consumed(dataloader)
    state = pipeline(work, batches, calibration, forward_fn=forward_fn, device=device,
                     progress=progress)  # fmt: skip
    home = execution_device(work) or torch.device("cpu")
    adapted, report = _adapt(work, state, adapter, pipeline.graph, device=home)
    report.run = {
        **_versions(),
        **batches.totals(state.steps),
        "elapsed_s": round(time.monotonic() - start, 3),
    }
    return (adapted, report, state) if return_state else (adapted, report)


transform.__doc__ += _BLOCK_DOC
