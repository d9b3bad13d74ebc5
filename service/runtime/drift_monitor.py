"""Drift monitoring of one served model version from its BatchNorm statistics.

The version's ONNX graph is tapped with :func:`recalib.onnx.taps.add_drift_taps` (every BN
node's input moments become extra outputs). Sampled batches run through the tapped
session, which produces the predictions too, so a sampled batch costs one run, not two;
the other batches run on the plain (fully fused) session. A :class:`DriftMonitor` turns
the tap outputs of each sampled run into per-layer moment windows
(:func:`recalib.onnx.taps.tap_moments`), adds them to a :class:`recalib.drift.RollingWindow`
(bounded by ``window_seconds``) and scores the window against the version's own stored
statistics (:func:`recalib.onnx.taps.reference_stats`) with :func:`recalib.drift.score_model`.

Sampling is deterministic: with fraction ``f`` an accumulator gains ``f`` per batch and a
batch is sampled whenever it reaches 1, so exactly ``f`` of the batches are tapped, evenly
spread (``f = 1``: every batch; ``f = 0``: none, and no tapped session is built). The
accumulator starts full, and is filled again by :meth:`DriftMonitor.reset`: the first
batch a version answers (and the first after a reset) is always sampled, so a client
that sends a few requests gets a score rather than ``None``.

Flagging needs evidence: ``exceeded`` stays false until the window holds ``min_rows``
rows (``RECALIB_DRIFT_MIN_ROWS``). With no drift at all, the symmetric KL between a
channel's reference Gaussian and moments estimated from ``n`` independent values is about
``(δ²/σ² + (r-1)²/2)`` with ``δ ~ N(0, σ²/n)`` and ``r - 1 ~ N(0, 2/n)``: its expectation
is ``2/n`` (more with heavy tails: ``(κ+1)/(2n)`` for kurtosis ``κ``), and a layer of
pooled features gives one value per row; with one or two rows the variance estimate can
be near zero and the score unbounded. ``n = 256`` keeps the noise floor near 0.01, two
orders of magnitude under the default threshold of 1.0 (and 5x under a threshold of
0.05 even for κ = 9), while 256 rows are a few seconds of modest traffic at the default
sample fraction. The score itself is reported from the first row (with ``samples``).

Off the request path: turning tap outputs into moments costs more Python time than the
tapped run itself adds (about a millisecond per run for a 9-layer network), so with an
``executor`` the run thread only queues the raw tap outputs (:meth:`DriftMonitor.submit`)
and returns the predictions. The executor's thread wakes at most every
``process_every`` seconds and drains the queue in one go: the rows of every queued run
are concatenated per tap output, so one :func:`tap_moments` call and one window update
cover all of them. Processing per run on another thread would not do: that Python work
holds the GIL and delays the event loop and the next run (up to the 5 ms switch
interval), which costs more latency than doing it inline. The queue is bounded
(``max_pending_rows``); rows beyond it are dropped and counted in the report.
:meth:`DriftMonitor.report` first drains the queue, so it covers all traffic answered
before it was called.

The window is guarded by a lock. The Prometheus gauges are refreshed at most once per
``publish_every`` seconds from the drain and on every :meth:`DriftMonitor.report`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from datetime import datetime, timezone
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from recalib.drift import RollingWindow, score_model
from recalib.errors import RecalibError
from recalib.onnx.names import read_bn_map
from recalib.onnx.taps import read_taps, reference_stats, tap_moments, tap_output_names

__all__ = ["DriftMonitor", "DriftPublisher", "SampleCredit"]

log = logging.getLogger(__name__)

DriftPublisher = Callable[[dict[str, Any]], None]
"""Receives each fresh :meth:`DriftMonitor.report` (the runtime sets the gauges)."""

FloatArray = npt.NDArray[np.float64]

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


class SampleCredit:
    """Deterministic sampling of a fraction of batches (see the module): each call gains
    ``fraction``, and a call that brings the credit to 1 samples. The credit starts full,
    so the first batch (and the first after :meth:`refill`) is sampled. Thread-safe.

    Args:
        fraction: in ``[0, 1]``; ``0`` never samples.
    """

    def __init__(self, fraction: float) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"expected sample_fraction in [0, 1] (got {fraction})")
        self.fraction = fraction
        self._credit = 1.0
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        """Whether this batch is sampled."""
        if self.fraction <= 0.0:
            return False
        with self._lock:
            if self._credit < 1.0 - 1e-12:
                self._credit += self.fraction
            if self._credit >= 1.0 - 1e-12:
                self._credit -= 1.0
                return True
            return False

    def refill(self) -> None:
        """Sample the next batch."""
        with self._lock:
            self._credit = 1.0


class DriftMonitor:
    """Rolling BN-statistics drift of one model version.

    Args:
        tapped_model: the version's graph after :func:`recalib.onnx.taps.add_drift_taps`.
        window_seconds: age bound of the rolling window.
        threshold: model score above which drift is flagged.
        sample_fraction: fraction of batches run through the tapped session.
        min_rows: rows the window needs before drift is flagged (see the module).
        publish: called with each fresh report (outside the lock).
        publish_every: least seconds between reports published from :meth:`observe`.
        executor: where :meth:`submit` processes tap outputs (``None``: inline).
        process_every: seconds the executor waits to gather queued runs.
        max_pending_rows: most rows queued for processing before new ones are dropped.
        clock: monotonic clock (tests inject one).
        reference: ``{tapped layer: (running_mean, running_var)}`` to score against
            (default: the statistics stored in ``tapped_model``, the version's own; a stat
            bank's for the drift of the rows that bank answered).

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
        min_rows: int = 0,
        publish: DriftPublisher | None = None,
        publish_every: float = 1.0,
        executor: Executor | None = None,
        process_every: float = 0.5,
        max_pending_rows: int = 65536,
        clock: Callable[[], float] = time.monotonic,
        reference: Mapping[str, tuple[FloatArray, FloatArray]] | None = None,
    ) -> None:
        self._sampler = SampleCredit(sample_fraction)
        self.taps = read_taps(tapped_model)
        self.tap_names = tap_output_names(self.taps)
        if reference is None:
            self.reference = reference_stats(tapped_model, self.taps)
        else:
            missing = sorted(set(self.taps) - set(reference))
            if missing:
                raise ValueError(
                    f"expected reference statistics for every tapped layer (missing {missing[:4]})"
                )
            self.reference = {layer: reference[layer] for layer in self.taps}
        self.modules = _module_names(tapped_model)
        self.window_seconds = window_seconds
        self.threshold = threshold
        self.sample_fraction = sample_fraction
        self.min_rows = min_rows
        self._publish = publish
        self._publish_every = publish_every
        self._clock = clock
        bucket = max(window_seconds / _BUCKETS_PER_WINDOW, 1e-3)
        self._window = RollingWindow(max_age=window_seconds, bucket_seconds=bucket)
        self._lock = threading.Lock()
        self._published = -float("inf")
        self._batches = 0
        self._executor = executor
        self._max_pending_rows = max_pending_rows
        self._pending: list[tuple[Sequence[npt.ArrayLike], int, float]] = []
        self._pending_rows = 0
        self._draining = False
        self._pending_since = 0.0
        self._dropped = 0
        self._idle = threading.Condition()
        self._hurry = threading.Event()
        self._process_every = process_every

    def should_sample(self) -> bool:
        """Whether the next batch goes through the tapped session (thread-safe)."""
        return self._sampler()

    def observe(self, tap_values: Sequence[npt.ArrayLike], rows: int) -> None:
        """Add one tapped run now: its tap outputs (in :attr:`tap_names` order) and rows."""
        self._check(tap_values)
        self._add([(tap_values, rows, self._clock())])

    def submit(self, tap_values: Sequence[npt.ArrayLike], rows: int) -> None:
        """Queue one tapped run for the executor (inline without one); never blocks on
        the window. Rows beyond ``max_pending_rows`` are dropped (counted)."""
        self._check(tap_values)
        if self._executor is None:
            self.observe(tap_values, rows)
            return
        with self._idle:
            if self._pending_rows + rows > self._max_pending_rows:
                self._dropped += rows
                return
            self._pending.append((tap_values, rows, self._clock()))
            self._pending_rows += rows
            start = not self._draining
            if start:
                self._pending_since = time.monotonic()
            self._draining = True
        if start:
            try:
                self._executor.submit(self._drain)
            except RuntimeError:  # executor shut down: process here
                self._drain()

    def flush(self, timeout: float = 1.0) -> bool:
        """Process every submitted run now and wait until it is in the window; False on
        timeout."""
        self._hurry.set()
        with self._idle:
            return self._idle.wait_for(lambda: not self._draining, timeout)

    def close(self) -> None:
        """Process what is queued, then stop publishing (the version is being unloaded:
        its gauges must not come back after the runtime removed them)."""
        self.flush()
        self._publish = None

    def _check(self, tap_values: Sequence[npt.ArrayLike]) -> None:
        if len(tap_values) != len(self.tap_names):
            raise ValueError(f"expected {len(self.tap_names)} tap outputs (got {len(tap_values)})")

    def _drain(self) -> None:
        # gather runs for process_every from the first one queued (flush cuts it short);
        # counted from then, not from now: several monitors (one per stat bank) share the
        # one drift thread, and each waiting in turn would add up
        remaining = self._process_every - (time.monotonic() - self._pending_since)
        if remaining > 0:
            self._hurry.wait(remaining)
        while True:
            with self._idle:
                items, self._pending, self._pending_rows = self._pending, [], 0
                if not items:
                    self._draining = False
                    self._hurry.clear()
                    self._idle.notify_all()
                    return
            try:
                self._add(items)
            except (ValueError, RecalibError) as exc:  # e.g. NaN inputs: keep the others
                for item in items:
                    try:
                        self._add([item])
                    except (ValueError, RecalibError):
                        log.warning("drift moments of a batch skipped: %s", exc)

    def _add(self, items: Sequence[tuple[Sequence[npt.ArrayLike], int, float]]) -> None:
        """Merge runs into the window: rows of runs with equal per-row counts (spatial
        positions) are concatenated, so each group costs one :func:`tap_moments` call."""
        counts = [i for i, name in enumerate(self.tap_names) if name.endswith("::count")]
        groups: dict[tuple[float, ...], list[tuple[Sequence[npt.ArrayLike], int, float]]] = {}
        for item in items:
            key = tuple(float(np.asarray(item[0][i])) for i in counts)
            groups.setdefault(key, []).append(item)
        for group in groups.values():
            values: dict[str, npt.ArrayLike] = {}
            for i, name in enumerate(self.tap_names):
                parts = [item[0][i] for item in group]
                values[name] = parts[0] if i in counts or len(parts) == 1 else np.concatenate(parts)
            moments = tap_moments(values, self.taps)
            rows = sum(item[1] for item in group)
            now = max(item[2] for item in group)
            with self._lock:
                self._window.add(moments, now, samples=max(1, rows))
                self._batches += len(group)
                due = now - self._published >= self._publish_every
                if due:
                    self._published = now
            if due and self._publish is not None:
                self._publish(self.report(wait=False))

    def report(self, *, wait: bool = True) -> dict[str, Any]:
        """The window's drift: ``score`` (``None`` when empty), ``max_score``,
        ``worst_layer``, ``layers`` (per-layer details), ``samples``, ``tapped_batches``
        (since the last reset), ``window`` (``seconds``, ``start``, ``end`` as ISO 8601
        UTC or ``None``), ``threshold``, ``min_rows``, ``exceeded`` (false below
        ``min_rows`` rows), ``sample_fraction`` and ``dropped_rows``. With ``wait``, first
        lets queued runs reach the window (1 s at most)."""
        if wait:
            self.flush()
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
            "min_rows": self.min_rows,
            "exceeded": drift is not None
            and samples >= self.min_rows
            and bool(np.isfinite(drift.score))
            and drift.score > self.threshold,
            "sample_fraction": self.sample_fraction,
            "dropped_rows": self._dropped,
        }
        return result

    def _layer(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry["module"] = self.modules.get(entry["name"])
        return entry

    def reset(self) -> None:
        """Empty the window (e.g. after the traffic's domain was recalibrated for); runs
        queued before the reset are dropped with it."""
        self.flush()
        with self._lock:
            self._window.reset()
            self._sampler.refill()  # the next batch is sampled
            self._batches = 0
            self._dropped = 0
            self._published = -float("inf")
        if self._publish is not None:
            self._publish(self.report(wait=False))
