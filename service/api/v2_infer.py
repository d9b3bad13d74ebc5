"""REST inference (``POST /v2/models/{name}[/versions/{version}]/infer``), answered as plain
ASGI ahead of FastAPI's stack.

:class:`InferenceEndpoint` answers the hot path: the app (``service.app.RecalibApp``)
hands it the two inference paths (:func:`is_inference_request`) before FastAPI's own
``__call__``, so they skip FastAPI's telemetry, exception and body-limit middleware,
Starlette's error middleware and routing, and any ``Request`` object, which together cost
about as much CPU as the rest of a small model's request (0.53 -> 0.44 ms of server CPU
per request for the benchmark's small model at concurrency 1, against 0.24 for a bare
ASGI callable). Every other request (and a ``root_path`` the path does not start with)
goes on to the app it wraps. The documented FastAPI operations in :mod:`service.api.v2`
run the same :func:`answer` and serve the same paths in an app without this front (the
OpenAPI document describes them).

What a request goes through, in order (the endpoint first refuses a declared
``Content-Length`` above ``max_request_bytes`` with 413 before anything is looked up, as
``BodyLimit`` does for the documented operations, and closes the connection on every 413:
the rest of the body is never read):

1. the bearer token (:meth:`DataPlane.check_token`; 401 first);
2. the ``{model_version}`` pattern (400);
3. the data plane's metrics window (:meth:`DataPlane.inference`: resolution, loading);
4. the body (:func:`read_body`: ``max_request_bytes``, ``Content-Encoding``);
5. :func:`~service.api.v2_codec.decode_request`, inference,
   :func:`~service.api.v2_codec.encode_response`.

Errors are answered by :func:`service.errors.error_response`, the table the app's
exception handlers use; anything else is answered as the app's handler of unexpected
errors answers it (:func:`service.errors.internal_error`: 500, logged) and raised on to
the server, as Starlette's error middleware does.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import AsyncIterator, Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from ..auth import bearer_token
from ..dataplane import DataPlane
from ..errors import (
    ClientGone,
    InvalidInput,
    PayloadTooLarge,
    error_response,
    internal_error,
    is_answered_error,
)
from .v2_codec import HEADER_LENGTH, decode_request, encode_response

__all__ = [
    "VERSION_PATTERN",
    "InferenceEndpoint",
    "answer",
    "body_too_large",
    "declared_too_large",
    "is_inference_request",
    "read_body",
    "route_path",
]

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""What ``{model_version}`` may look like (a version number or an alias)."""

_VERSION_RE = re.compile(VERSION_PATTERN)
# Starlette's ``{param}`` is ``[^/]+``: the same paths the documented operations match.
_INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
_HEADER_LENGTH = HEADER_LENGTH.lower()


def body_too_large(limit: int) -> PayloadTooLarge:
    """The 413 for a body found, while it is read, to be longer than ``limit`` bytes."""
    return PayloadTooLarge(f"request body: expected at most {limit} bytes (got more)")


def declared_too_large(declared: str | None, limit: int) -> PayloadTooLarge | None:
    """The 413 for a declared ``Content-Length`` above ``limit`` (``None``: no header, not
    ASCII digits, or within the limit). ``int()`` reads other digits too and refuses more
    than 4,300, so only ASCII digits count, and a value is compared by its length first.
    """
    if declared is None or not (declared.isascii() and declared.isdigit()):
        return None
    digits = declared.lstrip("0")
    if len(digits) <= 24 and int(digits or "0") <= limit:
        return None
    shown = declared if len(declared) <= 24 else f"{declared[:24]}... ({len(declared)} digits)"
    return PayloadTooLarge(
        f"request body: expected at most {limit} bytes (got Content-Length {shown})"
    )


async def read_body(chunks: AsyncIterator[bytes], headers: Mapping[str, str], limit: int) -> bytes:
    """The request body, refused above ``limit`` bytes (before and while reading), and
    decompressed for ``Content-Encoding: gzip`` / ``deflate`` (the limit applies to the
    decompressed size too).

    Args:
        chunks: the body as it arrives.
        headers: the request's headers (lower-case names).
        limit: the most bytes the body may have, compressed or not.

    Returns:
        The (decompressed) body.

    Raises:
        PayloadTooLarge: more than ``limit`` bytes.
        InvalidInput: a bad ``Content-Length`` or ``Content-Encoding``, or corrupt data.
    """
    declared = headers.get("content-length")
    if declared is not None:  # read as the endpoint and BodyLimit read it (not stripped)
        if not (declared.isascii() and declared.isdigit()):
            raise InvalidInput(f"Content-Length: expected an integer (got {declared[:64]!r})")
        too_large = declared_too_large(declared, limit)
        if too_large is not None:
            raise too_large
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise body_too_large(limit)
        parts.append(chunk)
    body = parts[0] if len(parts) == 1 else b"".join(parts)
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(
            f"Content-Encoding: expected gzip, deflate or identity (got {encoding!r})"
        )
    inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body: expected {encoding} data ({exc})") from None
    if len(plain) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(
            f"request body: expected at most {limit} bytes once decompressed (got more)"
        )
    return plain


async def answer(
    plane: DataPlane,
    name: str,
    ref: str | None,
    headers: Mapping[str, str],
    chunks: AsyncIterator[bytes],
) -> tuple[bytes, int | None]:
    """One REST inference request, from its headers and body to the response body.

    Args:
        plane: the data plane.
        name: the ``{model_name}`` of the path.
        ref: the ``{model_version}`` of the path, ``None`` without one.
        headers: the request's headers (lower-case names).
        chunks: the body as it arrives.

    Returns:
        ``(body, json_length)`` as :func:`~service.api.v2_codec.encode_response` gives
        them (``json_length`` is ``None`` for a plain JSON body).

    Raises:
        ServiceError: 401 without the token, 400 for a malformed version or body, 404,
            413, 503 as the data plane says.
    """
    plane.check_token(bearer_token(headers.get("authorization")))  # first
    if ref is not None and not _VERSION_RE.match(ref):
        raise InvalidInput(
            f"model_version: expected a version number or alias matching "
            f"{VERSION_PATTERN} (got {ref[:64]!r})"
        )
    async with plane.inference(name, ref) as call:  # the body is read inside the window
        body = await read_body(chunks, headers, plane.settings.max_request_bytes)
        result = await call.infer(decode_request(body, headers.get(_HEADER_LENGTH)))
        return encode_response(result)


def route_path(scope: Scope) -> str:
    """The path the app routes (``path`` without ``root_path``), as Starlette's router."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


def _inference_path(scope: Scope) -> re.Match[str] | None:
    """The path's ``name`` / ``version`` groups when ``scope`` is a REST inference request."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    return _INFER_PATH.fullmatch(route_path(scope))


def is_inference_request(scope: Scope) -> bool:
    """Whether ``scope`` is a REST inference request (what :class:`InferenceEndpoint`
    answers)."""
    return _inference_path(scope) is not None


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name; the first of repeated ones (as
    Starlette's ``Headers.get``)."""
    return {
        key.decode("latin-1"): value.decode("latin-1") for key, value in reversed(scope["headers"])
    }


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def _too_large(scope: Scope, receive: Receive, send: Send, exc: PayloadTooLarge) -> None:
    """413, closing the connection: the rest of the body is never read (as ``BodyLimit``
    answers every other route)."""
    response = error_response(exc)
    response.headers["connection"] = "close"
    await response(scope, receive, send)


class InferenceEndpoint:
    """ASGI middleware: answers the two REST inference paths itself (see the module).

    Args:
        app: the wrapped application (every other request).
        dataplane: the data plane the answers come from.
    """

    def __init__(self, app: ASGIApp, *, dataplane: DataPlane) -> None:
        self.app = app
        self.dataplane = dataplane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _inference_path(scope)
        if match is None:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        limit = self.dataplane.settings.max_request_bytes
        too_large = declared_too_large(headers.get("content-length"), limit)
        if too_large is not None:  # before anything is looked up
            await _too_large(scope, receive, send, too_large)
            return
        try:
            payload, json_size = await answer(
                self.dataplane,
                match["name"],
                match["version"],
                headers,
                _chunks(receive),
            )
        except ClientGone:
            return  # nobody to answer
        except PayloadTooLarge as exc:
            await _too_large(scope, receive, send, exc)
            return
        except Exception as exc:
            if not is_answered_error(exc):  # a bug: answered as the app's handler would
                await internal_error("POST", scope["path"], exc)(scope, receive, send)
                raise  # on to the server, as Starlette's error middleware does
            await error_response(exc)(scope, receive, send)
            return
        sent = [(b"content-length", str(len(payload)).encode())]
        if json_size is None:
            sent.append((b"content-type", b"application/json"))
        else:
            sent.append((b"content-type", b"application/octet-stream"))
            sent.append((_HEADER_LENGTH.encode(), str(json_size).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": sent})
        await send({"type": "http.response.body", "body": payload})
