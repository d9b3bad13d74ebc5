"""Drift per (model, stat bank): each bank's rows scored against that bank's statistics.

A version that serves stat banks runs bank requests through its bank session, built from
the drift-tapped graph (:func:`recalib.onnx.taps.add_drift_taps` with ``source="input"``,
then :func:`recalib.onnx.banks.add_bank_inputs`): the taps read every BN node's *input*,
which the bank rewrite keeps, so a row's tap outputs are the moments of what its own bank
normalises (the layers before were normalised with that bank too). Taps at BN outputs
(``source="auto"``, which keeps Conv+BN fusion in the plain graph) would read the bank's
per-row affine map instead, and the bank graph has no fusion to keep.

:class:`BankDrift` samples bank batches (:class:`~service.runtime.drift_monitor.SampleCredit`,
the same deterministic fraction as the version's own monitor), splits each sampled run's
rows by the bank that answered them (the graph's ``recalib_bank`` output: an explicit
choice, a routed one, or bank 0 for a fallback) and gives each bank's rows to that bank's
:class:`~service.runtime.drift_monitor.DriftMonitor`, whose reference is the bank's own
statistics. Rows answered by bank 0 (the version's statistics) are the version monitor's
business, not this one's: they are dropped here. Monitors exist for at most ``limit``
banks per version (the first tracked), so memory and metric series stay bounded however
many banks a model carries; rows of untracked banks are counted, not scored.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from .drift_monitor import DriftMonitor, SampleCredit

__all__ = ["BankDrift", "BankDriftPublisher"]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
BankDriftPublisher = Callable[[str, dict[str, Any]], None]
"""Receives ``(bank name, report)`` for each fresh report of a bank's monitor."""


class BankDrift:
    """Rolling drift of each stat bank's rows of one model version.

    Args:
        tapped_model: the bank session's graph (drift taps at BN inputs, then banks).
        window_seconds, threshold, sample_fraction, min_rows, executor: as
            :class:`~service.runtime.drift_monitor.DriftMonitor` (one value for all banks).
        limit: most banks with a monitor.
        publish: called with ``(bank, report)`` for each fresh report.

    Examples::

        >>> drift = BankDrift(tapped_banked, window_seconds=3600, threshold=1.0, limit=32)
        >>> drift.track(1, "site_b", site_b_stats)
        >>> if drift.should_sample():
        ...     values = session.run(outputs + drift.tap_names, feed)
        ...     drift.submit(values[len(outputs):], answered_by)
    """

    def __init__(
        self,
        tapped_model: onnx.ModelProto,
        *,
        window_seconds: float,
        threshold: float,
        sample_fraction: float,
        min_rows: int,
        limit: int,
        executor: Executor | None = None,
        publish: BankDriftPublisher | None = None,
    ) -> None:
        if limit < 0:
            raise ValueError(f"expected limit >= 0 (got {limit})")
        self._model = tapped_model
        self._options: dict[str, Any] = {
            "window_seconds": window_seconds,
            "threshold": threshold,
            "sample_fraction": sample_fraction,
            "min_rows": min_rows,
            "executor": executor,
        }
        self.limit = limit
        self._sampler = SampleCredit(sample_fraction)
        self._publish = publish
        self._lock = threading.Lock()
        self._monitors: dict[int, tuple[str, DriftMonitor]] = {}
        self._untracked_rows = 0
        self.tap_names: list[str] = []
        self._tap_rows: list[bool] = []  # which tap outputs have a row axis

    def should_sample(self) -> bool:
        """Whether the next bank batch is run with its tap outputs (thread-safe)."""
        return bool(self._monitors) and self._sampler()

    def track(
        self, index: int, name: str, reference: Mapping[str, tuple[FloatArray, FloatArray]]
    ) -> bool:
        """Score the rows bank ``index`` answers against ``reference`` (``{tapped layer:
        (mean, var)}``, the bank's statistics); False when ``limit`` banks are tracked.

        Raises:
            ValueError: ``reference`` lacks a tapped layer.
        """
        with self._lock:
            if index in self._monitors:
                return True
            if len(self._monitors) >= self.limit:
                return False
        monitor = DriftMonitor(
            self._model,
            reference=reference,
            publish=self._publisher(name),
            **self._options,
        )
        with self._lock:
            if len(self._monitors) >= self.limit:
                return False
            self._monitors.setdefault(index, (name, monitor))
            if not self.tap_names:
                self.tap_names = list(monitor.tap_names)
                self._tap_rows = [not name.endswith("::count") for name in self.tap_names]
        return True

    def _publisher(self, name: str) -> Callable[[dict[str, Any]], None] | None:
        publish = self._publish
        if publish is None:
            return None

        def send(report: dict[str, Any]) -> None:
            publish(name, report)

        return send

    def forget(self, index: int) -> str | None:
        """Stop scoring bank ``index`` (it was deleted); the name it had, if tracked."""
        with self._lock:
            entry = self._monitors.pop(index, None)
        if entry is None:
            return None
        entry[1].close()
        return entry[0]

    def submit(self, tap_values: Sequence[npt.ArrayLike], banks: npt.ArrayLike) -> None:
        """Queue one sampled run: its tap outputs (in :attr:`tap_names` order) and the
        bank that answered each row (``[N]``)."""
        answered = np.asarray(banks).reshape(-1)
        with self._lock:
            monitors = dict(self._monitors)
        for index in np.unique(answered).tolist():
            if index == 0:
                continue  # the version's own statistics: its monitor's rows
            rows = np.flatnonzero(answered == index)
            entry = monitors.get(int(index))
            if entry is None:
                with self._lock:
                    self._untracked_rows += int(rows.size)
                continue
            whole = rows.size == answered.size
            part = [
                np.asarray(v)[rows] if has_rows and not whole else v
                for v, has_rows in zip(tap_values, self._tap_rows, strict=True)
            ]
            entry[1].submit(part, int(rows.size))

    def reports(self, *, wait: bool = True) -> dict[str, dict[str, Any]]:
        """Each tracked bank's :meth:`DriftMonitor.report`, by bank name."""
        with self._lock:
            monitors = list(self._monitors.values())
        return {name: monitor.report(wait=wait) for name, monitor in monitors}

    @property
    def untracked_rows(self) -> int:
        """Sampled rows of banks beyond ``limit`` (not scored)."""
        return self._untracked_rows

    def reset(self) -> None:
        """Empty every bank's window; the next bank batch is sampled."""
        with self._lock:
            monitors = [m for _, m in self._monitors.values()]
            self._untracked_rows = 0
        for monitor in monitors:
            monitor.reset()
        self._sampler.refill()

    def close(self) -> None:
        """Process what is queued and stop publishing (the version is unloading)."""
        with self._lock:
            monitors = [m for _, m in self._monitors.values()]
            self._publish = None
        for monitor in monitors:
            monitor.close()
