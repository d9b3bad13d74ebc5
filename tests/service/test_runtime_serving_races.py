"""The serving runtime under concurrent serve / load / unload_model: the served pointer
moves in call order, and a model unloaded (deleted) while one of its versions loads is
neither served nor kept loaded afterwards (its generation moved on)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from runtime_helpers import export, make_model, runtime_settings

from service.errors import NotFound
from service.metrics import ServiceMetrics
from service.runtime.runtime import ServingRuntime


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(make_model(0), tmp_path_factory.mktemp("races") / "v1.onnx")


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


# -- generations: a deleted model is not loaded back ------------------------------------


def test_unload_model_moves_the_generation(onnx_path: Path, tmp_path: Path) -> None:
    async def main() -> None:
        runtime = _runtime(tmp_path)
        try:
            assert runtime.generation("m") == 0
            await runtime.serve("m", 1, onnx_path)
            await runtime.unload_model("m")
            assert runtime.generation("m") > 0
            assert runtime.generation("other") == 0
        finally:
            await runtime.close()

    asyncio.run(main())


@pytest.mark.parametrize("lazy", [True, False])
def test_a_load_resolved_before_an_unload_is_refused(
    onnx_path: Path, tmp_path: Path, lazy: bool
) -> None:
    async def main() -> None:
        runtime = _runtime(tmp_path)
        try:
            generation = runtime.generation("m")  # then the registry resolves ...
            await runtime.unload_model("m")  # ... and the model is deleted meanwhile
            with pytest.raises(NotFound, match="deleted"):
                if lazy:
                    await runtime.serve("m", 1, onnx_path, if_unserved=True, generation=generation)
                else:
                    await runtime.load("m", 1, onnx_path, generation=generation)
            assert runtime.served_version("m") is None
            assert runtime.loaded_versions("m") == []
        finally:
            await runtime.close()

    asyncio.run(main())


@pytest.mark.parametrize("lazy", [True, False])
def test_a_load_during_an_unload_is_dropped_when_it_returns(
    onnx_path: Path, tmp_path: Path, lazy: bool
) -> None:
    """The window the stress test of test_delete_race.py hit: a request resolves the model
    while unload_model waits for in-flight requests, and loads it back."""

    async def main() -> None:
        runtime = _runtime(tmp_path)
        try:
            await runtime.serve("m", 1, onnx_path)
            entry = runtime._versions[("m", 1)]
            entry.enter(explicit=False)  # an in-flight request holds the unload
            unloading = asyncio.create_task(runtime.unload_model("m"))
            await _until(lambda: runtime.served_version("m") is None)
            generation = runtime.generation("m")  # resolved during the unload
            if lazy:
                await runtime.serve("m", 2, onnx_path, if_unserved=True, generation=generation)
                assert runtime.served_version("m") == 2
            else:
                await runtime.load("m", 2, onnx_path, generation=generation)
            assert runtime.loaded_versions("m") == [2]
            entry.leave()
            await unloading
            assert runtime.served_version("m") is None
            assert runtime.loaded_versions("m") == []
            assert runtime.generation("m") != generation
        finally:
            await runtime.close()

    asyncio.run(main())


def test_a_model_registered_again_after_an_unload_serves(onnx_path: Path, tmp_path: Path) -> None:
    async def main() -> None:
        runtime = _runtime(tmp_path)
        try:
            await runtime.serve("m", 1, onnx_path)
            await runtime.unload_model("m")
            await runtime.serve("m", 1, onnx_path)  # POST /v1/models again
            assert runtime.served_version("m") == 1 and runtime.is_ready("m")
            generation = runtime.generation("m")
            await runtime.load("m", 2, onnx_path, generation=generation)
            assert runtime.loaded_versions("m") == [1, 2]
        finally:
            await runtime.close()

    asyncio.run(main())
