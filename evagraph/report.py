"""What ``transform`` did to a model: per-layer facts, serialisable to JSON.

``Report.from_state`` builds it from the statistics (``EvaState``), the ranks allocated on
them and the adapter settings, and says why each layer left out was; ``Report.load`` reads a
saved one back, every value checked.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import AdapterSettings
from .errors import ReportLoadError, first_line
from .state import EvaState
from .validate import REQUIRED, check_settings, expect


def _expect(d: dict, key: str, what: str, source: str, where: str, default=REQUIRED):
    return expect(d, key, what, source, where, default, ReportLoadError)


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
    # How the run went: versions, elapsed_s, samples and tokens consumed; model and data
    # (as the CLI was given them). Values are strings, numbers or null.
    run: dict = field(default_factory=dict)

    @classmethod
    def from_state(
        cls, state: EvaState, ranks: dict[str, int], settings: AdapterSettings
    ) -> Report:
        """The report of adapters made from ``state`` with ``ranks`` (``state.ranks``) and
        ``settings``: per target layer its rank, scale and statistics, every layer left out
        with why (rank 0 included), and how calibration went. ``run`` is left to the caller."""
        layers = []
        for name, layer in state.layers.items():
            group, rank = state.layer_group[name], ranks[name]
            alpha_l, scale = settings.layer_scaling(rank) if rank else (0.0, 0.0)
            layers.append(
                LayerReport(
                    name=name,
                    kind=layer.kind,
                    op=layer.op,
                    in_features=layer.in_features,
                    out_features=layer.out_features,
                    rank=rank,
                    alpha=alpha_l,
                    scaling=scale,
                    group=group,
                    depth=state.depth.get(name, 0),
                    explained_variance_ratio=state.components[
                        group
                    ].explained_variance_ratio.tolist(),
                    converged=bool(state.component_converged[group][:rank].all()),
                    steps_to_converge=state.converged_at.get(name),
                )
            )
        graph_mode = any(state.layers[n].module is None for n, r in ranks.items() if r)
        return cls(
            settings={"calibration": dict(state.settings), "adapter": settings.to_dict()},
            layers=layers,
            skipped={**state.skipped, **_rank_zero(state, ranks, settings.budget)},
            groups=state.groups,
            rows={g: c.n_rows for g, c in state.components.items()},
            batches=state.batches,
            steps=state.steps,
            unconverged=[layer.name for layer in layers if layer.rank and not layer.converged],
            capture=state.capture,
            rewrite="graph" if graph_mode else "module",
        )

    @property
    def converged(self) -> bool:
        return not self.unconverged

    @property
    def ranks(self) -> dict[str, int]:
        return {layer.name: layer.rank for layer in self.layers}

    @property
    def next_steps(self) -> list[str]:
        """What a user does with the result, and about what did not go as planned."""
        steps = [
            "train: evagraph.apply_adapter(model, OUTDIR) adds the adapters to the base model "
            "(only they train); with --format peft, PeftModel.from_pretrained(base, OUTDIR, "
            "is_trainable=True)"
        ]
        if self.unconverged:
            steps.append(
                f"{len(self.unconverged)} adapted layer(s) did not converge: calibrate on more "
                "data (or a larger --max-steps), or accept their components as the PCA of the "
                "rows seen"
            )
        if not any(layer.rank for layer in self.layers):
            steps.append("no layer got an adapter: see 'skipped' for why")
        return steps

    def to_dict(self) -> dict:
        d = asdict(self)
        d["converged"] = self.converged
        d["total_rank"] = sum(self.ranks.values())
        d["next_steps"] = self.next_steps
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Read a ``report.json`` written by ``save``.

        Raises ``ReportLoadError`` (a ``ModelLoadError``) naming the file and what is wrong if
        it cannot be read, is not JSON or is not a report: every field is checked for type and
        range (``_LAYER_FIELDS``, ``_REPORT_FIELDS``), as the renderers do arithmetic on them.
        Unknown keys (and the derived ``converged`` / ``total_rank`` / ``next_steps``) are
        ignored.
        """
        source = f"cannot read report {path}"

        def bad(reason: str) -> ReportLoadError:
            return ReportLoadError(f"{source}: {reason}")

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise bad(err.strerror or str(err)) from err
        except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, nested too deep
            raise bad(f"not valid JSON ({first_line(err)})") from err
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise bad("no 'layers' list: not an evagraph report")
        layers = [_layer_from(d, i, source) for i, d in enumerate(data["layers"])]
        values = {}
        for key, (what, default) in _REPORT_FIELDS.items():
            values[key] = _expect(data, key, what, source, "report", default)
        check_settings(values["settings"], source, error=ReportLoadError)
        for key, what in _PER_ENTRY.items():
            for name in values[key]:
                _expect(values[key], name, what, source, key)
        return cls(layers=layers, **values)

    def render(self, outdir: str | Path) -> list[Path]:
        """Write ``report.html`` (and ``report.png`` if matplotlib is installed) to ``outdir``.

        Returns the paths written; see ``evagraph.render.render_report``.
        """
        from .render import render_report

        return render_report(self, outdir)


def _rank_zero(state: EvaState, ranks: dict[str, int], budget: int) -> dict[str, str]:
    """Why each target layer that got rank 0 did."""
    reasons = {}
    few = state.few_rows(budget)
    for n, r in ranks.items():
        if r:
            continue
        if n in few:
            reasons[n] = (
                f"rank 0: the router sent this expert {few[n]} row(s), too few for a rank "
                f"(more than budget={budget} needed)"
            )
            continue
        found = state.components[state.layer_group[n]]
        if found.n_rows < 2:
            reasons[n] = (
                f"rank 0: it saw {found.n_rows} row(s) of calibration data, too few for a PCA "
                "(more data needed)"
            )
            continue
        dead = not bool((found.explained_variance > 0).any())
        reasons[n] = (
            "rank 0: its inputs have no variance (constant, zero or masked)"
            if dead
            else "rank 0: its variance did not make the global cut"
        )
    return reasons


# What each saved field must be (``expect``'s words), for ``Report.load``.
_LAYER_FIELDS = {
    "name": "a string", "kind": "'linear' or 'conv'", "op": "a string",
    "in_features": "an integer >= 1", "out_features": "an integer >= 1",
    "rank": "an integer >= 0", "alpha": "a finite number >= 0", "scaling": "a finite number >= 0",
    "group": "a string", "depth": "an integer >= 0",
    "explained_variance_ratio": "a list of numbers in [0, 1]", "converged": "a boolean",
    "steps_to_converge": "null or an integer >= 0",
}  # fmt: skip
_REPORT_FIELDS = {  # key: (what, default)
    "settings": ("an object", REQUIRED), "skipped": ("an object", REQUIRED),
    "groups": ("an object", REQUIRED), "rows": ("an object", REQUIRED),
    "batches": ("an object", REQUIRED), "steps": ("an integer >= 0", REQUIRED),
    "unconverged": ("a list of strings", []), "capture": ("a string", "fx"),
    "rewrite": ("a string", "module"), "run": ("an object", {}),
}  # fmt: skip
_PER_ENTRY = {  # the values inside the report's objects
    "skipped": "a string", "groups": "a list of strings", "rows": "an integer >= 0",
    "batches": "a list of [start, stop) runs", "run": "null, a string or a finite number >= 0",
}  # fmt: skip


def _layer_from(d: object, i: int, source: str) -> LayerReport:
    if not isinstance(d, dict):
        raise ReportLoadError(f"{source}: layers[{i}] must be an object, got {d!r:.40}")
    name = _expect(d, "name", "a string", source, f"layers[{i}]")
    where = f"layer {name!r:.60}"
    values = {key: _expect(d, key, what, source, where) for key, what in _LAYER_FIELDS.items()}
    # at_rank in the renderers reads the ratios of the components the adapter got
    if values["rank"] > len(values["explained_variance_ratio"]):
        raise ReportLoadError(
            f"{source}: {where}: rank {values['rank']} but only "
            f"{len(values['explained_variance_ratio'])} explained-variance ratios"
        )
    return LayerReport(**values)
