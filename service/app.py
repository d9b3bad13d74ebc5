"""``create_app``: the service's FastAPI application, built from one :class:`Settings`.

Nothing heavy happens at import or in :func:`create_app`: the database opens on first use,
ONNX Runtime sessions are built by the runtime when the app starts. The lifespan:

1. clears what a crashed process left (staging directories, uncommitted versions) and
   marks its unfinished jobs ``interrupted``;
2. starts the runtime and has it serve every model's ``production`` version, then pushes
   every model's stat banks and default bank to it (:meth:`BankStore.push_all`), before
   the app reports ready;
3. on shutdown stops running jobs (``interrupted``), then the runtime, then the database.

Request bodies are limited by a small ASGI middleware: ``Content-Length`` above the limit
is refused up front, and a body without one (chunked) is counted as it streams; either
way the answer is 413 with the usual ``{"error": ...}`` body. Uploads (``POST /v1/models``,
``POST /v1/models/{name}/versions``, ``POST /v1/datasets``) may be ``max_upload_bytes``,
every other body ``max_request_bytes``.

Authentication comes first: :class:`AuthGate`, the outermost middleware, checks the bearer
token of every protected path (``/v1/...``, ``/v2/models/...``, ``/v2/repository/...``;
health and server metadata with ``protect_health``, ``/metrics`` with ``protect_metrics``)
before routing, path parameters, body size or body parsing, so a caller without the token
gets 401 whatever else is wrong with the request. The routes' own dependencies repeat the check (and
document it in the OpenAPI document).

REST inference is answered in front of FastAPI: :class:`RecalibApp` hands the two
inference paths to ``AuthGate(InferenceEndpoint(...))`` before FastAPI's own ``__call__``
and its middleware stack (:mod:`service.api.v2_infer`), so FastAPI's native
OpenTelemetry telemetry does not see them; recalib's Prometheus metrics do.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

from fastapi import FastAPI, HTTPException
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api import banks as banks_api
from .api import datasets as datasets_api
from .api import metrics_route, v2
from .api import models as models_api
from .api import recalibrations as recalibrations_api
from .api.v2_infer import (
    InferenceEndpoint,
    body_too_large,
    declared_too_large,
    is_inference_request,
    route_path,
)
from .auth import bearer_token, check_bearer
from .banks import BankRuntime, BankStore
from .catalog import Catalog
from .dataplane import DataPlane, InferenceRuntime, server_version
from .datasets import DatasetStore
from .db import Database
from .errors import Unauthorized, install_error_handlers
from .grpc_api import GrpcServer
from .jobs import JobManager, WorkerTarget
from .metrics import ServiceMetrics
from .model_store import ModelStore, StoreMetrics, TritonOptions
from .registry import Registry, Runtime
from .settings import Settings
from .store_publisher import StorePublisher
from .store_replica import Periodic, StoreResolver, StoreRuntime, StoreWatcher

__all__ = ["AuthGate", "BodyLimit", "RecalibApp", "create_app"]

log = logging.getLogger(__name__)

_UPLOAD_PATHS = re.compile(r"/v1/(models|datasets|models/[^/]+/versions)")


class BodyLimit:
    """ASGI middleware: 413 for request bodies above the configured limits.

    Args:
        app: the wrapped application.
        upload_bytes: limit of ``POST`` to the upload paths.
        request_bytes: limit of every other body.
    """

    def __init__(self, app: ASGIApp, *, upload_bytes: int, request_bytes: int) -> None:
        self.app = app
        self.upload_bytes = upload_bytes
        self.request_bytes = request_bytes

    def _limit(self, scope: Scope) -> int:
        if scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            return self.request_bytes  # the inference hot path: no regular expression
        upload = _UPLOAD_PATHS.fullmatch(scope["path"].rstrip("/"))
        return self.upload_bytes if upload else self.request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        too_large = declared_too_large(
            None if declared is None else declared.decode("latin-1"), limit
        )
        if too_large is not None:
            await _reject(send, too_large.message)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI passes HTTPException through body parsing (anything else
                    # becomes a 400); the error handlers give it the {"error": ...} body.
                    raise HTTPException(413, body_too_large(limit).message)
            return message

        await self.app(scope, counted, send)


# The interactive docs and the schema: they list every route, so they are behind the token.
_DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class AuthGate:
    """ASGI middleware: 401 for a protected path without the configured bearer token,
    before anything else looks at the request.

    Args:
        app: the wrapped application.
        settings: ``api_token``, ``protect_health``, ``protect_metrics`` and
            ``public_docs`` say which paths are protected.
    """

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def protected(self, path: str) -> bool:
        """Whether ``path`` needs the token (when one is configured)."""
        path = path.rstrip("/") or "/"
        if path in ("/v1", "/v2/models") or path.startswith(
            ("/v1/", "/v2/models/", "/v2/repository")
        ):
            return True
        if path == "/v2" or path.startswith("/v2/health"):
            return self.settings.protect_health
        if path == "/metrics":
            return self.settings.protect_metrics
        if path in _DOC_PATHS:
            return not self.settings.public_docs
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = self.settings.api_token
        # the path the app routes: under a root_path (a proxy's prefix) too
        if scope["type"] == "http" and token is not None and self.protected(route_path(scope)):
            try:
                check_bearer(token, _bearer(scope))
            except Unauthorized as exc:
                await _reject(
                    send, exc.message, status=401, extra=[(b"www-authenticate", b"Bearer")]
                )
                return
        await self.app(scope, receive, send)


class RecalibApp(FastAPI):
    """FastAPI, with REST inference answered before its own ``__call__`` (see the module).

    Attributes:
        inference_front: what answers :func:`is_inference_request` requests (``None``:
            FastAPI's stack answers everything).
    """

    inference_front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        front = self.inference_front
        if front is not None and is_inference_request(scope):
            await front(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def stack(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI's own ``__call__`` (what the front passes anything else on to)."""
        await super().__call__(scope, receive, send)

    def answer_inference(self, dataplane: DataPlane, settings: Settings) -> None:
        """Answer REST inference from ``dataplane`` in front of the stack (it reads and
        limits its own body), behind the same authentication as every route."""
        endpoint = InferenceEndpoint(self.stack, dataplane=dataplane)
        self.inference_front = AuthGate(endpoint, settings=settings)


def _bearer(scope: Scope) -> str | None:
    """The credentials of the ``Authorization: Bearer <token>`` header (as HTTPBearer)."""
    value: bytes = dict(scope["headers"]).get(b"authorization", b"")
    return bearer_token(value.decode("latin-1"))


async def _reject(
    send: Send, message: str, *, status: int = 413, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _runtime(settings: Settings, metrics: ServiceMetrics) -> Runtime:
    from .runtime.runtime import ServingRuntime

    runtime: Runtime = ServingRuntime(settings, metrics)
    return runtime


def _model_store(
    settings: Settings, metrics_registry: CollectorRegistry
) -> tuple[ModelStore | None, StoreMetrics | None]:
    """The shared model store of ``settings.model_store`` and its counters (or none)."""
    if settings.model_store is None:
        return None, None
    triton = TritonOptions(
        max_batch_size=settings.max_batch_size,
        dynamic_batching=settings.dynamic_batching,
        max_queue_delay_ms=settings.max_queue_delay_ms,
        gpu={"cpu": False, "cuda": True}.get(settings.execution_provider),
    )
    store = ModelStore(
        settings.model_store, triton=triton, keep_versions=settings.store_keep_versions
    )
    return store, StoreMetrics(metrics_registry)


def create_app(
    settings: Settings,
    *,
    runtime: Runtime | None = None,
    metrics_registry: CollectorRegistry | None = None,
    worker: WorkerTarget | None = None,
) -> FastAPI:
    """Build the service.

    The app owns its database (``home/recalib.db``, opened on first use, closed when the
    app stops) and hands it to the registry, the data set store and the job manager; the
    runtime is given to the registry (which has it serve ``production`` versions) once.

    Args:
        settings: the configuration (``home`` holds all state).
        runtime: the serving runtime (default: ``ServingRuntime(settings, metrics)``).
        metrics_registry: where the Prometheus metrics register (default: a fresh one).
        worker: the function job processes run (default :func:`service.worker.run_job`;
            tests substitute slow or crashing ones).

    Returns:
        The FastAPI app; its state holds ``settings``, ``db``, ``registry``, ``banks``
        (the :class:`~service.banks.BankStore`), ``datasets``, ``jobs``, ``runtime``,
        ``metrics``, ``metrics_registry``,
        ``model_store`` and ``store_publisher`` (``None`` without a store; the latter
        also on a store-fed replica), ``dataplane`` (the
        :class:`~service.dataplane.DataPlane` the ``/v2`` routes and the gRPC service use)
        and ``grpc_port`` (the bound gRPC port while the app runs, with ``settings.grpc``).
    """
    metrics_registry = metrics_registry if metrics_registry is not None else CollectorRegistry()
    metrics = ServiceMetrics(metrics_registry)
    runtime = runtime if runtime is not None else _runtime(settings, metrics)
    db = Database(settings.home / "recalib.db")  # opened on first use: never store-fed
    store, store_metrics = _model_store(settings, metrics_registry)
    # the control replica publishes production versions to the store; a store-fed one reads
    catalog = Catalog(db, settings.home)  # the reads the publisher and the banks share
    publisher = (
        StorePublisher(catalog, store, store_metrics)
        if store is not None and not settings.store_fed
        else None
    )
    # the banks are pushed to the runtime (and the store) after every change
    banks = BankStore(catalog, cast(BankRuntime, runtime), publisher=publisher)
    registry = Registry(db, settings.home, runtime, publisher=publisher, on_change=banks.push)
    datasets = DatasetStore(db, settings.home)
    jobs = JobManager(
        settings,
        db=db,
        registry=registry,
        datasets=datasets,
        metrics=metrics,
        target=worker,
        banks=banks,
    )
    # The app's runtime is the ServingRuntime; the control-plane fakes of the tests
    # implement only the registry's Runtime and are never asked for inference.
    resolver = StoreResolver(store) if settings.store_fed and store is not None else None
    store_loop: StoreWatcher | Periodic | None = None
    if resolver is not None:  # an inference replica serving the store: no database
        store_loop = StoreWatcher(
            resolver,
            cast(StoreRuntime, runtime),
            settings.store_poll_seconds,
            metrics=store_metrics,
        )
    elif publisher is not None:  # the control replica: repair failed publications
        store_loop = Periodic(
            settings.store_poll_seconds, publisher.reconcile, "model store publication"
        )
    dataplane = DataPlane(settings, resolver or registry, cast(InferenceRuntime, runtime), metrics)
    grpc_server = GrpcServer(settings, dataplane) if settings.grpc else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if resolver is None:
            settings.home.mkdir(parents=True, exist_ok=True)
            registry.sweep()
            await jobs.start()
        await runtime.start()
        if resolver is None:
            await registry.serve_all()
            await banks.push_all()  # store-fed: the watcher pushes what the store holds
            if publisher is not None:
                await publisher.start()  # sweeps the store, publishes what the db says
        if store_loop is not None:
            await store_loop.start()  # store-fed: serves what the store holds first
        if grpc_server is not None:
            await grpc_server.start()
            app.state.grpc_port = grpc_server.port
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop()
            if store_loop is not None:
                await store_loop.close()
            if resolver is None:
                await jobs.close()
            await runtime.close()
            db.close()

    app = RecalibApp(
        title="recalib",
        summary="Recalibrate BatchNorm statistics for new domains; serve with drift monitoring.",
        version=server_version(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.db = db
    app.state.registry = registry
    app.state.banks = banks
    app.state.datasets = datasets
    app.state.jobs = jobs
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.metrics_registry = metrics_registry
    install_error_handlers(app)
    app.state.dataplane = dataplane
    app.state.resolver = resolver or registry
    app.state.model_store = store
    app.state.store_publisher = publisher
    app.state.grpc_port = None
    # The data plane first: Starlette matches routes in order, and inference is the hot
    # path (matching it after the 22 /v1 routes cost ~12% of a small model's server CPU).
    app.include_router(v2.router)
    app.include_router(metrics_route.router)
    app.include_router(models_api.router)
    app.include_router(banks_api.router)
    app.include_router(datasets_api.router)
    app.include_router(recalibrations_api.router)
    app.add_middleware(
        BodyLimit,
        upload_bytes=settings.max_upload_bytes,
        request_bytes=settings.max_request_bytes,
    )
    app.add_middleware(AuthGate, settings=settings)  # outermost: authentication first
    app.answer_inference(dataplane, settings)
    return app
