"""``EvaState``: the statistics of one calibration, what allocation and initialisation need.

Components (k per decomposition), explained variances, rows seen, convergence, the target
layers' metadata and the settings. Saved to one safetensors file (tensors, plus the rest as
JSON metadata), so other budgets and rho can be tried later without touching data again:
allocation is the only step that changes. Also converts to PEFT's ``eva_state_dict``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .attach import check_layer
from .config import AdapterSettings
from .errors import ConfigError, ModelLoadError
from .layers import Layer, kind_from
from .passes.allocate import allocate
from .stats import Components
from .validate import (
    check_descending,
    check_orthonormal_rows,
    check_settings,
    check_tensor,
    expect,
    load_json,
    read_safetensors,
)

_FORMAT = "evagraph-state/1"
_TENSORS = ("components", "explained_variance", "explained_variance_ratio", "singular_values",
            "mean", "converged")  # fmt: skip


@dataclass
class EvaState:
    """Statistics of one calibration.

    settings: the calibration settings (budget, rho, tau, ...; k = round(budget * rho)).
    layers: target layer -> its metadata. layer_group: target layer -> decomposition id.
    components: decomposition id -> Components. component_converged: id -> per-component
    flags at the end. converged / converged_at: per layer, for the calibration's allotment.
    batches: id -> consumed minibatches ([start, stop) runs). skipped: layers left out and why.
    depth: layer -> depth in the layer graph. capture: "fx", "export" or "graph".
    source: where the state came from, for error messages (not saved).
    """

    settings: dict
    layers: dict[str, Layer]
    layer_group: dict[str, str]
    components: dict[str, Components]
    component_converged: dict[str, torch.Tensor]
    converged: dict[str, bool]
    converged_at: dict[str, int | None]
    batches: dict[str, list[list[int]]]
    steps: int
    unconverged: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    depth: dict[str, int] = field(default_factory=dict)
    capture: str = "fx"
    source: str = field(default="the EVA state", repr=False, compare=False)

    @property
    def max_components(self) -> int:
        return round(self.settings["budget"] * self.settings["rho"])

    @property
    def groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for layer, g in self.layer_group.items():
            groups.setdefault(g, []).append(layer)
        return groups

    def ranks(self, settings: AdapterSettings | int, rho: float | None = None) -> dict[str, int]:
        """The allocation on these statistics for the budget and rho of ``settings`` (an
        ``AdapterSettings``; ``ranks(budget, rho)`` is short for one with those two, checked
        as settings are)."""
        if not isinstance(settings, AdapterSettings):
            settings = AdapterSettings(budget=settings, rho=rho)
        budget, rho = settings.budget, settings.rho
        if round(budget * rho) > self.max_components:
            raise ConfigError(
                f"budget {budget} x rho {rho} needs {round(budget * rho)} components per layer "
                f"but this state holds {self.max_components}: calibrate again with a larger "
                "budget or rho"
            )
        few = self.few_rows(budget)
        ratios = {
            m: self.components[g].explained_variance_ratio * (m not in few)
            for m, g in self.layer_group.items()
        }
        return allocate(ratios, budget, rho, list(self.groups.values()))

    def few_rows(self, budget: int) -> dict[str, int]:
        """Experts the router sent no more than ``budget`` rows to, with their row counts:
        rank 0 (a PCA of n rows has n - 1 directions; for dense layers that is an error)."""
        return {
            m: n
            for m, layer in self.layers.items()
            if layer.expert is not None
            and (n := self.components[self.layer_group[m]].n_rows) <= budget
        }

    def save(self, path: str | Path) -> None:
        tensors = {}
        for g, c in self.components.items():
            for name in _TENSORS[:-1]:
                tensors[f"{g}.{name}"] = getattr(c, name).detach().contiguous().cpu()
            tensors[f"{g}.converged"] = self.component_converged[g].to(torch.uint8).cpu()
        meta = {
            "format": _FORMAT,
            "settings": self.settings,
            "layers": {n: asdict(layer) for n, layer in self.layers.items()},
            "layer_group": self.layer_group,
            "n_rows": {g: c.n_rows for g, c in self.components.items()},
            "converged": self.converged,
            "converged_at": self.converged_at,
            "batches": self.batches,
            "steps": self.steps,
            "unconverged": self.unconverged,
            "skipped": self.skipped,
            "depth": self.depth,
            "capture": self.capture,
        }
        save_file(tensors, str(path), metadata={"evagraph_state": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> EvaState:
        """Read a state written by ``save``; anything malformed is a ``ModelLoadError`` naming
        the file and the entry (see ``_state_from``)."""
        tensors, metadata = read_safetensors(path, "EVA state")
        source = f"EVA state {path}"
        if "evagraph_state" not in metadata:
            raise ModelLoadError(f"{path} is not an evagraph EVA state file")
        return _state_from(load_json(metadata["evagraph_state"], source), tensors, source)

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ModelLoadError`` unless every target layer of this state is a layer of
        ``model`` of the same kind, widths and conv geometry (``attach.check_layer``).

        Statistics from another model would otherwise give adapters that fail at the first
        forward, or silently adapt other layers than the ones calibrated.
        """
        for layer in self.layers.values():
            check_layer(model, layer, self.source)

    def to_peft(
        self,
        budget: int | None = None,
        rho: float | None = None,
        whiten: bool = False,
        prefix: str = "base_model.model.",
    ) -> dict[str, torch.Tensor]:
        """PEFT's ``eva_state_dict``: ``{module name: components[:rank]}`` per linear layer.

        Pass it to ``peft.initialize_lora_eva_weights(peft_model, eva_state_dict=...)``;
        ``prefix`` is where the base model's modules sit inside a PeftModel. PEFT's EVA has
        no convolutions, so conv layers are left out.
        """
        budget = self.settings["budget"] if budget is None else budget
        rho = self.settings["rho"] if rho is None else rho
        out = {}
        for layer, rank in self.ranks(budget, rho).items():
            if self.layers[layer].kind != "linear":
                continue
            A = self.components[self.layer_group[layer]].lora_A(rank, whiten)
            out[prefix + layer] = A.clone()
        return out


# Layer's fields as saved (asdict), by what each must be; _REQUIRED have no default.
_LAYER_FIELDS = {
    "name": "a string", "kind": "'linear' or 'conv'", "in_features": "an integer >= 1",
    "out_features": "an integer >= 1", "weight": "a non-empty string", "op": "a string",
    "nodes": "a list of strings", "inputs": "a list of strings", "module": "null or a string",
    "weight_transposed": "a boolean", "host": "null or a string",
    "expert": "null or an integer >= 0", "offsets": "null or a string",
}  # fmt: skip
_REQUIRED = ("name", "kind", "op", "in_features", "out_features", "weight")  # no defaults in Layer


def _layer_from(d: Any, name: str, source: str) -> Layer:
    where = f"layer {name}"
    if not isinstance(d, dict):
        raise ModelLoadError(f"{source}: {where} must be an object, got {d!r:.40}")
    unknown = set(d) - {f.name for f in fields(Layer)}
    if unknown:
        raise ModelLoadError(f"{source}: {where}: unknown key(s) {sorted(unknown)}")
    for key, what in _LAYER_FIELDS.items():
        expect(d, key, what, source, where, **({} if key in _REQUIRED else {"default": None}))
    if d["name"] != name:
        raise ModelLoadError(f"{source}: {where}: entry is named {d['name']!r:.40}")
    kind = kind_from(d["kind"], bool(d.get("weight_transposed")), d.get("expert"))
    return Layer(**{**d, "conv": kind.read_saved(d, source, where)})


def _tensor(
    tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], source: str
) -> torch.Tensor:
    """``tensors[key]`` (removed from the dict), of ``shape``, a finite float."""
    if key not in tensors:
        raise ModelLoadError(f"{source}: missing tensor {key}")
    return check_tensor(tensors.pop(key), f"tensor {key}", source, shape)


def _check_components(c: Components, g: str, layers: list[Layer], source: str) -> None:
    """What a PCA of ``c.n_rows`` rows is: orthonormal directions (EVA's A; zero or scaled
    rows would give an adapter that never trains, or one 1000x too large), variances and
    ratios non-negative and non-increasing, ratios summing to at most 1, and no variance
    from fewer than two rows: a group that saw none or one (an expert the router sent no
    row, a layer one sample reached) is written with identity directions and zero variance,
    and gets rank 0."""
    check_orthonormal_rows(c.components, f"tensor {g}.components", source)
    for name in ("explained_variance", "explained_variance_ratio", "singular_values"):
        check_descending(getattr(c, name), f"tensor {g}.{name}", source)
    total = float(c.explained_variance_ratio.double().sum())
    if total > 1 + 1e-3:  # ratios of the total variance: their sum is at most 1 (rounding)
        raise ModelLoadError(
            f"{source}: tensor {g}.explained_variance_ratio sums to {total:.4g}, more than 1"
        )
    if c.n_rows < 2 and bool((c.explained_variance > 0).any()):
        raise ModelLoadError(
            f"{source}: group {g}: {c.n_rows} row(s) carry no variance, but "
            f"{g}.explained_variance holds some"
        )


def _state_from(meta: Any, tensors: dict[str, torch.Tensor], source: str) -> EvaState:
    """The EvaState a file holds, every value checked: JSON types, each group's tensors
    against its layers' width and the state's k, finiteness, and every cross-reference
    (layer -> group, group -> layers, per-layer and per-group records)."""
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ModelLoadError(f"{source} is not an evagraph EVA state file")
    settings = expect(meta, "settings", "an object", source, "settings")
    expect(settings, "budget", "an integer >= 1", source, "settings")  # required here
    expect(settings, "rho", "a finite number >= 1", source, "settings")
    check_settings(settings, source)
    max_components = round(settings["budget"] * settings["rho"])

    raw_layers = expect(meta, "layers", "an object", source, "layers")
    layers = {name: _layer_from(d, name, source) for name, d in raw_layers.items()}
    if not layers:
        raise ModelLoadError(f"{source}: holds no target layer")

    def per_layer(key: str, what: str) -> dict:
        d = expect(meta, key, "an object", source, key)
        if set(d) != set(layers):
            diff = sorted(set(d) ^ set(layers))[:3]
            raise ModelLoadError(f"{source}: {key} does not cover the target layers ({diff})")
        for name in d:
            expect(d, name, what, source, key)
        return d

    layer_group = per_layer("layer_group", "a string")
    converged = per_layer("converged", "a boolean")
    converged_at = per_layer("converged_at", "null or an integer >= 0")
    n_rows = expect(meta, "n_rows", "an object", source, "n_rows")
    for g in n_rows:
        expect(n_rows, g, "an integer >= 0", source, "n_rows")
    groups: dict[str, list[str]] = {}
    for name, g in layer_group.items():
        if g not in n_rows:
            raise ModelLoadError(f"{source}: layer {name} points to unknown group {g!r:.40}")
        groups.setdefault(g, []).append(name)
    if set(n_rows) - set(groups):
        raise ModelLoadError(
            f"{source}: group(s) {', '.join(sorted(set(n_rows) - set(groups))[:3])} have no layer"
        )

    components, flags = _components_from(tensors, groups, layers, n_rows, max_components, source)
    return _records_from(
        meta, settings, layers, layer_group, components, flags, converged, converged_at, source
    )


def _components_from(
    tensors: dict[str, torch.Tensor],
    groups: dict[str, list[str]],
    layers: dict[str, Layer],
    n_rows: dict[str, int],
    max_components: int,
    source: str,
) -> tuple[dict[str, Components], dict[str, torch.Tensor]]:
    """Each group's components and per-component convergence flags, checked against its
    layers' width and ``max_components``; no tensor may be left over."""
    components, flags = {}, {}
    for g, members in groups.items():
        first = layers[members[0]]
        for name in members[1:]:  # one decomposition: every member sees the same rows
            if (layers[name].in_features, layers[name].conv) != (first.in_features, first.conv):
                raise ModelLoadError(
                    f"{source}: group {g}: layers {first.name} and {name} read rows of "
                    "different width or geometry, so they cannot share one decomposition"
                )
        d = first.in_features
        if f"{g}.components" not in tensors:
            raise ModelLoadError(f"{source}: missing tensor {g}.components")
        k = tensors[f"{g}.components"].shape[0] if tensors[f"{g}.components"].dim() else 0
        if not 1 <= k <= min(d, max_components):
            raise ModelLoadError(
                f"{source}: group {g} holds {k} components; layers {', '.join(members)} of "
                f"width {d} with budget x rho = {max_components} allow 1 to "
                f"{min(d, max_components)}"
            )
        c = Components(
            components=_tensor(tensors, f"{g}.components", (k, d), source),
            explained_variance=_tensor(tensors, f"{g}.explained_variance", (k,), source),
            explained_variance_ratio=_tensor(
                tensors, f"{g}.explained_variance_ratio", (k,), source
            ),
            singular_values=_tensor(tensors, f"{g}.singular_values", (k,), source),
            mean=_tensor(tensors, f"{g}.mean", (d,), source),
            n_rows=n_rows[g],
        )
        _check_components(c, g, [layers[name] for name in members], source)
        flag = tensors.pop(f"{g}.converged", None)
        if flag is None or tuple(flag.shape) != (k,) or not bool(((flag == 0) | (flag == 1)).all()):
            raise ModelLoadError(f"{source}: tensor {g}.converged must be {k} flags (0 or 1)")
        components[g], flags[g] = c, flag.bool()
    if tensors:
        raise ModelLoadError(
            f"{source}: tensor(s) {', '.join(sorted(tensors)[:3])} belong to no group"
        )
    return components, flags


def _records_from(
    meta: dict,
    settings: dict,
    layers: dict[str, Layer],
    layer_group: dict[str, str],
    components: dict[str, Components],
    flags: dict[str, torch.Tensor],
    converged: dict[str, bool],
    converged_at: dict[str, int | None],
    source: str,
) -> EvaState:
    """The state, with the records about calibration (batches consumed, steps, unconverged
    and skipped layers, depths, capture) checked against its groups and layers."""
    groups = {layer_group[name] for name in layers}
    batches = expect(meta, "batches", "an object", source, "batches")
    for g in batches:
        if g not in groups:
            raise ModelLoadError(f"{source}: batches names unknown group {g!r:.40}")
        expect(batches, g, "a list of [start, stop) runs", source, "batches")
    unconverged = expect(meta, "unconverged", "a list of strings", source, "unconverged")
    if set(unconverged) - set(layers):
        unknown = sorted(set(unconverged) - set(layers))[:3]
        raise ModelLoadError(f"{source}: unconverged names unknown layer(s) {unknown}")
    skipped = expect(meta, "skipped", "an object", source, "skipped")
    for name in skipped:
        expect(skipped, name, "a string", source, "skipped")
    depth = expect(meta, "depth", "an object", source, "depth")
    for name in depth:
        expect(depth, name, "an integer >= 0", source, "depth")
    return EvaState(
        settings=settings,
        layers=layers,
        layer_group=layer_group,
        components=components,
        component_converged=flags,
        converged=converged,
        converged_at=converged_at,
        batches=batches,
        steps=expect(meta, "steps", "an integer >= 0", source, "steps"),
        unconverged=unconverged,
        skipped=skipped,
        depth=depth,
        capture=expect(meta, "capture", "a string", source, "capture"),
        source=source,
    )
