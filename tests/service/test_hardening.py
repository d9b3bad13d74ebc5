"""Hardening (issue 11): authentication first, no filesystem paths in errors, one error
format, uncompressed data set limit."""

from __future__ import annotations

import re

from conftest import Api

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
