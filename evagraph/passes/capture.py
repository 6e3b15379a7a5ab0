"""Capture pass: a model and one example batch -> a ``torch.fx.GraphModule``.

Takes an ``nn.Module`` (or a GraphModule already, e.g. a loaded ``.pt2``) and returns a
GraphModule whose nodes reference the model's own submodules and parameters (nothing is
copied). Adaptable layers (``nn.Linear``, ``nn.ConvNd``, HF ``Conv1D``) stay leaves, so each
call of one is a single ``call_module`` node that the layer-graph pass can find.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.fx as fx
from torch import nn

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
    if not isinstance(example, dict):
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


def capture(model: nn.Module, example: Any = None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule with linear/conv layers as leaves.

    ``example`` is one calibration batch (tensor, tuple, or dict of keyword inputs); with a
    dict, forward parameters it lacks are traced as their defaults.
    """
    if isinstance(model, fx.GraphModule):
        return model
    tracer = _LeafTracer()
    try:
        graph = tracer.trace(model, concrete_args=_concrete_args(model, example))
    except Exception as err:  # fx raises many types; all mean "not traceable"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CaptureError(
            f"torch.fx could not trace {type(model).__name__}: {type(err).__name__}: {first_line}. "
            "Data-dependent Python control flow is the usual cause; exclude or simplify the "
            "construct, or pass a traceable wrapper model."
        ) from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
