"""Layer taps of the torch core: for one pass, a selected layer's ``forward`` is replaced by
a :class:`LayerTap` that reduces the layer's input to per-channel moments and then runs the
layer's *own* forward, normalising either with the batch's statistics or with the running
statistics currently in the layer's buffers.

The layer's own forward (its class's, or one already set on the instance) is kept, so a
layer that does more than normalise stays itself: timm's ``BatchNormAct2d`` still applies
its activation, a user subclass its extra step. To normalise with the batch's statistics
the tap does not switch the layer to training mode (which would also update the buffers,
advance ``num_batches_tracked``, run Batch Renorm's ``r``/``d`` correction or try to
synchronise a ``SyncBatchNorm``); it lends the layer the batch's moments in place of its
``running_mean``/``running_var`` for the one eval-mode call and puts the buffers back. The
moments are the ones the tap has already reduced, so this costs no second reduction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .errors import DataError, LayerMismatchError, NonFiniteError
from .estimators import ExactEstimator
from .layers import NormLayer
from .moments import ChannelMoments, batch_moments

__all__ = ["LayerTap", "installed", "lent_statistics"]


@contextmanager
def lent_statistics(module: nn.Module, mean: Tensor, var: Tensor) -> Iterator[None]:
    """``module.running_mean``/``running_var`` are ``mean``/``var`` inside the block.

    The original buffer tensors (not copies) are put back on exit, so anything sharing
    them (an exported program's state dict) is untouched. The swap goes straight into the
    module's buffer dict: a loan for one call is no buffer registration, and torch's global
    buffer-registration hooks must not see it.
    """
    slots = module._buffers
    if "running_mean" not in slots or "running_var" not in slots:
        raise LayerMismatchError(
            f"expected running_mean/running_var buffers on {type(module).__name__} "
            f"(got buffers {sorted(slots)})"
        )
    old_mean, old_var = slots["running_mean"], slots["running_var"]
    slots["running_mean"], slots["running_var"] = mean, var
    try:
        yield
    finally:
        slots["running_mean"], slots["running_var"] = old_mean, old_var


@dataclass
class LayerTap:
    """Replaces one layer's forward during a pass; collects its input moments.

    Args:
        layer: the layer.
        use_batch_stats: normalise with the batch's statistics (else the running ones).
        make: builds the layer's estimator at its first batch.
        strict_batch_stats: a batch with one value per channel is an error (``mode="train"``)
            rather than normalised with the running statistics (eval mode's warm pass).
        inner: the forward set on the instance before the tap (``None``: the class's).
        synchronise: called with the tap after each call's moments reached the estimator
            and before the layer normalises (eval mode's lockstep pass waits there for
            the other batches and writes the merged statistics).
    """

    layer: NormLayer
    use_batch_stats: bool
    make: Callable[[NormLayer], ExactEstimator]
    strict_batch_stats: bool = True
    batch_index: int = 0
    estimator: ExactEstimator | None = None
    batches: int = field(default=0)
    inner: Callable[..., Any] | None = None
    synchronise: Callable[[LayerTap], None] | None = None

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
        # One sum for both checks: any NaN/Inf in either makes it non-finite.
        if not math.isfinite(float((var + mean).sum())):
            raise NonFiniteError(batch=self.batch_index, layer=self.layer.name)
        moments = ChannelMoments.from_var_mean(var, mean, n)
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
        if self.synchronise is not None:
            self.synchronise(self)
        if not batch_stats:
            return self._own_forward(input)
        with lent_statistics(m, mean.to(rm.dtype), var.to(rv.dtype)):
            return self._own_forward(input)

    def _own_forward(self, input: Tensor) -> Tensor:
        if self.inner is not None:
            out: Tensor = self.inner(input)
            return out
        # The class's forward, called directly: the module's hooks already ran around us.
        out = type(self.layer.module).forward(self.layer.module, input)
        return out


@contextmanager
def installed(taps: Sequence[LayerTap]) -> Any:
    """Each tap replaces its layer's ``forward`` on the instance inside the block."""
    saved = []
    for tap in taps:
        mod = tap.layer.module
        previous = mod.__dict__.get("forward")
        saved.append((mod, previous))
        tap.inner = previous
        mod.forward = tap  # type: ignore[method-assign]
    try:
        yield
    finally:
        for mod, previous in saved:
            if previous is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = previous  # type: ignore[method-assign]
