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


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


class ModelStats:
    """The counters of one model version (see the module). Every ``*_ns`` is nanoseconds
    summed over requests (or runs, for ``batches``)."""

    __slots__ = (
        "batches",
        "execution_count",
        "fail_count",
        "fail_ns",
        "inference_count",
        "infer_ns",
        "input_ns",
        "last_inference",
        "output_ns",
        "queue_ns",
        "success_count",
        "success_ns",
    )

    def __init__(self) -> None:
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference = 0  # ms since the epoch, 0: never
        self.success_count = 0
        self.success_ns = 0
        self.fail_count = 0
        self.fail_ns = 0
        self.queue_ns = 0
        self.input_ns = 0
        self.infer_ns = 0
        self.output_ns = 0
        # batch size -> [runs, input ns, infer ns, output ns]
        self.batches: dict[int, list[int]] = {}

    # -- recording (event loop only) -------------------------------------------------

    def add_success(self, rows: int, total: float, input_s: float, output_s: float) -> None:
        """A request answered: ``rows`` inferences, ``total`` seconds in the runtime, of
        which ``input_s`` building its feed and ``output_s`` wrapping its outputs."""
        self.inference_count += rows
        self.success_count += 1
        self.success_ns += int(total * _NS)
        self.input_ns += int(input_s * _NS)
        self.output_ns += int(output_s * _NS)
        self.last_inference = time.time_ns() // 1_000_000

    def add_failure(self, total: float) -> None:
        """A request that failed after ``total`` seconds in the runtime."""
        self.fail_count += 1
        self.fail_ns += int(total * _NS)

    def add_run(self, run: RunTiming) -> None:
        """One successful session run (``execution_count``, ``batch_stats``)."""
        self.execution_count += 1
        entry = self.batches.get(run.rows)
        if entry is None:
            entry = self.batches[run.rows] = [0, 0, 0, 0]
        entry[0] += 1
        entry[1] += int(run.input * _NS)
        entry[2] += int(run.infer * _NS)
        entry[3] += int(run.output * _NS)

    def add_request_run(self, enqueued: float, run: RunTiming) -> None:
        """A request answered by ``run``: its queue wait and the run's compute times."""
        self.queue_ns += int((run.started - enqueued) * _NS)
        self.input_ns += int(run.input * _NS)
        self.infer_ns += int(run.infer * _NS)
        self.output_ns += int(run.output * _NS)

    # -- reading -----------------------------------------------------------------------

    def to_dict(self, name: str, version: int) -> dict[str, Any]:
        """Triton's ``ModelStatistics`` JSON object of this version."""
        ok = self.success_count
        return {
            "name": name,
            "version": str(version),
            "last_inference": self.last_inference,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": _duration(ok, self.success_ns),
                "fail": _duration(self.fail_count, self.fail_ns),
                "queue": _duration(ok, self.queue_ns),
                "compute_input": _duration(ok, self.input_ns),
                "compute_infer": _duration(ok, self.infer_ns),
                "compute_output": _duration(ok, self.output_ns),
                "cache_hit": _duration(0, 0),
                "cache_miss": _duration(0, 0),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": _duration(runs, input_ns),
                    "compute_infer": _duration(runs, infer_ns),
                    "compute_output": _duration(runs, output_ns),
                }
                for size, (runs, input_ns, infer_ns, output_ns) in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }

    @staticmethod
    def empty(name: str, version: int) -> dict[str, Any]:
        """The JSON object of a version that has not answered anything."""
        return ModelStats().to_dict(name, version)
