"""Estimators that turn collected channel moments into new running statistics.

Each estimator sees the layer's *source* statistics (what the model held before) and the
moments of the layer's input on the calibration data, batch by batch, and produces the new
``running_mean`` and ``running_var`` in float64. ``running_var`` always follows PyTorch's
convention: the **unbiased** (``n - 1``) variance.

* ``exact``  - population mean/variance over every calibration sample and spatial position
  (AdaBN / PreciseBN, merged exactly, independent of the batch split).
* ``ema``    - BatchNorm's own update, batch by batch, starting from the source statistics:
  ``stat <- (1 - momentum) * stat + momentum * batch_stat`` with the unbiased batch
  variance; ``momentum=None`` is the cumulative average of batch statistics starting from
  nothing, i.e. exactly what ``torch.optim.swa_utils.update_bn`` computes.
* ``prior``  - Schneider et al. (2020): source statistics act as a prior worth
  ``prior_strength`` = N pseudo-samples, mixed with the exact target statistics from ``n``
  calibration samples (items along the batch axis, not spatial positions)::

      mean = N/(N+n) * mean_s + n/(N+n) * mean_t
      var  = N/(N+n) * var_s  + n/(N+n) * var_t

  The variance mix deliberately leaves out the between-means term
  ``N*n/(N+n)**2 * (mean_s - mean_t)**2``: the result is an estimate of the *target*
  domain's variance shrunk towards the source, not the variance of the pooled two-domain
  population; adding the term would inflate the variance by exactly the domain shift we are
  correcting for. This matches the paper's formula.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

from .moments import ChannelMoments
from .options import METHODS

__all__ = [
    "EmaEstimator",
    "ExactEstimator",
    "Method",
    "PriorEstimator",
    "StatEstimator",
    "make_estimator",
]

Method = Literal["exact", "ema", "prior"]


class StatEstimator(Protocol):
    """Accumulates batch moments of one layer and produces new running statistics."""

    def update(self, batch: ChannelMoments, num_items: int) -> None: ...

    def finalize(self) -> tuple[Tensor, Tensor]:
        """``(running_mean, running_var)`` in float64, the variance unbiased."""
        ...

    @property
    def moments(self) -> ChannelMoments:
        """Exact moments of everything seen so far (for reports and residuals)."""
        ...

    @property
    def num_items(self) -> int: ...


class ExactEstimator:
    """Population statistics over every sample seen (exact Chan merge)."""

    def __init__(self, num_channels: int, device: torch.device | str | None = None) -> None:
        self._moments = ChannelMoments.empty(num_channels, device)
        self._items = 0

    def update(self, batch: ChannelMoments, num_items: int) -> None:
        self._moments = self._moments.merge(batch)
        self._items += num_items

    def set_moments(self, moments: ChannelMoments, num_items: int) -> None:
        """Replace the accumulated moments (after a distributed all-gather)."""
        self._moments = moments
        self._items = num_items

    @property
    def moments(self) -> ChannelMoments:
        return self._moments

    @property
    def num_items(self) -> int:
        return self._items

    def finalize(self) -> tuple[Tensor, Tensor]:
        return self._moments.mean.clone(), self._moments.var(unbiased=True)


class EmaEstimator(ExactEstimator):
    """BatchNorm's exponential moving average (``momentum=None``: cumulative average)."""

    def __init__(self, source_mean: Tensor, source_var: Tensor, momentum: float | None) -> None:
        super().__init__(source_mean.numel(), source_mean.device)
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"expected momentum in (0, 1] or None (got {momentum})")
        self._momentum = momentum
        self._steps = 0
        if momentum is None:
            self._mean = torch.zeros_like(source_mean, dtype=torch.float64)
            self._var = torch.ones_like(source_var, dtype=torch.float64)
        else:
            self._mean = source_mean.to(torch.float64).clone()
            self._var = source_var.to(torch.float64).clone()

    def update(self, batch: ChannelMoments, num_items: int) -> None:
        super().update(batch, num_items)
        self._steps += 1
        factor = 1.0 / self._steps if self._momentum is None else self._momentum
        batch_var = batch.var(unbiased=True)
        self._mean = (1.0 - factor) * self._mean + factor * batch.mean
        self._var = (1.0 - factor) * self._var + factor * batch_var

    def finalize(self) -> tuple[Tensor, Tensor]:
        return self._mean.clone(), self._var.clone()


class PriorEstimator(ExactEstimator):
    """Schneider et al.: source statistics as a prior of ``prior_strength`` samples."""

    def __init__(self, source_mean: Tensor, source_var: Tensor, prior_strength: float) -> None:
        super().__init__(source_mean.numel(), source_mean.device)
        if not prior_strength >= 0.0:
            raise ValueError(f"expected prior_strength >= 0 (got {prior_strength})")
        self._strength = float(prior_strength)
        self._src_mean = source_mean.to(torch.float64)
        self._src_var = source_var.to(torch.float64)

    def finalize(self) -> tuple[Tensor, Tensor]:
        n = float(self.num_items)
        big_n = self._strength
        w_src = big_n / (big_n + n) if big_n + n > 0 else 1.0
        w_tgt = 1.0 - w_src
        mean_t, var_t = super().finalize()
        return w_src * self._src_mean + w_tgt * mean_t, w_src * self._src_var + w_tgt * var_t


def make_estimator(
    method: str,
    *,
    source_mean: Tensor,
    source_var: Tensor,
    momentum: float | None = 0.1,
    prior_strength: float | None = None,
) -> ExactEstimator:
    """Build the estimator for ``method`` (``"exact"``, ``"ema"`` or ``"prior"``)."""
    if method == "exact":
        return ExactEstimator(source_mean.numel(), source_mean.device)
    if method == "ema":
        return EmaEstimator(source_mean, source_var, momentum)
    if method == "prior":
        if prior_strength is None:
            raise ValueError("method='prior' needs prior_strength (got None)")
        return PriorEstimator(source_mean, source_var, prior_strength)
    raise ValueError(f"expected method in {METHODS} (got {method!r})")
