"""recalib: re-estimate BatchNorm / Batch Renormalization statistics for a new domain.

The public API::

    report = recalib.recalibrate(model, data, method="exact", mode="train")
    recalib.save_stat_bank(model, "domain_b.safetensors")
    recalib.export_onnx(model, example, "model.onnx")        # BN kept, parity-checked
    tapped = recalib.add_drift_taps(onnx.load("model.onnx"))  # in-graph BN input moments

``recalib.drift`` holds the drift math (symmetric KL, mergeable/rolling windows).
"""

from .adapt import adapt, adapt_onnx, data_flow_order
from .errors import (
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
from .onnx.export import ExportReport, export_onnx
from .onnx.recalibrate import recalibrate_onnx
from .onnx.taps import add_drift_taps
from .options import DEFAULTS, RecalibOptions
from .plans import PlanReport
from .recalibrate import recalibrate
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .report import LayerReport, RecalibrationReport
from .statbank import StatBank, apply_stat_bank, load_stat_bank, save_stat_bank

__version__ = "0.1.0"

__all__ = [
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
