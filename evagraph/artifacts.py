"""Exported artefacts: the adapted model as a torch.export archive, and the adapter alone.

The adapter is two files in a directory: ``adapter.safetensors`` (``{layer}.lora_A.weight``,
``{layer}.lora_B.weight``) and ``adapter.json``, a manifest with each layer's kind, rank,
alpha, scaling, dropout, shapes and conv geometry, from which ``apply_adapter`` rebuilds the
adapters on a base model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors.torch import save_file
from torch import nn

from .errors import ConfigError, ModelLoadError, first_line
from .io import disk_errors, zip_target
from .layers import ConvSpec, Layer, kind_from, kind_of, layer_of_module, module_kind
from .lora import LoraAdapter, adapter_state_dict, refuse_adapted, share_weights_copy
from .passes.capture import capture, export_program
from .passes.layer_graph import LayerGraph, build_layer_graph, forward_mismatch
from .passes.rewrite import rewrite
from .validate import check_settings, check_tensor, expect

WEIGHTS, MANIFEST = "adapter.safetensors", "adapter.json"
_FORMAT = "evagraph-adapter/1"


def export(adapted: nn.Module, example_inputs: Any, path: str | Path) -> Path:
    """Write ``adapted`` as a torch.export archive (``.pt2``) that ``torch.export.load`` reads.

    ``example_inputs``: one batch as the model takes it (a dict is keyword arguments). Batch,
    sequence and image dimensions stay dynamic where the model allows.
    """
    path = Path(path)
    program = export_program(adapted, example_inputs)  # traced first: errors below are the disk's
    with disk_errors(str(path)), zip_target(path) as f:
        torch.export.save(program, f)
    return path


# The manifest entry's keys, in the order written (kept so files stay byte-identical).
_ENTRY_KEYS = ("name", "kind", "base_weight", "weight_transposed", "host", "expert", "rank",
               "alpha", "scaling", "dropout", "lora_A_shape", "lora_B_shape", "conv")  # fmt: skip


def _describe(adapter: LoraAdapter) -> dict:
    dropout = adapter.lora_dropout.p if isinstance(adapter.lora_dropout, nn.Dropout) else 0.0
    entry = {
        "name": adapter.layer_name,
        "base_weight": adapter.base_weight,
        "host": adapter.host,
        "rank": adapter.rank,
        "alpha": adapter.scaling * adapter.rank,
        "scaling": adapter.scaling,
        "dropout": dropout,
        "lora_A_shape": list(adapter.lora_A.weight.shape),
        "lora_B_shape": list(adapter.lora_B.weight.shape),
        **kind_of(adapter).manifest_fields(adapter),  # kind, weight_transposed, expert, conv
    }
    return {key: entry[key] for key in _ENTRY_KEYS}


def save_adapter(model: nn.Module, directory: str | Path, settings: dict | None = None) -> None:
    """Write ``model``'s LoRA adapters as ``adapter.safetensors`` + ``adapter.json``."""
    # What load_adapters would refuse is refused here, before anything is written.
    check_settings(settings or {}, "save_adapter", error=ConfigError)
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


def _adapter_from(entry: _Entry, A: torch.Tensor, B: torch.Tensor) -> LoraAdapter:
    adapter = LoraAdapter.build(
        A.reshape(A.shape[0], -1),
        B.shape[0],
        entry.conv,
        entry.scaling,
        entry.dropout,
        entry.name,
        entry.base_weight,
        entry.weight_transposed,
        entry.host,
        entry.expert,
    )
    with torch.no_grad():
        adapter.lora_B.weight.copy_(B)
    return adapter


def apply_adapter(
    model: nn.Module, path: str | Path, *, example: Any = None, inplace: bool = False
) -> nn.Module:
    """Re-apply a saved adapter (directory from ``save_adapter``) to the base model.

    Layers are found by name: modules are wrapped, as ``transform`` does. When a layer is an
    op in a graph rather than a module (a loaded ``.pt2``), the graph is rewritten; a model
    that is not a GraphModule then needs ``example`` (one batch) to be captured. A model that
    already carries adapters, or whose layers differ from the adapter's (kind, widths, conv
    geometry), is refused. As in ``transform``, the result shares the model's weights
    (``inplace=True``: the model's own module tree is adapted).
    """
    refuse_adapted(model)
    adapters = load_adapters(path)
    work = model if inplace else share_weights_copy(model)
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    adapters = {name: a.to(device) for name, a in adapters.items()}
    return attach_adapters(work, adapters, example, source=f"adapter {path}")


def load_adapters(path: str | Path) -> dict[str, LoraAdapter]:
    """The adapters saved in directory ``path`` (by ``save_adapter``), by layer name, on CPU.

    Raises ``ModelLoadError`` naming the file and the layer for anything malformed: see
    ``_read_manifest``. Whether they fit a model is ``check_adapters``' business.
    """
    path = Path(path)
    manifest_file = path / MANIFEST
    try:
        text = manifest_file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"cannot read adapter from {path}: {first_line(err)}") from err
    entries = _read_manifest(load_json(text, str(manifest_file)), str(manifest_file))
    weights, _ = read_safetensors(path / WEIGHTS, "adapter weights")
    return _adapters_from(entries, weights, str(path / WEIGHTS))


# --- Validation of saved artefacts (adapters here; EVA states in state.py use the helpers).
# Files are untrusted input: every malformed value becomes a ModelLoadError naming the file
# and the entry, never a KeyError/TypeError from deep inside.


@dataclass
class _Entry:
    """One manifest entry, its JSON types checked."""

    name: str
    kind: str
    conv: ConvSpec | None
    base_weight: str
    weight_transposed: bool
    rank: int
    scaling: float
    dropout: float
    A_shape: list[int]
    B_shape: list[int]
    host: str | None = None
    expert: int | None = None


def load_json(text: str, source: str) -> Any:
    """Parse ``text``; duplicate keys (which json would resolve silently) are an error."""

    def unique(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise ModelLoadError(f"{source}: duplicate entry {key!r}")
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=unique)
    except (ValueError, RecursionError) as err:
        raise ModelLoadError(f"{source} is not valid JSON: {first_line(err)}") from err


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors and the metadata of a safetensors file; any failure is a ModelLoadError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as err:  # SafetensorError, OSError, ...: all the file's fault
        raise ModelLoadError(f"cannot read {what} {path}: {first_line(err)}") from err
    return tensors, metadata


def _read_manifest(manifest: Any, source: str) -> list[_Entry]:
    """The entries of ``adapter.json``, each checked for types and internal consistency."""
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise ModelLoadError(f"{source} is not an evagraph adapter manifest")
    settings = expect(manifest, "settings", "an object", source, "manifest", default={})
    check_settings(settings, source)
    entries: dict[str, _Entry] = {}
    for i, e in enumerate(expect(manifest, "layers", "a list", source, "manifest")):
        if not isinstance(e, dict):
            raise ModelLoadError(f"{source}: layers[{i}] must be an object, got {e!r:.40}")
        name = expect(e, "name", "a non-empty string", source, f"layers[{i}]")
        where = f"layer {name}"
        if name in entries:
            raise ModelLoadError(f"{source}: {where}: duplicate entry")
        kind = expect(e, "kind", "'linear' or 'conv'", source, where)
        transposed = expect(e, "weight_transposed", "a boolean", source, where, default=False)
        host = expect(e, "host", "null or a string", source, where, default=None)
        expert = expect(e, "expert", "null or an integer >= 0", source, where, default=None)
        conv = kind_from(kind, transposed, expert).read_manifest(e, host, source, where)
        expect(e, "alpha", "a finite number", source, where, default=0.0)
        A_shape = expect(e, "lora_A_shape", "a list of integers >= 1", source, where)
        B_shape = expect(e, "lora_B_shape", "a list of integers >= 1", source, where)
        base = expect(e, "base_weight", "a string", source, where, default="") or f"{name}.weight"
        entries[name] = _Entry(
            name,
            kind,
            conv,
            base,
            transposed,
            rank=expect(e, "rank", "an integer >= 1", source, where),
            scaling=float(expect(e, "scaling", "a finite number > 0", source, where)),
            dropout=float(expect(e, "dropout", "a finite number in [0, 1)", source, where, 0.0)),
            A_shape=A_shape,
            B_shape=B_shape,
            host=host,
            expert=expert,
        )
    return list(entries.values())


def _adapters_from(
    entries: list[_Entry], weights: dict[str, torch.Tensor], source: str
) -> dict[str, LoraAdapter]:
    """Adapters from validated entries and the weights file: shapes against the manifest's
    rank, kind and kernel, rank <= input width, finite values, no tensor left over."""
    weights = dict(weights)
    adapters = {}
    for entry in entries:
        rank, where = entry.rank, f"{source}: layer {entry.name}"
        try:
            A = weights.pop(f"{entry.name}.lora_A.weight")
            B = weights.pop(f"{entry.name}.lora_B.weight")
        except KeyError as err:
            raise ModelLoadError(f"{where}: missing tensor {err.args[0]}") from None
        for t, tensor, saved in (("lora_A", A, entry.A_shape), ("lora_B", B, entry.B_shape)):
            if list(tensor.shape) != saved:
                raise ModelLoadError(
                    f"{where}: {t} has shape {tuple(tensor.shape)} but the manifest says "
                    f"{tuple(saved)}"
                )
            check_tensor(tensor, f"layer {entry.name}: {t}", source)
        kernel = entry.conv.kernel_size if entry.conv is not None else ()
        ones = (1,) * len(kernel)
        if A.dim() != 2 + len(kernel) or A.shape[0] != rank or tuple(A.shape[2:]) != kernel:
            raise ModelLoadError(
                f"{where}: lora_A has shape {tuple(A.shape)}, expected (rank {rank}, in"
                f"{', ' if kernel else ''}{', '.join(map(str, kernel))}) for a {entry.kind} layer"
            )
        if B.dim() != 2 + len(kernel) or B.shape[1] != rank or tuple(B.shape[2:]) != ones:
            raise ModelLoadError(
                f"{where}: lora_B has shape {tuple(B.shape)}, expected (out, rank {rank}"
                f"{''.join(', 1' for _ in ones)})"
            )
        width = A[0].numel()
        if rank > width:
            raise ModelLoadError(f"{where}: rank {rank} exceeds the layer's input width {width}")
        if entry.scaling > torch.finfo(A.dtype).max:  # forward multiplies in A's dtype: inf
            raise ModelLoadError(
                f"{where}: 'scaling' {entry.scaling:.4g} overflows the adapter's {A.dtype}"
            )
        adapters[entry.name] = _adapter_from(entry, A, B)
    if weights:
        raise ModelLoadError(
            f"{source}: tensor(s) {', '.join(sorted(weights)[:3])} belong to no layer of the "
            "manifest"
        )
    return adapters


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
