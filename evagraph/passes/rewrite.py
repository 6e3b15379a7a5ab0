"""Rewrite pass: ranks and components -> the model with EVA-initialised LoRA adapters.

``init_adapters`` takes the ``LayerGraph``, the rank per target layer (allocation pass), each
layer's ``Components`` (a calibration pipeline) and the settings, and returns one ``LoraAdapter``
per layer with rank > 0: ``A = V[:rank]`` (optionally whitened), ``B = 0``, scale
``alpha / r`` (``adjust_scaling_factors``) or ``alpha / rank`` (``sqrt(rank)`` for rsLoRA),
with DoRA a magnitude of ``||W||`` per output, so the output is unchanged until training moves
B. ``rewrite`` splices adapters into the model and freezes every other parameter;
``apply_adapter`` reuses it for adapters loaded from disk.

Two ways of splicing the same ``LoraAdapter`` in, chosen by what the model is:
- every target is an ``nn.Module`` layer: that module is replaced by ``LoraLayer(base, lora)``
  in the model itself, which keeps the model's class and methods (``generate``, HF configs);
- some target is only an op in a graph (a loaded ``.pt2``, or ``F.linear`` on parameters):
  the captured GraphModule is rewritten, ``y = op(x)`` becoming ``y = op(x) + lora(x)``, as
  pt2e's convert does for observers.
The model (or graph) is modified in place and returned; ``transform`` gives it a new module
tree over the model's weights first (``lora.share_weights_copy``).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn

from ..config import AdapterSettings
from ..errors import ConfigError, EvagraphWarning
from ..layers import Layer
from ..lora import LoraAdapter, LoraLayer, ParamLoraLayer, adapter_dtype
from ..stats import Components
from .layer_graph import LayerGraph


def needs_graph_rewrite(layer_graph: LayerGraph, names: Iterable[str]) -> bool:
    """True when some layer in ``names`` is neither an nn.Module we can wrap nor an op on a
    parameter inside one (its ``host``), or the model is itself a graph (see module doc)."""
    # A model that is a GraphModule (a loaded .pt2) runs its flat graph, not its submodules'
    # forwards, so wrapping a host module would change nothing: its graph is rewritten.
    graph = layer_graph.model_is_graph
    return any(
        (layer := layer_graph.layers[n]).module is None and (layer.host is None or graph)
        for n in names
    )


def init_adapters(
    model: nn.Module,
    layers: Mapping[str, Layer],
    ranks: Mapping[str, int],
    components: Mapping[str, Components],
    settings: AdapterSettings,
    meta_device: torch.device | None = None,
) -> dict[str, LoraAdapter]:
    """EVA initialisation: an adapter per layer with rank > 0 (A = top components, B = 0).

    ``model`` holds the base weights (read for their device and dtype; weights on the meta
    device, which are not resident, put their adapter on ``meta_device``, default CPU);
    ``components`` maps each layer to its decomposition.
    """
    adapters: dict[str, LoraAdapter] = {}
    in_weight_space = [n for n, r in ranks.items() if r and layers[n].host is not None]
    if settings.dropout and in_weight_space:
        warnings.warn(
            f"lora dropout {settings.dropout} is not applied to the {len(in_weight_space)} "
            f"adapter(s) that change a weight in place (e.g. {in_weight_space[0]}): dropout "
            "acts on a layer's input, which a weight-space update never sees",
            EvagraphWarning,
            stacklevel=3,
        )
    if settings.use_dora:
        for name, rank in ranks.items():
            if rank and layers[name].host is not None:
                raise _no_dora(name, f"it is an op on {layers[name].weight} in module "
                               f"{layers[name].host}")  # fmt: skip
    for name, rank in ranks.items():
        if rank == 0:
            continue
        layer, stats = layers[name], components[name]
        weight = model.get_parameter(layer.weight)
        _, scale = settings.layer_scaling(rank)
        adapter = LoraAdapter.build(
            stats.lora_A(rank, settings.whiten).to(
                device=(meta_device or torch.device("cpu")) if weight.is_meta else weight.device,
                dtype=adapter_dtype(weight),
            ),
            layer.out_features,
            layer.conv,
            scale,
            0.0 if layer.host is not None else settings.dropout,
            layer_name=name,
            base_weight=layer.weight,
            weight_transposed=layer.weight_transposed,
            host=layer.host,
            expert=layer.expert,
            use_rslora=settings.use_rslora,
        )
        if settings.use_dora:
            adapter.init_magnitude(weight)
        adapters[name] = adapter
    return adapters


def _no_dora(name: str, why: str) -> ConfigError:
    """The refusal of DoRA for layer ``name``, which is no module a ``LoraLayer`` wraps."""
    return ConfigError(
        f"layer {name}: use_dora needs a linear/conv module to wrap (nn.Linear, nn.ConvNd, HF "
        f"Conv1D: PEFT's DoRA kinds), but {why}: exclude the layer, or adapt without use_dora"
    )


def rewrite(
    model: nn.Module,
    adapters: Mapping[str, LoraAdapter],
    layer_graph: LayerGraph | None = None,
) -> nn.Module:
    """Splice ``adapters`` (by layer name) into ``model``; return the adapted module.

    Wraps modules unless ``layer_graph`` is given and some layer is only an op in it, in
    which case ``layer_graph.gm`` is rewritten and returned. Freezes all other parameters.
    """
    graph = layer_graph is not None and needs_graph_rewrite(layer_graph, adapters)
    for name, adapter in adapters.items():
        if adapter.use_dora and adapter.host is not None:
            raise _no_dora(name, f"it is an op on {adapter.base_weight} in module {adapter.host}")
        if adapter.use_dora and graph:
            raise _no_dora(
                name, "the adapters go into the model's graph (a loaded .pt2, or a layer that "
                "is F.linear on a parameter)",
            )  # fmt: skip
    if graph:
        adapted = _splice_graph(layer_graph, adapters)
    else:
        # A module registered under several names (self.b = self.a) is one layer in the
        # graph, its calls under every name: wrap it at each, with the one adapter.
        paths: dict[int, list[str]] = {}
        for path, m in model.named_modules(remove_duplicate=False):
            paths.setdefault(id(m), []).append(path)
        for name, adapter in adapters.items():
            if adapter.host is not None:
                continue
            base = model.get_submodule(name)
            wrapped = LoraLayer(base, adapter)
            for path in paths.get(id(base), [name]):
                parent_name, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent_name), child, wrapped)
        _wrap_hosts(model, [a for a in adapters.values() if a.host is not None])
        adapted = model
    adapted.requires_grad_(False)
    for adapter in adapters.values():
        adapter.requires_grad_(True)
        adapter.train(model.training)
    return adapted


def _wrap_hosts(model: nn.Module, adapters: list[LoraAdapter]) -> None:
    """Wrap each host module in a ``ParamLoraLayer`` carrying the adapters of its
    parameters. A host inside another host is served by the outer one (one call swaps every
    weight), and the adapters record the host they ended up in (what save_adapter writes)."""
    hosts = sorted({a.host for a in adapters}, key=len)
    outer: dict[str, str] = {}
    for h in hosts:
        outer[h] = next((o for o in hosts if h.startswith(o + ".")), h)
    by_host: dict[str, dict[str, list[LoraAdapter]]] = {}
    for a in adapters:
        host = a.host = outer[a.host]
        path = a.base_weight.removeprefix(host + ".")
        if path == a.base_weight:
            raise ConfigError(
                f"layer {a.layer_name}: its weight {a.base_weight} is not under the module "
                f"{host} whose call uses it"
            )
        by_host.setdefault(host, {}).setdefault(path, []).append(a)
    for host, loras in by_host.items():
        parent, _, child = host.rpartition(".")
        setattr(
            model.get_submodule(parent), child, ParamLoraLayer(model.get_submodule(host), loras)
        )


def _splice_graph(layer_graph: LayerGraph, adapters: Mapping[str, LoraAdapter]) -> fx.GraphModule:
    gm = layer_graph.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    for i, (name, adapter) in enumerate(adapters.items()):
        owner = name.rpartition(".")[0]
        target = f"{name}.lora" if _is_module(gm, name) else f"{owner}.lora_{i}".lstrip(".")
        gm.add_submodule(target, adapter)
        layer = layer_graph.layers[name]
        for call, inp in zip(layer.nodes, layer.inputs):
            node = nodes[call]
            with gm.graph.inserting_after(node):
                delta = gm.graph.call_module(target, (nodes[inp],))
            with gm.graph.inserting_after(delta):
                out = gm.graph.call_function(operator.add, (node, delta))
            node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
    gm.recompile()
    return gm


def _is_module(gm: nn.Module, path: str) -> bool:
    try:
        return isinstance(gm.get_submodule(path), nn.Module)
    except AttributeError:
        return False
