"""ServingRuntime: lifecycle per transition, zero-downtime switch, pins, providers, metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from runtime_helpers import (
    export_versions,
    reference_outputs,
    runtime_settings,
    source_images,
)

from service.api.v2_codec import decode_request, encode_request
from service.errors import InvalidInput, NotFound, NotReady
from service.metrics import ServiceMetrics
from service.runtime import versions as versions_module
from service.runtime.runtime import ServingRuntime
from service.runtime.sessions import CPU, CUDA, ProviderUnavailable, create_session, cuda_usable
from service.runtime.tensors import InferRequest
from service.settings import Settings

T = TypeVar("T")


def _run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro, 30.0)

    return asyncio.run(main())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    return export_versions(tmp_path_factory.mktemp("runtime"))


def _request(x: np.ndarray, **kwargs: Any) -> InferRequest:
    return decode_request(*encode_request({"input": x}, **kwargs))


def test_lifecycle_load_serve_infer_unload(models: dict[int, Any], tmp_path: Path) -> None:
    model, path = models[1]
    metrics = ServiceMetrics(CollectorRegistry())
    x = source_images(3, seed=1)

    async def body() -> None:
        runtime = ServingRuntime(runtime_settings(tmp_path), metrics)
        await runtime.start()
        assert not runtime.is_ready("m") and runtime.served_version("m") is None
        with pytest.raises(NotFound, match="no served version"):
            await runtime.infer("m", None, _request(x))
        await asyncio.gather(*(runtime.load("m", 1, path) for _ in range(4)))
        assert runtime.loaded_versions("m") == [1]
        assert runtime.is_ready("m", 1) and not runtime.is_ready("m")
        response = await runtime.infer("m", 1, _request(x, request_id="abc"))
        assert (response.model_name, response.model_version, response.id) == ("m", "1", "abc")
        np.testing.assert_allclose(
            response.outputs[0].data, reference_outputs(model, x), rtol=1e-4, atol=1e-5
        )
        await runtime.serve("m", 1, path)
        assert runtime.served_version("m") == 1 and runtime.is_ready("m")
        meta = runtime.metadata("m")
        assert meta["platform"] == "onnx_onnxv1" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 8, 8]}]
        assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
        assert meta["parameters"]["execution_provider"] == "CPUExecutionProvider"
        await runtime.unload_model("m")
        assert runtime.loaded_versions("m") == [] and not runtime.is_ready("m", 1)
        with pytest.raises(NotReady, match="not loaded"):
            await runtime.infer("m", 1, _request(x))
        await runtime.close()
        assert not runtime.is_ready("m")

    _run(body())
    reg = metrics.registry
    assert reg.get_sample_value("recalib_loaded_versions") == 0
    # unload_model removed the model's series (they do not outlive it)
    assert reg.get_sample_value("recalib_batch_size_count", {"model": "m", "version": "1"}) is None


def test_concurrent_loads_build_once(
    models: dict[int, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = create_session

    def counting(model: Any, settings: Settings, **kwargs: Any) -> Any:
        calls.append(kwargs.get("label", ""))
        return real(model, settings, **kwargs)

    monkeypatch.setattr("service.runtime.versions.create_session", counting)

    async def body() -> None:
        runtime = ServingRuntime(runtime_settings(tmp_path), ServiceMetrics(CollectorRegistry()))
        await asyncio.gather(*(runtime.load("m", 1, models[1][1]) for _ in range(5)))
        await runtime.load("m", 1, models[1][1])
        await runtime.close()

    _run(body())
    assert len(calls) == 1  # drift on every batch: the tapped session serves alone


def test_switch_is_zero_downtime_and_retires_the_old_version(
    models: dict[int, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = versions_module.LoadedVersion.run

    def slow_run(self: Any, feed: Any, rows: int) -> Any:
        time.sleep(0.01)  # keep requests in flight across the switch
        return real_run(self, feed, rows)

    monkeypatch.setattr(versions_module.LoadedVersion, "run", slow_run)
    metrics = ServiceMetrics(CollectorRegistry())
    x = source_images(1, seed=3)

    async def body() -> tuple[list[str], list[str], list[int]]:
        runtime = ServingRuntime(runtime_settings(tmp_path, max_batch_size=4), metrics)
        await runtime.serve("m", 1, models[1][1])
        inflight = [asyncio.ensure_future(runtime.infer("m", None, _request(x))) for _ in range(12)]
        await asyncio.sleep(0.005)
        await runtime.serve("m", 2, models[2][1])
        old = [r.model_version for r in await asyncio.gather(*inflight)]
        new = [(await runtime.infer("m", None, _request(x))).model_version for _ in range(3)]
        loaded = runtime.loaded_versions("m")
        await runtime.close()
        return old, new, loaded

    old, new, loaded = _run(body())
    assert old == ["1"] * 12, "requests that started on v1 finish on v1"
    assert new == ["2"] * 3
    assert loaded == [2], "v1 is unloaded once idle"
    assert metrics.registry.get_sample_value("recalib_loaded_versions") == 0  # after close


def test_failed_load_leaves_the_old_version_serving(models: dict[int, Any], tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not a protobuf")
    x = source_images(2, seed=4)

    async def body() -> str:
        runtime = ServingRuntime(runtime_settings(tmp_path), ServiceMetrics(CollectorRegistry()))
        await runtime.serve("m", 1, models[1][1])
        with pytest.raises(InvalidInput, match="expected an ONNX model file"):
            await runtime.serve("m", 2, broken)
        assert runtime.served_version("m") == 1 and runtime.loaded_versions("m") == [1]
        version = (await runtime.infer("m", None, _request(x))).model_version
        await runtime.close()
        return version

    assert _run(body()) == "1"


def test_a_file_deleted_under_its_load_is_not_found_not_invalid(
    models: dict[int, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model store pruning a version while a replica loads it: the file goes between
    reading the graph and building the session; that is a 404, not a broken model."""
    doomed = tmp_path / "doomed.onnx"
    doomed.write_bytes(models[1][1].read_bytes())
    build = create_session

    def vanishing(model: Any, *args: Any, **kwargs: Any) -> Any:
        if model == doomed:
            doomed.unlink()
        return build(model, *args, **kwargs)

    monkeypatch.setattr(versions_module, "create_session", vanishing)

    async def body() -> None:
        settings = runtime_settings(tmp_path, drift_sample_fraction=0.1)  # a plain session
        runtime = ServingRuntime(settings, ServiceMetrics(CollectorRegistry()))
        with pytest.raises(NotFound, match="deleted while it was being loaded"):
            await runtime.load("m", 1, doomed)
        await runtime.close()

    _run(body())


def test_recently_pinned_version_stays_loaded(models: dict[int, Any], tmp_path: Path) -> None:
    x = source_images(1, seed=5)

    async def body() -> list[int]:
        runtime = ServingRuntime(runtime_settings(tmp_path), ServiceMetrics(CollectorRegistry()))
        await runtime.serve("m", 1, models[1][1])
        await runtime.infer("m", 1, _request(x))  # an explicitly versioned request
        await runtime.serve("m", 2, models[2][1])
        loaded = runtime.loaded_versions("m")
        assert (await runtime.infer("m", 1, _request(x))).model_version == "1"
        await runtime.close()
        return loaded

    assert _run(body()) == [1, 2]


def test_invalid_inputs_and_outputs_are_refused(models: dict[int, Any], tmp_path: Path) -> None:
    async def body() -> None:
        runtime = ServingRuntime(runtime_settings(tmp_path), ServiceMetrics(CollectorRegistry()))
        await runtime.serve("m", 1, models[1][1])
        with pytest.raises(InvalidInput, match=r"expected shape \[-1, 3, 8, 8\]"):
            await runtime.infer("m", None, _request(np.zeros((1, 3, 4, 4), np.float32)))
        with pytest.raises(InvalidInput, match="expected datatype FP32 \\(got FP64\\)"):
            await runtime.infer("m", None, _request(np.zeros((1, 3, 8, 8), np.float64)))
        bad_output = _request(source_images(1, 0), outputs=["logits"])
        with pytest.raises(InvalidInput, match="unknown output 'logits'"):
            await runtime.infer("m", None, bad_output)
        await runtime.close()

    _run(body())


def test_cuda_fallback_is_counted_or_refused(models: dict[int, Any], tmp_path: Path) -> None:
    """This ORT build has no CUDA: "warn" serves on CPU and says so, "fail" refuses."""
    metrics = ServiceMetrics(CollectorRegistry())

    async def body() -> None:
        warn = ServingRuntime(runtime_settings(tmp_path, execution_provider="cuda"), metrics)
        await warn.serve("m", 1, models[1][1])
        assert warn.metadata("m")["parameters"]["provider_fallback"] is True
        await warn.close()
        fail = ServingRuntime(
            runtime_settings(tmp_path, execution_provider="cuda", provider_fallback="fail"),
            ServiceMetrics(CollectorRegistry()),
        )
        with pytest.raises(ProviderUnavailable, match="provider_fallback='fail'"):
            await fail.serve("m", 1, models[1][1])
        assert fail.served_version("m") is None
        await fail.close()

    _run(body())
    labels = {"model": "m", "version": "1"}
    assert metrics.registry.get_sample_value("recalib_provider_fallbacks_total", labels) == 1


def test_provider_info_metric(models: dict[int, Any], tmp_path: Path) -> None:
    metrics = ServiceMetrics(CollectorRegistry())

    async def body() -> None:
        runtime = ServingRuntime(runtime_settings(tmp_path, execution_provider="auto"), metrics)
        await runtime.serve("m", 1, models[1][1])
        labels = {
            "model": "m",
            "version": "1",
            "requested": "auto",
            "provider": CUDA if cuda_usable() else CPU,  # auto: CUDA where it really runs
        }
        assert metrics.registry.get_sample_value("recalib_execution_provider_info", labels) == 1
        assert metrics.registry.get_sample_value("recalib_loaded_versions") == 1
        await runtime.close()

    _run(body())


@pytest.mark.parametrize(("fraction", "sessions", "tapped"), [(0.0, 1, 0), (0.5, 2, 4)])
def test_drift_sampling_sessions(
    models: dict[int, Any],
    tmp_path: Path,
    fraction: float,
    sessions: int,
    tapped: int,
) -> None:
    x = source_images(1, seed=6)

    async def body() -> tuple[int, dict[str, Any]]:
        runtime = ServingRuntime(
            runtime_settings(tmp_path, drift_sample_fraction=fraction),
            ServiceMetrics(CollectorRegistry()),
        )
        await runtime.serve("m", 1, models[1][1])
        entry = runtime._versions[("m", 1)]
        count = sum(s is not None for s in (entry.plain, entry.tapped))
        for _ in range(8):
            await runtime.infer("m", None, _request(x))
        report = runtime.drift("m")
        await runtime.close()
        return count, report

    count, report = _run(body())
    assert count == sessions
    assert report["monitoring"] is (fraction > 0)
    assert report["tapped_batches"] == tapped and report["samples"] == tapped


def test_drift_and_reset(models: dict[int, Any], tmp_path: Path) -> None:
    metrics = ServiceMetrics(CollectorRegistry())

    labels = {"model": "m", "version": "1", "layer": "bn1"}

    async def body() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any]:
        runtime = ServingRuntime(
            runtime_settings(
                tmp_path, drift_per_layer_metrics=True, drift_threshold=0.0, drift_min_rows=8
            ),
            metrics,
        )
        empty = runtime.drift("m")
        await runtime.serve("m", 1, models[1][1])
        await runtime.infer("m", None, _request(source_images(8, seed=7)))
        full = runtime.drift("m")
        gauge = metrics.registry.get_sample_value("recalib_layer_drift_score", labels)
        runtime.reset_drift("m")
        reset = runtime.drift("m")
        await runtime.close()
        return empty, full, reset, gauge

    empty, full, reset, gauge = _run(body())
    assert empty["monitoring"] is False and empty["version"] is None
    assert full["samples"] == 8 and full["score"] > 0.0 and full["exceeded"]
    assert {layer["module"] for layer in full["layers"]} == {"bn1", "bn2"}
    assert reset["samples"] == 0 and reset["score"] is None
    bn1 = next(layer for layer in full["layers"] if layer["module"] == "bn1")
    assert gauge == pytest.approx(bn1["symmetric_kl"])
    assert metrics.registry.get_sample_value("recalib_layer_drift_score", labels) is None
