"""The error hierarchy of the recalibration core.

Every failure the core detects in its inputs is a :class:`RecalibError` (a ``ValueError``),
so callers can catch one type; the service maps each subclass to an HTTP status in one
place. Messages say what was expected and what arrived.
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "LayerMismatchError",
    "NoBatchNormError",
    "NonFiniteError",
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
