"""Exported artefacts: the adapted model as a torch.export archive, and the adapter alone.

The adapter is two files in a directory: ``adapter.safetensors`` (``{layer}.lora_A.weight``,
``{layer}.lora_B.weight``) and ``adapter.json``, a manifest with each layer's kind, rank,
alpha, scaling, dropout, shapes and conv geometry, from which ``apply_adapter`` rebuilds the
adapters on a fresh copy of the base model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ModelLoadError
from .lora import LoraAdapter, adapter_state_dict
from .passes.capture import capture, export_program
from .passes.layer_graph import LayerGraph, _module_layer, build_layer_graph
from .passes.rewrite import rewrite

WEIGHTS, MANIFEST = "adapter.safetensors", "adapter.json"
_FORMAT = "evagraph-adapter/1"


def export(adapted: nn.Module, example_inputs: Any, path: str | Path) -> Path:
    """Write ``adapted`` as a torch.export archive (``.pt2``) that ``torch.export.load`` reads.

    ``example_inputs``: one batch as the model takes it (a dict is keyword arguments). Batch,
    sequence and image dimensions stay dynamic where the model allows.
    """
    path = Path(path)
    torch.export.save(export_program(adapted, example_inputs), str(path))
    return path


def _describe(adapter: LoraAdapter) -> dict:
    found = _module_layer(adapter.lora_A)
    conv = found[1] if found else None
    dropout = adapter.lora_dropout.p if isinstance(adapter.lora_dropout, nn.Dropout) else 0.0
    return {
        "name": adapter.layer_name,
        "kind": "linear" if conv is None else "conv",
        "base_weight": adapter.base_weight,
        "weight_transposed": adapter.weight_transposed,
        "rank": adapter.rank,
        "alpha": adapter.scaling * adapter.rank,
        "scaling": adapter.scaling,
        "dropout": dropout,
        "lora_A_shape": list(adapter.lora_A.weight.shape),
        "lora_B_shape": list(adapter.lora_B.weight.shape),
        "conv": None
        if conv is None
        else {
            "kernel_size": list(conv.kernel_size),
            "stride": list(conv.stride),
            "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
            "dilation": list(conv.dilation),
            "padding_mode": conv.padding_mode,
        },
    }


def save_adapter(model: nn.Module, directory: str | Path, settings: dict | None = None) -> None:
    """Write ``model``'s LoRA adapters as ``adapter.safetensors`` + ``adapter.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapters = [m for m in model.modules() if isinstance(m, LoraAdapter)]
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(state, str(directory / WEIGHTS), metadata={"format": _FORMAT})
    manifest = {
        "format": _FORMAT,
        "settings": settings or {},
        "layers": [_describe(a) for a in adapters],
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _adapter_from(entry: dict, weights: dict[str, torch.Tensor]) -> LoraAdapter:
    from .passes.layer_graph import ConvSpec

    name = entry["name"]
    A, B = weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"]
    conv = None
    if entry["conv"] is not None:
        c = entry["conv"]
        padding = c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"])
        conv = ConvSpec(
            tuple(c["kernel_size"]),
            tuple(c["stride"]),
            padding,
            tuple(c["dilation"]),
            padding_mode=c["padding_mode"],
        )
    adapter = LoraAdapter.build(
        A.reshape(A.shape[0], -1),
        B.shape[0],
        conv,
        entry["scaling"],
        entry["dropout"],
        name,
        entry.get("base_weight", ""),
        entry.get("weight_transposed", False),
    )
    with torch.no_grad():
        adapter.lora_B.weight.copy_(B)
    return adapter


def apply_adapter(
    model: nn.Module, path: str | Path, *, example: Any = None, inplace: bool = False
) -> nn.Module:
    """Re-apply a saved adapter (directory from ``save_adapter``) to a copy of the base model.

    Layers are found by name: modules are wrapped, as ``transform`` does. When a layer is an
    op in a graph rather than a module (a loaded ``.pt2``), the graph is rewritten; a model
    that is not a GraphModule then needs ``example`` (one batch) to be captured.
    """
    adapters = load_adapters(path)
    work = model if inplace else copy.deepcopy(model)
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    adapters = {name: a.to(device) for name, a in adapters.items()}
    return attach_adapters(work, adapters, example, source=str(path))


def load_adapters(path: str | Path) -> dict[str, LoraAdapter]:
    """The adapters saved in directory ``path`` (by ``save_adapter``), by layer name, on CPU."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        weights = load_file(str(path / WEIGHTS))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read adapter from {path}: {err}") from err
    if manifest.get("format") != _FORMAT:
        raise ModelLoadError(f"{path / MANIFEST} is not an evagraph adapter manifest")
    return {e["name"]: _adapter_from(e, weights) for e in manifest["layers"]}


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
    """
    if layer_graph is not None:
        return rewrite(work, adapters, layer_graph)

    def wrappable(name: str) -> bool:
        try:
            return _module_layer(work.get_submodule(name)) is not None
        except AttributeError:
            return False

    if all(wrappable(n) for n in adapters):
        return rewrite(work, adapters)
    layer_graph = build_layer_graph(capture(work, example).gm, work)
    missing = [n for n in adapters if n not in layer_graph.layers]
    if missing:
        raise ModelLoadError(f"the model has no layer(s) {', '.join(missing)} named in {source}")
    return rewrite(work, adapters, layer_graph)
