"""The Open Inference Protocol (KServe v2) router: health, metadata, readiness, inference.

Endpoints, exactly as the protocol names them (``{version}`` is a version number or an
alias, resolved by the registry):

* ``GET /v2`` - server metadata ``{name, version, extensions}``.
* ``GET /v2/health/live``, ``GET /v2/health/ready``.
* ``GET /v2/models/{name}[/versions/{version}]`` - model metadata.
* ``GET /v2/models/{name}[/versions/{version}]/ready`` - 200 when ready, 400 when not.
* ``POST /v2/models/{name}[/versions/{version}]/infer`` - JSON or binary tensor extension.

Routes only translate HTTP to runtime calls. The inference body is read here (with the
``max_request_bytes`` limit: 413 above it, checked on ``Content-Length`` and while
streaming; ``Content-Encoding: gzip``/``deflate`` accepted) and decoded by
:mod:`service.runtime.kserve`; no pydantic model sits on the hot path (the JSON request
schema is declared for the OpenAPI document only). A version that is not loaded yet is
loaded on first use; an unversioned request goes to the served version (the registry's
``production`` alias, else the latest version, served on first use).

Inference and model metadata require the bearer token when one is configured (the check
of :mod:`service.api.deps`, run as an ``async`` dependency); health and server metadata
only with ``protect_health``.

Inference is answered by plain Starlette routes registered ahead of the documented
FastAPI operations (see the end of this module): same behaviour, without FastAPI's
per-request dependency solving, which costs as much CPU as the rest of a small model's
request.
"""

from __future__ import annotations

import inspect
import re
import time
import zlib
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.routing import Route

from service.api import deps
from service.api.deps import require_health_token
from service.auth import check_bearer
from service.errors import (
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
)
from service.names import check_name, is_number
from service.runtime.kserve import HEADER_LENGTH, decode_request, encode_response
from service.runtime.runtime import ServingRuntime
from service.settings import Settings

__all__ = ["SERVER_NAME", "router"]

SERVER_NAME = "recalib"
EXTENSIONS = ["binary_tensor_data"]


# -- documentation models (OpenAPI only; the hot path never builds them) ---------------


class ErrorBody(BaseModel):
    """The protocol's error object."""

    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool
    waiting_for: list[str] = Field(
        default_factory=list,
        description="Models (registered, or expected via RECALIB_EXPECT_MODELS) that this "
        "process does not serve yet; the server is ready when this is empty. Omitted for a "
        "caller without the bearer token when one is configured (health is open to probes).",
    )


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64")
    shape: list[int] = Field(description="-1 for a variable dimension")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str = Field(description="onnx_onnxv1")
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(
        description="execution_provider (in use), requested_execution_provider, "
        "dynamic_batching, max_batch_size, drift_monitoring, ..."
    )


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data_size: bytes of this tensor in the binary section"
    )
    data: list[Any] | None = Field(
        default=None, description="row-major values, flat or nested (absent when binary)"
    )


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data: return this output in the binary section"
    )


class InferenceRequest(BaseModel):
    """A v2 inference request (the JSON part of a binary-extension body)."""

    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data_output: all outputs in the binary section"
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` references inlined (for ``openapi_extra``)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                return walk(defs[ref.rsplit("/", 1)[-1]])
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    result: dict[str, Any] = walk(schema)
    return result


_INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "JSON inference request; with the binary tensor extension, the JSON part "
            f"followed by raw little-endian tensor bytes, and the {HEADER_LENGTH} header "
            "giving the JSON length."
        ),
        "content": {
            "application/json": {"schema": _inline(InferenceRequest.model_json_schema())},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": "length of the JSON part of a binary-extension body",
            "schema": {"type": "integer", "minimum": 0},
        }
    ],
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "invalid request (expected vs got)"},
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    404: {"model": ErrorBody, "description": "unknown model, version or alias"},
    413: {"model": ErrorBody, "description": "request body above max_request_bytes"},
    503: {"model": ErrorBody, "description": "model version not ready"},
}

_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferenceResponse,
        "description": (
            f"outputs; binary outputs follow the JSON part, whose length is in the "
            f"{HEADER_LENGTH} response header"
        ),
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **_ERRORS,
}


# -- dependencies ----------------------------------------------------------------------


def _runtime(request: Request) -> ServingRuntime:
    runtime: ServingRuntime = request.app.state.runtime
    return runtime


async def _require_token(request: Request, credentials: deps._Credentials) -> None:
    """:func:`service.api.deps.require_token` as an ``async`` dependency: FastAPI runs a
    plain ``def`` dependency in its thread pool, a thread hop per inference request."""
    token = None if credentials is None else credentials.credentials
    check_bearer(deps.get_settings(request).api_token, token)


AuthDep = Annotated[None, Depends(_require_token)]
HealthAuth = Annotated[None, Depends(require_health_token)]

_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
VersionParam = Annotated[
    str, PathParam(description="version number or alias", pattern=_VERSION_PATTERN)
]

router = APIRouter(prefix="/v2", tags=["inference (Open Inference Protocol v2)"])


async def _resolve(request: Request, name: str, ref: str | None) -> tuple[int, Path]:
    result: Any = request.app.state.registry.resolve(name, ref)
    if inspect.isawaitable(result):
        result = await result
    version, path = result
    return int(version), Path(path)


async def _target(request: Request, name: str, ref: str | None) -> tuple[int, int | None]:
    """Resolve ``ref`` and make sure that version is loaded.

    Returns ``(version, explicit)``: the version that will answer, and the version to
    pass to the runtime (``None`` for the served one).
    """
    runtime = _runtime(request)
    if ref is None:
        served = runtime.served_version(name)
        if served is not None:
            return served, None
        version, path = await _resolve(request, name, None)
        # never overrides a serve() made meanwhile (an alias move, a model deletion)
        await runtime.serve(name, version, path, if_unserved=True)
        served = runtime.served_version(name)
        if served is None:
            raise NotFound(f"model {name!r} was deleted")
        return served, None
    version, path = await _resolve(request, name, ref)
    if not runtime.is_ready(name, version):
        await runtime.load(name, version, path)
    return version, version


# -- health and metadata ---------------------------------------------------------------


def _server_version() -> str:
    try:
        return importlib_metadata.version("recalib")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


@router.get("", response_model=ServerMetadata, responses={401: _ERRORS[401]})
async def server_metadata(_: HealthAuth) -> dict[str, Any]:
    """Server metadata: name, version and supported extensions."""
    return {"name": SERVER_NAME, "version": _server_version(), "extensions": EXTENSIONS}


@router.get("/health/live", response_model=ServerLive, responses={401: _ERRORS[401]})
async def server_live(_: HealthAuth) -> dict[str, bool]:
    """200 while the process answers."""
    return {"live": True}


@router.get(
    "/health/ready",
    response_model=ServerReady,
    responses={400: {"model": ServerReady, "description": "not ready"}, 401: _ERRORS[401]},
)
async def server_ready(request: Request, _: HealthAuth) -> JSONResponse:
    """200 when every model is ready for inference, 400 when not (the protocol's 4xx =
    false): the runtime runs, every registered model's production version is loaded, and
    every model in ``RECALIB_EXPECT_MODELS`` is registered and loaded. A model that failed
    to load at start-up keeps the server not ready (``waiting_for`` names it)."""
    runtime = _runtime(request)
    if not runtime.started:
        return JSONResponse({"ready": False, "waiting_for": []}, status_code=400)
    settings = deps.get_settings(request)
    names = set(request.app.state.registry.model_names())
    names.update(settings.expect_models)
    waiting = sorted(n for n in names if runtime.served_version(n) is None)
    ready = not waiting
    if waiting and not _may_see_names(settings, request):
        # health is open to probes by default: model names only for token holders
        return JSONResponse({"ready": False}, status_code=400)
    return JSONResponse({"ready": ready, "waiting_for": waiting}, status_code=200 if ready else 400)


def _may_see_names(settings: Settings, request: Request) -> bool:
    try:
        check_bearer(settings.api_token, _bearer_token(request))
    except Unauthorized:
        return False
    return True


async def _metadata(request: Request, name: str, ref: str | None) -> JSONResponse:
    _, explicit = await _target(request, name, ref)
    return JSONResponse(_runtime(request).metadata(name, explicit))


async def _ready(request: Request, name: str, ref: str | None) -> JSONResponse:
    # a malformed name or reference is an error ({"error": ...}), not a "not ready"
    check_name(name, "model name")
    if ref is not None and not is_number(ref):
        check_name(ref, "version number or alias")
    try:
        version, explicit = await _target(request, name, ref)
    except NotFound:
        raise
    except ServiceError as exc:
        return JSONResponse({"name": name, "ready": False, "error": exc.message}, status_code=400)
    ready = _runtime(request).is_ready(name, explicit)
    body = {"name": name, "ready": ready}
    return JSONResponse(body, status_code=200 if ready else 400)


_NAME = Annotated[str, PathParam(description="model name")]
_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ModelReady,
        "description": "not ready (a malformed model name or version: the error object)",
    },
    401: _ERRORS[401],
    404: _ERRORS[404],
}


@router.get("/models/{model_name}", response_model=ModelMetadata, responses=_ERRORS)
async def model_metadata(request: Request, model_name: _NAME, _: AuthDep) -> JSONResponse:
    """Metadata of the served version (inputs/outputs from the ONNX graph)."""
    return await _metadata(request, model_name, None)


@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    responses=_ERRORS,
)
async def model_version_metadata(
    request: Request, model_name: _NAME, model_version: VersionParam, _: AuthDep
) -> JSONResponse:
    """Metadata of one version (number or alias)."""
    return await _metadata(request, model_name, model_version)


@router.get("/models/{model_name}/ready", response_model=ModelReady, responses=_READY_RESPONSES)
async def model_ready(request: Request, model_name: _NAME, _: AuthDep) -> JSONResponse:
    """200 when the served version can answer (loaded on first call), 400 when not."""
    return await _ready(request, model_name, None)


@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    response_model=ModelReady,
    responses=_READY_RESPONSES,
)
async def model_version_ready(
    request: Request, model_name: _NAME, model_version: VersionParam, _: AuthDep
) -> JSONResponse:
    """200 when the version can answer (loaded on first call), 400 when not."""
    return await _ready(request, model_name, model_version)


# -- inference -------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused above ``limit`` bytes (before and while reading), and
    decompressed for ``Content-Encoding: gzip`` / ``deflate`` (the limit applies to the
    decompressed size too).

    Raises:
        PayloadTooLarge: more than ``limit`` bytes.
        InvalidInput: a bad ``Content-Length`` or ``Content-Encoding``, or corrupt data.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidInput(f"Content-Length: expected an integer (got {declared!r})") from None
        if size > limit:
            raise PayloadTooLarge(
                f"request body: expected at most {limit} bytes (got Content-Length {size})"
            )
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body: expected at most {limit} bytes (got more)")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
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


def _outcome(exc: BaseException) -> str:
    status = getattr(exc, "status", 500)
    return (
        "client_error" if isinstance(exc, ServiceError) and 400 <= status < 500 else "server_error"
    )


async def _infer(request: Request, name: str, ref: str | None) -> Response:
    runtime = _runtime(request)
    started = time.perf_counter()
    served = runtime.served_version(name) if ref is None else None
    if served is not None:
        version, explicit = served, None
    else:  # resolve before counting: unknown names must not become metric labels
        version, explicit = await _target(request, name, ref)
    metrics = runtime.metrics
    metrics.inflight_add(name, 1)
    outcome = "server_error"
    try:
        body = await read_body(request, runtime.settings.max_request_bytes)
        decoded = decode_request(body, request.headers.get(HEADER_LENGTH))
        if explicit is not None and not runtime.is_ready(name, explicit):
            version, explicit = await _target(request, name, ref)  # unloaded meanwhile
        result = await runtime.infer(name, explicit, decoded)
        payload, json_size = encode_response(result)
        version = int(result.model_version)
        outcome = "ok"
    except BaseException as exc:
        outcome = _outcome(exc)
        raise
    finally:
        metrics.inflight_add(name, -1)
        metrics.observe_request(name, version, outcome, time.perf_counter() - started)
    if json_size is None:
        return Response(payload, media_type="application/json")
    return Response(
        payload,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(json_size)},
    )


@router.post(
    "/models/{model_name}/infer",
    response_class=Response,
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_OPENAPI,
)
async def model_infer(request: Request, model_name: _NAME, _: AuthDep) -> Response:
    """Inference on the served version (JSON tensors or the binary tensor extension)."""
    return await _infer(request, model_name, None)


@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    response_class=Response,
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_OPENAPI,
)
async def model_version_infer(
    request: Request, model_name: _NAME, model_version: VersionParam, _: AuthDep
) -> Response:
    """Inference on one version (number or alias)."""
    return await _infer(request, model_name, model_version)


# -- the inference fast path -----------------------------------------------------------
#
# The two infer operations above document the endpoint (OpenAPI) and would serve it, but
# FastAPI's per-request dependency solving and parameter validation cost about as much
# CPU as the rest of a small model's request. Plain Starlette routes for the same paths,
# placed first, answer instead with identical behaviour: the same bearer check, the same
# version-reference pattern, the same errors (raised, so the app's handlers format them).

_VERSION_RE = re.compile(_VERSION_PATTERN)


def _bearer_token(request: Request) -> str | None:
    """The credentials of an ``Authorization: Bearer <token>`` header (as HTTPBearer)."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials


async def _fast_infer(request: Request) -> Response:
    params = request.path_params
    check_bearer(deps.get_settings(request).api_token, _bearer_token(request))  # first
    ref: str | None = params.get("model_version")
    if ref is not None and not _VERSION_RE.match(ref):
        raise InvalidInput(
            f"model_version: expected a version number or alias matching "
            f"{_VERSION_RE.pattern} (got {ref[:64]!r})"
        )
    return await _infer(request, params["model_name"], ref)


for _path in ("/models/{model_name}/infer", "/models/{model_name}/versions/{model_version}/infer"):
    router.routes.insert(
        0, Route(router.prefix + _path, _fast_infer, methods=["POST"], include_in_schema=False)
    )
