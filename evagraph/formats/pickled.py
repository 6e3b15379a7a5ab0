"""The whole-module pickle artefact: ``--format pickle`` writes the adapted model with
``torch.save`` (reading one back needs ``--allow-pickle``: see ``evagraph.loading``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, first_line
from .outdir import zip_target


def write(adapted: nn.Module, outdir: Path, example: Any) -> list[str]:
    """``--format pickle``: ``torch.save(adapted)`` as ``outdir/model.pt``; a model pickle
    cannot hold (a model loaded from a ``.pt2`` has local functions) is a ``ConfigError``."""
    with zip_target(outdir / "model.pt") as f:
        try:
            torch.save(adapted, f)
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise ConfigError(
                f"--format pickle cannot save this model: {first_line(err, typed=True)}"
            ) from err
    return ["model.pt"]
