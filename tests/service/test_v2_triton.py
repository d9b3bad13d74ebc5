"""``tritonclient.http`` (the reference v2 client) against a real uvicorn server on
127.0.0.1: binary requests and responses, JSON, aliases, metadata, errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from runtime_helpers import (
    FakeRegistry,
    build_app,
    export_versions,
    reference_outputs,
    runtime_settings,
    serving,
    source_images,
)
from tritonclient.utils import InferenceServerException

STARTUP_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    return export_versions(tmp_path_factory.mktemp("triton"))


@pytest.fixture(scope="module")
def server(models: dict[int, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """uvicorn in a thread on a free port; stopped (and joined) at the end."""
    home = tmp_path_factory.mktemp("home")
    settings = runtime_settings(home)
    app = build_app(settings, FakeRegistry({v: p for v, (_, p) in models.items()}))
    with serving(app, startup=STARTUP_TIMEOUT) as address:
        yield address


@pytest.fixture
def client(server: str) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(server, connection_timeout=10.0, network_timeout=10.0)
    try:
        yield c
    finally:
        c.close()


def _input(x: np.ndarray, *, binary: bool) -> httpclient.InferInput:
    item = httpclient.InferInput("input", list(x.shape), "FP32")
    item.set_data_from_numpy(x, binary_data=binary)
    return item


def test_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.is_model_ready("m")
    meta = client.get_model_metadata("m", model_version="2")
    assert meta["versions"] == ["1", "2"] and meta["platform"] == "onnx_onnxv1"
    assert meta["parameters"]["version"] == "2"
    assert meta["inputs"][0]["shape"] == [-1, 3, 8, 8]


def test_binary_round_trip(
    client: httpclient.InferenceServerClient, models: dict[int, Any]
) -> None:
    x = source_images(4, seed=9)
    result = client.infer(
        "m",
        [_input(x, binary=True)],
        outputs=[httpclient.InferRequestedOutput("output", binary_data=True)],
        request_id="t-1",
    )
    response = result.get_response()
    assert response["id"] == "t-1" and response["model_version"] == "1"
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 4 * 3 * 4
    out = result.as_numpy("output")
    np.testing.assert_allclose(out, reference_outputs(models[1][0], x), rtol=1e-4, atol=1e-5)


def test_default_outputs_binary_and_alias(
    client: httpclient.InferenceServerClient, models: dict[int, Any]
) -> None:
    x = source_images(2, seed=10)
    result = client.infer("m", [_input(x, binary=True)], model_version="staging")
    assert result.get_response()["model_version"] == "2"
    np.testing.assert_allclose(
        result.as_numpy("output"), reference_outputs(models[2][0], x), rtol=1e-4, atol=1e-5
    )


def test_json_round_trip(client: httpclient.InferenceServerClient, models: dict[int, Any]) -> None:
    x = source_images(2, seed=11)
    result = client.infer(
        "m",
        [_input(x, binary=False)],
        outputs=[httpclient.InferRequestedOutput("output", binary_data=False)],
        model_version="1",
    )
    assert "data" in result.get_response()["outputs"][0]
    np.testing.assert_allclose(
        result.as_numpy("output"), reference_outputs(models[1][0], x), rtol=1e-4, atol=1e-5
    )


def test_errors_reach_the_client(client: httpclient.InferenceServerClient) -> None:
    bad = httpclient.InferInput("input", [1, 3, 8, 8], "FP64")
    bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float64))
    with pytest.raises(InferenceServerException, match=r"expected datatype FP32 \(got FP64\)"):
        client.infer("m", [bad])
    with pytest.raises(InferenceServerException, match="not found"):
        client.infer("nope", [_input(source_images(1, seed=0), binary=True)])
