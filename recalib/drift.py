"""Drift scores from BatchNorm statistics: per-channel divergences and mergeable windows.

A BN layer stores a Gaussian summary ``N(mu_ref, var_ref)`` of each channel of its input.
At serving time the same per-channel moments of the *live* input (collected by the ONNX
taps in :mod:`recalib.onnx.taps`) give ``N(mu_live, var_live)``; comparing the two per channel
and averaging is a cheap, label-free drift score (MECTA; Song et al. 2019). Everything here
is NumPy float64.

* :func:`symmetric_kl`, :func:`standardized_mean_shift`, :func:`log_variance_ratio` - the
  per-channel divergences.
* :class:`MomentWindow` - count, mean and sum of squared deviations per channel, with an
  exact merge, fed with shifted sums ``sum(x - shift)``, ``sum((x - shift)**2)``.
* :class:`RollingWindow` - a bounded deque of time buckets of per-layer windows, so a
  service can keep "the last five minutes" or "the last 10k samples" cheaply.
* :class:`LayerDrift`, :class:`ModelDrift`, :func:`score_model` - per-layer aggregation
  (mean over channels) and the model score (mean and max over layers).

Variance guard: every divergence adds ``eps`` to *both* variances, like BatchNormalization
itself divides by ``sqrt(var + eps)``: channels whose variance is below ``eps`` are
indistinguishable to the network, so they should not dominate the score (and a dead channel
with zero variance gives a finite score instead of ``inf``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_EPS",
    "LayerDrift",
    "ModelDrift",
    "MomentWindow",
    "RollingWindow",
    "layer_drift",
    "log_variance_ratio",
    "score_model",
    "standardized_mean_shift",
    "symmetric_kl",
]

FloatArray = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike

DEFAULT_EPS = 1e-5
"""Variance guard, BatchNormalization's default epsilon."""


def _f64(name: str, value: ArrayLike) -> FloatArray:
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"expected finite {name} (got NaN/Inf)")
    return arr


def _moments(
    mean_live: ArrayLike, var_live: ArrayLike, mean_ref: ArrayLike, var_ref: ArrayLike, eps: float
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Validate and broadcast; returns ``(mu_l, var_l + eps, mu_r, var_r + eps)``."""
    if not eps > 0.0:
        raise ValueError(f"expected eps > 0 (got {eps})")
    arrays = [
        _f64(n, v)
        for n, v in (
            ("mean_live", mean_live),
            ("var_live", var_live),
            ("mean_ref", mean_ref),
            ("var_ref", var_ref),
        )
    ]
    try:
        mu_l, v_l, mu_r, v_r = np.broadcast_arrays(*arrays)
    except ValueError:
        shapes = ", ".join(str(a.shape) for a in arrays)
        raise ValueError(f"expected broadcastable moments (got shapes {shapes})") from None
    for name, v in (("var_live", v_l), ("var_ref", v_r)):
        if np.any(v < 0.0):
            raise ValueError(f"expected {name} >= 0 (got min {float(v.min())})")
    return mu_l, v_l + eps, mu_r, v_r + eps


def symmetric_kl(
    mean_live: ArrayLike,
    var_live: ArrayLike,
    mean_ref: ArrayLike,
    var_ref: ArrayLike,
    eps: float = DEFAULT_EPS,
) -> FloatArray:
    """Symmetric KL divergence between per-channel Gaussians ``KL(l||r) + KL(r||l)``::

        ½[(σ²_l/σ²_r + σ²_r/σ²_l) − 2] + ½(μ_l − μ_r)²(1/σ²_l + 1/σ²_r)

    with ``σ² = var + eps`` on both sides. It is evaluated as
    ``½[(σ²_l − σ²_r)² + (μ_l − μ_r)²(σ²_l + σ²_r)] / (σ²_l σ²_r)``, which is the same
    expression without the cancellation in ``a/b + b/a − 2``: the result is exactly zero
    for identical inputs, exactly symmetric in (live, ref) and never negative.

    Args:
        mean_live, var_live: live per-channel mean and (population) variance.
        mean_ref, var_ref: reference (stored running) mean and variance.
        eps: added to both variances (BatchNorm's epsilon); must be > 0.

    Shape:
        All four broadcast together (usually ``(C,)``); the output has the broadcast shape.
    """
    mu_l, v_l, mu_r, v_r = _moments(mean_live, var_live, mean_ref, var_ref, eps)
    d = mu_l - mu_r
    return 0.5 * ((v_l - v_r) ** 2 + d * d * (v_l + v_r)) / (v_l * v_r)


def standardized_mean_shift(
    mean_live: ArrayLike, mean_ref: ArrayLike, var_ref: ArrayLike, eps: float = DEFAULT_EPS
) -> FloatArray:
    """Mean shift in reference standard deviations: ``(μ_l − μ_r) / sqrt(σ²_r + eps)``."""
    mu_l, _, mu_r, v_r = _moments(mean_live, var_ref, mean_ref, var_ref, eps)
    return (mu_l - mu_r) / np.sqrt(v_r)


def log_variance_ratio(
    var_live: ArrayLike, var_ref: ArrayLike, eps: float = DEFAULT_EPS
) -> FloatArray:
    """``log((σ²_l + eps) / (σ²_r + eps))``: > 0 when the live input is wider."""
    _, v_l, _, v_r = _moments(0.0, var_live, 0.0, var_ref, eps)
    return np.log(v_l / v_r)


def _channel_vector(name: str, value: ArrayLike) -> FloatArray:
    arr = _f64(name, value)
    if arr.ndim != 1:
        raise ValueError(f"expected {name} of shape (C,) (got shape {arr.shape})")
    return arr


def _counts(value: ArrayLike, num_channels: int) -> FloatArray:
    count = _f64("count", value)
    if count.shape not in ((), (num_channels,)):
        raise ValueError(f"expected count of shape () or ({num_channels},) (got {count.shape})")
    if np.any(count < 0.0):
        raise ValueError(f"expected count >= 0 (got min {float(count.min())})")
    return count


@dataclass(eq=False)
class MomentWindow:
    """Per-channel count, mean and ``m2`` (sum of squared deviations), float64.

    Two windows merge exactly with Chan's parallel update (as :class:`ChannelMoments` in
    :mod:`recalib.moments`, but in NumPy for the serving path), so a window built from any
    split of the data equals the window of the whole, up to rounding.

    Data arrives as *shifted* sums ``s1 = sum(x - shift)``, ``s2 = sum((x - shift)**2)``
    (:meth:`add`, :meth:`from_sums`), which is what the in-graph taps compute. The batch
    variance ``(s2 - s1**2 / n) / n`` cancels catastrophically when ``|mean - shift|`` is
    large compared to the standard deviation (with plain sums, ``shift = 0``, a channel with
    mean 100 and std 0.01 keeps no correct digit in float32). The taps therefore shift by
    the layer's running mean: under no drift ``mean - shift`` is a fraction of a standard
    deviation and the variance keeps nearly all the digits the float32 sums carry; under a
    drift of ``k`` standard deviations the relative error of the variance grows by about
    ``k**2`` - still small, and then the mean term dominates the score anyway. Across
    batches nothing cancels: the window stores ``(count, mean, m2)``, not sums.

    ``count`` is a scalar or per-channel (shape ``(C,)``); channels with ``count == 0``
    have mean and variance 0 (see :attr:`is_empty`).

    Args:
        count: samples per channel (batch times spatial positions).
        mean: per-channel mean, shape ``(C,)``.
        m2: per-channel sum of squared deviations from ``mean``, shape ``(C,)``.

    Examples::

        >>> w = MomentWindow.from_samples(np.ones((4, 3, 2, 2)))
        >>> w.merge(MomentWindow.from_samples(np.zeros((4, 3, 2, 2)))).var
        array([0.25, 0.25, 0.25])
    """

    count: FloatArray
    mean: FloatArray
    m2: FloatArray

    def __post_init__(self) -> None:
        self.mean = _channel_vector("mean", self.mean)
        self.m2 = _channel_vector("m2", self.m2)
        if self.m2.shape != self.mean.shape:
            raise ValueError(f"expected m2 of shape {self.mean.shape} (got {self.m2.shape})")
        self.count = _counts(self.count, self.num_channels)

    @classmethod
    def empty(cls, num_channels: int) -> MomentWindow:
        """A window with no samples."""
        z = np.zeros(num_channels)
        return cls(np.zeros(()), z, z.copy())

    @classmethod
    def from_sums(
        cls,
        count: ArrayLike,
        sum: ArrayLike,
        sumsq: ArrayLike,
        *,
        shift: ArrayLike | None = None,
    ) -> MomentWindow:
        """Window of one batch from ``count``, ``sum(x - shift)`` and ``sum((x - shift)**2)``.

        Args:
            count: samples per channel, scalar or ``(C,)``.
            sum: per-channel sum of ``x - shift``.
            sumsq: per-channel sum of ``(x - shift)**2``.
            shift: per-channel (or scalar) shift the sums are taken around; 0 if omitted.
        """
        s1 = _channel_vector("sum", sum)
        s2 = _channel_vector("sumsq", sumsq)
        if s2.shape != s1.shape:
            raise ValueError(f"expected sumsq of shape {s1.shape} (got {s2.shape})")
        n = _counts(count, s1.shape[0])
        if np.any(s2 < 0.0):
            raise ValueError(f"expected sumsq >= 0 (got min {float(s2.min())})")
        c = _f64("shift", 0.0 if shift is None else shift)
        if c.shape not in ((), s1.shape):
            raise ValueError(f"expected shift of shape () or {s1.shape} (got {c.shape})")
        safe = np.where(n > 0.0, n, 1.0)
        d = s1 / safe  # mean - shift
        mean = np.where(n > 0.0, c + d, 0.0)
        # Rounding can push s2 - s1*d a hair below zero for constant channels.
        m2 = np.where(n > 0.0, np.maximum(s2 - s1 * d, 0.0), 0.0)
        return cls(n.copy(), mean, m2)

    @classmethod
    def from_samples(cls, x: ArrayLike, channel_axis: int = 1) -> MomentWindow:
        """Window of a batch ``x`` of shape ``(N, C, *)``, reduced over every axis but ``C``.

        Two-pass in float64 (mean first, then squared deviations): the reference the
        in-graph taps are tested against.
        """
        arr = _f64("x", x)
        if arr.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {arr.ndim}D input)")
        if not -arr.ndim <= channel_axis < arr.ndim:
            raise ValueError(
                f"expected channel_axis in [{-arr.ndim}, {arr.ndim}) (got {channel_axis})"
            )
        moved = np.moveaxis(arr, channel_axis, 0).reshape(arr.shape[channel_axis], -1)
        mean = moved.mean(axis=1)
        m2 = ((moved - mean[:, None]) ** 2).sum(axis=1)
        return cls(np.asarray(float(moved.shape[1])), mean, m2)

    @property
    def num_channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def is_empty(self) -> bool:
        """True when some channel has no samples (its mean and variance are meaningless)."""
        return bool(np.any(self.count == 0.0))

    @property
    def var(self) -> FloatArray:
        """Population variance per channel (0 where ``count == 0``)."""
        n = np.broadcast_to(self.count, self.mean.shape)
        return np.divide(self.m2, n, out=np.zeros_like(self.m2), where=n > 0.0)

    def copy(self) -> MomentWindow:
        return MomentWindow(self.count.copy(), self.mean.copy(), self.m2.copy())

    def merge(self, other: MomentWindow) -> MomentWindow:
        """Exact union of two windows (Chan's parallel update); neither is modified."""
        if other.num_channels != self.num_channels:
            raise ValueError(
                f"expected a window with {self.num_channels} channels (got {other.num_channels})"
            )
        n = self.count + other.count
        w = np.divide(other.count, n, out=np.zeros(np.shape(n)), where=n > 0.0)
        d = other.mean - self.mean
        mean = self.mean + d * w
        m2 = self.m2 + other.m2 + d * d * (self.count * w)
        return MomentWindow(n, mean, m2)

    @staticmethod
    def merge_all(windows: Sequence[MomentWindow]) -> MomentWindow:
        """Exact union of many windows in one vectorised step (same result as folding
        :meth:`merge`): ``n = sum n_i``, ``mean = sum n_i mean_i / n``,
        ``m2 = sum m2_i + sum n_i (mean_i - mean)**2``."""
        if not windows:
            raise ValueError("expected at least one window (got none)")
        c = windows[0].num_channels
        if any(w.num_channels != c for w in windows):
            got = sorted({w.num_channels for w in windows})
            raise ValueError(f"expected windows with {c} channels (got {got})")
        counts = np.stack([np.broadcast_to(w.count, (c,)) for w in windows])
        means = np.stack([w.mean for w in windows])
        n = counts.sum(axis=0)
        mean = np.divide((counts * means).sum(axis=0), n, out=np.zeros(c), where=n > 0.0)
        m2 = sum(w.m2 for w in windows) + (counts * (means - mean) ** 2).sum(axis=0)
        scalar = all(w.count.ndim == 0 for w in windows)
        return MomentWindow(n[0] if scalar else n, mean, np.asarray(m2))

    def add(
        self,
        count: ArrayLike,
        sum: ArrayLike,
        sumsq: ArrayLike,
        *,
        shift: ArrayLike | None = None,
    ) -> None:
        """Merge one batch's shifted sums into this window, in place (see :meth:`from_sums`)."""
        merged = self.merge(MomentWindow.from_sums(count, sum, sumsq, shift=shift))
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2


@dataclass
class _Bucket:
    index: int
    first: float
    last: float
    samples: int
    moments: dict[str, MomentWindow] = field(default_factory=dict)


class RollingWindow:
    """Per-layer moments of the recent past, in time buckets, bounded by age and/or samples.

    Each :meth:`add` merges one batch's per-layer windows into the bucket of
    ``floor(now / bucket_seconds)``; :meth:`total` merges the buckets that are still in the
    window. All layers share the buckets, so they always cover the same span of time and
    the same samples (a per-layer window would let layers drift apart in time). Sums are
    never subtracted when a bucket expires: totals are re-merged from the buckets, so the
    result stays exact however long the service runs.

    Eviction (on :meth:`add`, :meth:`total`, :meth:`samples`, :meth:`bounds`):

    * ``max_age``: a bucket goes once its newest sample is older than ``max_age`` seconds,
      so the window spans at most ``max_age + bucket_seconds`` of data.
    * ``max_samples``: the oldest bucket goes while the rest still hold ``max_samples``
      samples, so the window holds at least ``max_samples`` when that many have arrived,
      and at most ``max_samples`` plus one bucket's worth.

    Timestamps are seconds from a monotonic clock. A timestamp older than the newest bucket
    (concurrent callers) is counted in the newest bucket. Not thread-safe: guard it with a
    lock when several threads add.

    Args:
        max_age: seconds of data to keep, or ``None``.
        max_samples: samples (items along the batch axis) to keep, or ``None``.
        bucket_seconds: width of a time bucket; smaller is finer but costs more merges.
    """

    def __init__(
        self,
        *,
        max_age: float | None = None,
        max_samples: int | None = None,
        bucket_seconds: float = 1.0,
    ) -> None:
        if max_age is None and max_samples is None:
            raise ValueError("expected max_age and/or max_samples (got neither: unbounded)")
        if max_age is not None and not max_age > 0.0:
            raise ValueError(f"expected max_age > 0 (got {max_age})")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"expected max_samples >= 1 (got {max_samples})")
        if not (bucket_seconds > 0.0 and math.isfinite(bucket_seconds)):
            raise ValueError(f"expected a finite bucket_seconds > 0 (got {bucket_seconds})")
        self.max_age = max_age
        self.max_samples = max_samples
        self.bucket_seconds = bucket_seconds
        self._buckets: deque[_Bucket] = deque()
        self._samples = 0

    def add(self, moments: Mapping[str, MomentWindow], now: float, *, samples: int) -> None:
        """Add one batch: its per-layer windows and how many items (batch rows) it had."""
        if not math.isfinite(now):
            raise ValueError(f"expected a finite timestamp (got {now})")
        if samples < 1:
            raise ValueError(f"expected samples >= 1 (got {samples})")
        index = math.floor(now / self.bucket_seconds)
        if self._buckets and index <= self._buckets[-1].index:
            bucket = self._buckets[-1]
            bucket.last = max(bucket.last, now)
        else:
            bucket = _Bucket(index, now, now, 0)
            self._buckets.append(bucket)
        for name, window in moments.items():
            held = bucket.moments.get(name)
            bucket.moments[name] = window.copy() if held is None else held.merge(window)
        bucket.samples += samples
        self._samples += samples
        self._expire(now)

    def _expire(self, now: float) -> None:
        buckets = self._buckets
        if self.max_age is not None:
            while buckets and now - buckets[0].last > self.max_age:
                self._samples -= buckets.popleft().samples
        if self.max_samples is not None:
            while len(buckets) > 1 and self._samples - buckets[0].samples >= self.max_samples:
                self._samples -= buckets.popleft().samples

    def total(self, now: float) -> dict[str, MomentWindow]:
        """Per-layer windows of everything still in the window at ``now``."""
        self._expire(now)
        parts: dict[str, list[MomentWindow]] = {}
        for bucket in self._buckets:
            for name, window in bucket.moments.items():
                parts.setdefault(name, []).append(window)
        return {name: MomentWindow.merge_all(windows) for name, windows in parts.items()}

    def samples(self, now: float) -> int:
        """Items (batch rows) in the window at ``now``."""
        self._expire(now)
        return self._samples

    def bounds(self, now: float) -> tuple[float, float] | None:
        """``(oldest, newest)`` timestamp of the data in the window, ``None`` when empty."""
        self._expire(now)
        if not self._buckets:
            return None
        return self._buckets[0].first, self._buckets[-1].last

    def reset(self) -> None:
        """Forget everything (e.g. after the model's statistics were recalibrated)."""
        self._buckets.clear()
        self._samples = 0

    def __len__(self) -> int:
        """Number of buckets held (a memory bound, not a sample count)."""
        return len(self._buckets)


@dataclass(frozen=True)
class LayerDrift:
    """Drift of one BN layer's input, aggregated over its channels.

    Attributes:
        name: the layer (BatchNormalization node) name.
        num_channels: channels compared.
        count: samples per channel behind the live statistics (smallest over channels).
        symmetric_kl: mean over channels of :func:`symmetric_kl` - the layer's score.
        max_symmetric_kl: the largest channel's symmetric KL.
        mean_abs_shift: mean over channels of ``|standardized_mean_shift|``.
        mean_abs_log_var_ratio: mean over channels of ``|log_variance_ratio|``.
    """

    name: str
    num_channels: int
    count: float
    symmetric_kl: float
    max_symmetric_kl: float
    mean_abs_shift: float
    mean_abs_log_var_ratio: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_channels": self.num_channels,
            "count": self.count,
            "symmetric_kl": self.symmetric_kl,
            "max_symmetric_kl": self.max_symmetric_kl,
            "mean_abs_shift": self.mean_abs_shift,
            "mean_abs_log_var_ratio": self.mean_abs_log_var_ratio,
        }


@dataclass(frozen=True)
class ModelDrift:
    """Drift of a model: its layers and the mean and max of their scores.

    Attributes:
        layers: per-layer drift, in the order the windows were given.
        score: mean over layers of the layer score (mean symmetric KL over channels).
        max_score: the largest layer score.
        worst_layer: name of the layer with ``max_score``.
    """

    layers: tuple[LayerDrift, ...]
    score: float
    max_score: float
    worst_layer: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (plain floats and strings)."""
        return {
            "score": self.score,
            "max_score": self.max_score,
            "worst_layer": self.worst_layer,
            "layers": [layer.to_dict() for layer in self.layers],
        }


def layer_drift(
    name: str,
    window: MomentWindow,
    mean_ref: ArrayLike,
    var_ref: ArrayLike,
    *,
    eps: float = DEFAULT_EPS,
) -> LayerDrift:
    """Compare one layer's live window with its reference statistics.

    Args:
        name: the layer's name (carried into the result).
        window: live moments; every channel must have samples.
        mean_ref, var_ref: the layer's stored running mean and variance, shape ``(C,)``.
        eps: variance guard, see the module docstring.
    """
    if window.is_empty:
        raise ValueError(f"expected samples in the live window of layer {name!r} (got none)")
    ref_mean = _channel_vector("mean_ref", mean_ref)
    ref_var = _channel_vector("var_ref", var_ref)
    if ref_mean.shape != window.mean.shape or ref_var.shape != window.mean.shape:
        raise ValueError(
            f"expected reference statistics of shape {window.mean.shape} for layer {name!r} "
            f"(got mean {ref_mean.shape}, var {ref_var.shape})"
        )
    kl = symmetric_kl(window.mean, window.var, ref_mean, ref_var, eps)
    shift = standardized_mean_shift(window.mean, ref_mean, ref_var, eps)
    log_ratio = log_variance_ratio(window.var, ref_var, eps)
    return LayerDrift(
        name=name,
        num_channels=window.num_channels,
        count=float(np.min(window.count)),
        symmetric_kl=float(kl.mean()),
        max_symmetric_kl=float(kl.max()),
        mean_abs_shift=float(np.abs(shift).mean()),
        mean_abs_log_var_ratio=float(np.abs(log_ratio).mean()),
    )


def score_model(
    windows: Mapping[str, MomentWindow],
    reference: Mapping[str, tuple[ArrayLike, ArrayLike]],
    *,
    eps: float = DEFAULT_EPS,
) -> ModelDrift:
    """Score every layer in ``windows`` against ``reference[layer] = (mean, var)``.

    Args:
        windows: live per-layer windows (e.g. :meth:`RollingWindow.total`); each non-empty.
        reference: stored running statistics per layer; must cover every layer scored
            (:func:`recalib.onnx.taps.reference_stats` reads them from the ONNX model).
        eps: variance guard, see the module docstring.
    """
    if not windows:
        raise ValueError("expected at least one layer window (got none)")
    missing = [name for name in windows if name not in reference]
    if missing:
        raise ValueError(f"expected reference statistics for every layer (missing {missing})")
    layers = tuple(layer_drift(name, w, *reference[name], eps=eps) for name, w in windows.items())
    scores = [layer.symmetric_kl for layer in layers]
    worst = int(np.argmax(scores))
    return ModelDrift(
        layers=layers,
        score=float(np.mean(scores)),
        max_score=scores[worst],
        worst_layer=layers[worst].name,
    )
