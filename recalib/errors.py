"""The error hierarchy of the recalibration core.

Every failure the core detects in its inputs is a :class:`RecalibError` (a ``ValueError``),
so callers can catch one type; the service maps each subclass to an HTTP status in one
place. Messages say what was expected and what arrived.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BankIndexError",
    "BatchNormFoldedError",
    "BnGraphError",
    "DataError",
    "DivergedError",
    "ExportError",
    "ExportParityError",
    "LayerMismatchError",
    "NoBatchNormError",
    "NonFiniteError",
    "NotConvergedError",
    "OnnxModelError",
    "OptionsError",
    "OutputError",
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


class NotConvergedError(RecalibError):
    """``mode="eval"`` stopped (``max_passes``) before its fixed point was reached to ``tol``.

    Raised after the model's original statistics were restored, unless the run was asked
    to keep unconverged statistics (``allow_unconverged=True``).

    Attributes:
        report: the :class:`~recalib.report.RecalibrationReport` of the statistics that
            were *not* written (``None`` when none could be built).
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class DivergedError(NotConvergedError, NonFiniteError):
    """The eval fixed-point iteration blew up: NaN/Inf reached a layer, or an estimate left
    the range of the stored dtype, in a pass that started from earlier passes' estimates.

    Never written, whatever ``allow_unconverged`` says. Also a :class:`NonFiniteError`.
    """

    def __init__(self, message: str, *, layer: str, batch: int = -1, passes: int = 0) -> None:
        ValueError.__init__(self, message)
        self.report = None
        self.layer = layer
        self.batch = batch
        self.passes = passes


class LayerMismatchError(RecalibError):
    """A layer's input does not match its running statistics (e.g. channel count)."""


class StatBankMismatchError(RecalibError):
    """A statistics bank was saved from a model with a different layer signature."""


class BankIndexError(RecalibError):
    """A per-row bank index of a stat-bank graph is not an integer in ``[-1, banks)``."""


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


class OutputError(RecalibError):
    """The model's output is not what was needed (class scores ``(N, classes, *)``)."""
