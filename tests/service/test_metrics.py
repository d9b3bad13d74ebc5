"""ServiceMetrics: the contract's names and labels on an injected registry, helpers."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service.metrics import JOB_OUTCOMES, ServiceMetrics

EXPECTED = {
    "recalib_requests": ("counter", {"model", "version", "outcome"}),
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
}


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


def test_names_types_and_labels() -> None:
    registry = CollectorRegistry()
    _exercise(ServiceMetrics(registry))
    found = {}
    for family in registry.collect():
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        found[family.name] = (family.type, labels)
    assert found == EXPECTED


def test_values() -> None:
    m = ServiceMetrics(CollectorRegistry())
    _exercise(m)
    get = m.registry.get_sample_value
    mv = {"model": "demo", "version": "1"}
    assert get("recalib_requests_total", {**mv, "outcome": "ok"}) == 1
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
    assert get("recalib_layer_drift_score", {**mv, "layer": "a"}) is None
    cpu = {**mv, "requested": "cuda", "provider": "CPUExecutionProvider"}
    assert get("recalib_execution_provider_info", cpu) is None
