"""Ready-made adapters onto a model: whether each fits its layer, and splicing them in.

``check_layer`` / ``check_adapters`` compare what a saved adapter or EVA state recorded of a
layer (kind, widths, weight layout, conv geometry) with the model's layer of that name;
``attach_adapters`` drives the rewrite pass for adapters made elsewhere (loaded from disk,
or initialised from saved statistics), capturing the model only when some layer is an op
in its graph rather than a module.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from .errors import ModelLoadError
from .layers import ConvSpec, Layer, kind_of, layer_of_module, module_kind
from .lora import LoraAdapter
from .passes.capture import capture
from .passes.layer_graph import LayerGraph, build_layer_graph, forward_mismatch
from .passes.rewrite import rewrite


def _describe_layer(layer: Layer) -> str:
    suffix = kind_of(layer).describe(layer)  # e.g. the conv geometry
    return f"{layer.kind} {layer.in_features} -> {layer.out_features}{suffix}"


def _conv_difference(saved: ConvSpec, actual: ConvSpec) -> tuple[str, Any, Any] | None:
    """The first field (name, saved value, actual value) in which two conv geometries act
    differently, or None. Padding compares by the amounts it pads, so "same" and the explicit
    padding it amounts to agree; the padding mode matters only where something is padded."""
    for name in ("kernel_size", "stride", "dilation", "groups"):
        if getattr(saved, name) != getattr(actual, name):
            return name, getattr(saved, name), getattr(actual, name)
    if saved.pad_amounts() != actual.pad_amounts():
        return "padding", saved.padding, actual.padding
    if any(saved.pad_amounts()) and saved.padding_mode != actual.padding_mode:
        return "padding_mode", saved.padding_mode, actual.padding_mode
    return None


def _check_conv(name: str, saved: ConvSpec, actual: ConvSpec, source: str, what: str) -> None:
    """Raise ModelLoadError naming the field and both values unless the saved geometry acts
    as the model's: an A conv of another stride, padding or dilation than its layer sees
    other patches (a wrong receptive field) or gives outputs of another size (a RuntimeError
    at the first forward)."""
    diff = _conv_difference(saved, actual)
    if diff is not None:
        field_name, mine, theirs = diff
        raise ModelLoadError(
            f"layer {name}: {source} has conv {field_name} {mine!r} but the model's {what} has "
            f"{field_name} {theirs!r}"
        )


def check_layer(model: nn.Module, layer: Layer, source: str) -> None:
    """Raise ModelLoadError unless ``model`` has ``layer`` as ``source`` saw it.

    A linear/conv module at the layer's name must match in kind, widths, weight layout and
    conv geometry. A layer that is an op on a parameter (a loaded ``.pt2``: ``Layer.module``
    is None) is checked by its weight's shape, which fixes the widths and the kernel; its
    stride, padding and dilation live in the graph, checked once it is captured
    (``attach_adapters``).
    """
    try:
        module = model.get_submodule(layer.name) if layer.host is None else None
    except AttributeError:
        module = None
    actual = layer_of_module(layer.name, module) if module is not None else None
    if actual is not None:
        reason = forward_mismatch(module)  # e.g. an MoE router: its output is no tensor
        if reason is not None:
            raise ModelLoadError(
                f"layer {layer.name}: {reason}, so {source}'s adapter cannot be added to it"
            )
        if (actual.kind, actual.in_features, actual.out_features, actual.conv is None,
            actual.weight_transposed) != (
            layer.kind, layer.in_features, layer.out_features, layer.conv is None,
            layer.weight_transposed,
        ):  # fmt: skip
            raise ModelLoadError(
                f"layer {layer.name}: {source} has {_describe_layer(layer)} but the model's "
                f"{type(module).__name__} is {_describe_layer(actual)}"
            )
        if layer.conv is not None:
            _check_conv(layer.name, layer.conv, actual.conv, source, type(module).__name__)
        if layer.weight != actual.weight:
            raise ModelLoadError(
                f"layer {layer.name}: {source} names its weight {layer.weight}, but the "
                f"model's is {actual.weight}"
            )
        return
    try:
        weight = model.get_parameter(layer.weight)
    except AttributeError:
        raise ModelLoadError(
            f"layer {layer.name}: in {source}, but the model has no such linear/conv layer "
            f"(no module {layer.name} nor parameter {layer.weight})"
        ) from None
    expected = kind_of(layer).expected_weight(layer, weight, source)
    if layer.host is not None:
        try:
            model.get_submodule(layer.host)
        except AttributeError:
            raise ModelLoadError(
                f"layer {layer.name}: {source} adapts it inside module {layer.host}, which "
                "the model does not have"
            ) from None
    if tuple(weight.shape) != expected:
        raise ModelLoadError(
            f"layer {layer.name}: {source} has {_describe_layer(layer)} (weight "
            f"{expected}) but the model's weight {layer.weight} has shape {tuple(weight.shape)}"
        )


def _adapter_layer(adapter: LoraAdapter) -> Layer:
    """The layer an adapter was built for, read off its A and B."""
    kind = kind_of(adapter)
    A, B = adapter.lora_A.weight, adapter.lora_B.weight
    return Layer(adapter.layer_name, kind.serial, "", A[0].numel(), B.shape[0],
                 adapter.base_weight, conv=kind.conv_of(adapter.lora_A),
                 weight_transposed=adapter.weight_transposed, host=adapter.host,
                 expert=adapter.expert)  # fmt: skip


def check_adapters(model: nn.Module, adapters: dict[str, LoraAdapter], source: str) -> None:
    """Raise ModelLoadError unless every adapter fits its layer of ``model`` (``check_layer``)."""
    for adapter in adapters.values():
        check_layer(model, _adapter_layer(adapter), source)


def attach_adapters(
    work: nn.Module,
    adapters: dict[str, LoraAdapter],
    example: Any = None,
    source: str = "",
    layer_graph: LayerGraph | None = None,
) -> nn.Module:
    """Splice ready-made adapters into ``work`` (in place) by layer name.

    With ``layer_graph`` (the capture the adapters were computed on) the rewrite pass
    decides how; without, modules named like the layers are wrapped, and otherwise the
    model is captured (``example`` needed unless it is a GraphModule) and its graph rewritten.
    Adapters from elsewhere (no ``layer_graph``) are checked against their layers first
    (``check_adapters``); ``source`` names where they came from in the error.
    """
    if layer_graph is not None:
        return rewrite(work, adapters, layer_graph)
    check_adapters(work, adapters, source or "the adapters")

    def wrappable(name: str) -> bool:
        host = adapters[name].host
        if host is not None and isinstance(work, fx.GraphModule):
            return False  # a flat graph does not call its host modules
        try:
            if host is not None:
                return isinstance(work.get_submodule(host), nn.Module)
            return module_kind(work.get_submodule(name)) is not None
        except AttributeError:
            return False

    if all(wrappable(n) for n in adapters):
        return rewrite(work, adapters)
    layer_graph = build_layer_graph(capture(work, example).gm, work)
    missing = [n for n in adapters if n not in layer_graph.layers]
    if missing:
        raise ModelLoadError(f"the model has no layer(s) {', '.join(missing)} named in {source}")
    for name, adapter in adapters.items():  # the graph's ops carry the conv geometry
        saved, actual = _adapter_layer(adapter), layer_graph.layers[name]
        if (saved.conv is None) != (actual.conv is None):
            raise ModelLoadError(
                f"layer {name}: {source} has {_describe_layer(saved)} but the model's "
                f"{actual.op} is {_describe_layer(actual)}"
            )
        if saved.conv is not None:
            _check_conv(name, saved.conv, actual.conv, source, actual.op)
    return rewrite(work, adapters, layer_graph)
