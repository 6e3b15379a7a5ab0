"""Capture pass: a model and one example batch -> a ``torch.fx.GraphModule``.

Takes an ``nn.Module`` (or a GraphModule already, e.g. a loaded ``.pt2``) and returns a
GraphModule whose nodes reference the model's own parameters (nothing is copied).

Two captures, tried in order:
1. ``torch.fx.symbolic_trace`` with adaptable layers (``nn.Linear``, ``nn.ConvNd``, HF
   ``Conv1D``) as leaves: cheap, and each layer call is one ``call_module`` node.
2. ``torch.export`` (non-strict), with the example batch and every dimension of every input
   left to ``Dim.AUTO``, so later batches of other sizes run. Python that fx cannot trace
   (HF transformers, timm models with shape logic) is executed with real values here, so
   this captures nearly any model that runs; its graph is ATen ops whose weights are the
   model's own parameters, which the layer-graph pass maps back to their modules.
3. ``torch.export`` with static shapes, when 2 fails on the dynamic shapes themselves (a
   guard on a size it cannot decide, a data-dependent branch): the graph then takes only
   batches shaped as the example, which ``Captured.static`` tells calibration to check.
We keep fx first rather than exporting everything (as pt2e does) because it is an order of
magnitude faster on the models it can trace and keeps the model's own leaf modules.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from ..errors import CaptureError


def is_hf_conv1d(module: nn.Module) -> bool:
    """HF's GPT-2 style ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_hf_conv1d(m):
            return True
        return super().is_leaf_module(m, qualname)


def _concrete_args(model: nn.Module, example: Any) -> dict[str, Any] | None:
    # Keyword inputs the batches never pass are fixed to their defaults, so `if mask is None`
    # branches trace the way the model will actually be called.
    if not isinstance(example, Mapping):
        return None
    params = inspect.signature(model.forward).parameters
    fixed = {
        name: p.default
        for name, p in params.items()
        if name not in example
        and p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return fixed or None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return type(err).__name__ + (f": {text.splitlines()[0]}" if text else "")


# Frames from these installed packages are not the user's. Compared by real path, not by a
# name: a user's checkout may itself live in a folder called "evagraph" (git's default).
# sympy: export's shape solver fails inside it.
_LIBRARY_DIRS = tuple(
    os.path.join(os.path.dirname(path), "")  # trailing separator: torch/ but not torchvision/
    for path in (
        os.path.realpath(torch.__file__),
        os.path.dirname(os.path.realpath(__file__)),  # evagraph/passes -> evagraph
        *(os.path.realpath(s.origin) for s in [importlib.util.find_spec("sympy")] if s),
    )
)


def _user_frame(err: BaseException) -> str:
    """Where in the model's own code tracing failed: ``file:line in fn: `code```, or ""."""
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if not os.path.realpath(f.filename).startswith(_LIBRARY_DIRS)
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    # A failing export logs a warning per failed guard and prints the partial graph to
    # stderr; the reason reaches the user once, in the CaptureError. On success whatever was
    # written (e.g. the model's own warnings) is passed on.
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
        sys.stderr.write(buffer.getvalue())
    finally:
        logger.setLevel(level)


def _auto_dims(value: Any) -> Any:
    # Every dimension of every tensor may vary (batch, sequence, image size); export keeps
    # static whatever the model's code pins down.
    if isinstance(value, torch.Tensor):
        return {i: torch.export.Dim.AUTO for i in range(value.dim())} or None
    if isinstance(value, Mapping):
        return {k: _auto_dims(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_auto_dims(v) for v in value)
    return None


def export_program(
    model: nn.Module, example: Any, dynamic: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of ``model`` called with ``example``, all dims dynamic
    (``dynamic=False``: all static, the graph takes only ``example``'s shapes).

    A mapping is passed as keyword arguments, a tuple/list positionally, a tensor as the one
    input. HF models are exported without their KV cache (``config.use_cache``), which the
    graph has no use for and which export cannot always flatten.
    """
    if isinstance(example, Mapping):
        args, kwargs = (), dict(example)
    elif isinstance(example, (tuple, list)):
        args, kwargs = tuple(example), {}
    else:
        args, kwargs = (example,), {}
    # Export marks the input tensors' dims dynamic on the tensor objects themselves, which a
    # later export (the static retry, a user's torch.compile) would inherit: give it aliases.
    args, kwargs = torch.utils._pytree.tree_map_only(
        torch.Tensor, torch.Tensor.detach, (args, kwargs)
    )
    # Submodules may hold their own config copies (T5's decoder stack): switch off them all.
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    cached = [c for c in configs.values() if getattr(c, "use_cache", False) is True]
    for c in cached:
        c.use_cache = False
    try:
        with _quiet_export():
            return torch.export.export(
                model,
                args,
                kwargs,
                dynamic_shapes=(_auto_dims(kwargs) if kwargs else _auto_dims(args))
                if dynamic
                else None,
                strict=False,
            )
    finally:
        for c in cached:
            c.use_cache = True


@dataclass
class Captured:
    """Result of the capture pass. method: "graph" (given a GraphModule), "fx" or "export".
    static: why the graph takes only the example's input shapes (export with dynamic shapes
    failed on this), or None when it takes other shapes too."""

    gm: fx.GraphModule
    method: str
    static: str | None = None


def capture(model: nn.Module, example: Any = None) -> Captured:
    """Capture ``model`` as a GraphModule: fx symbolic trace, else torch.export.

    ``example`` is one calibration batch (tensor, tuple, or dict of keyword inputs), used by
    fx to fix absent keyword inputs to their defaults and by export as the example input.
    Raises ``CaptureError`` naming what each method failed on.
    """
    if isinstance(model, fx.GraphModule):
        return Captured(model, "graph")
    tracer = _LeafTracer()
    try:
        graph = tracer.trace(model, concrete_args=_concrete_args(model, example))
        return Captured(fx.GraphModule(tracer.root, graph, type(model).__name__), "fx")
    except Exception as err:  # fx raises many types; all mean "not traceable by fx"
        fx_error = err
    if example is None:
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__} ({_first_line(fx_error)}"
            f"{_user_frame(fx_error)}) and "
            "torch.export needs an example batch"
        ) from fx_error
    try:
        return Captured(export_program(model, example).module(), "export")
    except Exception as err:
        dynamic_error = err
    # Shape logic export cannot decide for every size (timm's CPUBone pads to a multiple of
    # its stride) is decided for the example's sizes. A guard on tensor values (DBRX routes
    # tokens to experts in a Python loop) stays undecidable: no retry.
    dynamic = f"{_first_line(dynamic_error)}{_user_frame(dynamic_error)}"
    err = dynamic_error
    if not isinstance(dynamic_error, GuardOnDataDependentSymNode):
        try:
            gm = export_program(model, example, dynamic=False).module()
        except Exception as static_error:
            err = static_error
        else:
            warnings.warn(
                f"torch.export could not capture {type(model).__name__} for inputs of any "
                f"shape ({dynamic}); it is captured for the first calibration batch's shapes, "
                "which every batch must then have",
                stacklevel=2,
            )
            return Captured(gm, "export", static=dynamic)
    static = f"{_first_line(err)}{_user_frame(err)}"
    raise CaptureError(
        f"cannot capture {type(model).__name__} as a graph. torch.fx: "
        f"{_first_line(fx_error)}{_user_frame(fx_error)}; torch.export: {static}"
        + (f" (with dynamic shapes: {dynamic})" if dynamic != static else "")
        + ". Check that the model runs on the calibration batch as given (a dict is "
        "passed as keyword arguments), or exclude the construct named above from the model."
    ) from err
