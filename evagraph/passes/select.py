"""Target-selection pass: a LayerGraph and name patterns -> which layers get adapters.

Takes the ``LayerGraph`` and the user's ``targets`` / ``exclude`` glob patterns (``fnmatch`` on
qualified names, e.g. ``"*.q_proj"``, ``"layers.0.*"``) and returns a ``Selection``: the
target layer names in graph order, and every layer left out with the reason. By default every
adaptable layer is a target except the model's output layers (heads); a ``targets`` pattern
that names a head explicitly selects it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..errors import ConfigError
from .layer_graph import LayerGraph


@dataclass
class Selection:
    targets: list[str]
    skipped: dict[str, str]  # layer name -> why it gets no adapter


def _matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in globs)


def select_targets(
    layer_graph: LayerGraph,
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> Selection:
    """Choose target layers; raise ``ConfigError`` if a pattern matches nothing or none remain."""
    names = list(layer_graph.layers)
    for kind, given in (("targets", targets or ()), ("exclude", exclude)):
        for p in given:
            if not any(fnmatchcase(n, p) for n in names):
                raise ConfigError(
                    f"{kind} pattern {p!r} matches no adaptable layer "
                    f"(layers: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''})"
                )
    chosen, skipped = [], dict(layer_graph.unsupported)
    for name in names:
        if _matches(name, exclude):
            skipped[name] = "excluded by pattern"
        elif targets is not None and not _matches(name, targets):
            skipped[name] = "not matched by the targets patterns"
        elif targets is None and name in layer_graph.outputs:
            skipped[name] = "output layer (model head)"
        else:
            chosen.append(name)
    if not chosen:
        raise ConfigError(
            "no adaptable layer selected: "
            + (
                "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:5])
                or "the model has no Linear, Conv1d/2d/3d or HF Conv1D layer on its path"
            )
        )
    return Selection(chosen, skipped)
