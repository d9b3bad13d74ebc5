"""Batch Renormalization layers (Ioffe 2017), drop-in subclasses of torch's ``_BatchNorm``.

In training, Batch Renormalization normalizes with the batch statistics but corrects the
result towards the moving statistics, so that training sees the same transform inference
will use::

    r  = stop_grad(clip(sigma_B / sigma, 1/rmax, rmax))
    d  = stop_grad(clip((mu_B - mu) / sigma, -dmax, dmax))
    x^ = (x - mu_B) / sigma_B * r + d
    y  = gamma * x^ + beta

with ``sigma_B = sqrt(var_B + eps)`` (biased batch variance, as BN normalizes) and
``sigma = sqrt(running_var + eps)``. The moving statistics are updated *after* ``r`` and
``d`` are computed, exactly as :class:`torch.nn.BatchNorm2d` updates them (``momentum``
weighs the new value, ``momentum=None`` is a cumulative average, ``running_var`` is
unbiased). In eval mode the layers are plain BN with the moving statistics (``r = 1``,
``d = 0``): the forward calls :func:`torch.nn.functional.batch_norm`, so the layers export
to ONNX as ``BatchNormalization`` and are recalibrated exactly like BN.

The layers keep torch's buffer names (``running_mean``, ``running_var``,
``num_batches_tracked``), so their state dicts are interchangeable with ``BatchNorm*d`` and
every ``isinstance(m, _BatchNorm)`` search finds them.
"""

from __future__ import annotations

import math
from typing import TypeAlias

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from recalib.moments import reduce_dims

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "renorm_factors"]

# A scalar bound: a Python float, or a 0-d tensor when a schedule makes it step-dependent
# (computed on the device, so the training step never waits for the host).
Bound: TypeAlias = float | Tensor


def renorm_factors(
    batch_mean: Tensor,
    batch_std: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    *,
    rmax: Bound,
    dmax: Bound,
) -> tuple[Tensor, Tensor]:
    r"""The Batch Renormalization corrections ``r`` and ``d``, detached from the graph.

    .. math::
        r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}(\sigma_B / \sigma), \qquad
        d = \mathrm{clip}_{[-d_{max},\, d_{max}]}((\mu_B - \mu) / \sigma)

    Both are returned detached: Batch Renormalization treats them as constants in
    backpropagation. ``rmax=1, dmax=0`` gives ``r = 1, d = 0`` (plain BN).

    Args:
        batch_mean: per-channel batch mean :math:`\mu_B`.
        batch_std: per-channel batch standard deviation :math:`\sigma_B = \sqrt{var_B + eps}`.
        running_mean: per-channel moving mean :math:`\mu`.
        running_std: per-channel moving standard deviation
            :math:`\sigma = \sqrt{running\_var + eps}`.
        rmax: upper bound of ``r`` (its lower bound is ``1 / rmax``), a float or 0-d tensor.
        dmax: bound of ``|d|``, a float or 0-d tensor.

    Shape:
        - All four statistics: :math:`(C)`.
        - Output: ``(r, d)``, each :math:`(C)`.
    """
    with torch.no_grad():
        ratio = batch_std / running_std
        shift = (batch_mean - running_mean) / running_std
        if isinstance(rmax, Tensor):
            r = torch.minimum(torch.maximum(ratio, 1.0 / rmax), rmax)
        else:
            r = ratio.clamp(1.0 / rmax, rmax)
        if isinstance(dmax, Tensor):
            d = torch.minimum(torch.maximum(shift, -dmax), dmax)
        else:
            d = shift.clamp(-dmax, dmax)
    return r, d


def _check_rmax(value: float) -> float:
    if not (math.isfinite(value) and value >= 1.0):
        raise ValueError(f"expected rmax to be a finite number >= 1 (got {value})")
    return float(value)


def _check_dmax(value: float) -> float:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"expected dmax to be a finite number >= 0 (got {value})")
    return float(value)


def _check_steps(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected {name} to be an int >= 0 (got {value!r})")
    return value


def _ramp_fraction(steps: Tensor, start: int, length: int) -> Tensor:
    """How far (0 to 1) the clipping has moved from plain BN to its target after ``steps``."""
    if length == 0:
        return (steps >= start).to(torch.float32)
    return ((steps - start).to(torch.float32) / length).clamp(0.0, 1.0)


def _check_batch_size(input: Tensor) -> None:
    # torch's message, so code that handles BN's error handles ours.
    if input.numel() // input.size(1) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )


_ARGS_DOC = r"""
        num_features: number of channels :math:`C` of the input.
        eps: value added to the variance for numerical stability. Default: ``1e-5``.
        momentum: weight of the new batch statistic in the moving averages; ``None`` for a
            cumulative moving average (as in :class:`torch.nn.BatchNorm2d`). Default: ``0.1``.
        affine: whether the layer has learnable ``weight`` (:math:`\gamma`) and ``bias``
            (:math:`\beta`). Default: ``True``.
        track_running_stats: whether the layer keeps moving statistics. Without them there
            is nothing to renormalize towards and the layer is plain BN (``r = 1, d = 0``),
            using batch statistics in training and in eval mode. Default: ``True``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        rmax: target bound of ``r`` (``r`` is clipped to ``[1/rmax, rmax]``); ``rmax >= 1``.
            Settable attribute. Default: ``3.0``.
        dmax: target bound of ``|d|``; ``dmax >= 0``. Settable attribute. Default: ``5.0``.
        warmup_steps: number of training steps run as plain BN (``rmax=1, dmax=0``) before
            the clipping relaxes. Default: ``0``.
        rmax_ramp_steps: steps, after the warm-up, over which the bound of ``r`` grows
            linearly from 1 to ``rmax``; ``0`` jumps to ``rmax`` at once. Default: ``0``.
        dmax_ramp_steps: steps, after the warm-up, over which the bound of ``|d|`` grows
            linearly from 0 to ``dmax``; ``0`` jumps to ``dmax`` at once. Default: ``0``.

    The schedule counts training steps with ``num_batches_tracked`` (so it survives a state
    dict round trip): after ``n`` tracked batches the next training forward clips with

    .. math::
        r_{max}(n) = 1 + (r_{max} - 1)\,\mathrm{clip}_{[0,1]}((n - w) / R), \qquad
        d_{max}(n) = d_{max}\,\mathrm{clip}_{[0,1]}((n - w) / D)

    (``w`` warm-up steps, ``R``/``D`` ramp steps; a zero ramp is a step at ``n = w``). The
    default (all zero) applies ``rmax``/``dmax`` from the first step. The paper's schedule
    (plain BN for 5k steps, ``rmax=3`` reached at 40k steps, ``dmax=5`` at 25k) is
    ``warmup_steps=5000, rmax_ramp_steps=35000, dmax_ramp_steps=20000``.

    ``SyncBatchNorm.convert_sync_batchnorm`` replaces these layers by plain
    :class:`torch.nn.SyncBatchNorm` (it matches every ``_BatchNorm``).
"""


class _BatchRenorm(_BatchNorm):
    r"""Common base of :class:`BatchRenorm1d`, :class:`BatchRenorm2d`, :class:`BatchRenorm3d`.

    Holds the arguments, the training transform (see the module docstring) and the
    clipping schedule; subclasses only check the input's number of dimensions.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        rmax_ramp_steps: int = 0,
        dmax_ramp_steps: int = 0,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.rmax = rmax
        self.dmax = dmax
        self.warmup_steps = warmup_steps
        self.rmax_ramp_steps = rmax_ramp_steps
        self.dmax_ramp_steps = dmax_ramp_steps

    @property
    def rmax(self) -> float:
        """Target upper bound of ``r`` (``>= 1``)."""
        return self._rmax

    @rmax.setter
    def rmax(self, value: float) -> None:
        self._rmax = _check_rmax(value)

    @property
    def dmax(self) -> float:
        """Target bound of ``|d|`` (``>= 0``)."""
        return self._dmax

    @dmax.setter
    def dmax(self, value: float) -> None:
        self._dmax = _check_dmax(value)

    @property
    def warmup_steps(self) -> int:
        """Training steps run as plain BN before the clipping relaxes."""
        return self._warmup_steps

    @warmup_steps.setter
    def warmup_steps(self, value: int) -> None:
        self._warmup_steps = _check_steps("warmup_steps", value)

    @property
    def rmax_ramp_steps(self) -> int:
        """Steps after the warm-up over which the bound of ``r`` grows from 1 to ``rmax``."""
        return self._rmax_ramp_steps

    @rmax_ramp_steps.setter
    def rmax_ramp_steps(self, value: int) -> None:
        self._rmax_ramp_steps = _check_steps("rmax_ramp_steps", value)

    @property
    def dmax_ramp_steps(self) -> int:
        """Steps after the warm-up over which the bound of ``|d|`` grows from 0 to ``dmax``."""
        return self._dmax_ramp_steps

    @dmax_ramp_steps.setter
    def dmax_ramp_steps(self, value: int) -> None:
        self._dmax_ramp_steps = _check_steps("dmax_ramp_steps", value)

    @property
    def _scheduled(self) -> bool:
        return self.warmup_steps + self.rmax_ramp_steps + self.dmax_ramp_steps > 0

    def _bounds_at(self, steps: Tensor) -> tuple[Tensor, Tensor]:
        frac_r = _ramp_fraction(steps, self.warmup_steps, self.rmax_ramp_steps)
        frac_d = _ramp_fraction(steps, self.warmup_steps, self.dmax_ramp_steps)
        return 1.0 + (self.rmax - 1.0) * frac_r, self.dmax * frac_d

    def clipping_at(self, steps: int) -> tuple[float, float]:
        """The ``(rmax, dmax)`` a training forward uses after ``steps`` tracked batches."""
        _check_steps("steps", steps)
        rmax, dmax = self._bounds_at(torch.tensor(steps))
        return float(rmax), float(dmax)

    def current_clipping(self) -> tuple[float, float]:
        """The ``(rmax, dmax)`` the next training forward will use.

        Read from ``num_batches_tracked`` and the schedule; ``(1.0, 0.0)`` (plain BN) when
        the layer keeps no moving statistics.
        """
        if not self.track_running_stats or self.num_batches_tracked is None:
            return 1.0, 0.0
        return self.clipping_at(int(self.num_batches_tracked.item()))

    def _clipping(self, like: Tensor) -> tuple[Bound, Bound]:
        if not self._scheduled or self.num_batches_tracked is None:
            return self.rmax, self.dmax
        rmax, dmax = self._bounds_at(self.num_batches_tracked)
        return rmax.to(like.dtype), dmax.to(like.dtype)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        renorm = (
            self.training
            and self.track_running_stats
            and self.running_mean is not None
            and self.running_var is not None
            and self.num_batches_tracked is not None
        )
        if not renorm:
            # Eval, or no moving statistics: exactly BN (and a BatchNormalization node in ONNX).
            return super().forward(input)
        return self._renorm_forward(input)

    def _renorm_forward(self, input: Tensor) -> Tensor:
        _check_batch_size(input)
        if input.size(1) != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels (got {input.size(1)} channels)"
            )
        # fp16/bf16 statistics overflow and lose precision: compute them in float32.
        stats_dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else None
        x = input if stats_dtype is None else input.to(stats_dtype)
        var_b, mean_b = torch.var_mean(x, dim=reduce_dims(x.dim()), correction=0)
        std_b = (var_b + self.eps).sqrt()
        running_mean, running_var = self._moving_stats(x.dtype)
        running_std = (running_var + self.eps).sqrt()
        rmax, dmax = self._clipping(x)
        r, d = renorm_factors(mean_b, std_b, running_mean, running_std, rmax=rmax, dmax=dmax)
        self._update_moving_stats(mean_b, var_b, count=x.numel() // x.size(1))
        # y = gamma * ((x - mu_B) / sigma_B * r + d) + beta, as one scale and one shift.
        scale = r / std_b
        shift = d
        if self.weight is not None:
            scale = scale * self.weight.to(x.dtype)
            shift = shift * self.weight.to(x.dtype)
        if self.bias is not None:
            shift = shift + self.bias.to(x.dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean_b.view(shape)) * scale.view(shape) + shift.view(shape)
        return y.to(input.dtype)

    def _moving_stats(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self.running_mean is None or self.running_var is None:
            raise RuntimeError("expected moving statistics (got running_mean/running_var None)")
        return self.running_mean.to(dtype), self.running_var.to(dtype)

    @torch.no_grad()
    def _update_moving_stats(self, mean_b: Tensor, var_b: Tensor, *, count: int) -> None:
        """Torch BN's update: new = (1 - m) * old + m * batch, unbiased variance."""
        if self.running_mean is None or self.running_var is None:
            raise RuntimeError("expected moving statistics (got running_mean/running_var None)")
        if self.num_batches_tracked is None:
            raise RuntimeError("expected num_batches_tracked (got None)")
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased_var = var_b * (count / (count - 1))
        for buf, new in ((self.running_mean, mean_b), (self.running_var, unbiased_var)):
            buf.copy_(buf * (1.0 - factor) + new.to(buf.dtype) * factor)

    def extra_repr(self) -> str:
        base: str = super().extra_repr()  # type: ignore[no-untyped-call]  # torch leaves it untyped
        return (
            f"{base}, rmax={self.rmax}, dmax={self.dmax}, "
            f"warmup_steps={self.warmup_steps}, rmax_ramp_steps={self.rmax_ramp_steps}, "
            f"dmax_ramp_steps={self.dmax_ramp_steps}"
        )


class BatchRenorm1d(_BatchRenorm):
    r"""Batch Renormalization over a 2D or 3D input (Ioffe 2017).

        A drop-in replacement for :class:`torch.nn.BatchNorm1d`; see :mod:`recalib.renorm` for
        the training transform.

        Args:
    {args}

        Shape:
            - Input: :math:`(N, C)` or :math:`(N, C, L)`.
            - Output: same shape as the input.

        Examples::

            >>> m = BatchRenorm1d(100, rmax=3.0, dmax=5.0)
            >>> y = m(torch.randn(20, 100))
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchRenorm2d(_BatchRenorm):
    r"""Batch Renormalization over a 4D input (Ioffe 2017).

        A drop-in replacement for :class:`torch.nn.BatchNorm2d`; see :mod:`recalib.renorm` for
        the training transform.

        Args:
    {args}

        Shape:
            - Input: :math:`(N, C, H, W)`.
            - Output: same shape as the input.

        Examples::

            >>> # the paper's schedule: BN for 5k steps, rmax=3 at 40k steps, dmax=5 at 25k
            >>> m = BatchRenorm2d(
            ...     64, warmup_steps=5000, rmax_ramp_steps=35000, dmax_ramp_steps=20000
            ... )
            >>> y = m(torch.randn(8, 64, 16, 16))
            >>> m.current_clipping()
            (1.0, 0.0)
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchRenorm3d(_BatchRenorm):
    r"""Batch Renormalization over a 5D input (Ioffe 2017).

        A drop-in replacement for :class:`torch.nn.BatchNorm3d`; see :mod:`recalib.renorm` for
        the training transform.

        Args:
    {args}

        Shape:
            - Input: :math:`(N, C, D, H, W)`.
            - Output: same shape as the input.

        Examples::

            >>> m = BatchRenorm3d(16)
            >>> y = m(torch.randn(4, 16, 4, 8, 8))
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


# One Args section for the three public layers (as torch shares its BN docs).
for _cls in (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d):
    _cls.__doc__ = (_cls.__doc__ or "").replace("{args}", _ARGS_DOC.strip("\n"))
