"""What ``transform`` did to a model: per-layer facts, serialisable to JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class LayerReport:
    """One target layer. ``rank`` 0 means it got no adapter (its variance did not make the cut)."""

    name: str
    kind: str
    op: str
    in_features: int
    out_features: int
    rank: int
    alpha: float
    scaling: float
    group: str  # decomposition it shares with the layers reading the same input
    depth: int
    explained_variance_ratio: list[float]
    converged: bool
    steps_to_converge: int | None


@dataclass
class Report:
    """Settings, the adapted layers, the layers left out (with why) and how calibration went."""

    settings: dict
    layers: list[LayerReport]
    skipped: dict[str, str]
    groups: dict[str, list[str]]
    rows: dict[str, int]  # group -> activation rows its decomposition saw
    batches: dict[str, list[list[int]]]  # group -> minibatches it consumed, [start, stop) runs
    steps: int
    unconverged: list[str] = field(default_factory=list)
    capture: str = "fx"  # how the graph was captured: "fx", "export", or "graph" (given one)
    rewrite: str = "module"  # "module": layers wrapped in place; "graph": graph rewritten

    @property
    def converged(self) -> bool:
        return not self.unconverged

    @property
    def ranks(self) -> dict[str, int]:
        return {layer.name: layer.rank for layer in self.layers}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["converged"] = self.converged
        d["total_rank"] = sum(self.ranks.values())
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
