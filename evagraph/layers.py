"""Core types: what a layer is, shared by every pass and artefact.

``ConvSpec`` (a convolution's geometry) and ``Layer`` (one adaptable layer: its name, kind,
widths, weight and where the graph calls it) are what the layer-graph pass returns and the
state, adapters and reports store; ``module_kind`` and ``layer_of_module`` say which modules
are layers (``nn.Linear``, ``nn.ConvNd``, HF ``Conv1D``) and read a Layer off one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn


def is_hf_conv1d(module: nn.Module) -> bool:
    """HF's GPT-2 style ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of a convolution: enough to unfold its input rows and to build LoRA's A conv."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str  # per spatial dim, or "same" / "valid"
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    def pad_amounts(self) -> list[int]:
        """Padding in ``F.pad`` order (last spatial dim first, left then right)."""
        pads: list[int] = []
        for i in reversed(range(self.ndim)):
            if self.padding == "same":  # as torch's _ConvNd: the odd extra goes right
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                pads += [total // 2, total - total // 2]
            elif self.padding == "valid":
                pads += [0, 0]
            else:
                pads += [self.padding[i], self.padding[i]]
        return pads


@dataclass
class Layer:
    """One adaptable layer. ``in_features`` is the width of its activation rows."""

    name: str
    kind: str  # "linear" or "conv"
    op: str  # what the graph calls: "Linear", "Conv2d", "Conv1D", "aten.linear.default", ...
    in_features: int
    out_features: int
    weight: str  # qualified name of the weight parameter
    nodes: list[str] = field(default_factory=list)  # fx nodes calling it
    inputs: list[str] = field(default_factory=list)  # fx nodes feeding those calls
    module: str | None = None  # owning nn.Module in the model, if the layer is one
    conv: ConvSpec | None = None
    weight_transposed: bool = False  # HF Conv1D stores (in, out)
    # An op on a parameter of a module that is no linear/conv layer (an MoE router's
    # F.linear, a fused expert weight): the module the op runs in, whose call the adapter
    # wraps by changing the weight it sees (None: module layers, and graphs of their own).
    host: str | None = None
    # One expert of a fused expert weight [E, ...]: its index, the node holding the group
    # offsets of the grouped matmul (its rows are input[offs[e-1]:offs[e]]), and the gather
    # that sorted the rows by expert, (source rows, index), when the graph shows one.
    expert: int | None = None
    offsets: str | None = None
    gather: list[str] | None = None

    @property
    def row_key(self) -> tuple:
        """Layers with the same inputs and row key see identical rows."""
        return (tuple(self.inputs), self.kind, self.conv, self.expert)


def module_kind(m: Any) -> tuple[str, ConvSpec | None] | None:
    """("linear" | "conv", conv geometry) for a linear/conv module (nn.Linear, nn.ConvNd, HF
    Conv1D), else None: which modules are layers."""
    if isinstance(m, nn.Linear) or is_hf_conv1d(m):
        return "linear", None
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        spec = ConvSpec(
            kernel_size=tuple(m.kernel_size),
            stride=tuple(m.stride),
            padding=m.padding if isinstance(m.padding, str) else tuple(m.padding),
            dilation=tuple(m.dilation),
            groups=m.groups,
            padding_mode=m.padding_mode,
        )
        return "conv", spec
    return None


def layer_of_module(name: str, m: Any) -> Layer | None:
    """The Layer a linear/conv module at ``name`` is (widths from its weight), or None."""
    found = module_kind(m)
    if found is None:
        return None
    kind, spec = found
    w = m.weight
    if is_hf_conv1d(m):
        in_f, out_f, transposed = w.shape[0], w.shape[1], True
    elif kind == "linear":
        in_f, out_f, transposed = w.shape[1], w.shape[0], False
    else:
        in_f, out_f, transposed = w.shape[1] * math.prod(spec.kernel_size), w.shape[0], False
    layer = Layer(name, kind, type(m).__name__, in_f, out_f, f"{name}.weight", conv=spec)
    layer.module, layer.weight_transposed = name, transposed
    return layer
