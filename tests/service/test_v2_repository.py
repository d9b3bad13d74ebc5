"""The Open Inference Protocol extensions beyond inference, over REST and gRPC side by side
with the reference clients (``tritonclient.http`` against uvicorn, ``tritonclient.grpc``
against the app's gRPC port): model repository (index, load, unload), model configuration,
statistics; metadata listing every version; the versioned ready probe that never loads;
unsupported extensions and request parameters the server does not honour."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from fastapi.testclient import TestClient
from google.protobuf import json_format
from prometheus_client import CollectorRegistry
from runtime_helpers import export_versions, runtime_settings, serving, source_images
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.app import create_app
from service.triton_config import config_json

TOKEN = "repo-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # copied per call: tritonclient.http adds to it
GRPC_AUTH = {"authorization": f"Bearer {TOKEN}"}
STARTUP_TIMEOUT = 30.0
MAX_BATCH = 16


@dataclass
class Server:
    """The running app: its REST address, gRPC address and a token-holding HTTP client."""

    rest: str
    grpc: str
    http: httpx.Client


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, bytes]:
    exported = export_versions(tmp_path_factory.mktemp("repo-models"))
    return {version: Path(path).read_bytes() for version, (_, path) in exported.items()}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real app (registry, runtime, batcher) under uvicorn in a thread, gRPC on."""
    settings = runtime_settings(
        tmp_path_factory.mktemp("repo-home"),
        api_token=TOKEN,
        grpc=True,
        grpc_port=0,
        max_batch_size=MAX_BATCH,
        drift_sample_fraction=0.0,
    )
    app = create_app(settings, metrics_registry=CollectorRegistry())
    with serving(app, startup=STARTUP_TIMEOUT) as rest:
        http = httpx.Client(base_url=f"http://{rest}", headers=dict(AUTH), timeout=60.0)
        try:
            yield Server(rest, f"127.0.0.1:{app.state.grpc_port}", http)
        finally:
            http.close()


def _register(server: Server, name: str, models: dict[int, bytes], versions: int = 2) -> None:
    """``name`` with versions 1 (production) .. ``versions``."""
    for version in range(1, versions + 1):
        files = {"file": ("model.onnx", models[1 + (version - 1) % 2])}
        if version == 1:
            r = server.http.post("/v1/models", data={"name": name}, files=files)
        else:
            r = server.http.post(f"/v1/models/{name}/versions", files=files)
        assert r.status_code == 201, r.text


@pytest.fixture
def rest(server: Server) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(server.rest, connection_timeout=30.0, network_timeout=30.0)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def triton(server: Server) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def stub(server: Server) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(server.grpc)
    try:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    finally:
        channel.close()


def _rest_input(x: np.ndarray) -> list[httpclient.InferInput]:
    item = httpclient.InferInput("input", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    return [item]


def _grpc_input(x: np.ndarray) -> list[grpcclient.InferInput]:
    item = grpcclient.InferInput("input", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    return [item]


def _index(server: Server, name: str, ready: bool | None = None) -> dict[str, tuple[str, str]]:
    """``version -> (state, reason)`` of ``name`` in the REST repository index."""
    body = None if ready is None else {"ready": ready}
    r = server.http.post("/v2/repository/index", json=body)
    assert r.status_code == 200, r.text
    return {e["version"]: (e["state"], e["reason"]) for e in r.json() if e["name"] == name}


def _grpc_index(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, name: str, ready: bool = False
) -> dict[str, tuple[str, str]]:
    response = stub.RepositoryIndex(
        pb.RepositoryIndexRequest(ready=ready), metadata=tuple(GRPC_AUTH.items())
    )
    return {m.version: (m.state, m.reason) for m in response.models if m.name == name}


# -- server metadata, model metadata, configuration ------------------------------------


def test_server_metadata_lists_the_implemented_extensions(
    rest: httpclient.InferenceServerClient, triton: grpcclient.InferenceServerClient
) -> None:
    expected = {"binary_tensor_data", "model_repository", "model_configuration", "statistics"}
    assert set(rest.get_server_metadata()["extensions"]) == expected
    assert set(triton.get_server_metadata().extensions) == expected


def test_metadata_lists_every_version(
    server: Server,
    models: dict[int, bytes],
    rest: httpclient.InferenceServerClient,
    triton: grpcclient.InferenceServerClient,
) -> None:
    _register(server, "meta", models, versions=3)
    assert rest.get_model_metadata("meta", headers=dict(AUTH))["versions"] == ["1", "2", "3"]
    grpc_meta = triton.get_model_metadata("meta", "2", headers=GRPC_AUTH)
    assert list(grpc_meta.versions) == ["1", "2", "3"]


def test_model_config_rest_and_grpc(
    server: Server,
    models: dict[int, bytes],
    rest: httpclient.InferenceServerClient,
    triton: grpcclient.InferenceServerClient,
) -> None:
    _register(server, "configured", models)
    config = rest.get_model_config("configured", headers=dict(AUTH))
    assert config["name"] == "configured" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == MAX_BATCH
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [3, 8, 8]}]
    assert config["output"][0]["dims"] == [3]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] > 0
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    grpc_config = triton.get_model_config("configured", headers=GRPC_AUTH).config
    assert config_json(grpc_config) == config  # the same configuration over both
    versioned = rest.get_model_config("configured", "2", headers=dict(AUTH))
    assert versioned["input"] == config["input"]
    with pytest.raises(InferenceServerException) as rest_missing:
        rest.get_model_config("nope", headers=dict(AUTH))
    assert rest_missing.value.status() == "404"
    with pytest.raises(InferenceServerException) as grpc_missing:
        triton.get_model_config("nope", headers=GRPC_AUTH)
    assert grpc_missing.value.status() == "StatusCode.NOT_FOUND"


# -- statistics ------------------------------------------------------------------------


def _check_sane(stats: dict[str, Any], ok: int, failed: int) -> None:
    """Counts equal the requests, times are positive and add up."""
    inference = stats["inference_stats"]
    assert stats["inference_count"] == ok  # batch-1 requests
    assert inference["success"]["count"] == ok and inference["fail"]["count"] == failed
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[key]["count"] == ok
        assert inference[key]["ns"] > 0, key
    assert inference["success"]["ns"] >= inference["compute_infer"]["ns"] > 0
    assert (inference["fail"]["ns"] > 0) == (failed > 0)
    assert 1 <= stats["execution_count"] <= ok
    batches = stats["batch_stats"]
    assert sum(int(b["compute_infer"]["count"]) for b in batches) == stats["execution_count"]
    assert sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in batches) == ok
    now_ms = time.time() * 1000
    assert now_ms - 600_000 < stats["last_inference"] <= now_ms + 1000


def _as_ints(stats: Any) -> dict[str, Any]:
    """A gRPC ``ModelStatistics`` as the REST JSON (protobuf's JSON has uint64 strings)."""
    obj = json_format.MessageToDict(
        stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )

    def ints(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ints(v) for k, v in node.items()}
        if isinstance(node, list):
            return [ints(v) for v in node]
        if isinstance(node, str) and node.isdigit():
            return int(node)
        return node

    converted: dict[str, Any] = ints(obj)
    converted["version"] = stats.version
    converted.pop("response_stats", None)  # gRPC only (decoupled models)
    return converted


def test_statistics_count_requests_over_both_protocols(
    server: Server,
    models: dict[int, bytes],
    rest: httpclient.InferenceServerClient,
    triton: grpcclient.InferenceServerClient,
) -> None:
    _register(server, "counted", models)
    x = source_images(1, seed=3)
    for _ in range(3):
        rest.infer("counted", _rest_input(x), headers=dict(AUTH))
    for _ in range(2):
        triton.infer("counted", _grpc_input(x), headers=GRPC_AUTH)
    bad = np.zeros((1, 3, 4, 4), np.float32)  # a wrong shape: reaches the model, fails
    with pytest.raises(InferenceServerException):
        rest.infer("counted", _rest_input(bad), headers=dict(AUTH))
    with pytest.raises(InferenceServerException):
        triton.infer("counted", _grpc_input(bad), headers=GRPC_AUTH)

    (stats,) = rest.get_inference_statistics("counted", headers=dict(AUTH))["model_stats"]
    assert (stats["name"], stats["version"]) == ("counted", "1")
    _check_sane(stats, ok=5, failed=2)
    (grpc_stats,) = triton.get_inference_statistics("counted", headers=GRPC_AUTH).model_stats
    assert _as_ints(grpc_stats) == stats  # the same numbers over gRPC

    versioned = rest.get_inference_statistics("counted", "1", headers=dict(AUTH))["model_stats"]
    assert versioned == [stats]
    # a version that never answered: zeros
    (idle,) = rest.get_inference_statistics("counted", "2", headers=dict(AUTH))["model_stats"]
    assert idle["version"] == "2" and idle["inference_count"] == 0
    assert idle["inference_stats"]["success"] == {"count": 0, "ns": 0}
    # every model
    everything = rest.get_inference_statistics(headers=dict(AUTH))["model_stats"]
    assert stats in everything
    all_grpc = triton.get_inference_statistics(headers=GRPC_AUTH).model_stats
    assert {(s.name, s.version) for s in all_grpc} == {
        (s["name"], s["version"]) for s in everything
    }

    with pytest.raises(InferenceServerException) as rest_missing:
        rest.get_inference_statistics("nope", headers=dict(AUTH))
    assert rest_missing.value.status() == "404"
    with pytest.raises(InferenceServerException) as grpc_missing:
        triton.get_inference_statistics("nope", headers=GRPC_AUTH)
    assert grpc_missing.value.status() == "StatusCode.NOT_FOUND"


def test_batched_requests_share_executions(server: Server, models: dict[int, bytes]) -> None:
    """Concurrent requests form batches: fewer executions than requests, and the batch
    sizes add up to the inferences."""
    _register(server, "batched", models)
    x = source_images(2, seed=4)
    body = {"inputs": [{"name": "input", "shape": [2, 3, 8, 8], "datatype": "FP32", "data": []}]}
    body["inputs"][0]["data"] = x.ravel().tolist()
    results: list[int] = []

    def send() -> None:
        with httpx.Client(base_url=f"http://{server.rest}", headers=dict(AUTH), timeout=60.0) as c:
            for _ in range(4):
                results.append(c.post("/v2/models/batched/infer", json=body).status_code)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [200] * 24
    (stats,) = server.http.get("/v2/models/batched/stats").json()["model_stats"]
    assert stats["inference_count"] == 48  # rows
    assert stats["inference_stats"]["success"]["count"] == 24
    batches = stats["batch_stats"]
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in batches) == 48
    assert all(b["batch_size"] % 2 == 0 for b in batches)


# -- repository ------------------------------------------------------------------------


def test_index_load_unload_over_both_protocols(
    server: Server,
    models: dict[int, bytes],
    rest: httpclient.InferenceServerClient,
    triton: grpcclient.InferenceServerClient,
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    _register(server, "repo", models)
    index = rest.get_model_repository_index(headers=dict(AUTH))
    assert {"name": "repo", "version": "1", "state": "READY", "reason": ""} in index
    assert _index(server, "repo") == {"1": ("READY", ""), "2": ("UNAVAILABLE", "not loaded")}
    assert _grpc_index(stub, "repo") == _index(server, "repo")
    assert _index(server, "repo", ready=True) == {"1": ("READY", "")}
    assert _grpc_index(stub, "repo", ready=True) == {"1": ("READY", "")}

    # a versioned ready probe answers without loading the version
    assert not rest.is_model_ready("repo", "2", headers=dict(AUTH))
    assert not triton.is_model_ready("repo", "2", headers=GRPC_AUTH)
    assert _index(server, "repo")["2"] == ("UNAVAILABLE", "not loaded")
    x = source_images(1, seed=5)
    assert rest.infer("repo", _rest_input(x), "2", headers=dict(AUTH)).get_response()[
        "model_version"
    ]
    assert rest.is_model_ready("repo", "2", headers=dict(AUTH))
    assert _index(server, "repo")["2"] == ("READY", "")

    # unload (REST): nothing served, not waited for by server readiness, stats end
    rest.unload_model("repo", headers=dict(AUTH))
    assert _index(server, "repo") == {
        "1": ("UNAVAILABLE", "unloaded"),
        "2": ("UNAVAILABLE", "unloaded"),
    }
    assert not rest.is_model_ready("repo", headers=dict(AUTH))
    assert not triton.is_model_ready("repo", headers=GRPC_AUTH)
    ready = server.http.get("/v2/models/repo/ready")
    assert ready.status_code == 400 and "unloaded" in ready.json()["error"]
    assert rest.is_server_ready() and triton.is_server_ready()
    (zeros,) = rest.get_inference_statistics("repo", headers=dict(AUTH))["model_stats"]
    assert zeros["inference_count"] == 0
    assert server.http.get("/v1/models/repo").status_code == 200  # still registered

    # load (gRPC): the production version serves again
    triton.load_model("repo", headers=GRPC_AUTH)
    assert _index(server, "repo") == {"1": ("READY", ""), "2": ("UNAVAILABLE", "not loaded")}
    assert triton.is_model_ready("repo", headers=GRPC_AUTH)
    triton.load_model("repo", headers=GRPC_AUTH)  # idempotent

    # unload (gRPC), then an unversioned inference loads it again on first use
    triton.unload_model("repo", headers=GRPC_AUTH)
    assert _grpc_index(stub, "repo")["1"] == ("UNAVAILABLE", "unloaded")
    answer = triton.infer("repo", _grpc_input(x), headers=GRPC_AUTH)
    assert answer.get_response().model_version == "1"
    assert _index(server, "repo")["1"] == ("READY", "")
    rest.load_model("repo", headers=dict(AUTH))  # REST load of a served model: a no-op
    assert rest.is_model_ready("repo", headers=dict(AUTH))


def test_repository_errors(
    server: Server,
    models: dict[int, bytes],
    rest: httpclient.InferenceServerClient,
    triton: grpcclient.InferenceServerClient,
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    _register(server, "strict", models, versions=1)
    with pytest.raises(InferenceServerException) as rest_missing:
        rest.load_model("nope", headers=dict(AUTH))
    assert rest_missing.value.status() == "404"
    with pytest.raises(InferenceServerException) as grpc_missing:
        triton.unload_model("nope", headers=GRPC_AUTH)
    assert grpc_missing.value.status() == "StatusCode.NOT_FOUND"
    # Triton's config override is refused, not ignored
    with pytest.raises(InferenceServerException) as rest_config:
        rest.load_model("strict", headers=dict(AUTH), config='{"max_batch_size": 2}')
    assert rest_config.value.status() == "400" and "'config'" in rest_config.value.message()
    with pytest.raises(InferenceServerException) as grpc_config:
        triton.load_model("strict", headers=GRPC_AUTH, config='{"max_batch_size": 2}')
    assert grpc_config.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert grpc_config.value.message() == rest_config.value.message()
    with pytest.raises(grpc.RpcError) as named:
        stub.RepositoryIndex(
            pb.RepositoryIndexRequest(repository_name="other"), metadata=tuple(GRPC_AUTH.items())
        )
    assert named.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_body = server.http.post("/v2/repository/index", json={"ready": "maybe"})
    assert bad_body.status_code == 400 and "ready" in bad_body.json()["error"]
    # a misspelt key is refused, not ignored (it would have listed every version)
    typo = server.http.post("/v2/repository/index", json={"ready_only": True})
    assert typo.status_code == 400 and "ready_only" in typo.json()["error"]
    extra = server.http.post("/v2/repository/models/strict/unload", json={"params": {}})
    assert extra.status_code == 400 and "params" in extra.json()["error"]
    not_json = server.http.post("/v2/repository/models/strict/load", content=b"{")
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]


def test_repository_and_statistics_need_the_token(
    server: Server, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    anonymous = httpx.Client(base_url=f"http://{server.rest}", timeout=30.0)
    with anonymous:
        for method, url in (
            ("POST", "/v2/repository/index"),
            ("POST", "/v2/repository/models/m/load"),
            ("POST", "/v2/repository/models/m/unload"),
            ("GET", "/v2/models/stats"),
            ("GET", "/v2/models/m/stats"),
            ("GET", "/v2/models/m/config"),
        ):
            r = anonymous.request(method, url)
            assert r.status_code == 401, (url, r.text)
    for call, request in (
        (stub.RepositoryIndex, pb.RepositoryIndexRequest()),
        (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="m")),
        (stub.ModelStatistics, pb.ModelStatisticsRequest()),
        (stub.ModelConfig, pb.ModelConfigRequest(name="m")),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call(request)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- unsupported extensions and request parameters -------------------------------------


@pytest.mark.parametrize(
    ("method", "url", "extension"),
    [
        ("GET", "/v2/systemsharedmemory/status", "system shared memory"),
        ("POST", "/v2/systemsharedmemory/region/r/register", "system shared memory"),
        ("POST", "/v2/cudasharedmemory/region/r/unregister", "CUDA shared memory"),
        ("GET", "/v2/trace/setting", "trace"),
        ("POST", "/v2/models/m/trace/setting", "trace"),
        ("GET", "/v2/models/m/versions/1/trace/setting", "trace"),
        ("GET", "/v2/logging", "logging"),
    ],
)
def test_unsupported_extensions_answer_the_protocol_error(
    server: Server, method: str, url: str, extension: str
) -> None:
    r = server.http.request(method, url)
    assert r.status_code == 400
    assert r.json() == {"error": f"the {extension} extension is not supported by this server"}


def test_the_reference_clients_see_unsupported_extensions(
    rest: httpclient.InferenceServerClient, triton: grpcclient.InferenceServerClient
) -> None:
    for method in (
        "get_system_shared_memory_status",
        "get_cuda_shared_memory_status",
        "get_trace_settings",
        "get_log_settings",
    ):
        with pytest.raises(InferenceServerException, match="not supported by this server"):
            getattr(rest, method)(headers=dict(AUTH))
    with pytest.raises(InferenceServerException) as grpc_trace:
        triton.get_trace_settings(headers=GRPC_AUTH)
    assert grpc_trace.value.status() == "StatusCode.UNIMPLEMENTED"


@pytest.mark.parametrize(
    ("option", "parameter"),
    [
        ({"sequence_id": 7, "sequence_start": True}, "sequence_id"),
        ({"priority": 2}, "priority"),
        ({"timeout": 1000}, "timeout"),
    ],
)
def test_unhonoured_request_parameters_are_refused(
    server: Server,
    models: dict[int, bytes],
    rest: httpclient.InferenceServerClient,
    triton: grpcclient.InferenceServerClient,
    option: dict[str, Any],
    parameter: str,
) -> None:
    if server.http.get("/v1/models/params").status_code == 404:
        _register(server, "params", models, versions=1)
    x = source_images(1, seed=6)
    with pytest.raises(InferenceServerException) as rest_refused:
        rest.infer("params", _rest_input(x), headers=dict(AUTH), **option)
    assert rest_refused.value.status() == "400"
    assert f"request parameter {parameter!r}" in rest_refused.value.message()
    with pytest.raises(InferenceServerException) as grpc_refused:
        triton.infer("params", _grpc_input(x), headers=GRPC_AUTH, **option)
    assert grpc_refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert grpc_refused.value.message() == rest_refused.value.message()


def test_neutral_parameter_values_are_accepted(server: Server, models: dict[int, bytes]) -> None:
    _register(server, "neutral", models, versions=1)
    x = source_images(1, seed=7)
    body = {
        "parameters": {"priority": 0, "sequence_id": 0, "sequence_start": False},
        "inputs": [
            {"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}
        ],
    }
    assert server.http.post("/v2/models/neutral/infer", json=body).status_code == 200


# -- an inference replica --------------------------------------------------------------


def test_an_inference_replica_answers_the_extensions(
    models: dict[int, bytes], tmp_path: Path
) -> None:
    settings = runtime_settings(tmp_path, role="inference", drift_sample_fraction=0.0)
    app = create_app(settings, metrics_registry=CollectorRegistry())
    with TestClient(app) as client:
        files = {"file": ("model.onnx", models[1])}
        assert client.post("/v1/models", data={"name": "r"}, files=files).status_code == 201
        x = source_images(1, seed=8).ravel().tolist()
        infer = {
            "inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": x}]
        }
        assert client.post("/v2/models/r/infer", json=infer).status_code == 200
        index = client.post("/v2/repository/index").json()
        assert index == [{"name": "r", "version": "1", "state": "READY", "reason": ""}]
        assert client.get("/v2/models/r/config").json()["max_batch_size"] > 0
        (stats,) = client.get("/v2/models/r/stats").json()["model_stats"]
        assert stats["inference_count"] == 1
        assert client.post("/v2/repository/models/r/unload").json() == {
            "name": "r",
            "unload": True,
        }
        assert client.post("/v2/repository/models/r/load").json() == {"name": "r", "load": True}
        assert client.get("/v2/models/r/ready").json() == {"name": "r", "ready": True}
