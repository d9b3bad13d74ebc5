"""The ONNX side of recalib: export with BN kept, in-graph recalibration, drift taps.

* :func:`export_onnx` (:mod:`.export`) - a torch model to ONNX with every BN node kept and
  a name map from ONNX statistics back to torch layers (:mod:`.names`).
* :func:`recalibrate_onnx` (:mod:`.recalibrate`) - re-estimate the statistics of an ONNX
  model from any framework, in-graph, with ONNX Runtime.
* :func:`add_drift_taps` (:mod:`.taps`) - per-channel BN-input moments as extra outputs.
* :func:`add_bank_inputs`, :class:`BankTables` (:mod:`.banks`) - many stat banks in one
  graph, chosen per row or routed in-graph to the nearest bank; :func:`bank_route_limit`
  (:mod:`.bank_routing`) - a bank's own fallback limit from its calibration data.
* :func:`weights_digest`, :func:`save_onnx_bank`, :func:`read_bank_file`
  (:mod:`.bank_files`) - bank files stamped with the weights they were computed with.
* :class:`GraphIndex` (:mod:`.graph`) - the one look-up structure over a graph.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from .._lazy import LazyPackage

if TYPE_CHECKING:
    from .bank_files import read_bank_file, save_onnx_bank, weights_digest
    from .bank_routing import bank_route_limit
    from .banks import BankTables, add_bank_inputs, read_bank_spec
    from .export import ExportReport, export_onnx
    from .graph import GraphIndex
    from .recalibrate import OnnxModelError, recalibrate_onnx
    from .taps import add_drift_taps

_LAZY: dict[str, str] = {
    "BankTables": ".banks",
    "ExportReport": ".export",
    "GraphIndex": ".graph",
    "OnnxModelError": ".recalibrate",
    "add_bank_inputs": ".banks",
    "add_drift_taps": ".taps",
    "bank_route_limit": ".bank_routing",
    "export_onnx": ".export",
    "read_bank_file": ".bank_files",
    "read_bank_spec": ".banks",
    "recalibrate_onnx": ".recalibrate",
    "save_onnx_bank": ".bank_files",
    "weights_digest": ".bank_files",
}
"""Imported on first use: ``recalib.onnx.taps``, ``.banks`` and ``.names`` (what serving
needs) load without torch."""

__all__ = [
    "BankTables",
    "ExportReport",
    "GraphIndex",
    "OnnxModelError",
    "add_bank_inputs",
    "add_drift_taps",
    "bank_route_limit",
    "export_onnx",
    "read_bank_file",
    "read_bank_spec",
    "recalibrate_onnx",
    "save_onnx_bank",
    "weights_digest",
]

sys.modules[__name__].__class__ = LazyPackage
