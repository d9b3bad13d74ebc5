"""Bearer-token authentication: every /v1 route and inference need it, and it is checked
before anything else; health and /metrics are open unless the settings protect them, /docs,
/redoc and /openapi.json unless RECALIB_PUBLIC_DOCS."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.auth import check_bearer
from service.errors import Unauthorized
from service.settings import Settings

NO_AUTH = {"Authorization": ""}

PROTECTED = [
    ("GET", "/v1/models"),
    ("POST", "/v1/models"),
    ("GET", "/v1/models/m"),
    ("DELETE", "/v1/models/m"),
    ("GET", "/v1/models/m/versions/1/artifact"),
    ("PUT", "/v1/models/m/aliases/production"),
    ("GET", "/v1/models/m/drift"),
    ("POST", "/v1/datasets"),
    ("GET", "/v1/datasets"),
    ("POST", "/v1/models/m/recalibrations"),
    ("GET", "/v1/recalibrations/j"),
    ("DELETE", "/v1/recalibrations/j"),
    ("POST", "/v2/models/m/infer"),
    ("GET", "/v2/models/m"),
]


@pytest.mark.parametrize(("method", "url"), PROTECTED)
@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "got none"),
        ("Bearer wrong-token", "wrong one"),
        ("Basic czNjcmV0LXRva2Vu", "got none"),
    ],
)
def test_missing_or_wrong_token_401(
    api: Any, method: str, url: str, header: str | None, message: str
) -> None:
    headers = {"Authorization": header} if header else {}
    api.client.headers.pop("Authorization")
    r = api.client.request(method, url, headers=headers)
    assert r.status_code == 401, r.text
    assert message in r.json()["error"]
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("url", ["/v2/health/live", "/v2/health/ready", "/v2", "/metrics"])
def test_health_and_metrics_open_by_default(api: Any, url: str) -> None:
    api.client.headers.pop("Authorization")
    assert api.client.get(url).status_code == 200


@pytest.mark.parametrize(
    ("flag", "url"), [("protect_health", "/v2/health/live"), ("protect_metrics", "/metrics")]
)
def test_health_and_metrics_protected_when_configured(
    make_api: Callable[..., Any], settings: Settings, flag: str, url: str
) -> None:
    api = make_api(settings.model_copy(update={flag: True}))
    assert api.client.get(url).status_code == 200
    api.client.headers.pop("Authorization")
    assert api.client.get(url).status_code == 401


def test_no_token_configured_means_open(make_api: Callable[..., Any], settings: Settings) -> None:
    api = make_api(settings.model_copy(update={"api_token": None}))
    api.client.headers.pop("Authorization")
    assert api.client.get("/v1/models").status_code == 200


def test_check_bearer() -> None:
    check_bearer(None, None)
    check_bearer(SecretStr("t"), "t")
    with pytest.raises(Unauthorized, match="got none"):
        check_bearer(SecretStr("t"), None)
    with pytest.raises(Unauthorized, match="wrong one"):
        check_bearer(SecretStr("tt"), "t")
    with pytest.raises(Unauthorized, match="wrong one"):
        check_bearer(SecretStr("t"), "tü")  # non-ASCII compares as bytes, no TypeError


def test_infer_with_a_bad_version_and_no_token_is_401(api: Any) -> None:
    r = api.client.post("/v2/models/m/versions/bad..ref!/infer", headers=NO_AUTH)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert "error" in r.json()


def test_under_a_root_path_the_token_comes_before_the_body_limit(api: Any) -> None:
    # a proxy's prefix: the gate must see the routed path, or inference answers 413 first
    client = TestClient(api.client.app, root_path="/api")
    huge = {"Authorization": "", "Content-Length": str(1 << 40)}
    r = client.post("/api/v2/models/m/infer", headers=huge, content=b"")
    assert r.status_code == 401, r.text
    r = client.get("/api/v1/models", headers=NO_AUTH)
    assert r.status_code == 401, r.text


def test_every_protected_route_without_a_token_is_401(api: Any) -> None:
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


def test_a_malformed_upload_without_a_token_is_401(api: Any) -> None:
    r = api.client.post(
        "/v1/datasets", files={"file": ("x" * 200_000 + ".npz", b"x")}, headers=NO_AUTH
    )
    assert r.status_code == 401, r.text


def test_open_paths_stay_open(api: Any) -> None:
    assert api.client.get("/v2/health/live", headers=NO_AUTH).status_code == 200
    assert api.client.get("/metrics", headers=NO_AUTH).status_code == 200


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
