"""What the torch and the ONNX recalibration entry points share about a run besides their
options (:mod:`recalib.options`): the convergence measure of eval-mode passes and the
optional progress bar."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from .options import MODES

__all__ = ["MODES", "Mode", "progress_bar", "relative_change"]

Mode = Literal["train", "eval"]


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
