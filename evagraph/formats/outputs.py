"""What ``evagraph compile`` writes into OUTDIR, and the ``--format`` registry.

Every run writes the adapter files (``adapter.safetensors`` + ``adapter.json``),
``report.json`` with its pictures and, after a calibration, ``eva_state.safetensors``;
``--format NAME`` adds what ``WRITERS[NAME]`` writes. ``write_outputs`` is the one place this
happens, for the command line and for Python alike, so an OUTDIR can be written from Python.
A new format is a function ``write(adapted, outdir, example) -> [file names]`` in its own
module, named in ``WRITERS`` here (or added with ``register_writer``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..render import render_report
from ..report import Report
from ..state import EvaState
from . import peft, pickled, pt2
from .adapter import save_adapter
from .outdir import disk_errors


@dataclass(frozen=True)
class Writer:
    """One ``--format``. ``write(adapted, outdir, example)`` writes its files into ``outdir``
    and returns their names. ``whole_model``: it writes the whole model, which a model whose
    weights were never loaded whole (block by block from a directory) cannot give.
    ``needs_example``: it traces the model on one batch, so ``example`` must be given."""

    write: Callable[[nn.Module, Path, Any], list[str]]
    whole_model: bool = False
    needs_example: bool = False


def _adapter_files_only(adapted: nn.Module, outdir: Path, example: Any) -> list[str]:
    return []  # the base model is at hand (a Hugging Face directory, a timm name)


# In the order ``--format`` lists them.
WRITERS: dict[str, Writer] = {
    "pt2": Writer(pt2.write, whole_model=True, needs_example=True),
    "safetensors": Writer(_adapter_files_only),
    "pickle": Writer(pickled.write, whole_model=True),
    "peft": Writer(peft.write),
}


def register_writer(
    name: str,
    write: Callable[[nn.Module, Path, Any], list[str]],
    *,
    whole_model: bool = False,
    needs_example: bool = False,
) -> None:
    """Add (or replace) the format ``name``; the command line offers it as ``--format name``
    when registered before ``evagraph.cli`` is imported."""
    WRITERS[name] = Writer(write, whole_model, needs_example)


def default_format(kind: str) -> str:
    """The format a model loaded as ``kind`` (``loading.load_model``) is written back in: a
    ``.pt2`` as a ``.pt2``, a pickle as a pickle; anything else (a Hugging Face directory, a
    timm name: the base model is at hand) as the adapter files only."""
    return kind if kind in ("pt2", "pickle") else "safetensors"


def write_outputs(
    adapted: nn.Module,
    report: Report,
    state: EvaState | None,
    outdir: str | Path,
    fmt: str = "safetensors",
    *,
    example: Any = None,
    shown: str | Path | None = None,
) -> list[str]:
    """Write what ``evagraph compile`` writes into ``outdir`` (created if missing); returns the
    names of the files written, in the order the command line lists them.

    ``adapted``, ``report`` and ``state`` as ``transform(..., return_state=True)`` returns
    them (``state`` None: no ``eva_state.safetensors``, as after ``adapt``); ``fmt``: a name
    in ``WRITERS``; ``example``: one batch the model takes, for formats that trace it.
    A write that fails on the disk is one ``OutputError`` naming ``shown`` (default
    ``outdir``; the command line writes into a temporary directory that becomes OUTDIR).
    """
    if fmt not in WRITERS:
        raise ConfigError(f"unknown format {fmt!r}; the formats are {', '.join(WRITERS)}")
    writer = WRITERS[fmt]
    if writer.needs_example and example is None:
        raise ConfigError(f"format {fmt} needs an example batch (example=): it traces the model")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = ["adapter.safetensors", "adapter.json", "report.json"]
    with disk_errors(str(shown if shown is not None else outdir)):
        if state is not None:
            state.save(outdir / "eva_state.safetensors")
            written.append("eva_state.safetensors")
        save_adapter(adapted, outdir, report.settings)
        report.save(outdir / "report.json")
        written += [path.name for path in render_report(report, outdir)]
        written += writer.write(adapted, outdir, example)
    return written
