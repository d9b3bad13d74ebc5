"""The Open Inference Protocol (KServe v2) REST routes: HTTP in, :class:`DataPlane` calls,
HTTP out.

Endpoints, exactly as the protocol names them (``{version}`` is a version number or an
alias, resolved by the registry):

* ``GET /v2`` - server metadata ``{name, version, extensions}``.
* ``GET /v2/health/live``, ``GET /v2/health/ready``.
* ``GET /v2/models/{name}[/versions/{version}]`` - model metadata.
* ``GET /v2/models/{name}[/versions/{version}]/ready`` - 200 when ready, 400 when not.
* ``POST /v2/models/{name}[/versions/{version}]/infer`` - JSON or binary tensor extension.

What the operations mean (resolution, lazy loading, readiness, metrics, token rules) is
:mod:`service.dataplane`'s; this module reads the token and the body and writes the
status and the body. The inference body is read here (with the ``max_request_bytes``
limit: 413 above it, checked on ``Content-Length`` and while streaming;
``Content-Encoding: gzip``/``deflate`` accepted) inside the data plane's metrics window,
and decoded by :mod:`service.api.v2_codec`; no pydantic model sits on the hot path (the
documents of :mod:`service.api.v2_schemas` are for the OpenAPI document only).

Inference and model metadata require the bearer token when one is configured (the
``HTTPBearer`` dependency of :mod:`service.api.deps`, which also marks them in the OpenAPI
document); health and server metadata only with ``protect_health``, so the document gives
them no security requirement.

Inference is answered by plain Starlette routes registered ahead of the documented
FastAPI operations (see the end of this module): same behaviour, without FastAPI's
per-request dependency solving, which costs as much CPU as the rest of a small model's
request.
"""

from __future__ import annotations

import re
import zlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from starlette.routing import Route

from ..auth import bearer_token
from ..dataplane import DataPlane
from ..errors import InvalidInput, PayloadTooLarge
from ..names import NAME_PATTERN
from .deps import AuthDep
from .v2_codec import HEADER_LENGTH, decode_request, encode_response
from .v2_schemas import (
    ERRORS,
    INFER_OPENAPI,
    INFER_RESPONSES,
    READY_RESPONSES,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
)

__all__ = ["VERSION_PATTERN", "get_dataplane", "read_body", "router"]

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""What ``{model_version}`` may look like (a version number or an alias)."""

_NAME_LENGTH = 64  # names.NAME_PATTERN's bound


def get_dataplane(request: Request) -> DataPlane:
    """The app's :class:`DataPlane` (``app.state.dataplane``)."""
    plane: DataPlane = request.app.state.dataplane
    return plane


def _presented(request: Request) -> str | None:
    return bearer_token(request.headers.get("authorization"))


async def _health_token(request: Request) -> None:
    """The bearer token on health and server metadata, only with ``protect_health``
    (read from the header, not ``HTTPBearer``: the routes are open by default)."""
    plane = get_dataplane(request)
    if plane.protect_health:
        plane.check_token(_presented(request))


HealthAuth = Annotated[None, Depends(_health_token)]
_HEALTH_SETTING = (
    " Open to probes unless RECALIB_PROTECT_HEALTH is set; then the bearer token "
    "(RECALIB_API_TOKEN) is required."
)

ModelName = Annotated[
    str,
    PathParam(
        description="model name",
        # documented, not validated here: a malformed name is the data plane's 400 / 404
        json_schema_extra={"pattern": NAME_PATTERN, "maxLength": _NAME_LENGTH},
    ),
]
VersionRef = Annotated[
    str,
    PathParam(
        description="version number or alias",
        pattern=VERSION_PATTERN,
        json_schema_extra={"maxLength": _NAME_LENGTH},
    ),
]

router = APIRouter(prefix="/v2", tags=["inference (Open Inference Protocol v2)"])


# -- health and metadata ---------------------------------------------------------------


@router.get(
    "",
    response_model=ServerMetadata,
    responses={401: ERRORS[401]},
    description="Server metadata: name, version and supported extensions." + _HEALTH_SETTING,
)
async def server_metadata(request: Request, _: HealthAuth) -> dict[str, Any]:
    """Server metadata."""
    return get_dataplane(request).server_metadata()


@router.get(
    "/health/live",
    response_model=ServerLive,
    responses={401: ERRORS[401]},
    description="200 while the process answers." + _HEALTH_SETTING,
)
async def server_live(request: Request, _: HealthAuth) -> dict[str, bool]:
    """Liveness."""
    return {"live": get_dataplane(request).live()}


@router.get(
    "/health/ready",
    response_model=ServerReady,
    responses={400: {"model": ServerReady, "description": "not ready"}, 401: ERRORS[401]},
    description=(
        "200 when every model is ready for inference, 400 when not (the protocol's 4xx = "
        "false): the runtime runs, every registered model's production version is loaded, "
        "and every model in RECALIB_EXPECT_MODELS is registered and loaded. A model that "
        "failed to load at start-up keeps the server not ready (`waiting_for` names it, "
        "for a caller with the bearer token)." + _HEALTH_SETTING
    ),
)
async def server_ready(request: Request, _: HealthAuth) -> JSONResponse:
    """Readiness."""
    plane = get_dataplane(request)
    ready, waiting = plane.ready(show_names=plane.authorized(_presented(request)))
    body: dict[str, Any] = {"ready": ready}
    if waiting is not None:
        body["waiting_for"] = waiting
    return JSONResponse(body, status_code=200 if ready else 400)


async def _ready(request: Request, name: str, ref: str | None) -> JSONResponse:
    ready, error = await get_dataplane(request).model_readiness(name, ref)
    body: dict[str, Any] = {"name": name, "ready": ready}
    if error is not None:
        body["error"] = error
    return JSONResponse(body, status_code=200 if ready else 400)


@router.get("/models/{model_name}", response_model=ModelMetadata, responses=ERRORS)
async def model_metadata(request: Request, model_name: ModelName, _: AuthDep) -> JSONResponse:
    """Metadata of the served version (inputs/outputs from the ONNX graph)."""
    return JSONResponse(await get_dataplane(request).model_metadata(model_name, None))


@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    responses=ERRORS,
)
async def model_version_metadata(
    request: Request, model_name: ModelName, model_version: VersionRef, _: AuthDep
) -> JSONResponse:
    """Metadata of one version (number or alias)."""
    return JSONResponse(await get_dataplane(request).model_metadata(model_name, model_version))


@router.get("/models/{model_name}/ready", response_model=ModelReady, responses=READY_RESPONSES)
async def model_ready(request: Request, model_name: ModelName, _: AuthDep) -> JSONResponse:
    """200 when the served version can answer (loaded on first call), 400 when not."""
    return await _ready(request, model_name, None)


@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    response_model=ModelReady,
    responses=READY_RESPONSES,
)
async def model_version_ready(
    request: Request, model_name: ModelName, model_version: VersionRef, _: AuthDep
) -> JSONResponse:
    """200 when the version can answer (loaded on first call), 400 when not."""
    return await _ready(request, model_name, model_version)


# -- inference -------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused above ``limit`` bytes (before and while reading), and
    decompressed for ``Content-Encoding: gzip`` / ``deflate`` (the limit applies to the
    decompressed size too).

    Args:
        request: the HTTP request.
        limit: the most bytes the body may have, compressed or not.

    Returns:
        The (decompressed) body.

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


async def _infer(request: Request, name: str, ref: str | None) -> Response:
    plane = get_dataplane(request)
    async with plane.inference(name, ref) as call:  # the body is read inside the window
        body = await read_body(request, plane.settings.max_request_bytes)
        result = await call.infer(decode_request(body, request.headers.get(HEADER_LENGTH)))
        payload, json_size = encode_response(result)
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
    responses=INFER_RESPONSES,
    openapi_extra=INFER_OPENAPI,
)
async def model_infer(request: Request, model_name: ModelName, _: AuthDep) -> Response:
    """Inference on the served version (JSON tensors or the binary tensor extension)."""
    return await _infer(request, model_name, None)


@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    response_class=Response,
    responses=INFER_RESPONSES,
    openapi_extra=INFER_OPENAPI,
)
async def model_version_infer(
    request: Request, model_name: ModelName, model_version: VersionRef, _: AuthDep
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

_VERSION_RE = re.compile(VERSION_PATTERN)


async def _fast_infer(request: Request) -> Response:
    params = request.path_params
    get_dataplane(request).check_token(_presented(request))  # first
    ref: str | None = params.get("model_version")
    if ref is not None and not _VERSION_RE.match(ref):
        raise InvalidInput(
            f"model_version: expected a version number or alias matching "
            f"{VERSION_PATTERN} (got {ref[:64]!r})"
        )
    return await _infer(request, params["model_name"], ref)


for _path in ("/models/{model_name}/infer", "/models/{model_name}/versions/{model_version}/infer"):
    router.routes.insert(
        0, Route(router.prefix + _path, _fast_infer, methods=["POST"], include_in_schema=False)
    )
