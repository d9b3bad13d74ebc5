"""FastAPI dependencies: the app's components (from ``app.state``) and authentication.

Routes declare what they need as ``Annotated`` aliases (``registry: RegistryDep``);
:func:`service.app.create_app` puts the components on ``app.state``. On a replica fed by
the model store, the registry, data sets and jobs dependencies answer 403
(:func:`require_database`): it has no database. ``AuthDep`` /
:func:`require_token` guard every ``/v1`` route and inference (through ``HTTPBearer``,
which marks them in the OpenAPI document); :func:`require_metrics_token` guards
``/metrics`` only with ``protect_metrics``, reading the header itself so the document
gives that open-by-default route no security requirement (health and server metadata:
:mod:`service.api.v2`, by the data plane's rules). The dependencies are ``async`` so
FastAPI calls them on the event loop (a plain ``def`` dependency costs a thread-pool hop
per request); the ``get_*`` accessors are plain functions for direct calls.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from ..auth import bearer_token, check_bearer
from ..dataplane import ModelResolver
from ..datasets import DatasetStore
from ..errors import Forbidden
from ..jobs import JobManager
from ..metrics import ServiceMetrics
from ..registry import Registry, Runtime
from ..settings import Settings

__all__ = [
    "ERROR_RESPONSES",
    "AuthDep",
    "DatasetsDep",
    "FORBIDDEN_RESPONSE",
    "ErrorBody",
    "JobsDep",
    "MetricsDep",
    "RegistryDep",
    "ResolverDep",
    "RuntimeDep",
    "SettingsDep",
    "get_datasets",
    "get_jobs",
    "get_metrics",
    "get_registry",
    "get_resolver",
    "get_runtime",
    "get_settings",
    "require_control_role",
    "require_database",
    "require_metrics_token",
    "require_token",
]


class ErrorBody(BaseModel):
    """Every error response's body (the Open Inference Protocol's shape)."""

    error: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what}
    for status, what in (
        (400, "Invalid input (what was expected and what arrived)"),
        (401, "Missing or wrong bearer token"),
        (404, "Unknown model, version, alias, data set or job"),
        (409, "Conflict with the current state"),
        (413, "Body above the configured size limit"),
        (422, "Malformed request (fields, types)"),
    )
}
"""The error statuses of the /v1 routes, for the OpenAPI document."""

_bearer = HTTPBearer(
    auto_error=False,
    description="The service's RECALIB_API_TOKEN, required by the operations marked with it "
    "(401 without it). A server without RECALIB_API_TOKEN checks no token: every operation "
    "is open (on a loopback host only, unless RECALIB_ALLOW_OPEN).",
)
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def get_resolver(request: Request) -> ModelResolver:
    """What names the served models and versions: the registry, or on a replica fed by the
    model store, the store (:class:`service.store_replica.StoreResolver`)."""
    resolver: ModelResolver = request.app.state.resolver
    return resolver


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_metrics(request: Request) -> ServiceMetrics:
    """The app's :class:`~service.metrics.ServiceMetrics`."""
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


def get_datasets(request: Request) -> DatasetStore:
    datasets: DatasetStore = request.app.state.datasets
    return datasets


def get_jobs(request: Request) -> JobManager:
    jobs: JobManager = request.app.state.jobs
    return jobs


def _presented(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return None if credentials is None else credentials.credentials


async def require_token(request: Request, credentials: _Credentials) -> None:
    """The bearer token, when one is configured (every /v1 route and inference)."""
    check_bearer(get_settings(request).api_token, _presented(credentials))


async def require_control_role(request: Request) -> None:
    """Refuse work that belongs on the control replica when ``role`` is ``inference``."""
    if get_settings(request).role == "inference":
        raise Forbidden(
            f"this replica runs with RECALIB_ROLE=inference: it serves models and takes "
            f"pushed versions, but {request.method} {request.url.path} (data sets and "
            f"recalibration jobs) belongs on the control replica (RECALIB_ROLE=all)"
        )


def require_database(request: Request) -> None:
    """Refuse what needs the registry's database on a replica fed by the model store
    (``RECALIB_ROLE=inference`` with ``RECALIB_MODEL_STORE``), which has none."""
    if get_settings(request).store_fed:
        raise Forbidden(
            f"this replica serves the model store read-only (RECALIB_ROLE=inference with "
            f"RECALIB_MODEL_STORE): send {request.method} {request.url.path} to the control "
            f"replica; models and versions are published to the store from there"
        )


FORBIDDEN_RESPONSE: dict[int | str, dict[str, Any]] = {
    403: {
        "model": ErrorBody,
        "description": "Refused by this replica's role (inference; with a model store, "
        "every /v1 call but drift)",
    }
}
"""The 403 of the routes guarded by :func:`require_control_role`, for the OpenAPI document."""


async def require_metrics_token(request: Request) -> None:
    """The bearer token on ``/metrics``, only with ``protect_metrics``."""
    settings = get_settings(request)
    if settings.protect_metrics:
        check_bearer(settings.api_token, bearer_token(request.headers.get("authorization")))


# The dependencies proper: async wrappers of the accessors above (which stay plain
# functions for direct calls).


async def _settings(request: Request) -> Settings:
    return get_settings(request)


async def _registry(request: Request) -> Registry:
    require_database(request)
    return get_registry(request)


async def _resolver(request: Request) -> ModelResolver:
    return get_resolver(request)


async def _runtime(request: Request) -> Runtime:
    return get_runtime(request)


async def _metrics(request: Request) -> ServiceMetrics:
    return get_metrics(request)


async def _datasets(request: Request) -> DatasetStore:
    require_database(request)
    return get_datasets(request)


async def _jobs(request: Request) -> JobManager:
    require_database(request)
    return get_jobs(request)


SettingsDep = Annotated[Settings, Depends(_settings)]
RegistryDep = Annotated[Registry, Depends(_registry)]
ResolverDep = Annotated[ModelResolver, Depends(_resolver)]
RuntimeDep = Annotated[Runtime, Depends(_runtime)]
MetricsDep = Annotated[ServiceMetrics, Depends(_metrics)]
DatasetsDep = Annotated[DatasetStore, Depends(_datasets)]
JobsDep = Annotated[JobManager, Depends(_jobs)]
AuthDep = Annotated[None, Depends(require_token)]
