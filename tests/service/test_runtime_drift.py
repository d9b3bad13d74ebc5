"""Drift monitoring: tapped runs feed a rolling window; shifted traffic drifts, in-domain
traffic does not, and recalibrating on the shifted domain (then serving the new version)
brings its drift down."""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import pytest
import torch
from prometheus_client import CollectorRegistry
from runtime_helpers import IMAGE, export, make_model, shifted_images, source_images

import recalib
from recalib.drift import MomentWindow, score_model
from recalib.onnx.taps import POOLED_OUTPUT, add_drift_taps
from service.api.v2_codec import decode_request, encode_request
from service.metrics import ServiceMetrics
from service.runtime.drift_monitor import DriftMonitor
from service.runtime.runtime import ServingRuntime
from service.runtime.sessions import create_session
from service.settings import Settings

T = TypeVar("T")


def _run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro, 30.0)

    return asyncio.run(main())


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_model(0)


@pytest.fixture(scope="module")
def onnx_path(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(model, tmp_path_factory.mktemp("drift") / "v1.onnx")


def _monitor(path: Path, **kwargs: Any) -> tuple[DriftMonitor, Callable[[np.ndarray], None]]:
    """A monitor and a function that runs a batch through the tapped session into it."""
    tapped = add_drift_taps(onnx.load(path), reduce=kwargs.pop("reduce", "auto"))
    monitor = DriftMonitor(tapped, **{"window_seconds": 60.0, "threshold": 0.5, **kwargs})
    session = create_session(
        tapped.SerializeToString(), Settings(execution_provider="cpu", intra_op_threads=1)
    )

    def feed(x: np.ndarray) -> None:
        values = session.run({"input": x}, ["output", *monitor.tap_names])
        monitor.observe(values[1:], len(x))

    return monitor, feed


def _bn_inputs(model: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """float64 inputs of bn1 / bn2 (torch hooks on a double copy)."""
    ref = copy.deepcopy(model).double().eval()
    seen: dict[str, np.ndarray] = {}
    for name in ("bn1", "bn2"):
        getattr(ref, name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.__setitem__(name, args[0].detach().numpy())
        )
    with torch.no_grad():
        ref(torch.from_numpy(x).double())
    return seen


def test_report_matches_float64_reference(model: torch.nn.Module, onnx_path: Path) -> None:
    monitor, feed = _monitor(onnx_path)
    x = shifted_images(96, seed=5)
    for i in range(0, 96, 32):
        feed(x[i : i + 32])
    report = monitor.report()
    inputs = _bn_inputs(model, x)
    windows = {
        "/bn1/BatchNormalization": MomentWindow.from_samples(inputs["bn1"]),
        "/bn2/BatchNormalization": MomentWindow.from_samples(inputs["bn2"]),
    }
    reference = {
        f"/{n}/BatchNormalization": (
            getattr(model, n).running_mean.double().numpy(),
            getattr(model, n).running_var.double().numpy(),
        )
        for n in ("bn1", "bn2")
    }
    expected = score_model(windows, reference)
    assert report["samples"] == 96 and report["tapped_batches"] == 3
    assert report["score"] == pytest.approx(expected.score, rel=1e-3)
    got = {layer["module"]: layer["symmetric_kl"] for layer in report["layers"]}
    want = {layer.name.split("/")[1]: layer.symmetric_kl for layer in expected.layers}
    assert got == pytest.approx(want, rel=1e-3)
    assert report["exceeded"] == (expected.score > 0.5)
    assert report["window"]["start"] is not None and report["window"]["seconds"] == 60.0


def test_shifted_traffic_drifts_more_than_in_domain(onnx_path: Path) -> None:
    monitor, feed = _monitor(onnx_path)
    feed(source_images(128, seed=11))
    in_domain = monitor.report()
    monitor.reset()
    assert monitor.report()["samples"] == 0 and monitor.report()["score"] is None
    feed(shifted_images(128, seed=12))
    shifted = monitor.report()
    assert in_domain["score"] < 0.1 < shifted["score"]
    assert shifted["score"] > 20 * in_domain["score"]
    assert not in_domain["exceeded"] and shifted["exceeded"]


def test_window_expires_old_batches(onnx_path: Path) -> None:
    clock = _Clock()
    monitor, feed = _monitor(onnx_path, window_seconds=10.0, clock=clock)
    feed(shifted_images(16, seed=1))
    clock.now += 5.0
    feed(source_images(16, seed=2))
    assert monitor.report()["samples"] == 32
    clock.now += 6.0  # the shifted batch is now older than the window
    assert monitor.report()["samples"] == 16
    clock.now += 20.0
    empty = monitor.report()
    assert empty["samples"] == 0 and empty["score"] is None and not empty["exceeded"]


def test_sampling_fraction_is_exact_and_even(onnx_path: Path) -> None:
    monitor, _ = _monitor(onnx_path, sample_fraction=0.25)
    picks = [monitor.should_sample() for _ in range(40)]
    assert sum(picks) == 10
    assert picks[:8] == [True, False, False, False] * 2  # the first batch always
    monitor.should_sample()
    monitor.reset()
    assert monitor.should_sample()  # and the first after a reset
    never, _ = _monitor(onnx_path, sample_fraction=0.0)
    assert not any(never.should_sample() for _ in range(10))


def test_drift_is_flagged_only_after_min_rows(onnx_path: Path) -> None:
    """Two shifted rows score far above the threshold, but are not evidence of drift."""
    monitor, feed = _monitor(onnx_path, min_rows=64)
    feed(shifted_images(2, seed=41))
    few = monitor.report()
    assert few["samples"] == 2 and few["score"] > few["threshold"] and few["min_rows"] == 64
    assert not few["exceeded"]
    feed(shifted_images(62, seed=42))
    enough = monitor.report()
    assert enough["samples"] == 64 and enough["exceeded"]
    # in-domain traffic: the noise floor of the estimate at the default min_rows is far
    # under the default threshold (about 2/n per channel with no drift)
    default = Settings()
    calm, feed_calm = _monitor(onnx_path, min_rows=default.drift_min_rows)
    feed_calm(source_images(default.drift_min_rows, seed=43))
    report = calm.report()
    assert default.drift_min_rows == 256 and report["samples"] == 256
    assert report["score"] < default.drift_threshold / 10 and not report["exceeded"]


def test_first_batch_of_each_served_version_is_sampled(
    model: torch.nn.Module, onnx_path: Path, tmp_path: Path
) -> None:
    """At the default sample fraction (0.1), a client sending one request per version
    still gets a score, not ``None``."""
    settings = Settings(home=tmp_path, execution_provider="cpu", intra_op_threads=1)
    assert settings.drift_sample_fraction == 0.1
    v2 = export(make_model(1), tmp_path / "v2.onnx")
    x = shifted_images(2, seed=44)

    async def body() -> list[dict[str, Any]]:
        runtime = ServingRuntime(settings, ServiceMetrics(CollectorRegistry()))
        await runtime.start()
        reports = []
        try:
            for version, path in ((1, onnx_path), (2, v2)):
                await runtime.serve("m", version, path)
                await _traffic(runtime, x)
                reports.append(runtime.drift("m"))
        finally:
            await runtime.close()
        return reports

    for version, report in enumerate(_run(body()), start=1):
        assert report["version"] == version and report["tapped_batches"] == 1
        assert report["samples"] == 2 and report["score"] is not None
        assert not report["exceeded"]  # 2 rows: below RECALIB_DRIFT_MIN_ROWS


def test_bad_tap_output_count_refused(onnx_path: Path) -> None:
    monitor, _ = _monitor(onnx_path)
    with pytest.raises(ValueError, match=r"expected 6 tap outputs \(got 1\)"):
        monitor.observe([np.zeros(1)], 1)
    pooled, _ = _monitor(onnx_path, reduce="pool")
    assert pooled.tap_names == [POOLED_OUTPUT]  # both BatchNorm2d (6, 8 channels) in one
    with pytest.raises(ValueError, match=r"expected 1 tap outputs \(got 2\)"):
        pooled.observe([np.zeros(1), np.zeros(1)], 1)
    with pytest.raises(ValueError, match=r"expected pooled rows \(N, >= 12, 1, 1\) for tap"):
        pooled.observe([np.zeros((1, 11, 1, 1))], 1)


def test_pooled_taps_give_the_summed_taps_report(onnx_path: Path) -> None:
    """The same traffic through a pooled and a summed tapped session: the same window."""
    x = np.random.default_rng(3).standard_normal((48, *IMAGE)).astype(np.float32)
    reports = []
    for reduce in ("sum", "pool"):
        monitor, feed = _monitor(onnx_path, reduce=reduce)
        for i in range(0, len(x), 16):
            feed(x[i : i + 16])
        reports.append(monitor.report())
    summed, pooled = reports
    assert pooled["samples"] == summed["samples"] == 48
    assert pooled["score"] == pytest.approx(summed["score"], rel=1e-4)
    assert [row["name"] for row in pooled["layers"]] == [row["name"] for row in summed["layers"]]
    for got, want in zip(pooled["layers"], summed["layers"], strict=True):
        assert got["count"] == want["count"]
        for key in ("symmetric_kl", "mean_abs_shift", "mean_abs_log_var_ratio"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-9), key


async def _traffic(runtime: ServingRuntime, x: np.ndarray, batch: int = 16) -> None:
    requests = [
        decode_request(*encode_request({"input": x[i : i + batch]}))
        for i in range(0, len(x), batch)
    ]
    await asyncio.gather(*(runtime.infer("m", None, r) for r in requests))


def test_drift_falls_after_recalibrating_and_serving_the_new_version(
    model: torch.nn.Module, onnx_path: Path, tmp_path: Path
) -> None:
    """The issue's acceptance test: serve v1, shifted traffic drifts; recalibrate on the
    shifted domain, serve v2 (zero-downtime switch); the same traffic's drift falls."""
    recalibrated = copy.deepcopy(model)
    recalib.recalibrate(
        recalibrated, torch.from_numpy(shifted_images(512, seed=21)), method="exact", mode="train"
    )
    v2 = export(recalibrated, tmp_path / "v2.onnx")
    settings = Settings(
        home=tmp_path,
        execution_provider="cpu",
        intra_op_threads=1,
        drift_threshold=0.5,
        drift_sample_fraction=1.0,
        drift_min_rows=128,  # flagged once the window holds the whole traffic
    )
    metrics = ServiceMetrics(CollectorRegistry())
    traffic = shifted_images(128, seed=22)

    async def body() -> tuple[dict[str, Any], dict[str, Any]]:
        runtime = ServingRuntime(settings, metrics)
        await runtime.start()
        try:
            await runtime.serve("m", 1, onnx_path)
            await _traffic(runtime, traffic)
            before = runtime.drift("m")
            await runtime.serve("m", 2, v2)
            await _traffic(runtime, traffic)
            after = runtime.drift("m")
        finally:
            await runtime.close()
        return before, after

    before, after = _run(body())
    assert before["version"] == 1 and after["version"] == 2
    assert before["samples"] == after["samples"] == 128
    assert before["exceeded"] and not after["exceeded"]
    assert after["score"] < before["score"] / 20
    registry = metrics.registry
    assert registry.get_sample_value("recalib_drift_score", {"model": "m", "version": "1"}) is None


def test_submitted_runs_are_coalesced_off_thread(onnx_path: Path) -> None:
    """Queued runs give the same window as runs observed one by one."""
    x = shifted_images(64, seed=31)
    inline, feed_inline = _monitor(onnx_path)
    for i in range(0, 64, 8):
        feed_inline(x[i : i + 8])
    with ThreadPoolExecutor(1) as pool:
        queued, _ = _monitor(onnx_path, executor=pool)
        tapped = add_drift_taps(onnx.load(onnx_path))
        session = create_session(
            tapped.SerializeToString(), Settings(execution_provider="cpu", intra_op_threads=1)
        )
        gate = threading.Event()
        pool.submit(gate.wait, 10.0)  # hold the drift thread: the runs pile up
        for i in range(0, 64, 8):
            values = session.run({"input": x[i : i + 8]}, ["output", *queued.tap_names])
            queued.submit(values[1:], 8)
        gate.set()
        got = queued.report()
    want = inline.report()
    assert got["samples"] == want["samples"] == 64 and got["tapped_batches"] == 8
    assert got["score"] == pytest.approx(want["score"], rel=1e-9)
    assert got["dropped_rows"] == 0


def test_queue_bound_drops_and_counts_rows(onnx_path: Path) -> None:
    with ThreadPoolExecutor(1) as pool:
        monitor, _ = _monitor(onnx_path, executor=pool, max_pending_rows=16)
        values = [
            np.int64(64)
            if name.endswith("::count")
            else np.ones((8, 8 if "bn2" in name else 6), np.float32)
            for name in monitor.tap_names
        ]
        gate = threading.Event()
        pool.submit(gate.wait, 10.0)
        for _ in range(3):
            monitor.submit(values, 8)
        gate.set()
        report = monitor.report()
    assert report["samples"] == 16 and report["dropped_rows"] == 8
