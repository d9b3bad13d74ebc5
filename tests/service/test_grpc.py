"""The v2 gRPC service (``inference.GRPCInferenceService``) with the reference clients:
``tritonclient.grpc`` (sync, asyncio and streaming) and KServe's ``InferenceGRPCClient``,
against a real app (registry, runtime, batcher, drift monitor) on a free port."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import queue
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from runtime_helpers import export_versions, reference_outputs, runtime_settings, source_images
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.app import create_app

TOKEN = "grpc-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    return export_versions(tmp_path_factory.mktemp("grpc-models"))


@pytest.fixture(scope="module")
def served(models: dict[int, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The app with model ``m`` (version 1 production, version 2 ``staging``); yields
    ``(client, "127.0.0.1:<grpc port>")``."""
    home = tmp_path_factory.mktemp("grpc-home")
    settings = runtime_settings(
        home, api_token=TOKEN, grpc=True, grpc_port=0, grpc_max_message_bytes=1 << 20
    )
    app = create_app(settings, metrics_registry=CollectorRegistry())
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app, headers=headers) as client:
        for version, (_, path) in sorted(models.items()):
            data = Path(path).read_bytes()
            files = {"file": ("model.onnx", data)}
            if version == 1:
                r = client.post("/v1/models", data={"name": "m"}, files=files)
            else:
                r = client.post("/v1/models/m/versions", files=files)
            assert r.status_code == 201, r.text
        assert client.put("/v1/models/m/aliases/staging", json={"version": 2}).status_code == 200
        yield client, f"127.0.0.1:{app.state.grpc_port}"


@pytest.fixture
def triton(served: Any) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(served[1])
    try:
        yield c
    finally:
        c.close()


def _inputs(x: np.ndarray) -> list[grpcclient.InferInput]:
    item = grpcclient.InferInput("input", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    return [item]


def test_health_and_metadata(triton: grpcclient.InferenceServerClient) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata(as_json=True)
    assert meta["name"] == "recalib" and "binary_tensor_data" in meta["extensions"]
    assert triton.is_model_ready("m", headers=AUTH)
    assert not triton.is_model_ready("nope", headers=AUTH)
    model = triton.get_model_metadata("m", headers=AUTH, as_json=True)
    assert model["platform"] == "onnx_onnxv1" and model["versions"] == ["1", "2"]
    # metadata loads the version it describes; a versioned ready probe never loads
    triton.get_model_metadata("m", "staging", headers=AUTH)
    assert triton.is_model_ready("m", "staging", headers=AUTH)
    assert model["inputs"][0] == {
        "name": "input",
        "datatype": "FP32",
        "shape": ["-1", "3", "8", "8"],
    }


def test_infer_matches_the_model_and_rest(
    served: Any, models: dict[int, Any], triton: grpcclient.InferenceServerClient
) -> None:
    x = source_images(3, seed=11)
    result = triton.infer("m", _inputs(x), headers=AUTH, request_id="r-1")
    response = result.get_response(as_json=True)
    assert response["model_version"] == "1" and response["id"] == "r-1"
    np.testing.assert_allclose(
        result.as_numpy("output"), reference_outputs(models[1][0], x), rtol=1e-4, atol=1e-5
    )
    pinned = triton.infer("m", _inputs(x), model_version="staging", headers=AUTH)
    assert pinned.get_response().model_version == "2"
    np.testing.assert_allclose(
        pinned.as_numpy("output"), reference_outputs(models[2][0], x), rtol=1e-4, atol=1e-5
    )
    client, _ = served
    rest = client.post(
        "/v2/models/m/infer",
        json={
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        },
    ).json()
    np.testing.assert_allclose(
        np.asarray(rest["outputs"][0]["data"]).reshape(3, -1), result.as_numpy("output"), rtol=1e-6
    )


def test_requested_outputs_and_typed_contents(
    served: Any, models: dict[int, Any], triton: grpcclient.InferenceServerClient
) -> None:
    """The typed ``fp32_contents`` field (what KServe's client sends) works as raw does."""
    x = source_images(2, seed=12)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served[1]))
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="output")
    response = stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, -1)
    np.testing.assert_allclose(logits, reference_outputs(models[1][0], x), rtol=1e-4, atol=1e-5)


def test_errors_map_to_status_codes_with_the_rest_messages(
    served: Any, triton: grpcclient.InferenceServerClient
) -> None:
    x = source_images(1, seed=13)
    with pytest.raises(InferenceServerException) as missing_token:
        triton.infer("m", _inputs(x))
    assert missing_token.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as unknown:
        triton.infer("nope", _inputs(x), headers=AUTH)
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert "'nope'" in unknown.value.message()
    bad = grpcclient.InferInput("input", [1, 3, 4, 4], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(InferenceServerException) as shape:
        triton.infer("m", [bad], headers=AUTH)
    assert shape.value.status() == "StatusCode.INVALID_ARGUMENT"
    client, _ = served
    rest = client.post(
        "/v2/models/m/infer",
        json={
            "inputs": [
                {"name": "input", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0.0] * 48}
            ]
        },
    )
    assert rest.status_code == 400 and rest.json()["error"] == shape.value.message()
    with pytest.raises(InferenceServerException) as unsupported:
        triton.get_system_shared_memory_status(headers=AUTH)
    assert unsupported.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "shared memory" in unsupported.value.message()


def test_message_size_limit(triton: grpcclient.InferenceServerClient) -> None:
    big = grpcclient.InferInput("input", [2048, 3, 8, 8], "FP32")
    big.set_data_from_numpy(np.zeros((2048, 3, 8, 8), np.float32))  # 1.5 MiB > 1 MiB
    with pytest.raises(InferenceServerException) as exc:
        triton.infer("m", [big], headers=AUTH)
    assert exc.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_streaming_infer_answers_every_request(
    models: dict[int, Any], triton: grpcclient.InferenceServerClient
) -> None:
    answers: queue.Queue[Any] = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)), headers=AUTH)
    x = source_images(8, seed=14)
    try:
        for i in range(8):
            triton.async_stream_infer("m", _inputs(x[i : i + 1]), request_id=str(i))
        triton.async_stream_infer("nope", _inputs(x[:1]), request_id="bad")
        got = [answers.get(timeout=30) for _ in range(9)]
    finally:
        triton.stop_stream()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and "'nope'" in errors[0].message()
    by_id = {r.get_response().id: r.as_numpy("output") for r, e in got if e is None}
    reference = reference_outputs(models[1][0], x)
    for i in range(8):
        np.testing.assert_allclose(by_id[str(i)][0], reference[i], rtol=1e-4, atol=1e-5)


def test_asyncio_client_concurrent_requests(served: Any, models: dict[int, Any]) -> None:
    x = source_images(16, seed=15)

    async def run() -> list[np.ndarray]:
        client = aioclient.InferenceServerClient(served[1])
        try:
            results = await asyncio.gather(
                *(client.infer("m", _aio_inputs(x[i : i + 1]), headers=AUTH) for i in range(16))
            )
        finally:
            await client.close()
        return [r.as_numpy("output")[0] for r in results]

    np.testing.assert_allclose(
        np.stack(asyncio.run(run())), reference_outputs(models[1][0], x), rtol=1e-4, atol=1e-5
    )


def _aio_inputs(x: np.ndarray) -> list[aioclient.InferInput]:
    item = aioclient.InferInput("input", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    return [item]


_KSERVE_CLIENT = """
import asyncio, io, sys
import numpy as np
import kserve

async def main(url, token):
    client = kserve.InferenceGRPCClient(url, timeout=30, retries=0)
    try:
        assert await client.is_server_ready()
        x = np.load(io.BytesIO(sys.stdin.buffer.read()))
        item = kserve.InferInput("input", list(x.shape), "FP32")
        item.set_data_from_numpy(x)
        request = kserve.InferRequest(model_name="m", infer_inputs=[item])
        response = await client.infer(request, headers=(("authorization", "Bearer " + token),))
        assert response.model_name == "m", response.model_name
        np.save(sys.stdout.buffer, response.outputs[0].as_numpy())
    finally:
        await client.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_kserve_grpc_client(served: Any, models: dict[int, Any]) -> None:
    """KServe's own client, in a process of its own: its generated ``inference`` protos
    and tritonclient's (which the server uses) cannot share one protobuf pool."""
    if importlib.util.find_spec("kserve") is None:
        pytest.skip("kserve is not installed (a dev dependency)")
    x = source_images(2, seed=16)
    buffer = io.BytesIO()
    np.save(buffer, x)
    done = subprocess.run(
        [sys.executable, "-c", _KSERVE_CLIENT, served[1], TOKEN],
        input=buffer.getvalue(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    logits = np.load(io.BytesIO(done.stdout))
    np.testing.assert_allclose(
        logits.reshape(2, -1), reference_outputs(models[1][0], x), rtol=1e-4, atol=1e-5
    )


def test_a_failed_stream_request_is_answered_with_its_id(served: Any) -> None:
    """As Triton does: the error answer names the request, so a client can match it."""
    x = source_images(1, seed=17)
    channel = grpc.insecure_channel(served[1])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    def requests() -> Iterator[Any]:
        for rid, model in (("good", "m"), ("bad", "nosuch")):
            request = pb.ModelInferRequest(model_name=model, id=rid)
            request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
            request.raw_input_contents.append(x.tobytes())
            yield request

    try:
        answers = list(stub.ModelStreamInfer(requests(), metadata=tuple(AUTH.items())))
    finally:
        channel.close()
    by_id = {a.infer_response.id: a for a in answers}
    assert set(by_id) == {"good", "bad"}
    assert by_id["good"].error_message == ""
    assert "'nosuch'" in by_id["bad"].error_message
    assert by_id["bad"].infer_response.model_name == "nosuch"
