"""The ONNX side of recalib: export with BN kept, in-graph recalibration, drift taps.

* :func:`export_onnx` (:mod:`.export`) - a torch model to ONNX with every BN node kept and
  a name map from ONNX statistics back to torch layers (:mod:`.names`).
* :func:`recalibrate_onnx` (:mod:`.recalibrate`) - re-estimate the statistics of an ONNX
  model from any framework, in-graph, with ONNX Runtime.
* :func:`add_drift_taps` (:mod:`.taps`) - per-channel BN-input moments as extra outputs.
* :class:`GraphIndex` (:mod:`.graph`) - the one look-up structure over a graph.
"""

from .export import ExportReport, export_onnx
from .graph import GraphIndex
from .recalibrate import OnnxModelError, recalibrate_onnx
from .taps import add_drift_taps

__all__ = [
    "ExportReport",
    "GraphIndex",
    "OnnxModelError",
    "add_drift_taps",
    "export_onnx",
    "recalibrate_onnx",
]
