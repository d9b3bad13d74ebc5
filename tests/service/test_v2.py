"""The KServe v2 router and /metrics through TestClient, on a minimal app with a fake
registry (the real ServingRuntime, tiny exported models)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from runtime_helpers import (
    FakeRegistry,
    build_app,
    export_versions,
    reference_outputs,
    runtime_settings,
    source_images,
)

from service.api.v2_codec import HEADER_LENGTH, decode_response, encode_request
from service.errors import NotFound

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    return export_versions(tmp_path_factory.mktemp("v2"))


@pytest.fixture
def client(models: dict[int, Any], tmp_path: Path) -> Iterator[TestClient]:
    app = build_app(
        runtime_settings(tmp_path), FakeRegistry({v: p for v, (_, p) in models.items()})
    )
    with TestClient(app) as c:
        yield c


def _post(client: TestClient, url: str, inputs: dict[str, np.ndarray], **kwargs: Any) -> Any:
    body, header = encode_request(inputs, **kwargs)
    headers = {} if header is None else {HEADER_LENGTH: str(header)}
    return client.post(url, content=body, headers=headers)


def _outputs(response: Any) -> dict[str, np.ndarray]:
    return decode_response(response.content, response.headers.get(HEADER_LENGTH))


def test_server_metadata_and_health(client: TestClient) -> None:
    meta = client.get("/v2").json()
    assert meta["name"] == "recalib" and "binary_tensor_data" in meta["extensions"]
    assert meta["version"]
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "waiting_for": []}


def test_model_metadata_and_ready(client: TestClient) -> None:
    meta = client.get("/v2/models/m")
    assert meta.status_code == 200
    body = meta.json()
    # every registered version; parameters.version is the one described
    assert body["name"] == "m" and body["versions"] == ["1", "2"]
    assert body["platform"] == "onnx_onnxv1" and body["parameters"]["version"] == "1"
    assert body["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 8, 8]}]
    assert body["parameters"]["execution_provider"] == "CPUExecutionProvider"
    # a versioned ready probe does not load the version
    assert client.get("/v2/models/m/versions/2/ready").json() == {"name": "m", "ready": False}
    staged = client.get("/v2/models/m/versions/staging").json()  # metadata loads it
    assert staged["versions"] == ["1", "2"] and staged["parameters"]["version"] == "2"
    ready = client.get("/v2/models/m/versions/2/ready")
    assert ready.status_code == 200 and ready.json() == {"name": "m", "ready": True}
    assert client.get("/v2/models/m/ready").json()["ready"] is True


@pytest.mark.parametrize(
    "url",
    [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/m/versions/9",
        "/v2/models/m/versions/qa",
    ],
)
def test_unknown_model_version_alias_404(client: TestClient, url: str) -> None:
    response = client.get(url)
    assert response.status_code == 404 and "error" in response.json()


def test_infer_json(client: TestClient, models: dict[int, Any]) -> None:
    x = source_images(2, seed=1)
    response = _post(
        client,
        "/v2/models/m/infer",
        {"input": x},
        binary=False,
        binary_output=False,
        request_id="r-7",
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert HEADER_LENGTH not in response.headers
    body = response.json()
    assert body["id"] == "r-7" and body["model_name"] == "m" and body["model_version"] == "1"
    assert body["outputs"][0]["shape"] == [2, 3] and body["outputs"][0]["datatype"] == "FP32"
    got = np.asarray(body["outputs"][0]["data"], np.float32).reshape(2, 3)
    np.testing.assert_allclose(got, reference_outputs(models[1][0], x), rtol=1e-4, atol=1e-5)


def test_infer_binary_by_alias(client: TestClient, models: dict[int, Any]) -> None:
    x = source_images(3, seed=2)
    response = _post(client, "/v2/models/m/versions/staging/infer", {"input": x})
    assert response.status_code == 200
    assert int(response.headers[HEADER_LENGTH]) < len(response.content)
    assert response.headers["content-type"] == "application/octet-stream"
    out = _outputs(response)["output"]
    np.testing.assert_allclose(out, reference_outputs(models[2][0], x), rtol=1e-4, atol=1e-5)
    head = json.loads(response.content[: int(response.headers[HEADER_LENGTH])])
    assert head["model_version"] == "2"


def test_infer_gzip_body(client: TestClient) -> None:
    body, header = encode_request({"input": source_images(1, seed=3)})
    response = client.post(
        "/v2/models/m/infer",
        content=gzip.compress(body),
        headers={HEADER_LENGTH: str(header), "Content-Encoding": "gzip"},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("inputs", "headers", "message"),
    [
        ({"input": np.zeros((1, 3, 8, 8), np.float64)}, None, "expected datatype FP32 (got FP64)"),
        ({"input": np.zeros((1, 3, 8), np.float32)}, None, "expected shape [-1, 3, 8, 8]"),
        ({"x": np.zeros((1, 3, 8, 8), np.float32)}, None, "unexpected input 'x'"),
        ({"input": np.zeros((1, 3, 8, 8), np.float32)}, {HEADER_LENGTH: "nan"}, HEADER_LENGTH),
    ],
)
def test_bad_inputs_400_with_error_body(
    client: TestClient, inputs: dict[str, np.ndarray], headers: dict[str, str] | None, message: str
) -> None:
    body, header = encode_request(inputs)
    sent = {HEADER_LENGTH: str(header), **(headers or {})}
    response = client.post("/v2/models/m/infer", content=body, headers=sent)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_truncated_binary_body_400(client: TestClient) -> None:
    body, header = encode_request({"input": np.zeros((2, 3, 8, 8), np.float32)})
    response = client.post(
        "/v2/models/m/infer", content=body[:-100], headers={HEADER_LENGTH: str(header)}
    )
    assert response.status_code == 400
    assert "truncated body" in response.json()["error"]


def test_request_body_limit_413(models: dict[int, Any], tmp_path: Path) -> None:
    app = build_app(
        runtime_settings(tmp_path, max_request_bytes=1024), FakeRegistry({1: models[1][1]})
    )
    body, header = encode_request({"input": np.zeros((2, 3, 8, 8), np.float32)})  # > 1 KiB
    with TestClient(app) as c:
        declared = c.post("/v2/models/m/infer", content=body, headers={HEADER_LENGTH: str(header)})
        streamed = c.post(
            "/v2/models/m/infer",
            content=iter([body[:600], body[600:]]),  # chunked: no Content-Length
            headers={HEADER_LENGTH: str(header)},
        )
    for response in (declared, streamed):
        assert response.status_code == 413
        assert "at most 1024 bytes" in response.json()["error"]


def test_bearer_token(models: dict[int, Any], tmp_path: Path) -> None:
    settings = runtime_settings(tmp_path, api_token=SecretStr(TOKEN))
    app = build_app(settings, FakeRegistry({1: models[1][1]}))
    body, header = encode_request({"input": source_images(1, seed=4)})
    with TestClient(app) as c:
        missing = c.post("/v2/models/m/infer", content=body, headers={HEADER_LENGTH: str(header)})
        wrong = c.post(
            "/v2/models/m/infer",
            content=body,
            headers={HEADER_LENGTH: str(header), "Authorization": "Bearer nope"},
        )
        ok = c.post(
            "/v2/models/m/infer",
            content=body,
            headers={HEADER_LENGTH: str(header), "Authorization": f"Bearer {TOKEN}"},
        )
        assert c.get("/v2/models/m").status_code == 401
        assert c.get("/v2/health/ready").status_code == 200  # open unless protect_health
        assert c.get("/metrics").status_code == 200  # open unless protect_metrics
    assert missing.status_code == wrong.status_code == 401
    assert "error" in missing.json() and missing.headers["www-authenticate"] == "Bearer"
    assert ok.status_code == 200


def test_protected_health_and_metrics(models: dict[int, Any], tmp_path: Path) -> None:
    settings = runtime_settings(
        tmp_path, api_token=SecretStr(TOKEN), protect_health=True, protect_metrics=True
    )
    with TestClient(build_app(settings, FakeRegistry({1: models[1][1]}))) as c:
        for url in ("/v2", "/v2/health/live", "/v2/health/ready", "/metrics"):
            assert c.get(url).status_code == 401, url
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert c.get(url, headers=auth).status_code == 200, url


def test_metrics_route_counts_requests(client: TestClient) -> None:
    _post(client, "/v2/models/m/infer", {"input": source_images(1, seed=5)})
    _post(client, "/v2/models/m/infer", {"input": np.zeros((1, 3, 8, 8), np.float64)})
    client.get("/v2/models/unknown-model")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'recalib_requests_total{model="m",outcome="ok",reason="none",version="1"} 1.0' in text
    assert (
        'recalib_requests_total{model="m",outcome="client_error",reason="invalid_input",'
        'version="1"} 1.0' in text
    )
    assert "_created" not in text  # off: twice the series for a start time nobody queries
    assert "unknown-model" not in text  # unresolved names never become labels
    assert 'recalib_batch_size_count{model="m",version="1"} 1.0' in text
    assert 'recalib_inflight_requests{model="m"} 0.0' in text
    assert 'recalib_drift_window_samples{model="m",version="1"} 1.0' in text


def test_openapi_documents_the_infer_body(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v2/models/{model_name}/versions/{model_version}/infer"]["post"]
    content = post["requestBody"]["content"]
    schema = content["application/json"]["schema"]
    assert schema["required"] == ["inputs"] and "$ref" not in json.dumps(schema)
    assert "application/octet-stream" in content
    assert HEADER_LENGTH in {p["name"] for p in post["parameters"]}
    assert "/v2/health/ready" in spec["paths"] and "/metrics" in spec["paths"]


def test_bad_version_reference_on_infer(client: TestClient) -> None:
    body, header = encode_request({"input": source_images(1, seed=6)})
    response = client.post(
        "/v2/models/m/versions/-1/infer", content=body, headers={HEADER_LENGTH: str(header)}
    )
    assert response.status_code == 400
    assert "expected a version number or alias" in response.json()["error"]


def test_non_bearer_authorization_is_refused(models: dict[int, Any], tmp_path: Path) -> None:
    settings = runtime_settings(tmp_path, api_token=SecretStr(TOKEN))
    body, header = encode_request({"input": source_images(1, seed=7)})
    with TestClient(build_app(settings, FakeRegistry({1: models[1][1]}))) as c:
        basic = c.post(
            "/v2/models/m/infer",
            content=body,
            headers={HEADER_LENGTH: str(header), "Authorization": f"Basic {TOKEN}"},
        )
    assert basic.status_code == 401


# -- shapes at the edges (the tapped graph is the one that broke on 0 rows) ----------


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


def test_fake_registry_takes_only_ascii_digits_as_versions(models: dict[int, Any]) -> None:
    onnx_path = models[1][1]
    registry = FakeRegistry({1: onnx_path})
    assert registry.resolve("m", "1") == (1, onnx_path)
    with pytest.raises(NotFound, match="no alias"):
        registry.resolve("m", "\u00b9")  # superscript one: str.isdigit() says yes
