"""Layer taps of the torch core: a selected layer's ``forward`` is replaced, for one pass,
by a :class:`LayerTap` that reduces the layer's input to per-channel moments and then
normalises it with the batch's own statistics or the layer's current running statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .errors import DataError, LayerMismatchError, NonFiniteError
from .estimators import ExactEstimator
from .layers import NormLayer
from .moments import ChannelMoments, batch_moments

__all__ = ["LayerTap", "installed"]


@dataclass
class LayerTap:
    """Replaces one layer's forward during a pass; collects its input moments."""

    layer: NormLayer
    use_batch_stats: bool
    make: Callable[[NormLayer], ExactEstimator]
    strict_batch_stats: bool = True
    batch_index: int = 0
    estimator: ExactEstimator | None = None
    batches: int = field(default=0)

    def __call__(self, input: Tensor) -> Tensor:
        m = self.layer.module
        m._check_input_dim(input)  # type: ignore[no-untyped-call]
        rm, rv = m.running_mean, m.running_var
        if rm is None or rv is None:
            raise LayerMismatchError(f"layer {self.layer.name!r} lost its running statistics")
        if input.dim() < 2 or input.shape[1] != rm.numel():
            got = tuple(input.shape)
            raise LayerMismatchError(
                f"layer {self.layer.name!r} expected input (N, {rm.numel()}, *) with "
                f"{rm.numel()} channels (got shape {got})"
            )
        var, mean, n = batch_moments(input)
        moments = ChannelMoments.from_var_mean(var, mean, n)
        if not bool(torch.isfinite(moments.m2).all() and torch.isfinite(moments.mean).all()):
            raise NonFiniteError(batch=self.batch_index, layer=self.layer.name)
        batch_stats = self.use_batch_stats and (n >= 2 or self.strict_batch_stats)
        if batch_stats and n < 2:
            raise DataError(
                f"mode='train' needs more than 1 value per channel in layer "
                f"{self.layer.name!r} (got input size {list(input.shape)}); use mode='eval', "
                "which works with any batch size"
            )
        if self.estimator is None:
            self.estimator = self.make(self.layer)
        self.estimator.update(moments, int(input.shape[0]))
        self.batches += 1
        if batch_stats:
            mean_n, var_n = mean.to(rm.dtype), var.to(rv.dtype)
        else:
            mean_n, var_n = rm, rv
        return F.batch_norm(input, mean_n, var_n, m.weight, m.bias, False, 0.0, m.eps)


@contextmanager
def installed(taps: Sequence[LayerTap]) -> Any:
    saved = []
    for tap in taps:
        mod = tap.layer.module
        saved.append((mod, mod.__dict__.get("forward")))
        mod.forward = tap  # type: ignore[method-assign]
    try:
        yield
    finally:
        for mod, previous in saved:
            if previous is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = previous  # type: ignore[method-assign]
