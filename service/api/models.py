"""``/v1/models``: register, list, delete models; versions (read, push), artifacts, aliases,
drift.

Routes only translate HTTP to registry and runtime calls (:mod:`service.registry`; the
registry has its own runtime, so only the drift routes use the runtime directly); errors
are the domain's, mapped to HTTP in :mod:`service.errors`. Path parameters are declared
in :mod:`service.api.params`. On a replica fed by the model store every route but drift
answers 403 (its ``RegistryDep`` refuses: there is no registry there).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from fastapi.responses import FileResponse

from ..artifacts import ArtifactFormat
from ..errors import InvalidInput
from ..registry_models import (
    MAX_VERSION,
    AliasInfo,
    AliasList,
    AliasUpdate,
    ModelInfo,
    ModelList,
    VersionInfo,
    VersionList,
)
from .deps import (
    ERROR_RESPONSES,
    FORBIDDEN_RESPONSE,
    ErrorBody,
    RegistryDep,
    ResolverDep,
    RuntimeDep,
    SettingsDep,
    require_token,
)
from .params import (
    ALIAS_FORM,
    METADATA_FORM,
    NAME_FORM,
    VERSION_FORM,
    VERSION_REF_FORM,
    AliasPath,
    ModelNamePath,
    NewAliasPath,
    VersionPath,
)

__all__ = ["router"]

router = APIRouter(
    prefix="/v1/models",
    tags=["models"],
    dependencies=[Depends(require_token)],
    responses={**ERROR_RESPONSES, **FORBIDDEN_RESPONSE},
)

_MEDIA = {
    "onnx": "application/octet-stream",
    "pt2": "application/zip",
    "stats": "application/octet-stream",
    "report": "application/json",
}
_EXT = {"onnx": "onnx", "pt2": "pt2", "stats": "safetensors", "report": "json"}


def _metadata(raw: str | None) -> dict[str, Any]:
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"expected metadata as a JSON object (got invalid JSON: {exc})") from exc
    if not isinstance(value, dict):
        raise InvalidInput(f"expected metadata as a JSON object (got {type(value).__name__})")
    return value


@router.post("", status_code=201, summary="Register a model (creates version 1, in production)")
async def register_model(
    registry: RegistryDep,
    settings: SettingsDep,
    name: Annotated[str, Form(description="model name"), NAME_FORM],
    file: Annotated[UploadFile, File(description=".onnx with BatchNormalization, or .pt2")],
    metadata: Annotated[
        str | None, Form(description="JSON object kept with the model"), METADATA_FORM
    ] = None,
) -> ModelInfo:
    return await registry.register(
        name=name,
        upload=file,
        metadata=_metadata(metadata),
        max_bytes=settings.max_upload_bytes,
    )


@router.get("", summary="List models")
def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(models=registry.models())


@router.get("/{name}", summary="Get a model")
def get_model(registry: RegistryDep, name: ModelNamePath) -> ModelInfo:
    return registry.model(name)


@router.delete("/{name}", status_code=204, summary="Delete a model, its versions and files")
async def delete_model(registry: RegistryDep, name: ModelNamePath) -> Response:
    await registry.delete(name)
    return Response(status_code=204)


@router.get("/{name}/versions", summary="List a model's versions")
def list_versions(registry: RegistryDep, name: ModelNamePath) -> VersionList:
    return VersionList(versions=registry.versions(name))


@router.post(
    "/{name}/versions",
    status_code=201,
    summary="Add a version from an uploaded artifact (optionally move an alias to it)",
    responses={
        422: {
            "model": ErrorBody,
            "description": "Malformed request (fields, types), or an artifact whose signature "
            "differs from the model's versions",
        }
    },
)
async def push_version(
    registry: RegistryDep,
    settings: SettingsDep,
    response: Response,
    name: ModelNamePath,
    file: Annotated[
        UploadFile,
        File(description=".onnx with BatchNormalization (or .pt2 for a model registered from one)"),
    ],
    version: Annotated[
        int | None,
        Form(
            ge=1,
            le=MAX_VERSION,
            description="number of the new version, above every existing one (default: next)",
        ),
        VERSION_FORM,
    ] = None,
    parent: Annotated[
        str | None,
        Form(description="lineage: the version (number or alias) of this model it came from"),
        VERSION_REF_FORM,
    ] = None,
    metadata: Annotated[
        str | None, Form(description="JSON object kept in the version's report"), METADATA_FORM
    ] = None,
    alias: Annotated[
        str | None,
        Form(description="alias to point at the new version (production: loaded and warmed first)"),
        ALIAS_FORM,
    ] = None,
) -> VersionInfo:
    """The artifact must have the signature of the model's versions (else 422). If moving
    ``alias`` fails, the version stays stored and the error says so."""
    info = await registry.push_version(
        name,
        upload=file,
        max_bytes=settings.max_upload_bytes,
        version=version,
        parent=parent,
        metadata=_metadata(metadata),
        alias=alias,
    )
    response.headers["Location"] = f"/v1/models/{name}/versions/{info.version}"
    return info


@router.get("/{name}/versions/{version}", summary="Get a version and its lineage")
def get_version(registry: RegistryDep, name: ModelNamePath, version: VersionPath) -> VersionInfo:
    """``version`` is a number or an alias."""
    return registry.version(name, version)


@router.get(
    "/{name}/versions/{version}/artifact",
    summary="Download an artifact of a version",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def get_artifact(
    registry: RegistryDep,
    name: ModelNamePath,
    version: VersionPath,
    fmt: Annotated[ArtifactFormat, Query(alias="format", description="which file")] = "onnx",
) -> FileResponse:
    path = registry.artifact(name, version, fmt)
    number = registry.resolve_version(name, version)
    return FileResponse(path, media_type=_MEDIA[fmt], filename=f"{name}-v{number}.{_EXT[fmt]}")


@router.get("/{name}/aliases", summary="List a model's aliases")
def list_aliases(registry: RegistryDep, name: ModelNamePath) -> AliasList:
    return AliasList(aliases=registry.aliases(name))


@router.put(
    "/{name}/aliases/{alias}",
    summary="Point an alias at a version (production: loaded and warmed before it switches)",
)
async def put_alias(
    registry: RegistryDep, name: ModelNamePath, alias: NewAliasPath, body: AliasUpdate
) -> AliasInfo:
    return await registry.set_alias(name, alias, body.version)


@router.get("/{name}/aliases/{alias}", summary="Get an alias")
def get_alias(registry: RegistryDep, name: ModelNamePath, alias: AliasPath) -> AliasInfo:
    return registry.alias(name, alias)


@router.delete("/{name}/aliases/{alias}", status_code=204, summary="Delete an alias")
def delete_alias(registry: RegistryDep, name: ModelNamePath, alias: AliasPath) -> Response:
    registry.delete_alias(name, alias)
    return Response(status_code=204)


@router.get("/{name}/drift", summary="Drift of the served version")
async def get_drift(
    resolver: ResolverDep, runtime: RuntimeDep, name: ModelNamePath
) -> dict[str, Any]:
    """Model score, per-layer scores, samples in the window, window bounds, threshold and
    whether it is exceeded (see ``recalib.drift``). Per replica: a replica fed by the model
    store answers for its own traffic."""
    resolver.resolve(name, None)  # NotFound for an unknown model
    return runtime.drift(name)


@router.post("/{name}/drift/reset", status_code=204, summary="Empty the drift window")
async def reset_drift(resolver: ResolverDep, runtime: RuntimeDep, name: ModelNamePath) -> Response:
    resolver.resolve(name, None)  # NotFound for an unknown model
    runtime.reset_drift(name)
    return Response(status_code=204)
