"""The artefacts evagraph writes and reads, one module each: the adapter files (``adapter``),
torch.export archives (``pt2``), PEFT adapters (``peft``) and whole-module pickles
(``pickled``); OUTDIR itself (``outdir``) and what a compile writes into it (``outputs``:
``write_outputs`` and the ``WRITERS`` that ``--format`` chooses from)."""

from .adapter import apply_adapter, load_adapters, save_adapter
from .outputs import WRITERS, Writer, default_format, register_writer, write_outputs
from .peft import from_peft_eva_state_dict, save_peft, to_peft
from .pt2 import export, load_exported_program

__all__ = [
    "WRITERS",
    "Writer",
    "apply_adapter",
    "default_format",
    "export",
    "from_peft_eva_state_dict",
    "load_adapters",
    "load_exported_program",
    "register_writer",
    "save_adapter",
    "save_peft",
    "to_peft",
    "write_outputs",
]
