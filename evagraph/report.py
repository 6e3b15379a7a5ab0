"""What ``transform`` did to a model: per-layer facts, serialisable to JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import ReportLoadError


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

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Read a ``report.json`` written by ``save``.

        Raises ``ReportLoadError`` (a ``ModelLoadError``) naming the file and what is wrong if
        it cannot be read, is not JSON or is not a report. Unknown keys (and the derived
        ``converged`` / ``total_rank``) are ignored.
        """

        def bad(reason: str) -> ReportLoadError:
            return ReportLoadError(f"cannot read report {path}: {reason}")

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise bad(err.strerror or str(err)) from err
        except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, nested too deep
            raise bad(f"not valid JSON ({err})") from err
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise bad("no 'layers' list: not an evagraph report")
        layer_keys = {f.name for f in fields(LayerReport)}
        report_keys = {f.name for f in fields(cls)}
        try:
            layers = [
                LayerReport(**{k: v for k, v in layer.items() if k in layer_keys})
                for layer in data["layers"]
            ]
            kwargs = {k: v for k, v in data.items() if k in report_keys and k != "layers"}
            report = cls(layers=layers, **kwargs)
        except (TypeError, AttributeError) as err:  # a missing key, or a layer not an object
            raise bad(f"not an evagraph report ({err})") from err
        # The renderers do arithmetic on these: catch a hand-edited file here, by name.
        for layer in report.layers:
            ints = (layer.rank, layer.in_features, layer.out_features, layer.depth)
            ratios = layer.explained_variance_ratio
            if not (
                all(isinstance(v, int) for v in ints)
                and isinstance(ratios, list)
                and all(isinstance(v, (int, float)) for v in ratios)
                and isinstance(layer.steps_to_converge, (int, type(None)))
            ):
                raise bad(f"layer {layer.name!r} has a field of the wrong type")
        if not isinstance(report.steps, int):
            raise bad("'steps' must be an integer")
        for name in ("settings", "skipped", "groups", "rows", "batches"):
            if not isinstance(getattr(report, name), dict):
                raise bad(f"{name!r} must be an object")
        if not isinstance(report.unconverged, list):
            raise bad("'unconverged' must be a list")
        return report

    def render(self, outdir: str | Path) -> list[Path]:
        """Write ``report.html`` (and ``report.png`` if matplotlib is installed) to ``outdir``.

        Returns the paths written; see ``evagraph.render.render_report``.
        """
        from .render import render_report

        return render_report(self, outdir)
