"""``EvaState``: the statistics of one calibration, what allocation and initialisation need.

Components (k per decomposition), explained variances, rows seen, convergence, the target
layers' metadata and the settings. Saved to one safetensors file (tensors, plus the rest as
JSON metadata), so other budgets and rho can be tried later without touching data again:
allocation is the only step that changes. Also converts to PEFT's ``eva_state_dict``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError, ModelLoadError
from .passes.allocate import allocate
from .passes.incremental_svd import Components
from .passes.layer_graph import ConvSpec, Layer

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

    @property
    def max_components(self) -> int:
        return round(self.settings["budget"] * self.settings["rho"])

    @property
    def groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for layer, g in self.layer_group.items():
            groups.setdefault(g, []).append(layer)
        return groups

    def ranks(self, budget: int, rho: float) -> dict[str, int]:
        """The allocation for ``budget`` and ``rho`` on these statistics."""
        if round(budget * rho) > self.max_components:
            raise ConfigError(
                f"budget {budget} x rho {rho} needs {round(budget * rho)} components per layer "
                f"but this state holds {self.max_components}: calibrate again with a larger "
                "budget or rho"
            )
        ratios = {
            m: self.components[g].explained_variance_ratio for m, g in self.layer_group.items()
        }
        return allocate(ratios, budget, rho, list(self.groups.values()))

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
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("evagraph_state", "{}"))
            tensors = load_file(str(path))
        except Exception as err:
            raise ModelLoadError(f"cannot read EVA state {path}: {err}") from err
        if meta.get("format") != _FORMAT:
            raise ModelLoadError(f"{path} is not an evagraph EVA state file")
        layers = {}
        for name, d in meta["layers"].items():
            conv = d.pop("conv")
            if conv is not None:
                conv = ConvSpec(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in conv.items()})  # fmt: skip
            layers[name] = Layer(**d, conv=conv)
        components = {
            g: Components(**{t: tensors[f"{g}.{t}"] for t in _TENSORS[:-1]}, n_rows=n)
            for g, n in meta["n_rows"].items()
        }
        flags = {g: tensors[f"{g}.converged"].bool() for g in meta["n_rows"]}
        return cls(
            settings=meta["settings"],
            layers=layers,
            layer_group=meta["layer_group"],
            components=components,
            component_converged=flags,
            converged=meta["converged"],
            converged_at=meta["converged_at"],
            batches=meta["batches"],
            steps=meta["steps"],
            unconverged=meta["unconverged"],
            skipped=meta["skipped"],
            depth=meta["depth"],
            capture=meta["capture"],
        )

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
        budget = budget or self.settings["budget"]
        rho = rho or self.settings["rho"]
        out = {}
        for layer, rank in self.ranks(budget, rho).items():
            if self.layers[layer].kind != "linear":
                continue
            c = self.components[self.layer_group[layer]]
            A = c.components[:rank]
            if whiten:
                A = A / c.singular_values[:rank].clamp_min(1e-12).sqrt()[:, None]
            out[prefix + layer] = A.clone()
        return out
