"""recalib: re-estimate BatchNorm / Batch Renormalization statistics for a new domain.

The public API::

    report = recalib.recalibrate(model, data, method="exact", mode="train")
    recalib.save_stat_bank(model, "domain_b.safetensors")
    recalib.export_onnx(model, example, "model.onnx")        # BN kept, parity-checked
    tapped = recalib.add_drift_taps(onnx.load("model.onnx"))  # in-graph BN input moments

``recalib.drift`` holds the drift math (symmetric KL, mergeable/rolling windows).
"""

from .errors import (
    DataError,
    LayerMismatchError,
    NoBatchNormError,
    NonFiniteError,
    RecalibError,
    StatBankMismatchError,
)
from .export import ExportReport, export_onnx
from .layers import NormLayer, find_norm_layers
from .moments import ChannelMoments
from .onnx_recalibrate import OnnxModelError, recalibrate_onnx
from .recalibrate import recalibrate
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .report import LayerReport, RecalibrationReport
from .statbank import StatBank, apply_stat_bank, load_stat_bank, save_stat_bank
from .taps import add_drift_taps

__version__ = "0.1.0"

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ChannelMoments",
    "DataError",
    "ExportReport",
    "LayerMismatchError",
    "LayerReport",
    "NoBatchNormError",
    "NonFiniteError",
    "NormLayer",
    "OnnxModelError",
    "RecalibError",
    "RecalibrationReport",
    "StatBank",
    "StatBankMismatchError",
    "__version__",
    "add_drift_taps",
    "apply_stat_bank",
    "export_onnx",
    "find_norm_layers",
    "load_stat_bank",
    "recalibrate",
    "recalibrate_onnx",
    "save_stat_bank",
]
