"""The adapter files: the LoRA weights alone, written and read back with their checks.

The adapter is two files in a directory: ``adapter.safetensors`` (``{layer}.lora_A.weight``,
``{layer}.lora_B.weight``, and DoRA's ``{layer}.lora_magnitude_vector``) and ``adapter.json``,
a manifest with each layer's kind, rank, alpha, scaling, dropout, shapes, conv geometry and
whether it is DoRA / rsLoRA, from which ``apply_adapter`` rebuilds the adapters on a base
model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..attach import attach_adapters
from ..errors import ConfigError, ModelLoadError, first_line
from ..layers import ConvSpec, kind_from, kind_of
from ..lora import LoraAdapter, adapter_state_dict, refuse_adapted, share_weights_copy
from ..validate import check_settings, check_tensor, expect, load_json, read_safetensors

WEIGHTS, MANIFEST = "adapter.safetensors", "adapter.json"
_FORMAT = "evagraph-adapter/1"


# The manifest entry's keys, in the order written (kept so files stay byte-identical).
_ENTRY_KEYS = ("name", "kind", "base_weight", "weight_transposed", "host", "expert", "rank",
               "alpha", "scaling", "dropout", "lora_A_shape", "lora_B_shape", "conv",
               "use_dora", "use_rslora")  # fmt: skip


def _describe(adapter: LoraAdapter) -> dict:
    dropout = adapter.lora_dropout.p if isinstance(adapter.lora_dropout, nn.Dropout) else 0.0
    entry = {
        "name": adapter.layer_name,
        "base_weight": adapter.base_weight,
        "host": adapter.host,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "scaling": adapter.scaling,
        "dropout": dropout,
        "lora_A_shape": list(adapter.lora_A.weight.shape),
        "lora_B_shape": list(adapter.lora_B.weight.shape),
        "use_dora": adapter.use_dora,
        "use_rslora": adapter.use_rslora,
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


def _adapter_from(
    entry: _Entry, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor | None
) -> LoraAdapter:
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
        use_rslora=entry.use_rslora,
        magnitude=magnitude,
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


# --- Reading the files back. They are untrusted input: every malformed value becomes a
# ModelLoadError naming the file and the entry, never a KeyError/TypeError from deep inside.


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
    use_dora: bool = False  # absent from files written before DoRA and rsLoRA: plain LoRA
    use_rslora: bool = False


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
            use_dora=expect(e, "use_dora", "a boolean", source, where, default=False),
            use_rslora=expect(e, "use_rslora", "a boolean", source, where, default=False),
        )
        if entries[name].use_dora and host is not None:
            raise ModelLoadError(f"{source}: {where}: a DoRA adapter cannot change a weight "
                                 f"inside module {host}")  # fmt: skip
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
        magnitude = None
        if entry.use_dora:  # one per output (a tensor left over otherwise: refused below)
            key = f"{entry.name}.lora_magnitude_vector"
            if key not in weights:
                raise ModelLoadError(f"{where}: missing tensor {key} (the manifest says DoRA)")
            magnitude = check_tensor(
                weights.pop(key), f"layer {entry.name}: lora_magnitude_vector", source,
                shape=(B.shape[0],),
            )  # fmt: skip
        adapters[entry.name] = _adapter_from(entry, A, B, magnitude)
    if weights:
        raise ModelLoadError(
            f"{source}: tensor(s) {', '.join(sorted(weights)[:3])} belong to no layer of the "
            "manifest"
        )
    return adapters
