"""Error answers: one ``{"error": ...}`` object everywhere (malformed v2 names, 405 with its
``Allow`` header) and no filesystem path in them (an unreadable model file)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from service_helpers import Api, real_api

from service.settings import Settings


def test_an_unreadable_model_file_names_no_path(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes
) -> None:
    api = real_api(make_api, settings, bn_onnx)
    registry = api.app.state.registry
    model_id = registry._model_row("m")["id"]
    registry.artifact("m", 2, "onnx").write_bytes(b"not an onnx file")
    r = api.client.put("/v1/models/m/aliases/production", json={"version": 2})
    assert r.status_code == 400, r.text
    assert str(api.home) not in r.text and model_id not in r.text


@pytest.mark.parametrize(
    "url",
    [
        "/v2/models/" + "a" * 10_000 + "/ready",
        "/v2/models/" + "a" * 10_000 + "/versions/1/ready",
        "/v2/models/m/versions/" + "b" * 10_000 + "/ready",
    ],
)
def test_ready_of_a_malformed_name_is_an_error_object(api: Api, url: str) -> None:
    r = api.client.get(url)
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert len(body["error"]) < 300
    assert "expected a" in body["error"]


def test_405_carries_an_allow_header(api: Api) -> None:
    r = api.client.put("/v1/models")
    assert r.status_code == 405
    assert set(r.json()) == {"error"}
    assert "GET" in r.headers["allow"] and "POST" in r.headers["allow"]


def test_a_missing_artifact_file_is_a_500_error_object_without_a_path(
    api: Api, bn_onnx: bytes
) -> None:
    assert api.register("m", bn_onnx).status_code == 201
    (onnx_file,) = [p for p in api.home.rglob("model.onnx") if p.parent.name == "1"]
    onnx_file.unlink()  # an operator's accident on the server's disk
    r = api.client.get("/v1/models/m/versions/1/artifact?format=onnx")
    assert r.status_code == 500, r.text
    assert set(r.json()) == {"error"}
    assert "missing from the server's artifact store" in r.json()["error"]
    assert str(api.home) not in r.text and "artifacts/" not in r.text


def test_an_unexpected_failure_is_a_500_error_object(settings: Settings) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(settings.model_copy(update={"api_token": None}))

    async def broken() -> None:
        raise RuntimeError("/secret/path/inside the server")

    app.add_api_route("/v1/broken", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/v1/broken")
    assert r.status_code == 500
    assert r.json() == {"error": "internal server error (logged by the server)"}
