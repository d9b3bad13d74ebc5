"""Hardening (issue 11): authentication first, no filesystem paths in errors, one error
format, uncompressed data set limit."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from conftest import Api

from service.settings import Settings

NO_AUTH = {"Authorization": ""}


# -- item 5: authentication first, everywhere ---------------------------------------------


def test_infer_with_a_bad_version_and_no_token_is_401(api: Api) -> None:
    r = api.client.post("/v2/models/m/versions/bad..ref!/infer", headers=NO_AUTH)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert "error" in r.json()


def test_every_protected_route_without_a_token_is_401(api: Api) -> None:
    checked = 0
    for path, operations in api.app.openapi()["paths"].items():
        if not path.startswith(("/v1", "/v2/models")):
            continue
        url = re.sub(r"\{[^}]+\}", "bad..ref!", path)
        for method in operations:
            r = api.client.request(method, url, headers=NO_AUTH, content=b"{not json")
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert set(r.json()) == {"error"}
            checked += 1
    assert checked > 20


def test_a_malformed_upload_without_a_token_is_401(api: Api) -> None:
    r = api.client.post(
        "/v1/datasets", files={"file": ("x" * 200_000 + ".npz", b"x")}, headers=NO_AUTH
    )
    assert r.status_code == 401, r.text


def test_open_paths_stay_open(api: Api) -> None:
    assert api.client.get("/v2/health/live", headers=NO_AUTH).status_code == 200
    assert api.client.get("/metrics", headers=NO_AUTH).status_code == 200


# -- item 2: a model deleted while an alias moves or a version loads ----------------------


def _real_api(make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes) -> Api:
    api = make_api(
        settings.model_copy(
            update={"execution_provider": "cpu", "intra_op_threads": 1, "warmup_batch_sizes": [1]}
        ),
        runtime=None,  # the real serving runtime
    )
    assert api.register("m", bn_onnx).status_code == 201
    assert (
        api.client.post("/v1/models/m/versions", files={"file": ("m.onnx", bn_onnx)}).status_code
        == 201
    )
    return api


def test_alias_move_racing_a_delete_is_404_without_a_path(
    make_api: Callable[..., Api],
    settings: Settings,
    bn_onnx: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = _real_api(make_api, settings, bn_onnx)
    registry = api.app.state.registry
    model_id = registry._model_row("m")["id"]
    artifact = registry.artifact

    def deleted_after_resolving(name: str, ref: Any, fmt: str) -> Path:
        path = artifact(name, ref, fmt)
        registry._remove_model(model_id)  # what a concurrent DELETE does under the lock
        return Path(path)

    monkeypatch.setattr(registry, "artifact", deleted_after_resolving)
    r = api.client.put("/v1/models/m/aliases/production", json={"version": 2})
    assert r.status_code in (404, 409), r.text
    assert set(r.json()) == {"error"}
    assert str(api.home) not in r.text and model_id not in r.text
    assert "No such file" not in r.text


@pytest.mark.parametrize("route", ["infer", "ready"])
def test_version_load_racing_a_delete_is_404_without_a_path(
    make_api: Callable[..., Api],
    settings: Settings,
    bn_onnx: bytes,
    monkeypatch: pytest.MonkeyPatch,
    route: str,
) -> None:
    api = _real_api(make_api, settings, bn_onnx)
    registry = api.app.state.registry
    model_id = registry._model_row("m")["id"]
    resolve = registry.resolve

    def deleted_after_resolving(name: str, ref: str | None) -> tuple[int, Path]:
        version, path = resolve(name, ref)
        Path(path).unlink()  # the model's files go first
        return version, path

    monkeypatch.setattr(registry, "resolve", deleted_after_resolving)
    if route == "infer":
        r = api.client.post("/v2/models/m/versions/2/infer", json={"inputs": []})
    else:
        r = api.client.get("/v2/models/m/versions/2/ready")
    assert r.status_code in (404, 409), r.text
    assert set(r.json()) == {"error"}
    assert str(api.home) not in r.text and model_id not in r.text
    assert "No such file" not in r.text


def test_an_unreadable_model_file_names_no_path(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes
) -> None:
    api = _real_api(make_api, settings, bn_onnx)
    registry = api.app.state.registry
    model_id = registry._model_row("m")["id"]
    registry.artifact("m", 2, "onnx").write_bytes(b"not an onnx file")
    r = api.client.put("/v1/models/m/aliases/production", json={"version": 2})
    assert r.status_code == 400, r.text
    assert str(api.home) not in r.text and model_id not in r.text


# -- item 7: the {"error": ...} format everywhere -----------------------------------------


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


def test_an_over_long_multipart_file_name_says_so(api: Api) -> None:
    r = api.client.post("/v1/datasets", files={"file": ("x" * 200_000 + ".npz", b"x")})
    assert r.status_code == 400, r.text
    message = r.json()["error"]
    assert "file name" in message and "bytes" in message, message


# -- item 6: the uncompressed size of data sets -------------------------------------------


def _compressed_npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **cast("dict[str, Any]", arrays))
    return buf.getvalue()


def test_an_npz_of_huge_zeros_is_413_with_the_numbers(
    make_api: Callable[..., Api], settings: Settings
) -> None:
    limit = 1 << 20
    api = make_api(settings.model_copy(update={"max_dataset_uncompressed_bytes": limit}))
    data = _compressed_npz(x=np.zeros((64, 3, 32, 32), np.float32))  # 786 KiB of arrays
    assert len(data) < 10_000
    assert api.upload(data).status_code == 201
    bomb = _compressed_npz(x=np.zeros((256, 3, 32, 32), np.float32))  # 3 MiB of arrays
    assert len(bomb) < 20_000
    before = api.files()
    r = api.upload(bomb)
    assert r.status_code == 413, r.text
    message = r.json()["error"]
    assert str(limit) in message, message
    got = re.search(r"got (\d+) bytes", message)
    assert got is not None and int(got.group(1)) >= 256 * 3 * 32 * 32 * 4, message
    assert api.files() == before  # nothing stored


def test_the_default_limit_refuses_a_4_gib_array() -> None:
    assert Settings().max_dataset_uncompressed_bytes < 4 << 30
    assert Settings().max_dataset_uncompressed_bytes >= Settings().max_upload_bytes


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_and_schema_are_behind_the_token_unless_public(
    make_api: Callable[..., Any], settings: Settings, path: str
) -> None:
    api = make_api(settings)
    anonymous = api.client.get(path, headers={"Authorization": ""})
    assert anonymous.status_code == 401 and "error" in anonymous.json()
    assert api.client.get(path).status_code == 200  # the client sends the token
    public = make_api(settings.model_copy(update={"public_docs": True}))
    assert public.client.get(path, headers={"Authorization": ""}).status_code == 200
