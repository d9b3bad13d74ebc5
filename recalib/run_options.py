"""What the torch and the ONNX recalibration entry points share about a run besides their
options (:mod:`recalib.options`): the convergence measure of eval-mode passes and the
optional progress bar."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .options import MODES

__all__ = ["MODES", "Mode", "batch_total", "progress_bar", "relative_change"]

Mode = Literal["train", "eval"]


def relative_change(old: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], eps: float) -> float:
    """Largest change of a mean (in old standard deviations) or a variance (relative)."""
    om, ov = (t.double() for t in old)
    nm, nv = (t.double().to(om.device) for t in new)
    scale = ov.clamp(min=0) + eps
    dm = ((nm - om).abs() / scale.sqrt()).max()
    dv = ((nv - ov).abs() / scale).max()
    return float(torch.maximum(dm, dv))


def batch_total(
    data: Any, batch_size: int, max_samples: int | None = None, passes: int = 1
) -> int | None:
    """The most batches a run makes over ``data``, when that is known without iterating it:
    ``data`` is a tensor or array (batched along axis 0) or has a ``len()`` counted in
    batches (a DataLoader). ``None`` for an iterator or a generator."""
    if batch_size < 1 or passes < 1:
        return None
    if isinstance(data, Tensor | np.ndarray):
        if data.ndim == 0:
            return None
        n = int(data.shape[0])
        items = n if max_samples is None else min(n, max_samples)
        return -(-items // batch_size) * passes
    try:
        if iter(data) is data:  # one-shot: its length, if any, says nothing of the batches
            return None
        n = len(data)
    except TypeError:
        return None
    return int(n) * passes if max_samples is None else None


def progress_bar(enabled: bool, desc: str, total: int | None = None) -> Any:
    """A ``tqdm`` bar counting batches, or ``None`` when ``enabled`` is false.

    ``total``: the number of batches when it is known (see :func:`batch_total`), so the
    bar shows a fraction and an ETA; ``None`` counts without an end.
    """
    if not enabled:
        return None
    from tqdm.auto import tqdm  # lazy: only the CLI and explicit callers want it

    return tqdm(desc=desc, unit="batch", leave=False, total=total)
