"""The service's error hierarchy and its one mapping to HTTP and gRPC status codes.

Domain code raises :class:`ServiceError` subclasses (or the core's
:class:`recalib.errors.RecalibError`); :func:`install_error_handlers` maps each to a status
code and the Open Inference Protocol's error body ``{"error": "<message>"}``, and
:func:`grpc_error` to a gRPC status code with the same message. Routes and RPCs never
build error responses themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

__all__ = [
    "ClientGone",
    "Conflict",
    "Forbidden",
    "GenerationMoved",
    "Incompatible",
    "InvalidInput",
    "NotFound",
    "NotReady",
    "PayloadTooLarge",
    "ServiceError",
    "StorageError",
    "Unauthorized",
    "error_response",
    "grpc_error",
    "install_error_handlers",
    "internal_error",
    "is_answered_error",
    "without_path",
]

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error the service reports; ``status`` is its HTTP status."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    """The request is malformed or does not match what was expected (400)."""

    status = 400


class Unauthorized(ServiceError):
    """Missing or wrong bearer token (401)."""

    status = 401


class Forbidden(ServiceError):
    """Valid and authenticated, but not something this process does: e.g. a recalibration
    job sent to an inference replica (``RECALIB_ROLE=inference``) (403)."""

    status = 403


class NotFound(ServiceError):
    """Unknown model, version, alias, dataset or job (404)."""

    status = 404


class GenerationMoved(NotFound):
    """The model was deleted or unloaded while a version of it was being loaded (404): the
    data plane resolves the reference again, so only a real deletion reaches the client."""


class Conflict(ServiceError):
    """The resource exists already, or the transition is not allowed now (409)."""

    status = 409


class Incompatible(ServiceError):
    """A valid artifact that does not fit the model it is added to, e.g. another input
    signature than the model's versions (422)."""

    status = 422


class PayloadTooLarge(ServiceError):
    """Upload or request body above the configured limit (413)."""

    status = 413


class StorageError(ServiceError):
    """The service's own files are missing or damaged (an operator's problem, 500); the
    message names the version and the file, never where it is kept."""

    status = 500


class NotReady(ServiceError):
    """The model version exists but cannot serve yet (503)."""

    status = 503


class ClientGone(ServiceError):
    """The caller went away before its request was read (nginx's 499): nothing is
    answered, and the request counts as the client's (``cancelled``), never paging."""

    status = 499

    def __init__(
        self, message: str = "request: the client disconnected before its body was read"
    ) -> None:
        super().__init__(message)


def without_path(message: str, path: Path) -> str:
    """``message`` with ``path`` (as given, absolute and resolved, and its folder) replaced
    by the file's name: errors never show where the service keeps its files."""
    variants = {str(path), str(path.absolute())}
    try:
        variants.add(str(path.resolve()))
    except OSError:
        pass
    for variant in sorted(variants, key=len, reverse=True):
        message = message.replace(variant, path.name)
    for folder in sorted({str(path.parent), str(path.absolute().parent)}, key=len, reverse=True):
        if len(folder) > 1:
            message = message.replace(folder, "")
    return message


def _body(message: str) -> dict[str, str]:
    return {"error": message}


_GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.FAILED_PRECONDITION,
    503: grpc.StatusCode.UNAVAILABLE,
}


def grpc_error(exc: ServiceError) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message of an error (the same message as over HTTP):
    ``InvalidInput`` -> ``INVALID_ARGUMENT``, ``Unauthorized`` -> ``UNAUTHENTICATED``,
    ``NotFound`` -> ``NOT_FOUND``, ``PayloadTooLarge`` -> ``RESOURCE_EXHAUSTED``,
    ``NotReady`` -> ``UNAVAILABLE``, ``Conflict`` -> ``FAILED_PRECONDITION``, ..."""
    return _GRPC_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message


def is_answered_error(exc: BaseException) -> bool:
    """Whether :func:`error_response` answers ``exc`` (a :class:`ServiceError` or the
    core's ``RecalibError``); anything else is a bug, answered 500 and logged."""
    if isinstance(exc, ServiceError):
        return True
    # Here, not at the top: the service's domain modules (which import this one) must
    # not import the core package eagerly.
    from recalib.errors import RecalibError

    return isinstance(exc, RecalibError)


def error_response(exc: BaseException) -> JSONResponse:
    """The HTTP answer to an error :func:`is_answered_error` accepts: its status (the
    core's errors are invalid input, 400), ``{"error": message}``, and
    ``WWW-Authenticate: Bearer`` with 401. The app's handlers and the inference endpoint
    (:mod:`service.api.v2_infer`) both answer with it."""
    if isinstance(exc, ServiceError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(_body(exc.message), status_code=exc.status, headers=headers)
    return JSONResponse(_body(str(exc)), status_code=400)


def internal_error(method: str, path: str, exc: BaseException) -> JSONResponse:
    """A bug's 500: logged with its traceback, answered in the protocol's error format
    without any detail (the message might hold paths or internal ids)."""
    log.error("%s %s failed", method, path, exc_info=exc)
    return JSONResponse(_body("internal server error (logged by the server)"), 500)


def install_error_handlers(app: FastAPI) -> None:
    """Register the exception -> HTTP table on ``app`` (the only place it lives)."""
    # Here, not at the top: the recalib package imports torch, and importing the
    # service's domain modules (which import this one) must not.
    from recalib.errors import RecalibError

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(request.method, request.url.path, exc)

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RecalibError)
    async def _core(_: Request, exc: RecalibError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            got = err.get("input")
            arrived = f" (got {got[:64]!r})" if isinstance(got, str) else ""
            parts.append(f"{where}: {err.get('msg')}{arrived}")
        # A malformed name, alias or id in the path is invalid input (400), as when the
        # domain's own check refuses it (service.api.params runs that check first).
        in_path = any(err.get("loc", ())[:1] == ("path",) for err in exc.errors())
        return JSONResponse(
            _body("invalid request: " + "; ".join(parts)), status_code=400 if in_path else 422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = _multipart_message(exc) or str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = _allowed_methods(request)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
                message = f"expected one of {', '.join(allowed)} (got {request.method})"
        return JSONResponse(_body(message), status_code=exc.status_code, headers=headers or None)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route answers at the request's path (Starlette's own ``Allow``
    names only the first route matching the path)."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes
        )
    ]


def _multipart_message(exc: BaseException) -> str | None:
    """What the multipart parser refused, for Starlette's bare "Invalid multipart data."."""
    if getattr(exc, "detail", None) != "Invalid multipart data.":
        return None
    cause = exc.__cause__ or exc.__context__
    for _ in range(4):
        if cause is None:
            return None
        text = str(cause)
        if "Maximum header size exceeded" in text:
            return (
                f"multipart body: expected each part's headers (its field name and file name) "
                f"within {_MULTIPART_HEADER_BYTES} bytes (got a longer one: shorten the "
                "file name)"
            )
        if "Maximum header count exceeded" in text:
            return (
                f"multipart body: expected at most {_MULTIPART_HEADER_COUNT} headers per part "
                "(got more)"
            )
        if cause.__cause__ is None and cause.__context__ is None:
            return f"multipart body: invalid multipart data ({text[:200]})"
        cause = cause.__cause__ or cause.__context__
    return None


try:
    from python_multipart.multipart import DEFAULT_MAX_HEADER_COUNT as _MULTIPART_HEADER_COUNT
    from python_multipart.multipart import DEFAULT_MAX_HEADER_SIZE as _MULTIPART_HEADER_BYTES
except ImportError:  # pragma: no cover - Starlette's multipart parser is optional
    _MULTIPART_HEADER_BYTES, _MULTIPART_HEADER_COUNT = 4224, 8
