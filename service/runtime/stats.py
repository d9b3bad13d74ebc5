"""Per model version inference statistics, as Triton's statistics extension counts them.

One :class:`ModelStats` per loaded ``(model, version)`` holds plain integer counters,
updated where the work happens, always on the event loop (the runtime is single-threaded
there; the worker threads only *measure*, and hand their :class:`RunTiming` back with the
outputs):

* :meth:`ServingRuntime.infer <service.runtime.runtime.ServingRuntime.infer>` - per
  request: ``success`` / ``fail`` (count, and the time from the decoded request reaching
  the runtime to its response), ``inference_count`` (rows: a request of batch size 8
  counts 8), ``last_inference``, and its own share of ``compute_input`` (building the
  feed: checks and conversions) and ``compute_output`` (selecting and wrapping the
  outputs).
* :class:`~service.runtime.batching.Batcher` - per session run: ``execution_count`` and
  ``batch_stats`` (per batch size: runs, and the time concatenating the inputs, running the
  session, splitting the outputs); per request in it: ``queue`` (from queued to a worker
  thread taking its batch) and the run's ``compute_input`` / ``compute_infer`` /
  ``compute_output`` (as Triton, every request of a batch is charged the whole run).

``queue`` and ``compute_*`` count successful requests only (their ``count`` is the
success count), as Triton does. :meth:`ModelStats.to_dict` gives Triton's JSON shape (the
``model_stats`` entries of ``GET /v2/models/stats``), which the gRPC servicer parses into
``inference.ModelStatistics``. The same counters can feed other exporters (Prometheus):
they are the one place these numbers live.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelStats", "RunTiming"]

_NS = 1_000_000_000


@dataclass(slots=True)
class RunTiming:
    """One session run as a worker thread measured it (``time.perf_counter`` seconds).

    Attributes:
        rows: the batch size of the run.
        started: when the worker thread took the batch (queue time ends there).
        input: concatenating the requests' inputs into one feed.
        infer: the session run.
        output: splitting the outputs back into the requests' rows.
    """

    rows: int
    started: float
    input: float = 0.0
    infer: float = 0.0
    output: float = 0.0


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": round(seconds * _NS)}


class ModelStats:
    """The counters of one model version (see the module). Times are float seconds summed
    over requests (or runs, for ``batches``), turned into nanoseconds when read: float
    additions are the cheapest thing the hot path can do, and a double keeps nanosecond
    resolution up to about 100 days of summed time."""

    __slots__ = (
        "batches",
        "execution_count",
        "fail_count",
        "fail_s",
        "inference_count",
        "infer_s",
        "input_s",
        "last_inference",
        "output_s",
        "queue_s",
        "success_count",
        "success_s",
    )

    def __init__(self) -> None:
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference = 0.0  # time.perf_counter() of the last success, 0: never
        self.success_count = 0
        self.success_s = 0.0
        self.fail_count = 0
        self.fail_s = 0.0
        self.queue_s = 0.0
        self.input_s = 0.0
        self.infer_s = 0.0
        self.output_s = 0.0
        # batch size -> [runs, input s, infer s, output s]
        self.batches: dict[int, list[float]] = {}

    # -- recording (event loop only) -------------------------------------------------

    def add_success(
        self, rows: int, started: float, done: float, input_s: float, output_s: float
    ) -> None:
        """A request answered: ``rows`` inferences, in the runtime from ``started`` to
        ``done`` (``time.perf_counter``), of which ``input_s`` building its feed and
        ``output_s`` wrapping its outputs."""
        self.inference_count += rows
        self.success_count += 1
        self.success_s += done - started
        self.input_s += input_s
        self.output_s += output_s
        self.last_inference = done

    def add_failure(self, seconds: float) -> None:
        """A request that failed after ``seconds`` in the runtime."""
        self.fail_count += 1
        self.fail_s += seconds

    def add_run(self, run: RunTiming) -> None:
        """One successful session run (``execution_count``, ``batch_stats``)."""
        self.execution_count += 1
        entry = self.batches.get(run.rows)
        if entry is None:
            entry = self.batches[run.rows] = [0, 0.0, 0.0, 0.0]
        entry[0] += 1
        entry[1] += run.input
        entry[2] += run.infer
        entry[3] += run.output

    def add_request_run(self, enqueued: float, run: RunTiming) -> None:
        """A request answered by ``run``: its queue wait and the run's compute times."""
        self.queue_s += run.started - enqueued
        self.input_s += run.input
        self.infer_s += run.infer
        self.output_s += run.output

    # -- reading -----------------------------------------------------------------------

    def to_dict(self, name: str, version: int) -> dict[str, Any]:
        """Triton's ``ModelStatistics`` JSON object of this version (``last_inference`` in
        ms since the epoch)."""
        ok = self.success_count
        last = 0
        if self.last_inference:
            last = round((time.time() - (time.perf_counter() - self.last_inference)) * 1000)
        return {
            "name": name,
            "version": str(version),
            "last_inference": last,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": _duration(ok, self.success_s),
                "fail": _duration(self.fail_count, self.fail_s),
                "queue": _duration(ok, self.queue_s),
                "compute_input": _duration(ok, self.input_s),
                "compute_infer": _duration(ok, self.infer_s),
                "compute_output": _duration(ok, self.output_s),
                "cache_hit": _duration(0, 0.0),
                "cache_miss": _duration(0, 0.0),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": _duration(int(runs), input_s),
                    "compute_infer": _duration(int(runs), infer_s),
                    "compute_output": _duration(int(runs), output_s),
                }
                for size, (runs, input_s, infer_s, output_s) in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }

    @staticmethod
    def empty(name: str, version: int) -> dict[str, Any]:
        """The JSON object of a version that has not answered anything."""
        return ModelStats().to_dict(name, version)
