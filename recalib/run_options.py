"""What the torch and the ONNX recalibration entry points share about a run: the argument
checks, the convergence measure of eval-mode passes and the optional progress bar."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from .errors import OptionsError
from .estimators import METHODS

__all__ = ["MODES", "Mode", "check_run_args", "progress_bar", "relative_change"]

Mode = Literal["train", "eval"]
MODES = ("train", "eval")


def check_run_args(
    method: str,
    mode: str,
    max_passes: int,
    tol: float,
    momentum: float | None,
    prior_strength: float | None,
    init: str,
) -> None:
    """Raise :class:`OptionsError` naming what was expected and what arrived for a bad option."""
    if method == "ema" and momentum is not None and not 0.0 < momentum <= 1.0:
        raise OptionsError(f"expected momentum in (0, 1] or None (got {momentum})")
    if method == "prior" and prior_strength is None:
        raise OptionsError("method='prior' needs prior_strength, the source's pseudo sample size")
    if method == "prior" and not (prior_strength is not None and prior_strength >= 0.0):
        raise OptionsError(f"expected prior_strength >= 0 (got {prior_strength})")
    if method not in METHODS:
        raise OptionsError(f"expected method in {METHODS} (got {method!r})")
    if init not in ("batch", "source"):
        raise OptionsError(f"expected init in ('batch', 'source') (got {init!r})")
    if mode not in MODES:
        raise OptionsError(f"expected mode in {MODES} (got {mode!r})")
    if max_passes < 1:
        raise OptionsError(f"expected max_passes >= 1 (got {max_passes})")
    if not tol >= 0:
        raise OptionsError(f"expected tol >= 0 (got {tol})")


def relative_change(old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], eps: float) -> float:
    """Largest change of a mean (in old standard deviations) or a variance (relative)."""
    om, ov = (t.double() for t in old)
    nm, nv = (t.double().to(om.device) for t in new)
    scale = ov.clamp(min=0) + eps
    dm = ((nm - om).abs() / scale.sqrt()).max()
    dv = ((nv - ov).abs() / scale).max()
    return float(torch.maximum(dm, dv))


def progress_bar(enabled: bool, desc: str) -> Any:
    """A ``tqdm`` bar counting batches, or ``None`` when ``enabled`` is false."""
    if not enabled:
        return None
    from tqdm.auto import tqdm  # lazy: only the CLI and explicit callers want it

    return tqdm(desc=desc, unit="batch", leave=False)
