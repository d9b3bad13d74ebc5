"""Drift monitoring of one served model version from its BatchNorm statistics.

The version's ONNX graph is tapped with :func:`recalib.taps.add_drift_taps` (every BN
node's input moments become extra outputs). Sampled batches run through the tapped
session, which produces the predictions too, so a sampled batch costs one run, not two;
the other batches run on the plain (fully fused) session. A :class:`DriftMonitor` turns
the tap outputs of each sampled run into per-layer moment windows
(:func:`recalib.taps.tap_moments`), adds them to a :class:`recalib.drift.RollingWindow`
(bounded by ``window_seconds``) and scores the window against the version's own stored
statistics (:func:`recalib.taps.reference_stats`) with :func:`recalib.drift.score_model`.

Sampling is deterministic: with fraction ``f`` an accumulator gains ``f`` per batch and a
batch is sampled whenever it reaches 1, so exactly ``f`` of the batches are tapped, evenly
spread (``f = 1``: every batch; ``f = 0``: none, and no tapped session is built).

Runs happen in worker threads, so the window is guarded by a lock. The Prometheus gauges
are refreshed at most once per ``publish_every`` seconds from the run path (scoring merges
the window's buckets) and on every :meth:`DriftMonitor.report`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from recalib.drift import RollingWindow, score_model
from recalib.errors import RecalibError
from recalib.onnx_names import read_bn_map
from recalib.taps import read_taps, reference_stats, tap_moments, tap_output_names

__all__ = ["DriftMonitor", "DriftPublisher"]

DriftPublisher = Callable[[dict[str, Any]], None]
"""Receives each fresh :meth:`DriftMonitor.report` (the runtime sets the gauges)."""

_BUCKETS_PER_WINDOW = 60


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, tz=timezone.utc).isoformat()


def _module_names(model: onnx.ModelProto) -> dict[str, str]:
    """BN node name -> the torch module it was exported from (empty if the file has no
    recalib name map, e.g. a model exported by another tool)."""
    try:
        return {node: info.layer for node, info in read_bn_map(model).items()}
    except (RecalibError, ValueError, KeyError, AttributeError):  # names stay node names
        return {}


class DriftMonitor:
    """Rolling BN-statistics drift of one model version.

    Args:
        tapped_model: the version's graph after :func:`recalib.taps.add_drift_taps`.
        window_seconds: age bound of the rolling window.
        threshold: model score above which drift is flagged.
        sample_fraction: fraction of batches run through the tapped session.
        publish: called with each fresh report (outside the lock).
        publish_every: least seconds between reports published from :meth:`observe`.
        clock: monotonic clock (tests inject one).

    Examples::

        >>> monitor = DriftMonitor(tapped, window_seconds=3600, threshold=1.0)
        >>> outputs = session.run(model_outputs + monitor.tap_names, feed)
        >>> monitor.observe(outputs[len(model_outputs):], rows=len(x))
        >>> monitor.report()["score"]
    """

    def __init__(
        self,
        tapped_model: onnx.ModelProto,
        *,
        window_seconds: float,
        threshold: float,
        sample_fraction: float = 1.0,
        publish: DriftPublisher | None = None,
        publish_every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 <= sample_fraction <= 1.0:
            raise ValueError(f"expected sample_fraction in [0, 1] (got {sample_fraction})")
        self.taps = read_taps(tapped_model)
        self.tap_names = tap_output_names(self.taps)
        self.reference = reference_stats(tapped_model, self.taps)
        self.modules = _module_names(tapped_model)
        self.window_seconds = window_seconds
        self.threshold = threshold
        self.sample_fraction = sample_fraction
        self._publish = publish
        self._publish_every = publish_every
        self._clock = clock
        bucket = max(window_seconds / _BUCKETS_PER_WINDOW, 1e-3)
        self._window = RollingWindow(max_age=window_seconds, bucket_seconds=bucket)
        self._lock = threading.Lock()
        self._credit = 0.0
        self._published = -float("inf")
        self._batches = 0

    def should_sample(self) -> bool:
        """Whether the next batch goes through the tapped session (thread-safe)."""
        if self.sample_fraction <= 0.0:
            return False
        with self._lock:
            self._credit += self.sample_fraction
            if self._credit >= 1.0 - 1e-12:
                self._credit -= 1.0
                return True
            return False

    def observe(self, tap_values: Sequence[npt.ArrayLike], rows: int) -> None:
        """Add one tapped run: its tap outputs (in :attr:`tap_names` order) and rows."""
        if len(tap_values) != len(self.tap_names):
            raise ValueError(f"expected {len(self.tap_names)} tap outputs (got {len(tap_values)})")
        moments = tap_moments(dict(zip(self.tap_names, tap_values, strict=True)), self.taps)
        now = self._clock()
        with self._lock:
            self._window.add(moments, now, samples=max(1, rows))
            self._batches += 1
            due = now - self._published >= self._publish_every
            if due:
                self._published = now
        if due and self._publish is not None:
            self._publish(self.report())

    def report(self) -> dict[str, Any]:
        """The window's drift: ``score`` (``None`` when empty), ``max_score``,
        ``worst_layer``, ``layers`` (per-layer details), ``samples``, ``tapped_batches``
        (since the last reset), ``window`` (``seconds``, ``start``, ``end`` as ISO 8601
        UTC or ``None``), ``threshold``, ``exceeded`` and ``sample_fraction``."""
        now = self._clock()
        wall = time.time()
        with self._lock:
            totals = self._window.total(now)
            samples = self._window.samples(now)
            bounds = self._window.bounds(now)
            batches = self._batches
        scored = bool(totals) and not any(w.is_empty for w in totals.values())
        drift = score_model(totals, self.reference) if scored else None
        result: dict[str, Any] = {
            "score": None if drift is None else drift.score,
            "max_score": None if drift is None else drift.max_score,
            "worst_layer": None if drift is None else drift.worst_layer,
            "layers": []
            if drift is None
            else [self._layer(layer.to_dict()) for layer in drift.layers],
            "samples": samples,
            "tapped_batches": batches,
            "window": {
                "seconds": self.window_seconds,
                "start": None if bounds is None else _iso(wall - (now - bounds[0])),
                "end": None if bounds is None else _iso(wall - (now - bounds[1])),
            },
            "threshold": self.threshold,
            "exceeded": drift is not None
            and bool(np.isfinite(drift.score))
            and drift.score > self.threshold,
            "sample_fraction": self.sample_fraction,
        }
        return result

    def _layer(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry["module"] = self.modules.get(entry["name"])
        return entry

    def reset(self) -> None:
        """Empty the window (e.g. after the traffic's domain was recalibrated for)."""
        with self._lock:
            self._window.reset()
            self._batches = 0
            self._published = -float("inf")
        if self._publish is not None:
            self._publish(self.report())
