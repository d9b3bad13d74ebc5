"""The error hierarchy of the recalibration core.

Every failure the core detects in its inputs is a :class:`RecalibError` (a ``ValueError``),
so callers can catch one type; the service maps each subclass to an HTTP status in one
place. Messages say what was expected and what arrived.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BatchNormFoldedError",
    "BnGraphError",
    "DataError",
    "ExportError",
    "ExportParityError",
    "LayerMismatchError",
    "NoBatchNormError",
    "NonFiniteError",
    "OnnxModelError",
    "OptionsError",
    "RecalibError",
    "StatBankMismatchError",
]


class RecalibError(ValueError):
    """Base class of every input error raised by :mod:`recalib`."""


class NoBatchNormError(RecalibError):
    """The model (or the ``layers=`` selection) has no layer with running statistics."""


class DataError(RecalibError):
    """The calibration data is empty, of the wrong type, shape or dtype."""


class NonFiniteError(DataError):
    """NaN or Inf reached a normalization layer's input."""

    def __init__(self, *, batch: int, layer: str, what: str = "NaN/Inf") -> None:
        self.batch = batch
        self.layer = layer
        super().__init__(
            f"{what} in the input of layer {layer!r} at batch {batch}; "
            "expected finite values (the model's statistics were left untouched)"
        )


class LayerMismatchError(RecalibError):
    """A layer's input does not match its running statistics (e.g. channel count)."""


class StatBankMismatchError(RecalibError):
    """A statistics bank was saved from a model with a different layer signature."""


class OptionsError(RecalibError):
    """An option of a recalibration run is out of range or of the wrong type."""


class BnGraphError(RecalibError):
    """An ONNX graph's BN statistics cannot be found, read or written as asked."""


class OnnxModelError(RecalibError):
    """The ONNX model cannot be read, loaded by ONNX Runtime, or recalibrated as given."""


class ExportError(RecalibError):
    """The model cannot be exported with its BN layers kept and identified."""


class BatchNormFoldedError(ExportError):
    """The exported graph has fewer BN nodes than the model has BN calls."""


class ExportParityError(ExportError):
    """ONNX Runtime's outputs differ from torch's by more than the tolerance.

    Attributes:
        report: the :class:`~recalib.onnx.export.ExportReport` of the failed check (the
            file was not written).
    """

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report
