"""Merge LoRA into the base weights (a plain model for deployment), and undo it.

``merge`` returns an adapted model with every adapter folded into its base weight (``W +
scale * B A``; transposed for HF Conv1D; reshaped to a kernel for convs, which is exact because
B is 1x1 and A has the base conv's geometry) and the LoRA modules removed: a plain model of the
model's own class, identical outputs. A layer whose module computes something else than that
op of its weight (a subclass overriding ``forward``: weight standardisation in timm's
``StdConv2d`` / ``ScaledStdConv2d``) cannot take the delta: merge and unmerge refuse it, naming
it. ``unmerge`` takes such a merged model and the adapters (the adapted model, or a directory
from ``save_adapter``), subtracts the deltas and splices the adapters back in, so training can
go on. ``merge`` marks its result with the adapters it folded in (attribute ``MERGED``), so
that ``unmerge`` can refuse a model that never held them: subtracting deltas from a base model
would silently corrupt it.

A quantized base layer (bitsandbytes 4-bit / 8-bit, torchao int8 weight-only) folds in as
PEFT's merge into such layers does: its weight dequantized, the delta added, re-quantized as
it was (``quantized.requantize``; other torchao configs are refused). That rounds: ``merge``
measures the largest change re-quantizing made per layer (attribute ``ROUNDING``) and warns,
and ``unmerge`` refuses such layers (subtracting the delta leaves the rounding in).

A DoRA adapter folds in as ``m * (W + delta) / ||W + delta||`` (per output, PEFT's merge).
Every output of the result has norm ``m`` whatever ``||W + delta||`` was, so that norm cannot
be read back from the merged weight: ``merge`` records it (attribute ``DORA_NORMS``, as PEFT
caches it on the layer) and ``unmerge`` needs that record.

Neither copies the model's weights nor writes into them: the result is a new module tree
(``share_weights_copy``) over the input's weights, in which each folded layer gets a new
weight tensor. A weight tied to a layer without an adapter is untied by this: that layer keeps
the old weight, which is what it computed with in the adapted model.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from .attach import attach_adapters, check_adapters
from .errors import ConfigError, EvagraphWarning
from .formats.adapter import load_adapters
from .layers import kind_of
from .lora import (
    LoraAdapter,
    LoraLayer,
    ParamLoraLayer,
    refuse_adapted,
    share_weights_copy,
    unfreeze,
)
from .passes.layer_graph import forward_mismatch
from .quantized import dequantize, quantization, requantize

# Attribute of a merged model: the names of the layers whose adapters were folded into it.
MERGED = "evagraph_merged"
# Attribute of a merged model with DoRA adapters: {layer: ||W + delta|| per output} at merge.
DORA_NORMS = "evagraph_dora_norms"
# Attribute of a model merged into quantized layers: {layer: the largest change that
# re-quantizing W + delta made to one weight}.
ROUNDING = "evagraph_rounding_error"


def _refuse_unfoldable(pairs: list[tuple[LoraAdapter, nn.Module]]) -> None:
    """Raise ``ConfigError`` naming every adapter whose layer module (the one owning its base
    weight) does not compute the plain linear/conv op of that weight: ``W + B A`` reproduces
    the adapted layer only if it does (``forward_mismatch`` runs the module to check)."""
    bad = [
        f"{adapter.layer_name} ({reason})"
        for adapter, owner in pairs
        if (reason := forward_mismatch(owner, values=True)) is not None
    ]
    if bad:
        raise ConfigError(
            f"cannot fold the adapter(s) of {'; '.join(bad)}: no change of such a weight "
            "reproduces the layer plus its adapter. Keep the model adapted, or adapt it "
            "without these layers (exclude)"
        )


def _refuse_quantized(model: nn.Module, adapters: Iterable[LoraAdapter]) -> None:
    """Raise ``ConfigError`` naming the first adapter whose base layer is quantized: its merge
    re-quantized W + delta, and that rounding is not undone by subtracting the delta."""
    for a in adapters:
        scheme = quantization(_owner(model, a)) if a.host is None else None
        if scheme is not None:
            raise ConfigError(
                f"layer {a.layer_name}: its base weight is quantized ({scheme}), and merge "
                "re-quantized W + scale B A: subtracting the delta does not give W back "
                "exactly (the rounding stays). Re-apply the adapter to the quantized base "
                "model instead (evagraph.apply_adapter)"
            )


def _owner(model: nn.Module, adapter: LoraAdapter) -> nn.Module:
    return model.get_submodule(adapter.base_weight.rpartition(".")[0])


@torch.no_grad()
def _fold(
    owner: nn.Module,
    attr: str,
    adapters: list[LoraAdapter],
    sign: float,
    folded: dict[int, str],
    norms: dict[str, torch.Tensor],
) -> None:
    """Set ``owner.attr`` to a new Parameter ``W + sign * delta`` of ``adapters``: one adapter,
    or the experts of a fused weight, each into its slice (one new tensor for all of them). W
    is shared with the model merge/unmerge was given, so it is replaced, never written. A DoRA
    adapter (a module's, alone on its weight) folds by ``_dora_fold``, with ``norms``."""
    weight = getattr(owner, attr)
    new = weight.to(torch.float32, copy=True)
    for adapter in adapters:
        if adapter.expert is None:  # the experts of a fused weight each own their slice
            _claim(weight, adapter, folded)
        delta = adapter.delta_weight().to(weight.device)
        if adapter.expert is None:
            target = new
        elif adapter.expert < (len(weight) if weight.dim() else 0):
            target = new[adapter.expert]
        else:
            target = None
        if target is None or delta.shape != target.shape:
            raise ConfigError(
                f"adapter {adapter.layer_name}: delta {tuple(delta.shape)} does not fit base "
                f"weight {adapter.base_weight} {tuple(weight.shape)}"
            )
        if adapter.use_dora:
            target.copy_(_dora_fold(adapter, target, delta, sign, norms))
        else:
            target += sign * delta
    setattr(owner, attr, nn.Parameter(new.to(weight.dtype), requires_grad=weight.requires_grad))


def _claim(weight: torch.Tensor, adapter: LoraAdapter, folded: dict[int, str]) -> None:
    """Record that ``adapter`` folds into ``weight``, refusing a weight another adapter took:
    layers with tied weights (one Parameter) have one adapter each, and one weight cannot
    hold both deltas (folding both would change every such layer by their sum)."""
    if id(weight) in folded:
        raise ConfigError(
            f"adapters {folded[id(weight)]} and {adapter.layer_name} share one base weight "
            f"({adapter.base_weight}): it cannot hold both deltas, so they cannot be merged"
        )
    folded[id(weight)] = adapter.layer_name


@torch.no_grad()
def _fold_quantized(layer: LoraLayer, folded: dict[int, str]) -> tuple[float, float]:
    """Fold ``layer``'s adapter into its quantized base: the base weight dequantized, the delta
    added, re-quantized as it was, as a new weight (``evagraph.quantized``). Returns (the
    rounding error: the largest change re-quantizing made to an entry of W + delta, the
    largest entry of the delta)."""
    owner, adapter = layer.base_layer, layer.lora
    _claim(owner.weight, adapter, folded)
    delta = adapter.delta_weight().to(owner.weight.device)
    target = dequantize(owner) + delta
    owner.weight = requantize(owner, target)
    return float((dequantize(owner) - target).abs().max()), float(delta.abs().max())


def _warn_rounding(rounding: dict[str, tuple[float, float]]) -> None:
    """Warn that merging into quantized layers rounded (PEFT warns too), with the worst case."""
    worst = max(rounding, key=lambda name: rounding[name][0])
    error, delta = rounding[worst]
    warnings.warn(
        f"merging into {len(rounding)} quantized layer(s) re-quantized W + scale B A, so the "
        "merged model computes slightly other outputs than the adapted one: the largest "
        f"rounding error is {error:.3g} in a weight of {worst}, whose delta's largest entry is "
        f"{delta:.3g} (attribute {ROUNDING} of the result has every layer's)",
        EvagraphWarning,
        stacklevel=3,
    )


def _dora_fold(
    adapter: LoraAdapter,
    weight: torch.Tensor,
    delta: torch.Tensor,
    sign: float,
    norms: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Merging (``sign`` > 0): ``f (W + delta)`` with ``f = m / ||W + delta||`` per output,
    the norms recorded in ``norms``; unmerging: ``W' / f - delta`` with the recorded norms
    (``_check_dora_unmerge`` made sure they are there). Float32, as ``weight`` and ``delta``."""
    kind, name = kind_of(adapter), adapter.layer_name
    magnitude = adapter.lora_magnitude_vector.detach().float().to(weight.device)
    if sign > 0:
        norms[name] = adapter.dora_norms(weight)  # what the forward divides by
        return kind.on_weight(magnitude / norms[name], weight) * (weight + delta)
    factor = kind.on_weight(magnitude / norms[name].to(weight.device), weight)
    return weight / factor - delta


def _check_dora_unmerge(adapters: Iterable[LoraAdapter], norms: dict[str, torch.Tensor]) -> None:
    """Raise ``ConfigError`` naming a DoRA adapter whose merge cannot be undone: its norms
    were not recorded on the merged model (it was saved and reloaded, or copied), or some
    magnitude is zero (that output of the merged weight is zero, whatever W was)."""
    for a in adapters:
        if not a.use_dora:
            continue
        if a.layer_name not in norms:
            raise ConfigError(
                f"layer {a.layer_name}: a DoRA adapter's merge cannot be undone without the norms "
                "||W + scale B A|| that evagraph.merge recorded on the model it returned (a "
                "merged model saved and reloaded, or copied, has lost them): re-apply the "
                "adapter to the base model instead (evagraph.apply_adapter)"
            )
        if not bool((a.lora_magnitude_vector != 0).all()):
            raise ConfigError(
                f"layer {a.layer_name}: its DoRA magnitude is zero for some outputs, whose "
                "weights the merge set to zero: the base weight cannot be recovered"
            )


def _fold_at(
    model: nn.Module,
    adapters: list[LoraAdapter],
    sign: float,
    folded: dict[int, str],
    norms: dict[str, torch.Tensor],
) -> None:
    """``_fold`` into the parameter that ``adapters`` (all of one weight) name in ``model``."""
    name = adapters[0].base_weight
    model.get_parameter(name)  # AttributeError unless it is one
    owner, _, attr = name.rpartition(".")
    _fold(model.get_submodule(owner), attr, adapters, sign, folded, norms)


def _by_weight(adapters) -> list[list[LoraAdapter]]:
    """Adapters grouped by base weight: the experts of a fused weight fold together."""
    groups: dict[str, list[LoraAdapter]] = {}
    for a in adapters:
        groups.setdefault(a.base_weight if a.expert is not None else a.layer_name, []).append(a)
    return list(groups.values())


def merge(model: nn.Module) -> nn.Module:
    """``model`` with every LoRA adapter folded into its base weight, as a plain model.

    A new module tree: the weights of layers without an adapter are ``model``'s own (shared,
    not copied), each folded layer gets a new weight; ``model`` is left as it was.
    """
    merged = share_weights_copy(model)
    graph_adapters = (
        [merged.get_submodule(n.target) for n in merged.graph.nodes if n.op == "call_module"]
        if isinstance(merged, fx.GraphModule)
        else []
    )
    # Weight-space adapters (ParamLoraLayer) change the weight itself: always foldable.
    _refuse_unfoldable(
        [(m.lora, m.base_layer) for m in merged.modules() if isinstance(m, LoraLayer)]
        + [(a, _owner(merged, a)) for a in graph_adapters if isinstance(a, LoraAdapter)]
    )
    found, folded = False, {}
    norms: dict[str, torch.Tensor] = {}
    rounding: dict[str, tuple[float, float]] = {}
    names: set[str] = set()
    # Every name of a module registered twice (self.b = self.a) is unwrapped; folded once.
    unwrapped: set[int] = set()
    # Innermost first: a LoraLayer inside a ParamLoraLayer's module keeps its path until then.
    for name, module in reversed(list(merged.named_modules(remove_duplicate=False))):
        if isinstance(module, LoraLayer):
            found = True
            if id(module) not in unwrapped:
                if quantization(module.base_layer) is not None:
                    rounding[module.lora.layer_name] = _fold_quantized(module, folded)
                else:
                    _fold(module.base_layer, "weight", [module.lora], +1.0, folded, norms)
                unwrapped.add(id(module))
                names.add(module.lora.layer_name)
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name), child, module.base_layer)
        elif isinstance(module, ParamLoraLayer):
            found = True
            for path in module.params:
                owner, _, attr = path.rpartition(".")
                adapters = module.adapters(path)
                _fold(module.base_layer.get_submodule(owner), attr, adapters, +1.0, folded, norms)
                names.update(a.layer_name for a in adapters)
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name), child, module.base_layer)
    if isinstance(merged, fx.GraphModule):  # adapters spliced into a graph
        for node in list(merged.graph.nodes):
            if node.op != "call_module":
                continue
            adapter = merged.get_submodule(node.target)
            if not isinstance(adapter, LoraAdapter):
                continue
            found = True
            _fold_at(merged, [adapter], +1.0, folded, norms)
            names.add(adapter.layer_name)
            for add in list(node.users):  # y + lora(x)  ->  y
                if add.target is operator.add:
                    add.replace_all_uses_with(add.args[0])
                    merged.graph.erase_node(add)
            merged.graph.erase_node(node)
            merged.delete_submodule(node.target)
        merged.recompile()
    if not found:
        raise ConfigError("the model has no evagraph LoRA adapters to merge")
    unfreeze(merged)
    setattr(merged, MERGED, sorted(names))
    if norms:
        setattr(merged, DORA_NORMS, norms)
    if rounding:
        setattr(merged, ROUNDING, {name: error for name, (error, _) in rounding.items()})
        _warn_rounding(rounding)
    return merged


def unmerge(
    merged: nn.Module,
    adapters: nn.Module | str | Path,
    example=None,
    *,
    assume_merged: bool = False,
) -> nn.Module:
    """Undo ``merge``: subtract the adapters' deltas from ``merged``'s weights, re-splice them.

    ``adapters``: the adapted model the merge came from, or a ``save_adapter`` directory.
    ``example``: one batch, needed only when ``merged`` is a model that must be captured to
    find layers that are graph ops.

    ``merged`` must come from ``merge`` with these same adapters: ``merge`` records them on
    its result (attribute ``evagraph_merged``), and a model without that record, still
    carrying adapters, or merged with other adapters is refused with ``ConfigError``. The
    record lives only on the Python object, so a merged model that was saved and reloaded
    (``save_pretrained``, a state dict, a ``.pt2``; also a deep copy of a GraphModule, which
    keeps only its graph's attributes) has lost it: pass ``assume_merged=True`` to vouch that
    it does hold exactly these adapters' deltas. Every adapter must also fit its layer of
    ``merged`` (``ModelLoadError`` otherwise).

    As ``merge``, a new module tree over ``merged``'s weights: only the layers that get an
    adapter back get new weight tensors, ``merged`` is left as it was.
    """
    refuse_adapted(merged)
    if isinstance(adapters, nn.Module):
        found = {
            m.layer_name: copy.deepcopy(m) for m in adapters.modules() if isinstance(m, LoraAdapter)
        }
        source = "the adapted model"
        if not found:
            raise ConfigError("the model given as adapters has no evagraph LoRA adapters")
    else:
        found = load_adapters(adapters)
        source = f"adapter {adapters}"
    record = getattr(merged, MERGED, None)
    if not assume_merged:
        if record is None:
            raise ConfigError(
                "the model was not made by evagraph.merge: unmerging would subtract deltas it "
                "never held. If it is a merged model that was saved and reloaded, pass "
                "assume_merged=True"
            )
        if set(record) != set(found):
            diff = sorted(set(record) ^ set(found))[:3]
            raise ConfigError(
                f"the model was merged with other adapters than {source} (they differ in "
                f"layer(s) {', '.join(diff)})"
            )
    check_adapters(merged, found, source)  # before any weight is changed
    _refuse_quantized(merged, found.values())
    _refuse_unfoldable([(a, _owner(merged, a)) for a in found.values() if a.host is None])
    norms = getattr(merged, DORA_NORMS, {})
    _check_dora_unmerge(found.values(), norms)
    work = share_weights_copy(merged)
    work.__dict__.pop(MERGED, None)
    work.__dict__.pop(DORA_NORMS, None)
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    folded: dict[int, str] = {}
    for adapter in found.values():
        adapter.to(device)
    for adapters in _by_weight(found.values()):
        _fold_at(work, adapters, -1.0, folded, norms)
    return attach_adapters(work, found, example, source=source)
