"""ServiceMetrics: the contract's names and labels on an injected registry, helpers; the
process collectors, ``_created`` off, the failure reason, the compute split read from the
runtime's counters, load failures, readiness, and retired versions' series removed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from runtime_helpers import FakeRegistry, export_versions, runtime_settings, source_images

from service import errors
from service.dataplane import DataPlane
from service.metrics import (
    JOB_OUTCOMES,
    LOAD_FAILURE_REASONS,
    PHASES,
    REQUEST_REASONS,
    ServiceMetrics,
    error_reason,
    load_failure_reason,
)
from service.runtime.runtime import ServingRuntime
from service.runtime.sessions import ProviderUnavailable
from service.runtime.stats import ModelStats, RunTiming
from service.runtime.tensors import InferInput, InferRequest

EXPECTED = {
    "recalib_requests": ("counter", {"model", "version", "outcome", "reason"}),
    "recalib_request_duration_seconds": ("histogram", {"model", "version"}),
    "recalib_queue_wait_seconds": ("histogram", {"model", "version"}),
    "recalib_batch_size": ("histogram", {"model", "version"}),
    "recalib_inflight_requests": ("gauge", {"model"}),
    "recalib_drift_score": ("gauge", {"model", "version"}),
    "recalib_layer_drift_score": ("gauge", {"model", "version", "layer"}),
    "recalib_drift_threshold_exceeded": ("gauge", {"model", "version"}),
    "recalib_drift_window_samples": ("gauge", {"model", "version"}),
    "recalib_drift_threshold": ("gauge", set()),
    "recalib_recalibration_jobs": ("counter", {"outcome"}),
    "recalib_recalibration_job_duration_seconds": ("histogram", set()),
    "recalib_loaded_versions": ("gauge", set()),
    "recalib_execution_provider_info": ("gauge", {"model", "version", "requested", "provider"}),
    "recalib_provider_fallbacks": ("counter", {"model", "version"}),
    "recalib_model_load_failures": ("counter", {"model", "reason"}),
    "recalib_bank_requests": ("counter", {"model", "bank"}),
    "recalib_bank_route_distance": ("histogram", {"model"}),
    "recalib_bank_fallbacks": ("counter", {"model"}),
    "recalib_stat_banks": ("gauge", {"model", "version"}),
    "recalib_bank_load_failures": ("counter", {"model"}),
    "recalib_bank_drift_score": ("gauge", {"model", "version", "bank"}),
    "recalib_bank_drift_threshold_exceeded": ("gauge", {"model", "version", "bank"}),
}
PROCESS = {"process_cpu_seconds", "process_resident_memory_bytes", "process_start_time_seconds"}


def _exercise(m: ServiceMetrics) -> None:
    m.observe_request("demo", 1, "ok", 0.003)
    m.observe_batch("demo", 1, 4, [0.001, 0.002])
    m.inflight_add("demo", 1)
    m.set_drift("demo", 1, score=0.2, exceeded=False, samples=40, layers={"bn1": 0.3})
    m.set_drift_threshold(0.75)
    m.job_finished("succeeded", 12.0)
    m.set_loaded_versions(1)
    m.set_provider("demo", 1, "auto", "CPUExecutionProvider")
    m.provider_fallback("demo", 1)
    m.model_load_failed("demo", errors.InvalidInput("not an ONNX file"))
    m.observe_bank_request("demo", ["night"], limit=4, distances=[0.03], fallbacks=1)
    m.set_banks_loaded("demo", 1, 2)
    m.set_bank_drift("demo", 1, "night", score=0.4, exceeded=False)
    m.set_bank_drift("demo", 1, "gone", score=0.1, exceeded=False)
    m.forget_bank_drift("demo", 1, "gone")
    m.bank_load_failed("demo")


def test_banks_past_the_limit_count_once_per_request_as_other() -> None:
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry)
    metrics.observe_bank_request("m", ["a"], limit=1)
    metrics.observe_bank_request("m", ["a", "b", "c"], limit=1)  # b and c: one "other"
    metrics.observe_bank_request("m", ["d"], limit=1)

    def count(bank: str) -> float | None:
        return registry.get_sample_value(
            "recalib_bank_requests_total", {"model": "m", "bank": bank}
        )

    assert (count("a"), count("other"), count("b")) == (2.0, 2.0, None)


def test_names_types_and_labels() -> None:
    registry = CollectorRegistry()
    _exercise(ServiceMetrics(registry))
    found = {}
    for family in registry.collect():
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        found[family.name] = (family.type, labels)
    service = {name: v for name, v in found.items() if name.startswith("recalib_")}
    assert service == EXPECTED
    assert set(found) - set(service) >= PROCESS | {"python_info", "python_gc_collections"}


def test_process_collectors_live_in_each_injected_registry() -> None:
    """Two apps in one process: each registry gets its own process, platform and GC
    collectors, no "Duplicated timeseries", and the global registry is left alone."""
    global_names = set(prometheus_client.REGISTRY._names_to_collectors)
    a, b = ServiceMetrics(CollectorRegistry()), ServiceMetrics(CollectorRegistry())
    for m in (a, b):
        text = m.exposition().decode()
        assert "process_cpu_seconds_total " in text and "python_info{" in text
        assert m.registry.get_sample_value("process_start_time_seconds") is not None
    assert set(prometheus_client.REGISTRY._names_to_collectors) == global_names


def test_exposition_has_no_created_series_without_a_global_switch() -> None:
    m = ServiceMetrics(CollectorRegistry())
    _exercise(m)
    text = m.exposition().decode()
    assert "_created" not in text
    assert 'recalib_requests_total{model="demo",outcome="ok",reason="none",version="1"} 1.0' in text
    assert "recalib_request_duration_seconds_count" in text
    # per registry, not prometheus_client.disable_created_metrics(): other registries of
    # the process keep theirs
    assert "recalib_requests_created{" in generate_latest(m.registry).decode()


def test_values() -> None:
    m = ServiceMetrics(CollectorRegistry())
    _exercise(m)
    get = m.registry.get_sample_value
    mv = {"model": "demo", "version": "1"}
    assert get("recalib_requests_total", {**mv, "outcome": "ok", "reason": "none"}) == 1
    load = {"model": "demo", "reason": "invalid_model"}
    assert get("recalib_model_load_failures_total", load) == 1
    assert get("recalib_request_duration_seconds_sum", mv) == pytest.approx(0.003)
    assert get("recalib_queue_wait_seconds_count", mv) == 2
    assert get("recalib_batch_size_sum", mv) == 4
    assert get("recalib_inflight_requests", {"model": "demo"}) == 1
    assert get("recalib_drift_score", mv) == pytest.approx(0.2)
    assert get("recalib_layer_drift_score", {**mv, "layer": "bn1"}) == pytest.approx(0.3)
    assert get("recalib_drift_window_samples", mv) == 40
    assert get("recalib_drift_threshold_exceeded", mv) == 0
    assert get("recalib_drift_threshold") == 0.75
    assert get("recalib_recalibration_jobs_total", {"outcome": "succeeded"}) == 1
    assert get("recalib_recalibration_job_duration_seconds_sum") == 12.0
    assert get("recalib_loaded_versions") == 1
    assert get("recalib_provider_fallbacks_total", mv) == 1
    info = {**mv, "requested": "auto", "provider": "CPUExecutionProvider"}
    assert get("recalib_execution_provider_info", info) == 1


def test_drift_threshold_absent_until_set() -> None:
    m = ServiceMetrics(CollectorRegistry())
    assert "recalib_drift_threshold" not in {f.name for f in m.registry.collect()}
    m.set_drift_threshold(2.0)
    m.set_drift_threshold(1.5)  # registered once, updated
    assert m.registry.get_sample_value("recalib_drift_threshold") == 1.5


def test_registries_are_independent() -> None:
    a, b = ServiceMetrics(CollectorRegistry()), ServiceMetrics(CollectorRegistry())
    a.job_finished("failed", 1.0)
    assert (
        b.registry.get_sample_value("recalib_recalibration_jobs_total", {"outcome": "failed"})
        is None
    )
    assert b"recalib_recalibration_jobs_total{" not in generate_latest(b.registry)


@pytest.mark.parametrize("outcome", JOB_OUTCOMES)
def test_job_outcomes(outcome: str) -> None:
    m = ServiceMetrics(CollectorRegistry())
    m.job_finished(outcome, 2.5)
    assert (
        m.registry.get_sample_value("recalib_recalibration_jobs_total", {"outcome": outcome}) == 1
    )


def test_unknown_outcomes_refused() -> None:
    m = ServiceMetrics(CollectorRegistry())
    with pytest.raises(ValueError, match="expected outcome in"):
        m.job_finished("exploded", 1.0)
    with pytest.raises(ValueError, match="expected outcome in"):
        m.observe_request("demo", 1, "teapot", 0.1)
    with pytest.raises(ValueError, match="expected reason in"):
        m.observe_request("demo", 1, "client_error", 0.1, reason="bad shape [1, 2]")


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (None, "none"),
        (errors.InvalidInput("input 'x': expected FP32 (got INT8)"), "invalid_input"),
        (errors.Unauthorized("missing or invalid bearer token"), "unauthorized"),
        (errors.Forbidden("inference replica"), "forbidden"),
        (errors.NotFound("model 'm' has no version 9"), "not_found"),
        (errors.Conflict("busy"), "conflict"),
        (errors.Incompatible("signature"), "incompatible"),
        (errors.PayloadTooLarge("request body: expected at most 10 bytes"), "payload_too_large"),
        (errors.NotReady("model 'm' version 1 is being unloaded"), "not_ready"),
        (ProviderUnavailable("CUDA requested"), "provider_unavailable"),
        (asyncio.CancelledError(), "cancelled"),
        (errors.ServiceError("inference failed: ORT"), "internal"),
        (RuntimeError("a bug"), "internal"),
    ],
)
def test_error_reason_is_the_class_never_the_message(exc: Any, reason: str) -> None:
    assert error_reason(exc) == reason
    assert reason in REQUEST_REASONS
    m = ServiceMetrics(CollectorRegistry())
    m.observe_request("m", 1, "ok" if exc is None else "client_error", 0.1, reason=reason)
    labels = {"model": "m", "version": "1", "outcome": "ok" if exc is None else "client_error"}
    assert m.registry.get_sample_value("recalib_requests_total", {**labels, "reason": reason}) == 1


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (errors.InvalidInput("expected an ONNX model file"), "invalid_model"),
        (ProviderUnavailable("provider_fallback='fail' refuses to serve"), "provider_unavailable"),
        (errors.ServiceError("its ONNX file could not be read"), "unreadable"),
        (RuntimeError("ORT's own exception"), "internal"),
    ],
)
def test_load_failure_reasons(exc: BaseException, reason: str) -> None:
    assert load_failure_reason(exc) == reason and reason in LOAD_FAILURE_REASONS
    m = ServiceMetrics(CollectorRegistry())
    m.model_load_failed("m", exc)
    m.model_load_failed("m", exc)
    labels = {"model": "m", "reason": reason}
    assert m.registry.get_sample_value("recalib_model_load_failures_total", labels) == 2


def test_drift_gauges_follow_the_window_and_versions() -> None:
    m = ServiceMetrics(CollectorRegistry())
    get = m.registry.get_sample_value
    mv = {"model": "demo", "version": "2"}
    m.set_drift("demo", 2, score=1.5, exceeded=True, samples=8, layers={"a": 1.0, "b": 2.0})
    m.set_drift("demo", 2, score=None, exceeded=False, samples=0, layers={"a": 0.5})
    assert get("recalib_drift_score", mv) is None  # empty window: no made-up value
    assert get("recalib_drift_threshold_exceeded", mv) == 0
    assert get("recalib_layer_drift_score", {**mv, "layer": "b"}) is None
    assert get("recalib_layer_drift_score", {**mv, "layer": "a"}) == 0.5
    m.set_provider("demo", 2, "cuda", "CUDAExecutionProvider")
    m.set_provider("demo", 2, "cuda", "CPUExecutionProvider")
    cuda = {**mv, "requested": "cuda", "provider": "CUDAExecutionProvider"}
    assert get("recalib_execution_provider_info", cuda) is None
    m.forget_version("demo", 2)
    assert get("recalib_drift_window_samples", mv) is None
    assert get("recalib_drift_threshold_exceeded", mv) is None
    assert get("recalib_layer_drift_score", {**mv, "layer": "a"}) is None
    cpu = {**mv, "requested": "cuda", "provider": "CPUExecutionProvider"}
    assert get("recalib_execution_provider_info", cpu) is None


def _names_with(m: ServiceMetrics, **labels: str) -> set[str]:
    return {
        sample.name
        for family in m.registry.collect()
        for sample in family.samples
        if labels.items() <= sample.labels.items()
    }


def test_forget_version_removes_counters_and_histograms_too() -> None:
    m = ServiceMetrics(CollectorRegistry())
    for version in (1, 2):
        m.observe_request("demo", version, "ok", 0.003)
        m.observe_request("demo", version, "client_error", 0.001, reason="invalid_input")
        m.observe_batch("demo", version, 4, [0.001])
        m.set_drift("demo", version, score=0.2, exceeded=False, samples=4, layers={"a": 1.0})
        m.set_provider("demo", version, "auto", "CPUExecutionProvider")
        m.provider_fallback("demo", version)
    m.observe_request("other", 1, "ok", 0.003)
    assert len(_names_with(m, model="demo", version="1")) >= 10
    m.forget_version("demo", 1)
    assert _names_with(m, model="demo", version="1") == set()
    assert "recalib_requests_total" in _names_with(m, model="demo", version="2")
    m.forget_version("demo", 1)  # idempotent
    m.inflight_add("demo", 1)
    m.model_load_failed("demo", errors.InvalidInput("x"))
    m.forget_model("demo")
    # in flight (a request still reading its body): the gauge stays, else it would go -1
    assert _names_with(m, model="demo") == {"recalib_inflight_requests"}
    m.inflight_add("demo", -1)
    m.forget_model("demo")
    assert _names_with(m, model="demo") == set()
    assert "recalib_requests_total" in _names_with(m, model="other")
    # a version served again starts its series over (the hot path's cached series went
    # with them: a stale one would count into nothing)
    m.inflight_add("demo", 1)
    m.observe_request("demo", 1, "ok", 0.002)
    m.observe_batch("demo", 1, 2, [0.001, 0.002])
    assert (
        m.registry.get_sample_value(
            "recalib_requests_total",
            {"model": "demo", "version": "1", "outcome": "ok", "reason": "none"},
        )
        == 1.0
    )
    assert (
        m.registry.get_sample_value(
            "recalib_queue_wait_seconds_count", {"model": "demo", "version": "1"}
        )
        == 2.0
    )
    assert m.registry.get_sample_value("recalib_inflight_requests", {"model": "demo"}) == 1.0


def test_compute_split_and_readiness_are_read_at_scrape() -> None:
    m = ServiceMetrics(CollectorRegistry())
    stats = ModelStats()
    run = RunTiming(rows=4, started=10.5, input=0.01, infer=0.2, output=0.03)
    stats.add_run(run)
    for _ in range(2):  # two requests of one run: each charged the whole run
        stats.add_request_run(10.0, run)
        stats.add_success(2, 10.0, 10.8, 0.001, 0.002)
    loaded = [("demo", 3, stats)]
    m.watch_statistics(lambda: loaded)
    ready: dict[str, bool] = {"demo": True, "late": False}
    m.watch_readiness(lambda: (all(ready.values()), ready))
    get = m.registry.get_sample_value
    mv = {"model": "demo", "version": "3"}
    seconds = {p: get("recalib_inference_phase_seconds_total", {**mv, "phase": p}) for p in PHASES}
    assert seconds == pytest.approx({"queue": 1.0, "input": 0.022, "infer": 0.4, "output": 0.064})
    assert get("recalib_inference_successes_total", mv) == 2
    assert get("recalib_inference_rows_total", mv) == 4
    assert get("recalib_session_runs_total", mv) == 1
    assert get("recalib_ready") == 0
    assert get("recalib_model_ready", {"model": "late"}) == 0
    assert get("recalib_model_ready", {"model": "demo"}) == 1
    ready["late"] = True
    loaded.clear()  # retired: no series
    assert get("recalib_ready") == 1
    assert get("recalib_inference_rows_total", mv) is None
    assert "_created" not in m.exposition().decode()


# -- wired into the runtime and the data plane --------------------------------------------


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    return {v: p for v, (_, p) in export_versions(tmp_path_factory.mktemp("metrics")).items()}


def _request(rows: int = 2) -> InferRequest:
    x = source_images(rows, 0)
    return InferRequest([InferInput("input", "FP32", tuple(x.shape), x)], id="r1")


def test_runtime_counts_load_failures_and_removes_retired_series(
    paths: dict[int, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    config = runtime_settings(tmp_path, drift_sample_fraction=1.0, drift_min_rows=0)
    metrics = ServiceMetrics(CollectorRegistry())
    runtime = ServingRuntime(config, metrics)
    plane = DataPlane(config, FakeRegistry(paths), runtime, metrics)
    get = metrics.registry.get_sample_value
    seen: dict[str, Any] = {}

    async def body() -> None:
        await runtime.start()
        try:
            with pytest.raises(errors.InvalidInput):
                await runtime.load("m", 9, broken)
            labels = {"model": "m", "reason": "invalid_model"}
            seen["failures"] = get("recalib_model_load_failures_total", labels)
            seen["before"] = get("recalib_ready"), get("recalib_model_ready", {"model": "m"})
            await plane.infer("m", None, _request())  # serves production (v1)
            with pytest.raises(errors.InvalidInput):
                await plane.infer("m", None, _request_wrong())
            seen["ready"] = get("recalib_ready"), get("recalib_model_ready", {"model": "m"})
            seen["v1"] = _names_with(metrics, model="m", version="1")
            await runtime.serve("m", 2, paths[2])  # v1 retired once idle (not pinned)
            seen["v1 retired"] = _names_with(metrics, model="m", version="1")
            seen["v2"] = _names_with(metrics, model="m", version="2")
            await runtime.unload_model("m")
            seen["unloaded"] = _names_with(metrics, model="m")
        finally:
            await runtime.close()

    asyncio.run(body())
    assert seen["failures"] == 1
    assert seen["before"] == (0.0, 0.0) and seen["ready"] == (1.0, 1.0)
    assert {
        "recalib_requests_total",
        "recalib_request_duration_seconds_count",
        "recalib_queue_wait_seconds_count",
        "recalib_batch_size_count",
        "recalib_inference_phase_seconds_total",
        "recalib_drift_window_samples",
        "recalib_execution_provider_info",
    } <= seen["v1"]
    assert seen["v1 retired"] == set()
    assert "recalib_inference_phase_seconds_total" in seen["v2"]
    # only the readiness of the model the registry still lists (and the server waits for)
    assert seen["unloaded"] == {"recalib_model_ready"}


def test_request_reason_and_cancelled_callers(paths: dict[int, Path], tmp_path: Path) -> None:
    config = runtime_settings(tmp_path, drift_sample_fraction=0.0)
    metrics = ServiceMetrics(CollectorRegistry())
    runtime = ServingRuntime(config, metrics)
    plane = DataPlane(config, FakeRegistry(paths), runtime, metrics)

    async def body() -> None:
        await runtime.start()
        try:
            await plane.infer("m", "1", _request())
            with pytest.raises(errors.InvalidInput):
                await plane.infer("m", "1", _request_wrong())
            with pytest.raises(asyncio.CancelledError):
                async with plane.inference("m", "1"):
                    raise asyncio.CancelledError  # the client went away mid-body
            with pytest.raises(RuntimeError):
                async with plane.inference("m", "1"):
                    raise RuntimeError("the protocol layer broke")
            counted.update(
                ((s.labels["outcome"], s.labels["reason"]), s.value)
                for family in metrics.registry.collect()
                for s in family.samples
                if s.name == "recalib_requests_total"
            )
        finally:
            await runtime.close()  # retires v1: its series go

    counted: dict[tuple[str, str], float] = {}
    asyncio.run(body())
    assert counted == {
        ("ok", "none"): 1,
        ("client_error", "invalid_input"): 1,
        ("client_error", "cancelled"): 1,  # no 5xx page for a caller that left
        ("server_error", "internal"): 1,
    }


def _request_wrong() -> InferRequest:
    x = np.zeros((1, 3, 2, 2), np.float32)
    return InferRequest([InferInput("input", "FP32", (1, 3, 2, 2), x)], id="bad")
