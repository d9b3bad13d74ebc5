"""The REST inference endpoint answered as plain ASGI (service.api.v2_infer) against the
documented FastAPI operations it stands in front of: the same answers, the paths it
leaves to the app, root_path, a client gone mid-body, and unexpected errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from runtime_helpers import FakeRegistry, build_app, export_versions, runtime_settings

from service.api.v2_codec import HEADER_LENGTH, decode_response, encode_request
from service.api.v2_infer import InferenceEndpoint, declared_too_large
from service.app import AuthGate, BodyLimit, RecalibApp
from service.dataplane import _outcome
from service.errors import ClientGone
from service.metrics import error_reason

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    return export_versions(tmp_path_factory.mktemp("v2_infer"))


def _app(models: dict[int, Any], tmp_path: Path, *, endpoint: bool, **settings: Any) -> FastAPI:
    app = build_app(
        runtime_settings(tmp_path, **settings),
        FakeRegistry({v: p for v, (_, p) in models.items()}),
    )
    assert isinstance(app, RecalibApp) and isinstance(app.inference_front, AuthGate)
    if not endpoint:  # the documented FastAPI operations answer alone
        app.inference_front = None
    return app


@pytest.fixture
def pair(models: dict[int, Any], tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    fast = _app(models, tmp_path / "fast", endpoint=True, api_token=SecretStr(TOKEN))
    slow = _app(models, tmp_path / "slow", endpoint=False, api_token=SecretStr(TOKEN))
    with TestClient(fast) as a, TestClient(slow) as b:
        yield a, b


def _request(x: np.ndarray, *, binary: bool) -> tuple[bytes, dict[str, str]]:
    body, header = encode_request({"input": x}, binary=binary, binary_output=binary)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if header is not None:
        headers[HEADER_LENGTH] = str(header)
    return body, headers


def test_same_answers_as_the_documented_operations(
    pair: tuple[TestClient, TestClient],
) -> None:
    fast, slow = pair
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    for binary in (False, True):
        body, headers = _request(x, binary=binary)
        for url in ("/v2/models/m/infer", "/v2/models/m/versions/1/infer"):
            a, b = (
                fast.post(url, content=body, headers=headers),
                slow.post(url, content=body, headers=headers),
            )
            assert a.status_code == b.status_code == 200
            assert a.headers["content-type"] == b.headers["content-type"]
            assert a.headers.get(HEADER_LENGTH) == b.headers.get(HEADER_LENGTH)
            assert a.headers["content-length"] == str(len(a.content))
            got = decode_response(a.content, a.headers.get(HEADER_LENGTH))
            want = decode_response(b.content, b.headers.get(HEADER_LENGTH))
            assert got.keys() == want.keys()
            for key in got:
                np.testing.assert_array_equal(got[key], want[key])
    body, headers = _request(x, binary=True)
    cases = [
        ("/v2/models/nope/infer", headers),  # unknown model: 404
        ("/v2/models/m/versions/9/infer", headers),  # unknown version: 404
        ("/v2/models/m/infer", {HEADER_LENGTH: headers[HEADER_LENGTH]}),  # no token: 401
        ("/v2/models/m/infer", {**headers, HEADER_LENGTH: "x"}),  # bad header: 400
    ]
    for url, sent in cases:
        a, b = (
            fast.post(url, content=body, headers=sent),
            slow.post(url, content=body, headers=sent),
        )
        assert a.status_code == b.status_code != 200, url
        assert a.json() == b.json(), url
        assert a.headers.get("www-authenticate") == b.headers.get("www-authenticate")
    bad = fast.post("/v2/models/m/versions/-1/infer", content=body, headers=headers)
    assert bad.status_code == 400 and "model_version" in bad.json()["error"]


def test_leaves_other_requests_to_the_app(pair: tuple[TestClient, TestClient]) -> None:
    fast, slow = pair
    auth = {"Authorization": f"Bearer {TOKEN}"}
    wrong_method = slow.get("/v2/models/m/infer", headers=auth)
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["allow"]
    assert fast.get("/v2/models/m/infer", headers=auth).status_code == 405  # left to the app
    assert fast.post("/v2/models/m/infer/extra", headers=auth).status_code == 404
    assert fast.get("/v2/models/m", headers=auth).json()["name"] == "m"


@pytest.fixture
def documented_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented operations fail if they are asked: the endpoint must answer."""

    async def refuse(*args: Any) -> Any:
        raise AssertionError("a documented FastAPI operation answered")

    monkeypatch.setattr("service.api.v2.answer", refuse)


@pytest.mark.usefixtures("documented_unused")
def test_the_endpoint_answers(models: dict[int, Any], tmp_path: Path) -> None:
    app = _app(models, tmp_path, endpoint=True)
    body, headers = _request(np.zeros((1, 3, 8, 8), np.float32), binary=False)
    with TestClient(app) as c:
        stack = app.middleware_stack  # built by the lifespan's call
        app.middleware_stack = _app_not_called  # FastAPI's own stack must not be reached
        assert c.post("/v2/models/m/infer", content=body, headers=headers).status_code == 200
        with pytest.raises(AssertionError, match="the app was called"):
            c.get("/v2/health/ready")  # every other request still goes through it
        app.middleware_stack = stack
        assert (
            c.post("/v2/models/m/versions/2/infer", content=body, headers=headers).json()[
                "model_version"
            ]
            == "2"
        )


@pytest.mark.usefixtures("documented_unused")
def test_root_path(models: dict[int, Any], tmp_path: Path) -> None:
    app = _app(models, tmp_path, endpoint=True)
    x = np.zeros((1, 3, 8, 8), np.float32)
    body, headers = _request(x, binary=True)
    with TestClient(app, root_path="/api") as c:
        mounted = c.post("/api/v2/models/m/infer", content=body, headers=headers)
    assert mounted.status_code == 200
    assert decode_response(mounted.content, mounted.headers.get(HEADER_LENGTH))


def test_unexpected_error_is_the_apps_500(
    models: dict[int, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = _app(models, tmp_path, endpoint=True)

    def broken(name: str, ref: str | None) -> Any:
        raise RuntimeError("registry bug with /secret/path")

    body, headers = _request(np.zeros((1, 3, 8, 8), np.float32), binary=True)
    with TestClient(app, raise_server_exceptions=False) as c:
        app.state.dataplane.registry.resolve = broken
        with caplog.at_level(logging.ERROR, logger="service.errors"):
            response = c.post("/v2/models/other/infer", content=body, headers=headers)
        # raised on to the server too, as Starlette's error middleware does (a client that
        # re-raises server errors, on the same started app)
        with pytest.raises(RuntimeError, match="registry bug"):
            TestClient(app).post("/v2/models/other/infer", content=body, headers=headers)
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error (logged by the server)"}
    logged = [r for r in caplog.records if "POST /v2/models/other/infer failed" in r.message]
    assert len(logged) == 2 and all(r.exc_info for r in logged)  # once per request, traced
    assert "secret" not in response.text


async def _app_not_called(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the app was called")


def _asgi_call(asgi: Any, scope: dict[str, Any], messages: list[dict[str, Any]]) -> list[Any]:
    """One call of ``asgi`` receiving ``messages`` (the last one repeats): what it sent."""
    sent: list[Any] = []
    pending = list(messages)

    async def receive() -> Any:
        return pending.pop(0) if len(pending) > 1 else pending[0]

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(asgi(scope, receive, send))
    return sent


def test_client_gone_mid_body_is_not_answered() -> None:
    """A disconnect while the body streams: nothing is sent, and the metrics window (the
    data plane's ``inference`` block) is left."""
    left: list[BaseException | None] = []

    @asynccontextmanager
    async def window(name: str, ref: str | None) -> Any:
        try:
            yield SimpleNamespace()
        except BaseException as exc:
            left.append(exc)
            raise

    plane = SimpleNamespace(
        check_token=lambda presented: None,
        settings=SimpleNamespace(max_request_bytes=1 << 20),
        inference=window,
    )

    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b"{", "more_body": True},
        {"type": "http.disconnect"},
    ]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/m/infer",
        "root_path": "",
        "headers": [],
    }
    endpoint = InferenceEndpoint(_app_not_called, dataplane=plane)  # type: ignore[arg-type]
    assert _asgi_call(endpoint, scope, messages) == []
    assert len(left) == 1 and isinstance(left[0], ClientGone)
    # counted as the client's, never paging: outcome client_error, reason cancelled
    assert _outcome(left[0]) == "client_error" and error_reason(left[0]) == "cancelled"


def test_an_oversize_body_is_refused_before_anything_is_looked_up(
    models: dict[int, Any], tmp_path: Path
) -> None:
    app = _app(models, tmp_path, endpoint=True, max_request_bytes=1024)
    body, headers = _request(np.zeros((2, 3, 8, 8), np.float32), binary=True)  # > 1 KiB
    with TestClient(app) as c:
        for url in (
            "/v2/models/nope/infer",  # unknown model: still 413, not 404
            "/v2/models/m/versions/-1/infer",  # malformed version: still 413, not 400
            "/v2/models/m/infer",
        ):
            declared = c.post(url, content=body, headers=headers)
            assert declared.status_code == 413, url
            assert "at most 1024 bytes" in declared.json()["error"]
            assert declared.headers["connection"] == "close"
        streamed = c.post(
            "/v2/models/m/infer", content=iter([body[:600], body[600:]]), headers=headers
        )
        assert streamed.status_code == 413 and streamed.headers["connection"] == "close"
        text = c.get("/metrics").text
    assert 'model="nope"' not in text  # refused before resolution: never a metric label


def test_a_content_length_of_other_digits_is_a_400() -> None:
    """``int()`` reads digits of other scripts ("²" is a digit to ``str.isdigit``): the
    early size check takes ASCII digits only, and the body reader answers 400."""

    @asynccontextmanager
    async def window(name: str, ref: str | None) -> Any:
        yield SimpleNamespace()

    plane = SimpleNamespace(
        check_token=lambda presented: None,
        settings=SimpleNamespace(max_request_bytes=1 << 20),
        inference=window,
    )
    body = [{"type": "http.request", "body": b"{}", "more_body": False}]
    for value in ("\u00b2".encode("latin-1"), b"9" * 5000):
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v2/models/m/infer",
            "root_path": "",
            "headers": [(b"content-length", value)],
        }
        endpoint = InferenceEndpoint(_app_not_called, dataplane=plane)  # type: ignore[arg-type]
        status = _asgi_call(endpoint, scope, body)[0]["status"]
        assert status == (400 if value.startswith(b"\xb2") else 413), value[:8]


@pytest.mark.parametrize(
    ("declared", "refused"),
    [
        (None, False),
        ("1024", False),
        ("1025", True),
        ("0" * 40 + "1024", False),  # leading zeros: compared by value, not by length
        ("0" * 40 + "1025", True),
        ("9" * 5000, True),  # more digits than int() reads
        ("\u00b2", False),  # not ASCII digits: the body reader's 400, not a 413
        ("-1", False),
    ],
)
def test_declared_too_large_reads_ascii_digits_of_any_length(
    declared: str | None, refused: bool
) -> None:
    too_large = declared_too_large(declared, 1024)
    assert (too_large is not None) is refused
    if too_large is not None:
        assert too_large.status == 413 and "at most 1024 bytes" in too_large.message
        assert len(too_large.message) < 200  # thousands of digits are not echoed


def test_body_limit_refuses_a_declared_length_of_thousands_of_digits() -> None:
    """The same check guards every other route (``BodyLimit``): 413 with the connection
    closed, the app never called (``int()`` of 5,000 digits raised a 500 there)."""

    limit = BodyLimit(_app_not_called, upload_bytes=1 << 20, request_bytes=1024)
    body = [{"type": "http.request", "body": b"", "more_body": False}]
    for value in (b"9" * 5000, b"1025"):
        headers = [(b"content-length", value)]
        scope = {"type": "http", "method": "POST", "path": "/v1/recalibrations", "headers": headers}
        sent = _asgi_call(limit, scope, body)
        assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
        assert b"at most" in sent[1]["body"]
