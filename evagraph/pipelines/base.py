"""What every calibration pipeline shares: the registry, the model as calibration sees it
(``Traced``), and the ``Pipeline`` base class that runs the passes up to the probes.

A pipeline is called as ``pipeline(model, batches, settings, ...)`` and returns the
``EvaState``. The base class draws the first batch, puts the model in eval mode, captures it
and inserts the probes (``trace``), and hands ``run`` the traced model with the batches as
a stream on the device; a pipeline is its ``run``: how the batches go through the graph
until the statistics are done (``Calibrator`` holds the convergence loop's state).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import distributed
from ..config import CalibrationSettings
from ..errors import CaptureError, DataError
from ..onload import Onloader
from ..passes.capture import capture
from ..passes.layer_graph import LayerGraph, build_layer_graph
from ..passes.probe import ProbedGraph, insert_probes
from ..passes.select import Selection, select_targets
from ..quantized import no_cpu_repacking
from ..runtime import (
    call_model,
    check_batch_fits,
    check_shapes,
    input_shapes,
    model_device,
    set_training,
    to_device,
)
from ..state import EvaState
from ..stats import Sync

# name -> pipeline class; ``register`` fills it (see ``pipelines.choose`` for which runs).
PIPELINES: dict[str, type[Pipeline]] = {}


def register(name: str) -> Callable[[type[Pipeline]], type[Pipeline]]:
    """Class decorator: register a ``Pipeline`` subclass as ``name`` (``transform(...,
    pipeline=name)``)."""

    def add(cls: type[Pipeline]) -> type[Pipeline]:
        cls.name = name
        PIPELINES[name] = cls
        return cls

    return add


@dataclass
class Traced:
    """The model as calibration sees it. capture: how its graph was captured ("fx", "export",
    or "graph" for a model that is one); static: why that graph takes only the first batch's
    input shapes, or None; the layer graph, the targets selected, and the probed graph."""

    capture: str
    static: str | None
    layer_graph: LayerGraph
    selection: Selection
    probed: ProbedGraph


def trace(
    model: nn.Module,
    first: Any,
    settings: CalibrationSettings,
    forward_fn: Callable | None,
    resident: bool = True,
) -> Traced:
    """The passes up to the probes (capture, layer graph, select, probe) on ``model`` called
    with ``first``. ``resident``: the model's weights are in it, so a capture failure is
    checked against the model run eagerly (``DataError`` if the batch is what fails)."""
    try:
        captured = capture(model, first)
    except CaptureError:
        if resident:
            check_batch_fits(model, first, forward_fn)
        raise
    if captured.method == "graph":
        # A loaded .pt2 checks its input shapes in a hook of its own module, which the probed
        # copy of its graph does not carry: run that check once, on the model.
        check_batch_fits(model, first, forward_fn)
    if forward_fn is not None and captured.method == "export":
        raise CaptureError(
            "forward_fn needs a model torch.fx can trace; torch.export captures the "
            "model as called with the batch itself (dict -> keyword arguments), so "
            "pass batches in that form instead of a forward_fn"
        )
    layer_graph = build_layer_graph(captured.gm, model)
    selection = select_targets(layer_graph, settings.targets, settings.exclude)
    label_value = settings.label_mask_value if settings.use_label_mask else None
    probed = insert_probes(layer_graph, selection, label_value)
    return Traced(captured.method, captured.static, layer_graph, selection, probed)


class Pipeline:
    """How calibration batches go through a model to its statistics.

    Subclasses are registered by name (``register``), take their options in ``__init__``
    and implement ``run``. ``resident``: the model's own weights are in place while it runs
    (False: placeholders, swapped for the real ones by the ``Onloader`` that ``placed``
    installs). After a call, ``graph`` is the layer graph the state was computed on when
    the rewrite may splice adapters into it (resident pipelines), else None.
    """

    name: ClassVar[str] = ""
    resident: ClassVar[bool] = True
    graph: LayerGraph | None = None

    def __call__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        settings: CalibrationSettings,
        *,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        device: torch.device | None = None,
        progress: bool = True,
    ) -> EvaState:
        """Calibrate ``model`` on ``batches`` with ``settings``, in eval mode, on ``device``
        (default: ``default_device``); the model's training mode is restored after."""
        self.check(forward_fn)
        device = device or self.default_device(model)
        if device.type == "meta":  # a skeleton: its blocks run where the user has not said
            device = torch.device("cpu")
        sync = distributed.current()
        progress = progress and (sync is None or sync.main)
        drawn = iter(batches)
        first = next(drawn, None)
        if first is None:
            raise DataError("the calibration data is empty: the dataloader yielded no batch")
        first = to_device(first, device)
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:  # a generator: no length, no total on the progress bar
            total = None
        # Eval mode before capture: torch.export bakes the mode (dropout) into its graph.
        was_training = model.training
        set_training(model, False)
        with self.placed(model, device) as onloader, no_cpu_repacking(model):
            try:
                traced = trace(model, first, settings, forward_fn, self.resident)
                stream = self._stream(model, traced, first, drawn, device, sync)
                state = self.run(
                    traced, stream, settings, forward=forward_fn or call_model, device=device,
                    total=total, progress=progress, sync=sync, onloader=onloader,
                )  # fmt: skip
            finally:
                set_training(model, was_training)
        # The graph of a pipeline that is not resident holds placeholders, not the weights.
        self.graph = traced.layer_graph if self.resident else None
        return state

    def run(
        self,
        traced: Traced,
        batches: Iterator[Any],
        settings: CalibrationSettings,
        *,
        forward: Callable[[nn.Module, Any], Any],
        device: torch.device,
        total: int | None,
        progress: bool,
        sync: Sync | None,
        onloader: Onloader | None,
    ) -> EvaState:
        """The statistics of ``traced`` on ``batches`` (already on ``device``; under data
        parallelism this process's slices, ``sync`` its peers). ``forward(module, batch)``
        runs one batch; ``total``: how many batches there are, if known (progress bar);
        ``onloader``: what ``placed`` installed."""
        raise NotImplementedError

    def check(self, forward_fn: Callable | None) -> None:
        """Refuse, before anything runs, what this pipeline cannot do (nothing here)."""

    def default_device(self, model: nn.Module) -> torch.device:
        """Where calibration runs when the caller does not say: where the model is."""
        return model_device(model)

    def placed(self, model: nn.Module, device: torch.device) -> contextlib.AbstractContextManager:
        """Where the model's weights are while it is traced and run: as they are (here)."""
        return contextlib.nullcontext()

    @staticmethod
    def _stream(
        model: nn.Module,
        traced: Traced,
        first: Any,
        rest: Iterator[Any],
        device: torch.device,
        sync: Sync | None,
    ) -> Iterator[Any]:
        """All batches, ``first`` included: this process's slice of each (data parallel),
        checked against the input shapes a static capture takes, on ``device``."""
        stream = itertools.chain([first], rest)
        if sync is not None:  # this process's slice of each global batch
            stream = sync.shards(stream)
        if traced.static is not None:
            source = f"{type(model).__name__}, captured for one input shape,"
            stream = check_shapes(source, input_shapes(first), stream)
        return (to_device(b, device) for b in stream)
