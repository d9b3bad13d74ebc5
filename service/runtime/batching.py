"""Dynamic batching: concurrent requests to one model version share a session run.

A :class:`Batcher` holds one queue and one consumer task per model version. The consumer
takes the oldest request, adds queued requests that can share its run (the same input
dtypes and non-batch shapes) up to ``max_batch_size`` rows, waiting at most ``max_delay``
seconds after the first request arrived, concatenates the inputs along axis 0, runs the
session in a worker thread and splits the outputs back by row ranges. Requests that cannot
join a batch keep their place in line for the next one.

Short runs run on the event loop instead (``inline_seconds``): handing a batch to a worker
thread and back costs about as much CPU as a small model's whole run (measured on 2 cores,
batch-1 requests: 0.1-0.4 ms per run, most of a request's server CPU at concurrency 1).
The consumer keeps a moving average of the session's seconds per row for each batch key
(the inputs' dtypes and non-batch shapes: an image size, a sequence length, bank requests
apart from plain ones) over the runs it timed, and a batch whose estimate (rows x its
key's average) is at most ``inline_seconds`` runs on the loop, which it blocks for about
that long; every other batch, every batch of a key not timed yet (a new shape always runs
in a worker first), and every batch of a batcher with several runs in flight at once
(``max_concurrent`` > 1, where the loop would serialise them) goes to the worker threads.
At most ``_ROW_KEYS`` keys are timed; batches of further keys always go to the workers.
A request that has the batcher to itself (nothing queued or held, no other run in
flight, a batch of one, and requests per run about one: a lone client) is held to the
larger ``alone_inline_seconds``: the model's next request would wait for this run
anyway, so a worker thread would add only the hand-off (0.37 ms of server CPU per request
on the benchmark's CNN at concurrency 1, whose 0.5-1 ms runs straddle
``inline_seconds``). That allowance is also bounded per turn of the event loop
(:class:`LoopBudget`, shared by every batcher of a runtime): the runs made on the loop
in one turn (every inline run counts) may add up to ``alone_inline_seconds`` at most, so
a burst of requests that each find the batcher idle (without batching, each runs inside
its own ``submit`` before the next is submitted), or lone clients of several models, do
not stall probes, scrapes and gRPC for the sum of their runs: the first runs on the loop,
the others go to the workers and queue, and the batcher sees the concurrency again.
A drift-tapped run (1.3-1.5x a plain one) shares its key's estimate, so a run can
overshoot its bound by that much.
Without batching (``enabled=False``, or a model whose axis 0 is fixed), a request that
finds nothing queued and no run in flight, and whose run is short by that estimate, runs
inside :meth:`Batcher.submit` itself (the caller's task), skipping the hand-off to the
consumer task and its run task: 9 vs 24 µs of batcher CPU per request (a trivial run,
sequential requests, uvloop). With batching on every request goes through the consumer,
which forms the batches.

Waiting only pays when other requests are coming: the consumer keeps a moving average of
requests per run and skips the wait while it is about one (a lone client then gets no
added latency); under concurrency the requests that arrive while a run is in flight
form the next batch anyway.

Errors stay per request: inputs are validated before they are queued, and if a batched
run fails anyway, each request in it is re-run alone so that only the failing one gets
the error. A request whose caller went away (cancelled future) is skipped.

Statistics: the worker thread times each session run (:class:`~.stats.RunTiming`:
concatenating the inputs, the run, splitting the outputs) and returns that with the
outputs; the consumer, on the event loop, adds it to the version's
:class:`~.stats.ModelStats` (``stats=``) with each request's queue wait (queued until a
worker took its batch), and hands the same waits to ``observe`` (the
``recalib_queue_wait_seconds`` histogram): one measurement of the queue for both. Nothing
is shared with the threads.

Runs in flight are bounded by ``max_concurrent`` (like Triton's instance count): on a GPU
one (concurrent runs of a session serialise on its CUDA stream anyway: batch instead); on
a CPU, as many as the cores hold runs of ``intra_op_threads`` threads each, so that runs
never oversubscribe the cores (a parallel operator waits for its slowest thread). The
consumer takes a free run slot *before* forming a batch, so a batch holds everything
that queued while the slots were busy. With ``enabled=False`` (or a model whose axis 0
is fixed) every request runs alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import NotReady, ServiceError
from .stats import ModelStats, RunTiming

__all__ = ["BatchObserver", "Batcher", "LoopBudget", "RunFn"]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
Feed = dict[str, Array]

RunFn = Callable[[Feed, int], list[Array]]
"""``run(feed, rows) -> outputs``: one session run; each output has ``rows`` on axis 0
when the model is batched. Called in a worker thread."""

BatchObserver = Callable[[int, Sequence[float]], None]
"""``observe(rows, queue_waits)`` after each run (metrics), called on the event loop."""

_LOAD_DECAY = 0.8
_ROW_DECAY = 0.9  # the moving average of seconds per row
_ROW_KEYS = 64  # batch keys with a moving average of their own (then: worker threads)
_WAIT_ABOVE = 1.5


@dataclass(eq=False)
class _Item:
    feed: Feed
    rows: int
    key: tuple[Any, ...]
    future: asyncio.Future[list[Array]]
    enqueued: float


def _key(feed: Feed) -> tuple[Any, ...]:
    return tuple((name, arr.dtype.str, arr.shape[1:]) for name, arr in feed.items())


class LoopBudget:
    """Seconds of session runs made on the event loop in its current turn (see the module).

    One per runtime, shared by its batchers: runs on the loop add what they took
    (:meth:`spend`), and a lone request's larger bound applies only while the turn's total
    plus its estimate stays within :attr:`seconds` (:meth:`allows`). The total starts over
    with the loop's next turn (a ``call_soon`` callback runs after every callback that was
    ready when the first run was spent).

    Args:
        seconds: the most the runs of one turn may add up to under the larger bound.
    """

    def __init__(self, seconds: float) -> None:
        if seconds < 0.0:
            raise ValueError(f"expected seconds >= 0 (got {seconds})")
        self.seconds = seconds
        self.spent = 0.0
        self._reset_pending = False

    def allows(self, estimate: float) -> bool:
        return self.spent + estimate <= self.seconds

    def spend(self, seconds: float) -> None:
        self.spent += seconds
        if not self._reset_pending:
            self._reset_pending = True
            asyncio.get_running_loop().call_soon(self._reset)

    def _reset(self) -> None:
        self.spent = 0.0
        self._reset_pending = False


class Batcher:
    """Gathers concurrent requests of one model version into session runs.

    Args:
        run: the session run (see :data:`RunFn`), called in ``executor``.
        executor: a bounded thread pool shared by the runtime's batchers.
        max_batch_size: most rows in one run (a larger request runs alone).
        max_delay: seconds the first request of a batch may wait for others.
        enabled: gather requests at all (``False``: one run per request).
        batchable: the model's inputs and outputs all have a variable axis 0.
        observe: called after each run with its rows and each request's queue wait.
        stats: the version's statistics, updated after each run (see the module).
        max_concurrent: session runs in flight at once (1 on a GPU; on a CPU, cores
            divided by the intra-op threads per run).
        inline_seconds: a batch expected to run at most this long runs on the event loop
            (0: every run in ``executor``; see the module).
        alone_inline_seconds: the same bound for a request that has the batcher to itself
            (at least ``inline_seconds``; only where ``inline_seconds`` > 0), within
            ``loop_budget``.
        loop_budget: the runs on the loop per turn of it, shared with other batchers
            (default: this batcher's own, of ``alone_inline_seconds``).
        name: for log lines.
    """

    def __init__(
        self,
        run: RunFn,
        *,
        executor: Executor,
        max_batch_size: int,
        max_delay: float,
        enabled: bool = True,
        batchable: bool = True,
        observe: BatchObserver | None = None,
        stats: ModelStats | None = None,
        max_concurrent: int = 1,
        inline_seconds: float = 0.0,
        alone_inline_seconds: float = 0.0,
        loop_budget: LoopBudget | None = None,
        name: str = "model",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"expected max_batch_size >= 1 (got {max_batch_size})")
        if max_delay < 0.0:
            raise ValueError(f"expected max_delay >= 0 (got {max_delay})")
        if max_concurrent < 1:
            raise ValueError(f"expected max_concurrent >= 1 (got {max_concurrent})")
        if inline_seconds < 0.0:
            raise ValueError(f"expected inline_seconds >= 0 (got {inline_seconds})")
        if alone_inline_seconds < 0.0:
            raise ValueError(f"expected alone_inline_seconds >= 0 (got {alone_inline_seconds})")
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self.gathers = enabled and batchable
        self._observe = observe
        self._stats = stats
        self.name = name
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._load = 1.0
        self.max_concurrent = max_concurrent
        self._slots = asyncio.Semaphore(max_concurrent)
        self.inline_seconds = inline_seconds
        # off with inline runs off (a GPU session): no estimate could allow it anyway
        alone = max(alone_inline_seconds, inline_seconds) if inline_seconds > 0.0 else 0.0
        self.alone_inline_seconds = alone
        self._budget = loop_budget if loop_budget is not None else LoopBudget(alone)
        self._running = 0  # run tasks that have not finished their session run
        self.row_seconds: dict[tuple[Any, ...], float] = {}
        """Moving average of the session's seconds per row, by batch key (see the module)."""

    def start(self) -> None:
        """Start the consumer task (on the running event loop)."""
        if self._task is None or self._task.done():  # first start, or after a failure
            self._task = asyncio.get_running_loop().create_task(
                self._consume(), name=f"batcher {self.name}"
            )
            self._task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        """A consumer that failed while requests queued behind it is replaced."""
        if task is self._task and self._queue:
            self.start()

    @property
    def pending(self) -> int:
        """Requests waiting in the queue."""
        return len(self._queue)

    async def submit(self, feed: Feed, rows: int) -> list[Array]:
        """Queue one validated request and wait for its outputs (its own rows only).

        Raises:
            NotReady: the batcher is closing.
        """
        if self._closed:
            raise NotReady(f"{self.name} is being unloaded; retry the request")
        self.start()
        loop = asyncio.get_running_loop()
        item = _Item(feed, rows, _key(feed), loop.create_future(), time.perf_counter())
        if not self.gathers and not self._queue and not self._running:
            if self._inline(item.key, rows, alone=True):  # nothing to wait for: run it now
                results, timings = self._on_loop([(feed, rows)])
                self._settle([item], item.enqueued, results, timings)
                return item.future.result()
        self._queue.append(item)
        self._wakeup.set()
        return await item.future

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the consumer."""
        self._closed = True
        self._wakeup.set()
        while self._task is not None:
            task = self._task
            await task
            if task is self._task:  # else a failed consumer was replaced: drain that one
                self._task = None

    # -- consumer ----------------------------------------------------------------------

    async def _next(self, timeout: float | None) -> bool:
        """Wait until the queue is non-empty (or ``timeout`` passes); True if it is."""
        while not self._queue:
            if self._closed:
                return False
            self._wakeup.clear()
            if timeout is None:
                await self._wakeup.wait()
                continue
            if timeout <= 0.0:
                return False
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                return bool(self._queue)
        return True

    def _gather(self, batch: list[_Item], held: deque[_Item], rows: int) -> int:
        """Move items from ``held`` then the queue into ``batch`` while they fit."""
        first = batch[0]
        for source in (held, self._queue):
            kept: deque[_Item] = deque()
            while source and rows < self.max_batch_size:
                item = source.popleft()
                if item.key == first.key and rows + item.rows <= self.max_batch_size:
                    batch.append(item)
                    rows += item.rows
                else:
                    kept.append(item)
            if source is held:
                held.extendleft(reversed(kept))
            else:
                held.extend(kept)
        return rows

    async def _consume(self) -> None:
        held: deque[_Item] = deque()  # taken from the queue, waiting for a later batch
        runs: set[asyncio.Task[None]] = set()
        batch: list[_Item] = []
        slot = False  # a run slot acquired and not yet handed to a run task
        try:
            while True:
                if not held and not await self._next(None):
                    return
                await self._slots.acquire()  # a free run slot first: the batch then takes
                slot = True
                batch = self._form(held)  # everything that queued meanwhile
                if self.gathers:
                    batch = await self._grow(batch, held)
                self._load = _LOAD_DECAY * self._load + (1.0 - _LOAD_DECAY) * len(batch)
                entered = [False]  # whether _execute began (and so counts its run down)
                alone = len(batch) == 1 and not held and self._load <= _WAIT_ABOVE
                run = asyncio.get_running_loop().create_task(self._execute(batch, entered, alone))
                self._running += 1
                runs.add(run)
                run.add_done_callback(self._finished(runs, entered))
                slot, batch = False, []
        except Exception as exc:  # a bug: fail the waiting requests, never hang them
            log.exception("%s: the batching consumer failed", self.name)
            error = ServiceError(f"{self.name}: batching failed: {exc}")
            if slot:
                self._slots.release()
            waiting = [*batch, *held, *self._queue]
            self._queue.clear()
            for item in waiting:
                if not item.future.done():
                    item.future.set_exception(error)
        finally:
            if runs:
                await asyncio.gather(*runs, return_exceptions=True)

    def _finished(
        self, runs: set[asyncio.Task[None]], entered: list[bool]
    ) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            runs.discard(task)
            if not entered[0]:  # cancelled before its first step
                self._running -= 1
            self._slots.release()

        return done

    def _form(self, held: deque[_Item]) -> list[_Item]:
        source = held if held else self._queue
        return [source.popleft()]

    async def _grow(self, batch: list[_Item], held: deque[_Item]) -> list[_Item]:
        """Add queued requests that fit; wait for more only under concurrency."""
        first = batch[0]
        rows = self._gather(batch, held, first.rows)
        wait = self._load > _WAIT_ABOVE and self.max_delay > 0.0
        while wait and rows < self.max_batch_size:
            remaining = first.enqueued + self.max_delay - time.perf_counter()
            if not await self._next(remaining):
                break
            rows = self._gather(batch, held, rows)
            if held:  # the next request cannot join: stop waiting
                break
        return batch

    async def _execute(self, batch: list[_Item], entered: list[bool], alone: bool) -> None:
        entered[0] = True
        live = [item for item in batch if not item.future.done()]
        start = time.perf_counter()
        parts = [(i.feed, i.rows) for i in live]
        timings: list[RunTiming | None]
        try:
            if not live:
                return
            alone = alone and len(live) == 1 and not self._queue  # nothing queued behind it
            if self._inline(live[0].key, sum(i.rows for i in live), alone=alone):
                results, timings = self._on_loop(parts)
            else:
                loop = asyncio.get_running_loop()
                results, timings = await loop.run_in_executor(
                    self._executor, self._run_batch, parts
                )
        except Exception as exc:  # executor shut down, or a bug: every caller learns it
            log.exception("%s: batch of %d requests failed", self.name, len(live))
            results, timings = [exc] * len(live), [None] * len(live)
        finally:  # before the callers wake: the next request may run in submit
            self._running -= 1
        self._settle(live, start, results, timings)

    def _settle(
        self,
        live: list[_Item],
        start: float,
        results: Sequence[list[Array] | BaseException],
        timings: Sequence[RunTiming | None],
    ) -> None:
        """Statistics, metrics and the callers' futures after one run of ``live``. The
        futures are settled whatever the bookkeeping raises (logged): an answer that is
        ready is never lost to a metrics error."""
        try:
            self._account(live, start, timings)
        except Exception:
            log.exception("%s: the statistics of a run failed", self.name)
        for item, result in zip(live, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _account(
        self, live: list[_Item], start: float, timings: Sequence[RunTiming | None]
    ) -> None:
        stats = self._stats
        counted: RunTiming | None = None
        waits: list[float] = []
        for item, timing in zip(live, timings, strict=True):
            # the queue wait ends when a worker thread took the batch: one measurement
            # for the statistics and the histogram
            waits.append((start if timing is None else timing.started) - item.enqueued)
            if timing is not None and timing is not counted:  # parts of a run share it
                counted = timing
                self._timed(item.key, timing)
                if stats is not None:
                    stats.add_run(timing)
            if timing is not None and stats is not None and not item.future.done():
                stats.add_request_run(item.enqueued, timing)
        if self._observe is not None:
            self._observe(sum(i.rows for i in live), waits)

    def _inline(self, key: tuple[Any, ...], rows: int, *, alone: bool = False) -> bool:
        """Whether a batch of ``rows`` of ``key`` runs on the event loop (see the module):
        never with several runs in flight at once, which a run on the loop would
        serialise, nor for a key not timed yet; ``alone``: the batch has the batcher to
        itself (``alone_inline_seconds``)."""
        estimate = self.row_seconds.get(key)
        if self.max_concurrent != 1 or estimate is None:
            return False
        expected = estimate * rows
        if expected <= self.inline_seconds:
            return True
        return alone and expected <= self.alone_inline_seconds and self._budget.allows(expected)

    def _on_loop(
        self, parts: list[tuple[Feed, int]]
    ) -> tuple[list[list[Array] | Exception], list[RunTiming | None]]:
        """:meth:`_run_batch` on the event loop, its time spent from the loop's budget."""
        started = time.perf_counter()
        try:
            return self._run_batch(parts)
        finally:
            self._budget.spend(time.perf_counter() - started)

    def _timed(self, key: tuple[Any, ...], timing: RunTiming) -> None:
        if self.inline_seconds <= 0.0:
            return
        per_row = timing.infer / max(1, timing.rows)
        average = self.row_seconds.get(key)
        if average is None:
            if len(self.row_seconds) < _ROW_KEYS:
                self.row_seconds[key] = per_row
            return
        self.row_seconds[key] = _ROW_DECAY * average + (1.0 - _ROW_DECAY) * per_row

    def _run_batch(
        self, parts: list[tuple[Feed, int]]
    ) -> tuple[list[list[Array] | Exception], list[RunTiming | None]]:
        """A worker thread (or the event loop, for a short run): one run for all parts, or
        one per part if that fails; each part's result and the timing of the run that
        answered it (``None``: failed)."""
        started = time.perf_counter()
        if len(parts) == 1:
            result, timing = self._run_one(*parts[0], started)
            return [result], [timing]
        names = list(parts[0][0])
        feed = {name: np.concatenate([p[0][name] for p in parts], axis=0) for name in names}
        total = sum(rows for _, rows in parts)
        fed = time.perf_counter()
        try:
            outputs = self._run(feed, total)
            ran = time.perf_counter()
            bad = [o.shape for o in outputs if o.ndim == 0 or o.shape[0] != total]
            if bad:
                raise ValueError(f"expected outputs with {total} rows on axis 0 (got {bad})")
        except Exception:
            log.warning(
                "%s: batched run of %d requests failed; running them one by one",
                self.name,
                len(parts),
                exc_info=True,
            )
            singles = [self._run_one(*part, started) for part in parts]
            return [r for r, _ in singles], [t for _, t in singles]
        results: list[list[Array] | Exception] = []
        start = 0
        for _, rows in parts:
            results.append([o[start : start + rows] for o in outputs])
            start += rows
        timing = RunTiming(total, started, fed - started, ran - fed, time.perf_counter() - ran)
        return results, [timing] * len(parts)

    def _run_one(
        self, feed: Feed, rows: int, started: float
    ) -> tuple[list[Array] | Exception, RunTiming | None]:
        before = time.perf_counter()
        try:
            outputs = self._run(feed, rows)
        except Exception as exc:  # reported to this request only
            return exc, None
        return outputs, RunTiming(rows, started, 0.0, time.perf_counter() - before)
