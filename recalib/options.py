"""One frozen options type for a recalibration run, validated once.

:func:`recalib.recalibrate` and :func:`recalib.recalibrate_onnx` build a
:class:`RecalibOptions` from their keyword arguments before touching the model, so both
refuse a bad option with the same :class:`~recalib.errors.OptionsError` (one line: what
was expected, what arrived); the CLI and the service's job request take their defaults
from :data:`DEFAULTS`, so the three entry points cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import OptionsError

__all__ = ["DEFAULTS", "INITS", "METHODS", "MODES", "RecalibOptions"]

METHODS: tuple[str, ...] = ("exact", "ema", "prior")
"""The estimators of new running statistics (:mod:`recalib.estimators`), by name."""

MODES = ("train", "eval")
INITS = ("batch", "source")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RecalibOptions:
    """How statistics are estimated (see :func:`recalib.recalibrate` for each field).

    Args:
        method: ``"exact"``, ``"ema"`` or ``"prior"``.
        mode: ``"train"`` (one pass, batch statistics) or ``"eval"`` (the eval-consistent
            fixed point). The default of every entry point.
        prior_strength: the source's pseudo sample size ``N`` (``method="prior"``).
        momentum: EMA weight of a new batch (``method="ema"``), ``None`` for the average.
        max_passes: the most passes of ``mode="eval"``.
        tol: ``mode="eval"`` convergence tolerance.
        max_samples: stop after this many items.
        batch_size: chunk size for one array or tensor.
        init: ``mode="eval"`` start, ``"batch"`` or ``"source"``.
        anchor: items of the lockstep eval pass (``None``: bounded by memory).
        allow_unconverged: write unconverged eval-mode statistics instead of refusing.

    Raises:
        OptionsError: an option out of range or of the wrong type.
    """

    method: str = "exact"
    mode: str = "train"
    prior_strength: float | None = None
    momentum: float | None = 0.1
    max_passes: int = 10
    tol: float = 1e-4
    max_samples: int | None = None
    batch_size: int = 64
    init: str = "batch"
    anchor: int | None = None
    allow_unconverged: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OptionsError(f"expected method in {METHODS} (got {self.method!r})")
        if self.mode not in MODES:
            raise OptionsError(f"expected mode in {MODES} (got {self.mode!r})")
        if self.init not in INITS:
            raise OptionsError(f"expected init in {INITS} (got {self.init!r})")
        if self.method == "prior" and self.prior_strength is None:
            raise OptionsError(
                "method='prior' needs prior_strength, the source's pseudo sample size"
            )
        if self.prior_strength is not None and not (
            _is_number(self.prior_strength) and 0.0 <= self.prior_strength < math.inf
        ):
            raise OptionsError(f"expected prior_strength >= 0 (got {self.prior_strength})")
        if self.momentum is not None and not (
            _is_number(self.momentum) and 0.0 < self.momentum <= 1.0
        ):
            raise OptionsError(f"expected momentum in (0, 1] or None (got {self.momentum})")
        if not (_is_int(self.max_passes) and self.max_passes >= 1):
            raise OptionsError(f"expected max_passes >= 1 (got {self.max_passes})")
        if not (_is_number(self.tol) and 0.0 <= self.tol < math.inf):
            raise OptionsError(f"expected tol >= 0 (got {self.tol})")
        if self.max_samples is not None and not (
            _is_int(self.max_samples) and self.max_samples >= 1
        ):
            raise OptionsError(f"expected max_samples >= 1 or None (got {self.max_samples})")
        if not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise OptionsError(f"expected batch_size >= 1 (got {self.batch_size})")
        if self.anchor is not None and not (_is_int(self.anchor) and self.anchor >= 0):
            raise OptionsError(f"expected anchor to be an int >= 0 or None (got {self.anchor!r})")
        if not isinstance(self.allow_unconverged, bool):
            raise OptionsError(
                f"expected allow_unconverged True or False (got {self.allow_unconverged!r})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULTS = RecalibOptions()
"""The defaults every entry point uses (Python, CLI, service job request)."""
