"""Regression tests for data-plane review findings: empty and oversized shapes, races of
serve/unload on the served pointer, and a batcher whose consumer dies."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from runtime_helpers import (
    FakeRegistry,
    build_app,
    export,
    make_model,
    runtime_settings,
)

from service.errors import NotFound, ServiceError
from service.metrics import ServiceMetrics
from service.runtime.batching import Batcher
from service.api.v2_codec import HEADER_LENGTH, decode_request
from service.runtime.runtime import ServingRuntime


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(make_model(0), tmp_path_factory.mktemp("fixes") / "v1.onnx")


@pytest.fixture
def client(onnx_path: Path, tmp_path: Path) -> Iterator[TestClient]:
    # drift on every request: the tapped graph is the one that broke on 0 rows
    settings = runtime_settings(tmp_path, drift_sample_fraction=1.0)
    with TestClient(build_app(settings, FakeRegistry({1: onnx_path}))) as c:
        yield c


def test_zero_rows_is_400(client: TestClient) -> None:
    body = {"inputs": [{"name": "input", "shape": [0, 3, 8, 8], "datatype": "FP32", "data": []}]}
    response = client.post("/v2/models/m/infer", json=body)
    assert response.status_code == 400, response.text
    assert response.json() == {"error": "expected at least 1 row (got 0)"}


@pytest.mark.parametrize("binary", [False, True])
def test_huge_dimension_of_an_empty_shape_is_400(client: TestClient, binary: bool) -> None:
    entry: dict[str, Any] = {"name": "input", "shape": [0, 3, 8, 2**62], "datatype": "FP32"}
    if binary:
        entry["parameters"] = {"binary_data_size": 0}
    else:
        entry["data"] = []
    header = json.dumps({"inputs": [entry]}).encode()
    response = client.post(
        "/v2/models/m/infer", content=header, headers={HEADER_LENGTH: str(len(header))}
    )
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert "expected dimensions of at most 2147483647" in message
    assert str(2**62) in message


def test_element_count_is_capped() -> None:
    entry = {"name": "input", "shape": [0, 2**20, 2**20, 2**20], "datatype": "FP32", "data": []}
    with pytest.raises(Exception, match="expected at most 2147483647 elements") as info:
        decode_request(json.dumps({"inputs": [entry]}).encode())
    assert type(info.value).__name__ == "InvalidInput"


# -- serve / unload races ----------------------------------------------------------------


class _Gates:
    """Makes ``ServingRuntime._build`` of chosen versions wait until released."""

    def __init__(self, runtime: ServingRuntime, slow: set[int]) -> None:
        self.events = {v: threading.Event() for v in slow}
        build = runtime._build

        def gated(name: str, version: int, path: Path) -> Any:
            event = self.events.get(version)
            if event is not None:
                event.wait(30.0)
            return build(name, version, path)

        runtime._build = gated  # type: ignore[method-assign]

    def release(self, version: int) -> None:
        self.events[version].set()


def _runtime(tmp_path: Path) -> ServingRuntime:
    return ServingRuntime(runtime_settings(tmp_path), ServiceMetrics(CollectorRegistry()))


async def _until(condition: Any) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


def test_lazy_serve_never_overrides_a_later_serve(onnx_path: Path, tmp_path: Path) -> None:
    async def main() -> None:
        runtime = _runtime(tmp_path)
        gates = _Gates(runtime, {1})
        try:
            lazy = asyncio.create_task(runtime.serve("m", 1, onnx_path, if_unserved=True))
            await asyncio.sleep(0)
            await runtime.serve("m", 2, onnx_path)  # PUT production -> 2
            gates.release(1)
            await lazy
            assert runtime.served_version("m") == 2
            assert runtime.is_ready("m")
        finally:
            gates.release(1)
            await runtime.close()

    asyncio.run(main())


def test_an_overtaken_serve_neither_moves_the_pointer_nor_retires_the_current(
    onnx_path: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        runtime = _runtime(tmp_path)
        gates = _Gates(runtime, {1})
        try:
            first = asyncio.create_task(runtime.serve("m", 1, onnx_path))
            await asyncio.sleep(0)
            second = asyncio.create_task(runtime.serve("m", 2, onnx_path))
            await _until(lambda: runtime.served_version("m") == 2)
            gates.release(1)
            await asyncio.gather(first, second)
            assert runtime.served_version("m") == 2
            assert 2 in runtime.loaded_versions("m")
            assert runtime.is_ready("m")
        finally:
            gates.release(1)
            await runtime.close()

    asyncio.run(main())


def test_unload_during_a_serve_load_leaves_nothing_served(onnx_path: Path, tmp_path: Path) -> None:
    async def main() -> None:
        runtime = _runtime(tmp_path)
        gates = _Gates(runtime, {1})
        try:
            serving = asyncio.create_task(runtime.serve("m", 1, onnx_path, if_unserved=True))
            await _until(lambda: ("m", 1) in runtime._loading)
            await runtime.unload_model("m")
            gates.release(1)
            with pytest.raises(NotFound, match="unloaded"):
                await serving
            assert runtime.served_version("m") is None
            assert runtime.loaded_versions("m") == []
        finally:
            gates.release(1)
            await runtime.close()

    asyncio.run(main())


def test_unload_between_load_and_pointer_move_wins(onnx_path: Path, tmp_path: Path) -> None:
    async def main() -> None:
        runtime = _runtime(tmp_path)
        try:
            await runtime.load("m", 1, onnx_path)
            lock = runtime._lock("m")
            await lock.acquire()  # a concurrent serve() holds the pointer
            serving = asyncio.create_task(runtime.serve("m", 1, onnx_path))
            unloading = asyncio.create_task(runtime.unload_model("m"))
            await asyncio.sleep(0.01)
            lock.release()
            await asyncio.gather(serving, unloading)
            assert runtime.served_version("m") is None
            assert runtime.loaded_versions("m") == []
        finally:
            await runtime.close()

    asyncio.run(main())


# -- batcher consumer failure ------------------------------------------------------------


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


def test_fake_registry_takes_only_ascii_digits_as_versions(onnx_path: Path) -> None:
    registry = FakeRegistry({1: onnx_path})
    assert registry.resolve("m", "1") == (1, onnx_path)
    with pytest.raises(NotFound, match="no alias"):
        registry.resolve("m", "\u00b9")  # superscript one: str.isdigit() says yes
