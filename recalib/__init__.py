"""recalib: re-estimate BatchNorm / Batch Renormalization statistics for a new domain.

The public API::

    report = recalib.recalibrate(model, data, method="exact", mode="train")
    recalib.save_stat_bank(model, "domain_b.safetensors")
    recalib.export_onnx(model, example, "model.onnx")        # BN kept, parity-checked
    tapped = recalib.add_drift_taps(onnx.load("model.onnx"))  # in-graph BN input moments
    banked = recalib.add_bank_inputs(onnx.load("model.onnx"))  # many banks, one session

``recalib.drift`` holds the drift math (symmetric KL, mergeable/rolling windows).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ._lazy import LazyPackage

if TYPE_CHECKING:
    from .adapt import adapt, adapt_onnx, data_flow_order
    from .errors import (
        BankIndexError,
        BatchNormFoldedError,
        BnGraphError,
        DataError,
        DivergedError,
        ExportError,
        ExportParityError,
        LayerMismatchError,
        NoBatchNormError,
        NonFiniteError,
        NotConvergedError,
        OnnxModelError,
        OptionsError,
        OutputError,
        RecalibError,
        StatBankMismatchError,
    )
    from .layers import NormLayer, find_norm_layers
    from .moments import ChannelMoments
    from .onnx.banks import BankTables, add_bank_inputs
    from .onnx.export import ExportReport, export_onnx
    from .onnx.recalibrate import recalibrate_onnx
    from .onnx.taps import add_drift_taps
    from .options import DEFAULTS, RecalibOptions
    from .plans import PlanReport
    from .recalibrate import recalibrate
    from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
    from .report import LayerReport, RecalibrationReport
    from .statbank import StatBank, apply_stat_bank, load_stat_bank, save_stat_bank

_LAZY: dict[str, str] = {
    "BankIndexError": ".errors",
    "BankTables": ".onnx.banks",
    "BatchNormFoldedError": ".errors",
    "BatchRenorm1d": ".renorm",
    "BatchRenorm2d": ".renorm",
    "BatchRenorm3d": ".renorm",
    "BnGraphError": ".errors",
    "ChannelMoments": ".moments",
    "DEFAULTS": ".options",
    "DataError": ".errors",
    "DivergedError": ".errors",
    "ExportError": ".errors",
    "ExportParityError": ".errors",
    "ExportReport": ".onnx.export",
    "LayerMismatchError": ".errors",
    "LayerReport": ".report",
    "NoBatchNormError": ".errors",
    "NonFiniteError": ".errors",
    "NormLayer": ".layers",
    "NotConvergedError": ".errors",
    "OnnxModelError": ".errors",
    "OptionsError": ".errors",
    "OutputError": ".errors",
    "PlanReport": ".plans",
    "RecalibError": ".errors",
    "RecalibOptions": ".options",
    "RecalibrationReport": ".report",
    "StatBank": ".statbank",
    "StatBankMismatchError": ".errors",
    "adapt": ".adapt",
    "adapt_onnx": ".adapt",
    "add_bank_inputs": ".onnx.banks",
    "add_drift_taps": ".onnx.taps",
    "apply_stat_bank": ".statbank",
    "data_flow_order": ".adapt",
    "export_onnx": ".onnx.export",
    "find_norm_layers": ".layers",
    "load_stat_bank": ".statbank",
    "recalibrate": ".recalibrate",
    "recalibrate_onnx": ".onnx.recalibrate",
    "save_stat_bank": ".statbank",
}
"""Public name -> the submodule defining it: imported on first use (PEP 562), so the
torch-free parts (``recalib.drift``, ``recalib.errors``, ``recalib.onnx.taps``) load
without torch - what the serving process imports."""

__version__ = "0.1.0"

__all__ = [
    "BankIndexError",
    "BankTables",
    "BatchNormFoldedError",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "BnGraphError",
    "ChannelMoments",
    "DEFAULTS",
    "DataError",
    "DivergedError",
    "ExportError",
    "ExportParityError",
    "ExportReport",
    "LayerMismatchError",
    "LayerReport",
    "NoBatchNormError",
    "NonFiniteError",
    "NormLayer",
    "NotConvergedError",
    "OnnxModelError",
    "OptionsError",
    "OutputError",
    "RecalibError",
    "RecalibOptions",
    "RecalibrationReport",
    "StatBank",
    "StatBankMismatchError",
    "PlanReport",
    "__version__",
    "adapt",
    "adapt_onnx",
    "add_bank_inputs",
    "add_drift_taps",
    "apply_stat_bank",
    "data_flow_order",
    "export_onnx",
    "find_norm_layers",
    "load_stat_bank",
    "recalibrate",
    "recalibrate_onnx",
    "save_stat_bank",
]

sys.modules[__name__].__class__ = LazyPackage
