"""Dynamic batching: each caller gets its own rows, batches form, errors stay per request."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from runtime_helpers import export, make_model, source_images

from service.errors import NotReady, ServiceError
from service.runtime.batching import Batcher, LoopBudget
from service.runtime.runtime import concurrent_runs
from service.runtime.sessions import create_session
from service.settings import Settings

T = TypeVar("T")
TIMEOUT = 20.0


def _run(coro_fn: Callable[[ThreadPoolExecutor], Awaitable[T]]) -> T:
    """Run an async test body with a worker pool and a hard timeout (never hangs)."""

    async def main() -> T:
        with ThreadPoolExecutor(2) as pool:
            return await asyncio.wait_for(coro_fn(pool), TIMEOUT)

    return asyncio.run(main())


class _Recorder:
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.waits: list[float] = []

    def __call__(self, rows: int, waits: Any) -> None:
        self.batches.append(rows)
        self.waits.extend(waits)


def _slow_double(delay: float = 0.01) -> Callable[[dict[str, np.ndarray], int], list[np.ndarray]]:
    """A run function that takes a while (so requests queue up) and keeps rows apart."""
    lock = threading.Lock()

    def run(feed: dict[str, np.ndarray], rows: int) -> list[np.ndarray]:
        with lock:  # the batcher never runs two batches of one model at once
            time.sleep(delay)
            x = feed["x"]
            if x.shape[0] != rows:
                raise AssertionError(f"rows {rows} vs {x.shape}")
            if np.isnan(x).any():
                raise ValueError("NaN input")
            return [x * 2.0 + 1.0, x.sum(axis=tuple(range(1, x.ndim)))]

    return run


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(make_model(0), tmp_path_factory.mktemp("batching") / "tiny.onnx")


def test_fifty_concurrent_requests_each_get_their_own_rows(onnx_path: Path) -> None:
    session = create_session(onnx_path, Settings(execution_provider="cpu", intra_op_threads=1))
    data = [source_images(1 + i % 3, seed=100 + i) for i in range(50)]  # 1-3 rows each
    singles = [session.run({"input": x})[0] for x in data]
    recorder = _Recorder()

    async def body(pool: ThreadPoolExecutor) -> list[list[np.ndarray]]:
        batcher = Batcher(
            lambda feed, rows: session.run(feed),
            executor=pool,
            max_batch_size=16,
            max_delay=0.005,
            observe=recorder,
        )
        results = await asyncio.gather(*(batcher.submit({"input": x}, len(x)) for x in data))
        await batcher.close()
        return results

    results = _run(body)
    for x, single, (out,) in zip(data, singles, results, strict=True):
        assert out.shape == (len(x), 3)
        np.testing.assert_allclose(out, single, rtol=1e-5, atol=1e-6)
    assert sum(recorder.batches) == sum(len(x) for x in data)
    assert max(recorder.batches) > 3, "concurrent requests should share runs"
    assert max(recorder.batches) <= 16
    assert len(recorder.waits) == 50 and min(recorder.waits) >= 0.0


def test_batches_respect_max_rows_and_split_outputs() -> None:
    recorder = _Recorder()
    data = [np.full((2, 3), float(i), dtype=np.float32) for i in range(20)]

    async def body(pool: ThreadPoolExecutor) -> list[list[np.ndarray]]:
        batcher = Batcher(
            _slow_double(), executor=pool, max_batch_size=5, max_delay=0.0, observe=recorder
        )
        out = await asyncio.gather(*(batcher.submit({"x": x}, 2) for x in data))
        await batcher.close()
        return out

    results = _run(body)
    for i, (doubled, summed) in enumerate(results):
        np.testing.assert_array_equal(doubled, np.full((2, 3), 2.0 * i + 1.0))
        np.testing.assert_array_equal(summed, [3.0 * i, 3.0 * i])
    assert max(recorder.batches) == 4  # two 2-row requests; a third would exceed 5
    assert sum(recorder.batches) == 40


def test_only_identical_shapes_share_a_run() -> None:
    shapes: list[tuple[int, ...]] = []
    inner = _slow_double()

    def run(feed: dict[str, np.ndarray], rows: int) -> list[np.ndarray]:
        shapes.append(feed["x"].shape)
        return inner(feed, rows)

    data = [np.full((1, 2 + i % 2), float(i), np.float32) for i in range(12)]

    async def body(pool: ThreadPoolExecutor) -> list[list[np.ndarray]]:
        batcher = Batcher(run, executor=pool, max_batch_size=32, max_delay=0.002)
        out = await asyncio.gather(*(batcher.submit({"x": x}, 1) for x in data))
        await batcher.close()
        return out

    results = _run(body)
    for x, (doubled, _) in zip(data, results, strict=True):
        np.testing.assert_array_equal(doubled, x * 2.0 + 1.0)
    assert {s[1] for s in shapes} == {2, 3}
    assert any(s[0] > 1 for s in shapes)


def test_one_bad_request_does_not_fail_the_others() -> None:
    data = [np.full((1, 3), float(i), np.float32) for i in range(10)]
    data[4] = np.full((1, 3), np.nan, np.float32)
    recorder = _Recorder()

    async def body(pool: ThreadPoolExecutor) -> list[Any]:
        batcher = Batcher(
            _slow_double(), executor=pool, max_batch_size=32, max_delay=0.0, observe=recorder
        )
        out = await asyncio.gather(
            *(batcher.submit({"x": x}, 1) for x in data), return_exceptions=True
        )
        await batcher.close()
        return out

    results = _run(body)
    assert isinstance(results[4], ValueError) and "NaN" in str(results[4])
    for i, result in enumerate(results):
        if i != 4:
            np.testing.assert_array_equal(result[0], data[i] * 2.0 + 1.0)


def test_disabled_batching_runs_each_request_alone() -> None:
    recorder = _Recorder()

    async def body(pool: ThreadPoolExecutor) -> None:
        batcher = Batcher(
            _slow_double(0.002),
            executor=pool,
            max_batch_size=32,
            max_delay=0.01,
            enabled=False,
            observe=recorder,
        )
        await asyncio.gather(
            *(batcher.submit({"x": np.ones((1, 2), np.float32)}, 1) for _ in range(8))
        )
        await batcher.close()

    _run(body)
    assert recorder.batches == [1] * 8


def test_close_drains_queue_then_refuses() -> None:
    async def body(pool: ThreadPoolExecutor) -> tuple[list[Any], BaseException | None]:
        batcher = Batcher(_slow_double(0.005), executor=pool, max_batch_size=2, max_delay=0.0)
        tasks = [
            asyncio.ensure_future(batcher.submit({"x": np.ones((1, 2), np.float32)}, 1))
            for _ in range(6)
        ]
        await asyncio.sleep(0)  # let them queue
        await batcher.close()
        done = [t.result() for t in tasks]
        try:
            await batcher.submit({"x": np.ones((1, 2), np.float32)}, 1)
        except NotReady as exc:
            return done, exc
        return done, None

    done, refused = _run(body)
    assert len(done) == 6
    assert isinstance(refused, NotReady)


def test_waits_for_more_only_under_concurrency() -> None:
    recorder = _Recorder()

    async def body(pool: ThreadPoolExecutor) -> None:
        # A delay far beyond the test's timeout: a lone client must never sit it out.
        batcher = Batcher(
            _slow_double(0.0), executor=pool, max_batch_size=8, max_delay=3600.0, observe=recorder
        )
        for _ in range(3):
            await batcher.submit({"x": np.ones((1, 2), np.float32)}, 1)
        await batcher.close()

    _run(body)
    assert recorder.batches == [1, 1, 1]


def test_runs_in_flight_are_bounded_by_max_concurrent() -> None:
    lock = threading.Lock()
    active = [0, 0]  # now, peak

    def run(feed: dict[str, np.ndarray], rows: int) -> list[np.ndarray]:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return [feed["x"] + 1.0]

    async def body(pool: ThreadPoolExecutor) -> list[list[np.ndarray]]:
        batcher = Batcher(run, executor=pool, max_batch_size=1, max_delay=0.0, max_concurrent=2)
        data = [np.full((1, 2), float(i), np.float32) for i in range(8)]
        out = await asyncio.gather(*(batcher.submit({"x": x}, 1) for x in data))
        await batcher.close()
        return out

    results = _run(body)
    assert [float(r[0][0, 0]) for r in results] == [float(i) + 1.0 for i in range(8)]
    assert active[1] == 2


@pytest.mark.parametrize(
    ("threads", "provider", "expected"),
    [
        (0, "CPUExecutionProvider", 1),
        (1, "CPUExecutionProvider", None),
        (1, "CUDAExecutionProvider", 1),
    ],
)
def test_concurrent_runs_rule(threads: int, provider: str, expected: int | None) -> None:
    cpus = os.cpu_count() or 1
    got = concurrent_runs(Settings(intra_op_threads=threads), provider)
    assert got == (cpus if expected is None else expected)


def test_a_failed_batching_consumer_fails_its_requests_and_restarts() -> None:
    def double(feed: dict[str, np.ndarray], rows: int) -> list[np.ndarray]:
        return [feed["x"] * 2.0]

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(double, executor=pool, max_batch_size=8, max_delay=0.0)
            grow = batcher._grow
            failures = [RuntimeError("injected")]

            async def broken(batch: list[Any], held: Any) -> list[Any]:
                if failures:  # after the run slot was taken and the first item popped
                    raise failures.pop()
                return await grow(batch, held)

            batcher._grow = broken  # type: ignore[method-assign]
            x = np.ones((1, 3), np.float32)
            first = await asyncio.wait_for(
                asyncio.gather(
                    *(batcher.submit({"x": x}, 1) for _ in range(3)), return_exceptions=True
                ),
                10.0,
            )
            for result in first:
                assert isinstance(result, ServiceError)
                assert "batching failed: injected" in str(result)
            # the consumer is back and the run slot (max_concurrent=1) was given back
            (out,) = await asyncio.wait_for(batcher.submit({"x": x}, 1), 10.0)
            np.testing.assert_array_equal(out, x * 2.0)
            await asyncio.wait_for(batcher.close(), 10.0)

    asyncio.run(main())


def _threads_of_runs(
    inline_seconds: float, delay: float, requests: int
) -> tuple[list[bool], Batcher]:
    """Sequential requests; for each run, whether it ran on the event loop's thread."""
    on_loop: list[bool] = []
    loop_thread: list[int] = []

    def run(feed: dict[str, np.ndarray], rows: int) -> list[np.ndarray]:
        on_loop.append(threading.get_ident() == loop_thread[0])
        time.sleep(delay)
        return [feed["x"] * 2.0]

    async def body(pool: ThreadPoolExecutor) -> Batcher:
        loop_thread.append(threading.get_ident())
        batcher = Batcher(
            run, executor=pool, max_batch_size=8, max_delay=0.0, inline_seconds=inline_seconds
        )
        for i in range(requests):
            x = np.full((1, 2), float(i), np.float32)
            (out,) = await batcher.submit({"x": x}, 1)
            np.testing.assert_array_equal(out, x * 2.0)
        await batcher.close()
        return batcher

    return on_loop, _run(body)


def test_short_runs_run_on_the_event_loop_after_the_first_timed_run() -> None:
    on_loop, batcher = _threads_of_runs(inline_seconds=0.5, delay=0.0, requests=4)
    assert on_loop == [False, True, True, True]  # the first run has no estimate yet
    (average,) = batcher.row_seconds.values()
    assert 0.0 <= average < 0.5


def test_long_runs_and_inline_off_stay_in_the_workers() -> None:
    slow, batcher = _threads_of_runs(inline_seconds=0.001, delay=0.005, requests=3)
    assert slow == [False, False, False]
    (average,) = batcher.row_seconds.values()
    assert average >= 0.004
    off, batcher = _threads_of_runs(inline_seconds=0.0, delay=0.0, requests=3)
    assert off == [False, False, False] and not batcher.row_seconds


KEY = (("x", "<f4", (2,)),)


def test_a_new_input_shape_runs_in_a_worker_first() -> None:
    """The estimate is per batch key: after small inputs are timed (and run inline), the
    first request of a larger shape still goes to a worker thread."""
    on_loop: list[bool] = []
    loop_thread: list[int] = []

    def run(feed: dict[str, np.ndarray], rows: int) -> list[np.ndarray]:
        on_loop.append(threading.get_ident() == loop_thread[0])
        return [feed["x"] * 2.0]

    async def body(pool: ThreadPoolExecutor) -> int:
        loop_thread.append(threading.get_ident())
        batcher = Batcher(run, executor=pool, max_batch_size=8, max_delay=0.0, inline_seconds=0.5)
        for width in (2, 2, 2, 64, 64, *range(100, 170), 100, 169):
            await batcher.submit({"x": np.ones((1, width), np.float32)}, 1)
        await batcher.close()
        return len(batcher.row_seconds)

    keys = _run(body)
    assert on_loop[:5] == [False, True, True, False, True]
    assert not any(on_loop[5:-2])  # each new width: a worker first
    # width 100 was timed (the 3rd key); 169 came after _ROW_KEYS keys: never timed
    assert on_loop[-2:] == [True, False]
    assert keys == 64


def test_inline_estimate_scales_with_the_batch_rows() -> None:
    async def body(pool: ThreadPoolExecutor) -> list[bool]:
        answers = []
        for concurrent, rows in ((1, 4), (1, 5), (2, 1)):
            batcher = Batcher(
                lambda feed, rows: [feed["x"]],
                executor=pool,
                max_batch_size=8,
                max_delay=0.0,
                inline_seconds=0.004,
                max_concurrent=concurrent,
            )
            batcher.row_seconds[KEY] = 0.001
            answers.append(batcher._inline(KEY, rows))
            answers.append(batcher._inline(("other",), 1))  # a key not timed yet
            await batcher.close()
        return answers

    # 4 x 1 ms fits 4 ms, 5 rows do not; with two runs in flight the loop would serialise
    assert _run(body) == [True, False, False, False, False, False]
    with pytest.raises(ValueError, match="inline_seconds"):
        _constructed(inline_seconds=-1)


def _constructed(**options: Any) -> Batcher:
    """A batcher built with ``options`` and never started (its constructor's checks)."""
    with ThreadPoolExecutor(1) as pool:
        return Batcher(lambda f, r: [], executor=pool, max_batch_size=1, max_delay=0.0, **options)


def test_a_lone_request_has_the_larger_alone_bound() -> None:
    """A run estimated between ``inline_seconds`` and ``alone_inline_seconds`` runs on the
    loop when its request has the batcher to itself (with and without batching), and in a
    worker when other requests are queued behind it."""
    on_loop: list[bool] = []
    loop_thread: list[int] = []

    def run(feed: dict[str, np.ndarray], rows: int) -> list[np.ndarray]:
        on_loop.append(threading.get_ident() == loop_thread[0])
        time.sleep(0.004)  # over inline_seconds (2 ms), under the alone bound (50 ms)
        return [feed["x"] * 2.0]

    async def body(pool: ThreadPoolExecutor) -> list[list[bool]]:
        loop_thread.append(threading.get_ident())
        seen = []
        for enabled in (False, True):
            batcher = Batcher(
                run,
                executor=pool,
                max_batch_size=1,  # one request per run, also with batching on
                max_delay=0.0,
                enabled=enabled,
                inline_seconds=0.002,
                alone_inline_seconds=0.05,
            )
            on_loop.clear()
            for i in range(3):  # sequential: alone, inline after the first timed run
                x = np.full((1, 2), float(i), np.float32)
                (out,) = await batcher.submit({"x": x}, 1)
                np.testing.assert_array_equal(out, x * 2.0)
            crowd = [batcher.submit({"x": np.ones((1, 2), np.float32)}, 1) for _ in range(4)]
            await asyncio.gather(*crowd)  # queued behind each other: not alone
            seen.append(list(on_loop))
            await batcher.close()
        return seen

    unbatched, batched = _run(body)
    for runs in (unbatched, batched):
        assert runs[:3] == [False, True, True]  # the first run has no estimate yet
    # without batching each request of the crowd runs inside its own submit, before the
    # next one is submitted: each finds the batcher idle
    assert unbatched[3:] == [True] * 4
    # with batching they all queue first: the consumer's runs have requests behind them,
    # except the last one
    assert batched[3:] == [False, False, False, True]
    with pytest.raises(ValueError, match="alone_inline"):
        _constructed(alone_inline_seconds=-1)
    # never below the plain bound
    assert (
        _constructed(inline_seconds=0.01, alone_inline_seconds=0.001).alone_inline_seconds == 0.01
    )


def test_the_loop_budget_bounds_lone_runs_per_turn_across_batchers() -> None:
    async def body(pool: ThreadPoolExecutor) -> list[bool]:
        budget = LoopBudget(0.005)
        a, b = (
            Batcher(
                lambda feed, rows: [feed["x"]],
                executor=pool,
                max_batch_size=8,
                max_delay=0.0,
                inline_seconds=0.001,
                alone_inline_seconds=0.005,
                loop_budget=budget,
            )
            for _ in range(2)
        )
        a.row_seconds[KEY] = b.row_seconds[KEY] = 0.004
        answers = [a._inline(KEY, 1, alone=True), a._inline(KEY, 1)]  # alone only
        budget.spend(0.004)  # a run on the loop this turn
        answers += [a._inline(KEY, 1, alone=True), b._inline(KEY, 1, alone=True)]
        a.row_seconds[KEY] = 0.0005
        answers.append(a._inline(KEY, 1))  # the ordinary bound is not budgeted
        await asyncio.sleep(0)  # the loop's next turn: the budget starts over
        answers.append(b._inline(KEY, 1, alone=True))
        for batcher in (a, b):
            await batcher.close()
        return answers

    assert _run(body) == [True, False, False, False, True, True]
    # inline runs off (a GPU session): no alone bound
    assert _constructed(alone_inline_seconds=0.005).alone_inline_seconds == 0.0
    with pytest.raises(ValueError, match="seconds >= 0"):
        LoopBudget(-1.0)


def test_a_burst_without_batching_does_not_run_back_to_back_on_the_loop() -> None:
    """Concurrent requests that each find the batcher idle (batching off): at most one
    run over the ordinary bound per turn of the loop, so other tasks still get their
    turn between them."""
    loop_thread: list[int] = []
    on_loop = [0]
    between: list[int] = []  # runs on the loop between two turns of a probe task

    def run(feed: dict[str, np.ndarray], rows: int) -> list[np.ndarray]:
        if threading.get_ident() == loop_thread[0]:
            on_loop[0] += 1
        time.sleep(0.004)  # over inline_seconds (1 ms), under the alone bound
        return [feed["x"]]

    async def body(pool: ThreadPoolExecutor) -> None:
        loop_thread.append(threading.get_ident())
        batcher = Batcher(
            run,
            executor=pool,
            max_batch_size=8,
            max_delay=0.0,
            enabled=False,
            inline_seconds=0.001,
            alone_inline_seconds=0.006,
        )
        await batcher.submit({"x": np.ones((1, 2), np.float32)}, 1)  # timed in a worker
        done = asyncio.Event()

        async def probe() -> None:
            seen = on_loop[0]
            while not done.is_set():
                await asyncio.sleep(0)
                between.append(on_loop[0] - seen)
                seen = on_loop[0]

        watcher = asyncio.create_task(probe())
        for _ in range(3):
            await asyncio.gather(
                *(batcher.submit({"x": np.ones((1, 2), np.float32)}, 1) for _ in range(8))
            )
        done.set()
        await watcher
        await batcher.close()

    _run(body)
    assert max(between) <= 1  # 8 per turn without the budget


def test_without_batching_a_short_run_runs_in_the_callers_task() -> None:
    """Batching off, nothing queued, nothing in flight: a short run runs inside ``submit``
    (no hand-off to the consumer task), with its statistics and metrics as before; a
    batching batcher still hands every request to the consumer, which forms batches."""
    tasks: list[asyncio.Task[Any] | None] = []
    observed: list[tuple[int, int]] = []

    def run(feed: dict[str, np.ndarray], rows: int) -> list[np.ndarray]:
        try:
            tasks.append(asyncio.current_task())
        except RuntimeError:  # a worker thread: no event loop there
            tasks.append(None)
        if feed["x"].shape[1] == 3:
            raise ValueError("bad width")
        return [feed["x"] * 2.0]

    async def body(pool: ThreadPoolExecutor) -> list[bool]:
        ran_in_caller: list[bool] = []
        for gathers in (False, True):
            tasks.clear()
            batcher = Batcher(
                run,
                executor=pool,
                max_batch_size=8,
                max_delay=0.0,
                enabled=gathers,
                inline_seconds=0.5,
                observe=lambda rows, waits: observed.append((rows, len(waits))),
            )
            for i in range(3):
                x = np.full((1, 2), float(i), np.float32)
                (out,) = await batcher.submit({"x": x}, 1)
                np.testing.assert_array_equal(out, x * 2.0)
            caller = asyncio.current_task()
            ran_in_caller.extend(task is caller for task in tasks)
            if not gathers:  # a failing run: this caller's error, raised from submit
                with pytest.raises(ValueError, match="bad width"):
                    await batcher.submit({"x": np.ones((1, 3), np.float32)}, 1)
            await batcher.close()
        return ran_in_caller

    ran_in_caller = _run(body)
    # the first run (no estimate yet) goes through the consumer; then in the caller's task
    assert ran_in_caller == [False, True, True, False, False, False]
    assert observed[:3] == [(1, 1)] * 3  # every run observed, the direct ones too


def test_a_failing_metrics_observer_loses_no_answer(caplog: pytest.LogCaptureFixture) -> None:
    """The bookkeeping after a run (statistics, ``observe``) raising is logged; every
    caller still gets its answer, on the consumer's path and on the direct one alike."""

    def observe(rows: int, waits: Any) -> None:
        raise RuntimeError("metrics broke")

    async def body(pool: ThreadPoolExecutor) -> int:
        answered = 0
        for enabled in (True, False):
            batcher = Batcher(
                lambda feed, rows: [feed["x"] + 1.0],
                executor=pool,
                max_batch_size=8,
                max_delay=0.0,
                enabled=enabled,
                inline_seconds=0.5,
                observe=observe,
            )
            for i in range(3):
                x = np.full((1, 2), float(i), np.float32)
                (out,) = await asyncio.wait_for(batcher.submit({"x": x}, 1), 10.0)
                np.testing.assert_array_equal(out, x + 1.0)
                answered += 1
            await batcher.close()
        return answered

    assert _run(body) == 6
    assert caplog.text.count("the statistics of a run failed") == 6
