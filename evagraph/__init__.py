"""evagraph: EVA-initialised LoRA adapters for any traceable PyTorch model.

Public API: ``transform``, ``export``, ``save_adapter``, ``apply_adapter``, ``merge``,
``unmerge``, ``save_peft``, ``to_peft``,
``adapter_state_dict``, ``Report``/``LayerReport``, ``EvaSettings``, and the exceptions in
``evagraph.errors``.
"""

from .api import transform
from .artifacts import apply_adapter, export, save_adapter
from .config import EvaSettings
from .errors import (
    CaptureError,
    ConfigError,
    ConvergenceWarning,
    DataError,
    EvagraphError,
    ModelLoadError,
)
from .lora import LoraAdapter, LoraLayer, adapter_state_dict
from .merge import merge, unmerge
from .peft import save_peft, to_peft
from .report import LayerReport, Report

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "ConfigError",
    "ConvergenceWarning",
    "DataError",
    "EvaSettings",
    "EvagraphError",
    "LayerReport",
    "LoraAdapter",
    "LoraLayer",
    "ModelLoadError",
    "Report",
    "adapter_state_dict",
    "apply_adapter",
    "export",
    "merge",
    "save_adapter",
    "save_peft",
    "to_peft",
    "transform",
    "unmerge",
]
