"""The data plane without HTTP: health, readiness, metadata, inference, its metrics window,
the token rules, a model deleted between resolving and loading, and the extensions
(statistics, repository load/unload/index, model configuration, refused parameters)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from runtime_helpers import FakeRegistry, export_versions, runtime_settings, source_images

from service.dataplane import EXTENSIONS, SERVER_NAME, DataPlane, server_version
from service.errors import InvalidInput, NotFound, Unauthorized
from service.metrics import ServiceMetrics
from service.runtime.runtime import ServingRuntime
from service.runtime.stats import ModelStats
from service.runtime.tensors import InferInput, InferRequest
from service.triton_config import config_json

T = TypeVar("T")


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    return {v: p for v, (_, p) in export_versions(tmp_path_factory.mktemp("plane")).items()}


def _plane(tmp_path: Path, paths: dict[int, Path], **settings: Any) -> DataPlane:
    config = runtime_settings(tmp_path, drift_sample_fraction=0.0, **settings)
    metrics = ServiceMetrics(CollectorRegistry())
    return DataPlane(config, FakeRegistry(paths), ServingRuntime(config, metrics), metrics)


def _run(plane: DataPlane, body: Callable[[DataPlane], Awaitable[T]]) -> T:
    """``body(plane)`` with the runtime started, then closed."""
    runtime = plane.runtime
    assert isinstance(runtime, ServingRuntime)

    async def main() -> T:
        await runtime.start()
        try:
            return await body(plane)
        finally:
            await runtime.close()

    return asyncio.run(main())


def _request(rows: int = 2, name: str = "input") -> InferRequest:
    x = source_images(rows, 0)
    return InferRequest([InferInput(name, "FP32", tuple(x.shape), x)], id="r1")


def _requests(plane: DataPlane, outcome: str, version: str = "1") -> float | None:
    """Requests of ``m`` ``version`` with ``outcome``, over every ``reason``."""
    labels = {"model": "m", "version": version, "outcome": outcome}
    values = [
        sample.value
        for family in plane.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "recalib_requests_total" and labels.items() <= sample.labels.items()
    ]
    return sum(values) if values else None


def test_live_and_server_metadata(tmp_path: Path, paths: dict[int, Path]) -> None:
    plane = _plane(tmp_path, paths)
    assert plane.live() is True
    assert plane.server_metadata() == {
        "name": SERVER_NAME,
        "version": server_version(),
        "extensions": list(EXTENSIONS),
    }


def test_token_rules(tmp_path: Path, paths: dict[int, Path]) -> None:
    open_plane = _plane(tmp_path, paths)
    open_plane.check_token(None)
    assert open_plane.authorized(None) and not open_plane.protect_health
    plane = _plane(tmp_path, paths, api_token=SecretStr("t0ken"), protect_health=True)
    plane.check_token("t0ken")
    assert plane.protect_health and plane.authorized("t0ken")
    assert not plane.authorized("wrong") and not plane.authorized(None)
    with pytest.raises(Unauthorized, match="got none"):
        plane.check_token(None)


def test_ready_waits_for_registered_and_expected_models(
    tmp_path: Path, paths: dict[int, Path]
) -> None:
    plane = _plane(tmp_path, paths, expect_models=["other"])
    assert plane.ready(show_names=True) == (False, [])  # the runtime is not started

    async def body(plane: DataPlane) -> None:
        assert plane.ready(show_names=True) == (False, ["m", "other"])
        assert plane.ready(show_names=False) == (False, None)
        await plane.model_metadata("m", None)  # serves m on first use
        assert plane.ready(show_names=True) == (False, ["other"])
        plane.settings.expect_models.clear()
        assert plane.ready(show_names=False) == (True, [])

    _run(plane, body)


def test_metadata_and_readiness(tmp_path: Path, paths: dict[int, Path]) -> None:
    async def body(plane: DataPlane) -> None:
        served = await plane.model_metadata("m", None)
        assert served["name"] == "m" and served["versions"] == ["1", "2"]
        assert served["platform"] == "onnx_onnxv1" and served["parameters"]["version"] == "1"
        assert served["inputs"][0]["shape"] == [-1, 3, 8, 8]
        assert await plane.model_ready("m", "2") is False  # not loaded, and not loaded by it
        assert not plane.runtime.is_ready("m", 2)
        staging = await plane.model_metadata("m", "staging")
        assert staging["versions"] == ["1", "2"] and staging["parameters"]["version"] == "2"
        assert await plane.model_ready("m", None) is True
        assert await plane.model_ready("m", "2") is True
        with pytest.raises(NotFound):
            await plane.model_ready("nope", None)
        with pytest.raises(NotFound):
            await plane.model_ready("m", "7")
        with pytest.raises(InvalidInput, match="model name"):
            await plane.model_ready("bad/name", None)
        with pytest.raises(InvalidInput, match="version number or alias"):
            await plane.model_ready("m", "b" * 100)

    _run(_plane(tmp_path, paths), body)


def test_a_version_that_fails_to_load_is_not_ready_with_the_reason(
    tmp_path: Path, paths: dict[int, Path]
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")

    plane = _plane(tmp_path, {**paths, 3: broken})

    async def check(plane: DataPlane) -> None:
        assert await plane.model_readiness("m", "3") == (False, None)  # never tried
        with pytest.raises(InvalidInput, match="expected an ONNX model file"):
            await plane.infer("m", "3", _request())
        ready, error = await plane.model_readiness("m", "3")
        assert not ready and error is not None and "expected an ONNX model file" in error
        assert str(tmp_path) not in error
        assert await plane.model_ready("m", "3") is False

    _run(plane, check)


def test_infer_answers_and_counts(tmp_path: Path, paths: dict[int, Path]) -> None:
    async def body(plane: DataPlane) -> None:
        response = await plane.infer("m", None, _request(3))
        assert (response.model_name, response.model_version, response.id) == ("m", "1", "r1")
        assert response.outputs[0].data.shape == (3, 3)
        explicit = await plane.infer("m", "staging", _request())
        assert explicit.model_version == "2"
        with pytest.raises(InvalidInput, match="unexpected input 'x'"):
            await plane.infer("m", None, _request(name="x"))
        with pytest.raises(NotFound):
            await plane.infer("nope", None, _request())

    plane = _plane(tmp_path, paths)
    _run(plane, body)
    assert _requests(plane, "ok") == 1.0
    assert _requests(plane, "ok", version="2") == 1.0
    assert _requests(plane, "client_error") == 1.0
    registry = plane.metrics.registry
    assert registry.get_sample_value("recalib_inflight_requests", {"model": "m"}) == 0.0
    # an unknown model never becomes a label
    assert registry.get_sample_value("recalib_inflight_requests", {"model": "nope"}) is None
    latency = registry.get_sample_value(
        "recalib_request_duration_seconds_count", {"model": "m", "version": "1"}
    )
    assert latency == 2.0


def test_the_inference_window_counts_what_fails_inside_it(
    tmp_path: Path, paths: dict[int, Path]
) -> None:
    async def body(plane: DataPlane) -> None:
        async with plane.inference("m", None) as call:
            assert call.version == 1
            assert (
                plane.metrics.registry.get_sample_value("recalib_inflight_requests", {"model": "m"})
                == 1.0
            )
            response = await call.infer(_request())
        np.testing.assert_array_equal(response.outputs[0].data.shape, (2, 3))
        with pytest.raises(InvalidInput):
            async with plane.inference("m", "1"):
                raise InvalidInput("request: expected a JSON object (got list)")  # the body
        with pytest.raises(RuntimeError):
            async with plane.inference("m", "1"):
                raise RuntimeError("the protocol layer broke")

    plane = _plane(tmp_path, paths)
    _run(plane, body)
    assert _requests(plane, "ok") == 1.0
    assert _requests(plane, "client_error") == 1.0
    assert _requests(plane, "server_error") == 1.0


@pytest.mark.parametrize("ref", [None, "2"])
def test_a_model_deleted_while_it_is_resolved_is_not_loaded_back(
    tmp_path: Path, paths: dict[int, Path], ref: str | None
) -> None:
    plane = _plane(tmp_path, paths)
    runtime = plane.runtime
    assert isinstance(runtime, ServingRuntime)
    registry = plane.registry
    assert isinstance(registry, FakeRegistry)
    resolve = registry.resolve

    def resolve_then_delete(name: str, ref: str | None) -> tuple[int, Path]:
        found = resolve(name, ref)
        # a DELETE /v1/models/m now: unload_model moves the generation, the rows go
        runtime._generations[name] = runtime.generation(name) + 1
        del registry.versions[name]
        return found

    registry.resolve = resolve_then_delete  # type: ignore[method-assign]

    async def body(plane: DataPlane) -> None:
        with pytest.raises(NotFound, match="not found|deleted"):  # resolved again: gone
            await plane.infer("m", ref, _request())
        assert runtime.served_version("m") is None
        assert runtime.loaded_versions("m") == []
        with pytest.raises(NotFound):
            await plane.infer("m", None, _request())

    _run(plane, body)


def test_statistics_count_where_the_work_happens(tmp_path: Path, paths: dict[int, Path]) -> None:
    async def body(plane: DataPlane) -> None:
        assert plane.model_statistics("m") == [ModelStats.empty("m", 1)]  # nothing yet
        await asyncio.gather(*(plane.infer("m", None, _request(2)) for _ in range(4)))
        with pytest.raises(InvalidInput):
            await plane.infer("m", None, _request(name="x"))
        await plane.infer("m", "2", _request(1))
        (first,) = plane.model_statistics("m", "1")
        assert first["inference_count"] == 8 and first["version"] == "1"
        stats = first["inference_stats"]
        assert stats["success"]["count"] == 4 and stats["fail"]["count"] == 1
        assert stats["fail"]["ns"] > 0
        assert all(stats[k]["count"] == 4 and stats[k]["ns"] > 0 for k in _TIMED)
        runs = first["batch_stats"]
        assert sum(b["compute_infer"]["count"] for b in runs) == first["execution_count"]
        assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in runs) == 8
        assert [s["version"] for s in plane.model_statistics("m")] == ["1", "2"]
        assert [s["name"] for s in plane.model_statistics(None)] == ["m", "m"]
        with pytest.raises(NotFound):
            plane.model_statistics("nope")
        with pytest.raises(NotFound):
            plane.model_statistics("m", "7")

    _run(_plane(tmp_path, paths), body)


_TIMED = ("queue", "compute_input", "compute_infer", "compute_output")


def test_unload_stops_serving_until_something_serves_again(
    tmp_path: Path, paths: dict[int, Path]
) -> None:
    async def body(plane: DataPlane) -> None:
        runtime = plane.runtime
        assert isinstance(runtime, ServingRuntime)
        await plane.load_model("m")
        assert runtime.served_version("m") == 1 and plane.ready(show_names=True) == (True, [])
        await plane.infer("m", "2", _request())
        states = {e["version"]: e["state"] for e in plane.repository_index()}
        assert states == {"1": "READY", "2": "READY"}
        await plane.unload_model("m", {"unload_dependents": False})
        assert runtime.loaded_versions("m") == [] and runtime.served_version("m") is None
        assert plane.repository_index() == [
            {"name": "m", "version": v, "state": "UNAVAILABLE", "reason": "unloaded"}
            for v in ("1", "2")
        ]
        assert plane.repository_index(ready_only=True) == []
        assert plane.ready(show_names=True) == (True, [])  # not waited for
        ready, error = await plane.model_readiness("m", None)  # does not load it back
        assert not ready and error is not None and "unloaded" in error
        assert plane.model_statistics("m") == [ModelStats.empty("m", 1)]
        response = await plane.infer("m", None, _request())  # loads on first use
        assert response.model_version == "1" and runtime.served_version("m") == 1
        assert plane.repository_index()[0]["state"] == "READY"
        with pytest.raises(InvalidInput, match="'config'"):
            await plane.load_model("m", {"config": "{}"})
        with pytest.raises(InvalidInput, match="'force'"):
            await plane.unload_model("m", {"force": True})
        with pytest.raises(NotFound):
            await plane.unload_model("nope")
        with pytest.raises(NotFound):
            await plane.load_model("nope")

    _run(_plane(tmp_path, paths), body)


def test_model_config_describes_the_version(tmp_path: Path, paths: dict[int, Path]) -> None:
    async def body(plane: DataPlane) -> None:
        config = config_json(await plane.model_config("m", "2"))
        assert config["max_batch_size"] == plane.settings.max_batch_size
        assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [3, 8, 8]}]
        assert "dynamic_batching" in config
        off = DataPlane(
            plane.settings.model_copy(update={"dynamic_batching": False}),
            plane.registry,
            plane.runtime,
            plane.metrics,
        )
        assert "dynamic_batching" not in config_json(await off.model_config("m", None))

    _run(_plane(tmp_path, paths), body)


@pytest.mark.parametrize(
    "parameters",
    [{"sequence_id": 3}, {"sequence_end": True}, {"priority": 1}, {"timeout": 10}],
)
def test_unhonoured_request_parameters_are_refused(
    tmp_path: Path, paths: dict[int, Path], parameters: dict[str, Any]
) -> None:
    async def body(plane: DataPlane) -> None:
        request = _request()
        request.parameters = dict(parameters)
        with pytest.raises(InvalidInput, match=f"request parameter '{next(iter(parameters))}'"):
            await plane.infer("m", None, request)
        request.parameters = {"priority": 0, "sequence_id": "", "binary_data_output": True}
        assert (await plane.infer("m", None, request)).model_version == "1"

    _run(_plane(tmp_path, paths), body)


class _ResolverOnly:
    """A resolver that cannot list versions (as the model store's)."""

    def __init__(self, registry: FakeRegistry) -> None:
        self._registry = registry

    def resolve(self, name: str, ref: str | None) -> tuple[int, Path]:
        return self._registry.resolve(name, ref)

    def model_names(self) -> list[str]:
        return self._registry.model_names()


def test_a_resolver_without_a_version_list(tmp_path: Path, paths: dict[int, Path]) -> None:
    config = runtime_settings(tmp_path, drift_sample_fraction=0.0)
    metrics = ServiceMetrics(CollectorRegistry())
    resolver = _ResolverOnly(FakeRegistry(paths))
    plane = DataPlane(config, resolver, ServingRuntime(config, metrics), metrics)

    async def body(plane: DataPlane) -> None:
        assert (await plane.model_metadata("m", None))["versions"] == ["1"]
        assert (await plane.model_metadata("m", "2"))["versions"] == ["1", "2"]
        assert [e["version"] for e in plane.repository_index()] == ["1"]

    _run(plane, body)
