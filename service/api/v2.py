"""The Open Inference Protocol (KServe v2) REST routes: HTTP in, :class:`DataPlane` calls,
HTTP out.

Endpoints, exactly as the protocol names them (``{version}`` is a version number or an
alias, resolved by the registry):

* ``GET /v2`` - server metadata ``{name, version, extensions}``.
* ``GET /v2/health/live``, ``GET /v2/health/ready``.
* ``GET /v2/models/{name}[/versions/{version}]`` - model metadata.
* ``GET /v2/models/{name}[/versions/{version}]/ready`` - 200 when ready, 400 when not.
* ``POST /v2/models/{name}[/versions/{version}]/infer`` - JSON or binary tensor extension.
* ``GET /v2/models/{name}[/versions/{version}]/config`` - Triton's model configuration.
* ``GET /v2/models/stats``, ``GET /v2/models/{name}[/versions/{version}]/stats`` - the
  statistics extension (``stats`` is therefore no usable model name here, as in Triton).
* ``POST /v2/repository/index``, ``POST /v2/repository/models/{name}/load`` and
  ``.../unload`` - the model repository extension.
* The shared memory, trace and logging extensions answer 400 with
  ``{"error": "the ... extension is not supported by this server"}``.

What the operations mean (resolution, lazy loading, readiness, metrics, token rules) is
:mod:`service.dataplane`'s; this module reads the token and the body and writes the
status and the body. The inference body is read here (with the ``max_request_bytes``
limit: 413 above it, checked on ``Content-Length`` and while streaming;
``Content-Encoding: gzip``/``deflate`` accepted) inside the data plane's metrics window,
and decoded by :mod:`service.api.v2_codec`; no pydantic model sits on the hot path (the
documents of :mod:`service.api.v2_schemas` are for the OpenAPI document only).

Inference, model metadata, configuration, statistics and the repository require the
bearer token when one is configured (the
``HTTPBearer`` dependency of :mod:`service.api.deps`, which also marks them in the OpenAPI
document); health and server metadata only with ``protect_health``, so the document gives
them no security requirement.

Inference is answered by :class:`service.api.v2_infer.InferenceEndpoint`, which the app
(``service.app.RecalibApp``) puts in front of FastAPI for the hot path, with the same
:func:`~service.api.v2_infer.answer` as the documented operations here (which serve in
an app without that front).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from ..auth import bearer_token
from ..dataplane import DataPlane
from ..errors import ClientGone, InvalidInput
from ..names import NAME_PATTERN
from ..triton_config import config_json
from .deps import AuthDep
from .params import VERSION_PATTERN as REF_PATTERN
from .v2_codec import HEADER_LENGTH
from .v2_ext_schemas import (
    ModelConfiguration,
    ModelLoaded,
    ModelUnloaded,
    RepositoryIndexEntry,
    RepositoryIndexRequest,
    RepositoryModelRequest,
    StatisticsResponse,
)
from .v2_infer import VERSION_PATTERN, answer
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

__all__ = ["VERSION_PATTERN", "get_dataplane", "router"]


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
        # documented as what is well-formed (a number of any length, or a name); the
        # data plane refuses the rest of VERSION_PATTERN (an over-long alias) with 400
        json_schema_extra={"pattern": REF_PATTERN},
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


# -- statistics, before /models/{model_name} (which would take "stats" as a name) ------

_STATS_ERRORS: dict[int | str, dict[str, Any]] = {
    k: v for k, v in ERRORS.items() if k in (400, 401, 404)
}


@router.get(
    "/models/stats",
    response_model=StatisticsResponse,
    responses={401: ERRORS[401]},
    description="Statistics of every registered model's versions that were loaded "
    "(Triton's statistics extension): counts, and queue and compute times in ns.",
)
async def all_model_statistics(request: Request, _: AuthDep) -> JSONResponse:
    """Statistics of every model."""
    return JSONResponse({"model_stats": get_dataplane(request).model_statistics(None)})


@router.get(
    "/models/{model_name}/stats",
    response_model=StatisticsResponse,
    responses=_STATS_ERRORS,
    description="Statistics of each version of the model that was loaded (the production "
    "version's zeros if none was). Counters start when a version loads and end when the "
    "model is unloaded or deleted.",
)
async def model_statistics(request: Request, model_name: ModelName, _: AuthDep) -> JSONResponse:
    """Statistics of a model's versions."""
    stats = get_dataplane(request).model_statistics(model_name)
    return JSONResponse({"model_stats": stats})


@router.get(
    "/models/{model_name}/versions/{model_version}/stats",
    response_model=StatisticsResponse,
    responses=_STATS_ERRORS,
)
async def model_version_statistics(
    request: Request, model_name: ModelName, model_version: VersionRef, _: AuthDep
) -> JSONResponse:
    """Statistics of one version (number or alias; zeros if it never answered)."""
    stats = get_dataplane(request).model_statistics(model_name, model_version)
    return JSONResponse({"model_stats": stats})


@router.get("/models/{model_name}", response_model=ModelMetadata, responses=ERRORS)
async def model_metadata(request: Request, model_name: ModelName, _: AuthDep) -> JSONResponse:
    """Metadata of the served version (inputs/outputs from the ONNX graph; `versions`
    lists every registered version)."""
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
    """200 when the served version can answer (loaded on first call, unless the model was
    unloaded through the repository extension), 400 when not."""
    return await _ready(request, model_name, None)


@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    response_model=ModelReady,
    responses=READY_RESPONSES,
)
async def model_version_ready(
    request: Request, model_name: ModelName, model_version: VersionRef, _: AuthDep
) -> JSONResponse:
    """200 when the version is loaded, 400 when not (never loads it: a version that is
    not loaded yet, is loading or failed to load is not ready; `error` gives a failure)."""
    return await _ready(request, model_name, model_version)


# -- model configuration ---------------------------------------------------------------


async def _config(request: Request, name: str, ref: str | None) -> JSONResponse:
    config = await get_dataplane(request).model_config(name, ref)
    return JSONResponse(config_json(config))


@router.get(
    "/models/{model_name}/config",
    response_model=ModelConfiguration,
    responses=ERRORS,
    description="Triton's model configuration (max_batch_size, inputs/outputs with dims, "
    "dynamic_batching, instance_group) of the served version, loaded first if needed.",
)
async def model_configuration(request: Request, model_name: ModelName, _: AuthDep) -> JSONResponse:
    """Model configuration of the served version."""
    return await _config(request, model_name, None)


@router.get(
    "/models/{model_name}/versions/{model_version}/config",
    response_model=ModelConfiguration,
    responses=ERRORS,
)
async def model_version_configuration(
    request: Request, model_name: ModelName, model_version: VersionRef, _: AuthDep
) -> JSONResponse:
    """Model configuration of one version (number or alias), loaded first if needed."""
    return await _config(request, model_name, model_version)


# -- model repository ------------------------------------------------------------------
#
# The small bodies are read here, not by FastAPI: tritonclient sends an empty body for the
# index and JSON without a JSON content type for load/unload.

_Body = TypeVar("_Body", bound=BaseModel)


async def _small_body(request: Request, model: type[_Body]) -> _Body:
    """The optional JSON body of a repository request (empty: the defaults).

    Raises:
        InvalidInput: not JSON, or not the document ``model`` describes.
    """
    raw = await request.body()
    if not raw.strip():
        return model()
    try:
        return model.model_validate(orjson.loads(raw), strict=True)
    except orjson.JSONDecodeError:
        raise InvalidInput("request body: expected a JSON object (got invalid JSON)") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise InvalidInput(f"request body: {where}: {first.get('msg')}") from None


def _optional_body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


@router.post(
    "/repository/index",
    response_model=list[RepositoryIndexEntry],
    responses={400: ERRORS[400], 401: ERRORS[401]},
    description="Every registered version and its state: READY (loaded), LOADING, or "
    "UNAVAILABLE with the reason. `ready: true` lists only the READY ones.",
    openapi_extra=_optional_body(RepositoryIndexRequest),
)
async def repository_index(request: Request, _: AuthDep) -> JSONResponse:
    """The model repository index."""
    body = await _small_body(request, RepositoryIndexRequest)
    return JSONResponse(get_dataplane(request).repository_index(ready_only=body.ready))


@router.post(
    "/repository/models/{model_name}/load",
    response_model=ModelLoaded,
    responses=ERRORS,
    description="Serve the model's production version: loaded and warmed up, then "
    "unversioned requests move to it (a no-op when it is served already). Load "
    "parameters (Triton's config and file: overrides) are refused.",
    openapi_extra=_optional_body(RepositoryModelRequest),
)
async def repository_load(request: Request, model_name: ModelName, _: AuthDep) -> JSONResponse:
    """Load (serve) a model."""
    body = await _small_body(request, RepositoryModelRequest)
    await get_dataplane(request).load_model(model_name, body.parameters)
    return JSONResponse({"name": model_name, "load": True})


@router.post(
    "/repository/models/{model_name}/unload",
    response_model=ModelUnloaded,
    responses={k: v for k, v in ERRORS.items() if k != 503},
    description="Stop serving the model: its loaded versions are dropped once their "
    "in-flight requests finish, and server readiness stops waiting for it. Nothing is "
    "deleted: the next unversioned inference (loaded on first use), a load or a promote "
    "serves it again (on a store-fed replica, the next store poll does).",
    openapi_extra=_optional_body(RepositoryModelRequest),
)
async def repository_unload(request: Request, model_name: ModelName, _: AuthDep) -> JSONResponse:
    """Unload (stop serving) a model."""
    body = await _small_body(request, RepositoryModelRequest)
    await get_dataplane(request).unload_model(model_name, body.parameters)
    return JSONResponse({"name": model_name, "unload": True})


# -- inference -------------------------------------------------------------------------


async def _body(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise ClientGone() from None


async def _infer(request: Request, name: str, ref: str | None) -> Response:
    payload, json_size = await answer(
        get_dataplane(request), name, ref, request.headers, _body(request)
    )
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


# -- extensions this server does not implement ----------------------------------------
#
# Plain routes (not in the OpenAPI document): the protocol's error instead of a bare 404.


def _unsupported(extension: str) -> Any:
    async def endpoint(request: Request) -> Response:  # noqa: ARG001
        raise InvalidInput(f"the {extension} extension is not supported by this server")

    return endpoint


for _path, _extension in (
    ("/systemsharedmemory/{rest:path}", "system shared memory"),
    ("/cudasharedmemory/{rest:path}", "CUDA shared memory"),
    ("/trace/setting", "trace"),
    ("/models/{model_name}/trace/setting", "trace"),
    ("/models/{model_name}/versions/{model_version}/trace/setting", "trace"),
    ("/logging", "logging"),
):
    router.routes.append(
        Route(
            router.prefix + _path,
            _unsupported(_extension),
            methods=["GET", "POST"],
            include_in_schema=False,
        )
    )
