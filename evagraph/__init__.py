"""evagraph: EVA-initialised LoRA adapters for any traceable PyTorch model.

Public API: ``transform`` (= ``calibrate``, giving an ``EvaState``, then ``adapt``),
``export``, ``save_adapter``, ``apply_adapter``, ``merge``, ``unmerge``, ``save_peft``,
``to_peft``, ``from_peft_eva_state_dict``, ``adapter_state_dict``, ``write_outputs`` (an
OUTDIR as ``evagraph compile`` writes it), ``Report`` / ``LayerReport``,
``CalibrationSettings`` / ``AdapterSettings`` (the settings, by name), the extension points
``PIPELINES`` / ``Calibrator`` (``evagraph.pipelines``) and ``WRITERS``
(``evagraph.formats``), and the exceptions in ``evagraph.errors``.
"""

from .api import adapt, calibrate, transform
from .config import AdapterSettings, CalibrationSettings
from .errors import (
    CaptureError,
    ConfigError,
    ConvergenceWarning,
    DataError,
    EvagraphError,
    EvagraphWarning,
    ModelLoadError,
    OutputError,
    ReportLoadError,
)
from .formats import (
    WRITERS,
    apply_adapter,
    export,
    from_peft_eva_state_dict,
    save_adapter,
    save_peft,
    to_peft,
    write_outputs,
)
from .lora import LoraAdapter, LoraLayer, adapter_state_dict
from .merge import merge, unmerge
from .pipelines import PIPELINES, Calibrator
from .report import LayerReport, Report
from .state import EvaState

__version__ = "0.1.0"

__all__ = [
    "PIPELINES",
    "WRITERS",
    "AdapterSettings",
    "CalibrationSettings",
    "Calibrator",
    "CaptureError",
    "ConfigError",
    "ConvergenceWarning",
    "DataError",
    "EvaState",
    "EvagraphError",
    "EvagraphWarning",
    "LayerReport",
    "LoraAdapter",
    "LoraLayer",
    "ModelLoadError",
    "OutputError",
    "ReportLoadError",
    "Report",
    "adapt",
    "adapter_state_dict",
    "apply_adapter",
    "calibrate",
    "export",
    "from_peft_eva_state_dict",
    "merge",
    "save_adapter",
    "save_peft",
    "to_peft",
    "transform",
    "unmerge",
    "write_outputs",
]
