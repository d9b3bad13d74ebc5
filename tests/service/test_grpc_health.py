"""``grpc.health.v1.Health`` on the gRPC port: the statuses of the server, the process and
each model, ``Watch`` following loads and unloads and ending when the server stops, the
token only with ``protect_health``, and the protocol's answers for unknown services."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as grpcclient
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from runtime_helpers import export_versions, runtime_settings

from service.app import create_app

TOKEN = "health-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_versions(tmp_path_factory.mktemp("health-models"))[1][1]


@contextlib.contextmanager
def _serve(home: Path, model_file: Path | None, **overrides: Any) -> Iterator[tuple[Any, str]]:
    """A running app (model ``m`` registered when ``model_file`` is given): yields
    ``(client, grpc target)``."""
    settings = runtime_settings(home, grpc=True, grpc_port=0, **overrides)
    app = create_app(settings, metrics_registry=CollectorRegistry())
    token = overrides.get("api_token")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with TestClient(app, headers=headers) as client:
        if model_file is not None:
            files = {"file": ("model.onnx", model_file.read_bytes())}
            r = client.post("/v1/models", data={"name": "m"}, files=files)
            assert r.status_code == 201, r.text
        yield client, f"127.0.0.1:{app.state.grpc_port}"


@pytest.fixture
def health(tmp_path: Path, model_file: Path) -> Iterator[tuple[Any, str]]:
    with _serve(tmp_path / "home", model_file, api_token=TOKEN) as (client, target):
        channel = grpc.insecure_channel(target)
        try:
            yield health_pb2_grpc.HealthStub(channel), target
        finally:
            channel.close()


def _check(stub: Any, service: str, **kwargs: Any) -> int:
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10, **kwargs)
    status: int = response.status
    return status


def test_server_process_and_model_statuses(health: tuple[Any, str]) -> None:
    stub, _ = health
    # server health is open to probes by default, even with a token configured (as REST)
    for service in ("", "inference.GRPCInferenceService", "live"):
        assert _check(stub, service) == SERVING, service
    assert _check(stub, "models/m", metadata=list(AUTH.items())) == SERVING


@pytest.mark.parametrize("service", ["models/m", "models/nope"])
def test_a_model_service_needs_the_token_it_would_reveal_the_model(
    health: tuple[Any, str], service: str
) -> None:
    stub, _ = health
    for call in (
        lambda: _check(stub, service),
        lambda: next(iter(stub.Watch(health_pb2.HealthCheckRequest(service=service)))),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "service", ["models/nope", "nope", "models/", "m", "live/", "models/" + "a" * 65, "x" * 10**6]
)
def test_unknown_services_are_not_found(health: tuple[Any, str], service: str) -> None:
    stub, _ = health
    with pytest.raises(grpc.RpcError) as caught:
        _check(stub, service, metadata=list(AUTH.items()))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    details = caught.value.details()
    assert "expected ''" in details and "models/<model>" in details and len(details) < 300
    if service.startswith("models/") and service != "models/":
        assert f"unknown model {service[len('models/') :][:80]!r}" in details
    else:
        assert f"unknown service {service[:80]!r}" in details


def test_not_ready_until_expected_models_load(tmp_path: Path) -> None:
    """A replica waiting for a model it expects: alive, not ready, that model not serving."""
    with _serve(tmp_path / "home", None, expect_models=["ghost"]) as (_, target):
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert _check(stub, "live") == SERVING
            assert _check(stub, "") == NOT_SERVING
            assert _check(stub, "inference.GRPCInferenceService") == NOT_SERVING
            assert _check(stub, "models/ghost") == NOT_SERVING


def _watch(stub: Any, service: str, into: queue.Queue[Any], **kwargs: Any) -> threading.Thread:
    def run() -> None:
        try:
            for response in stub.Watch(health_pb2.HealthCheckRequest(service=service), **kwargs):
                into.put(response.status)
            into.put("end")
        except grpc.RpcError as exc:
            into.put(exc.code())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_watch_follows_unload_and_load_then_ends_when_the_server_stops(
    tmp_path: Path, model_file: Path
) -> None:
    with _serve(tmp_path / "home", model_file) as (_, target):
        channel = grpc.insecure_channel(target)
        seen: queue.Queue[Any] = queue.Queue()
        _watch(health_pb2_grpc.HealthStub(channel), "models/m", seen)
        assert seen.get(timeout=10) == SERVING
        triton = grpcclient.InferenceServerClient(target)
        triton.unload_model("m")
        assert seen.get(timeout=10) == NOT_SERVING
        triton.load_model("m")
        assert seen.get(timeout=10) == SERVING
        triton.close()
        assert seen.empty()  # only changes are sent
    # the server has stopped
    assert seen.get(timeout=10) == NOT_SERVING
    assert seen.get(timeout=10) == "end"
    channel.close()


def test_watch_of_an_unknown_service_says_so_and_keeps_watching(health: tuple[Any, str]) -> None:
    stub, _ = health
    seen: queue.Queue[Any] = queue.Queue()
    _watch(stub, "models/later", seen, timeout=3, metadata=list(AUTH.items()))
    assert seen.get(timeout=10) == SERVICE_UNKNOWN
    # no error and nothing else until the caller's deadline ends the stream
    assert seen.get(timeout=10) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_token_only_with_protect_health(tmp_path: Path, model_file: Path) -> None:
    overrides = {"api_token": TOKEN, "protect_health": True}
    with _serve(tmp_path / "home", model_file, **overrides) as (_, target):
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for call in (
                lambda: _check(stub, ""),
                lambda: list(stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)),
                lambda: _check(stub, "", metadata=[("authorization", "Bearer wrong")]),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert _check(stub, "", metadata=list(AUTH.items())) == SERVING
            assert _check(stub, "models/m", metadata=list(AUTH.items())) == SERVING


class _Plane:
    """What the health service reads of the data plane, counting the model lookups."""

    protect_health = False

    def __init__(self) -> None:
        self.serving: dict[str, bool] = {"m": True, "cold": False}
        self.lookups = 0
        self.settings = runtime_settings(Path("unused"))  # no token

    def ready(self, *, show_names: bool) -> tuple[bool, list[str] | None]:
        return all(self.serving.values()), None

    def live(self) -> bool:
        return True

    def model_serving(self, name: str) -> bool | None:
        self.lookups += 1
        return self.serving.get(name)


def test_statuses_from_the_data_plane_and_at_stop() -> None:
    from service.grpc_api.health import HealthServicer

    health = HealthServicer(_Plane(), poll_seconds=1.0)  # type: ignore[arg-type]
    assert [health.status(s) for s in ("", "live", "models/m", "models/cold", "x")] == [
        NOT_SERVING,
        SERVING,
        SERVING,
        NOT_SERVING,
        SERVICE_UNKNOWN,
    ]
    asyncio.run(health.stop())  # no watches: returns at once
    assert [health.status(s) for s in ("live", "models/m", "x")] == [
        NOT_SERVING,
        NOT_SERVING,
        SERVICE_UNKNOWN,
    ]


def test_watches_of_one_service_share_a_look_per_tick() -> None:
    from service.grpc_api.health import HealthServicer

    plane = _Plane()
    health = HealthServicer(plane, poll_seconds=3600.0)  # type: ignore[arg-type]
    for _ in range(100):  # a hundred watchers of two models, one tick
        health._watched_status("models/m")
        health._watched_status("models/cold")
    assert plane.lookups == 2
    plane.serving["cold"] = True  # seen at the next tick, not before
    assert health._watched_status("models/cold") == NOT_SERVING
    health._shared_at -= 3600.0
    assert health._watched_status("models/cold") == SERVING
    assert plane.lookups == 3


class _Context:
    """A servicer context without metadata whose ``abort`` raises, as grpc.aio's does."""

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


class _Aborted(Exception):
    pass


def test_stop_waits_for_every_watch_to_send_not_serving_and_end() -> None:
    from service.grpc_api.health import HealthServicer

    async def run() -> list[Any]:
        health = HealthServicer(_Plane(), poll_seconds=3600.0)  # type: ignore[arg-type]
        request = health_pb2.HealthCheckRequest(service="models/m")
        watches = [health.Watch(request, _Context()) for _ in range(3)]
        firsts = [(await w.__anext__()).status for w in watches]
        rest: list[Any] = [[] for _ in watches]

        async def drain(i: int) -> None:
            async for response in watches[i]:
                rest[i].append(response.status)

        drains = [asyncio.ensure_future(drain(i)) for i in range(3)]
        await asyncio.sleep(0)
        await health.stop()
        done = [d.done() for d in drains]  # stop returned only once all had ended
        await asyncio.gather(*drains)
        return [firsts, rest, done]

    firsts, rest, done = asyncio.run(run())
    assert firsts == [SERVING] * 3
    assert rest == [[NOT_SERVING]] * 3
    assert done == [True] * 3


def test_watches_beyond_the_limit_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.grpc_api import health as health_module

    monkeypatch.setattr(health_module, "MAX_WATCHES", 2)

    async def run() -> tuple[grpc.StatusCode, str, int]:
        health = health_module.HealthServicer(_Plane())  # type: ignore[arg-type]
        request = health_pb2.HealthCheckRequest(service="live")
        held = [health.Watch(request, _Context()) for _ in range(2)]
        for watch in held:
            await watch.__anext__()
        with pytest.raises(_Aborted) as caught:
            await health.Watch(request, _Context()).__anext__()
        await held[0].aclose()  # one ends: room for another
        again = (await health.Watch(request, _Context()).__anext__()).status
        return caught.value.args[0], caught.value.args[1], again

    code, details, again = asyncio.run(run())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 2 watches" in details
    assert again == SERVING
