"""``grpc.health.v1.Health``: gRPC's standard health checking protocol, for the probes and
load balancers that speak only gRPC (Kubernetes ``grpc:`` probes, Envoy's gRPC health
checks, ``grpc_health_probe``). The messages and the service come from
``grpcio-health-checking``; the statuses are the data plane's, as for the v2 health RPCs.

Services (the request's ``service``):

* ``""`` and ``"inference.GRPCInferenceService"``: the server is ready
  (``ServerReady``, ``GET /v2/health/ready``): every model it serves or expects is loaded;
* ``"live"``: the process answers (``ServerLive``, ``GET /v2/health/live``), for a
  liveness probe that must not fail while models load;
* ``"models/<name>"``: that model's served version is loaded (``ModelReady`` without a
  version, except that the check never loads anything); a name in ``expect_models`` that
  is not registered yet is known (``NOT_SERVING``), as for ``ModelReady``.

``SERVING`` or ``NOT_SERVING``; for any other name ``Check`` fails with ``NOT_FOUND`` and
``Watch`` sends ``SERVICE_UNKNOWN``, as the protocol specifies. ``Watch`` sends the status
at once, then every change (looked at every ``poll_seconds``), until the caller cancels;
when the server stops it sends ``NOT_SERVING`` (for a known service) and ends; the server
waits for that, up to a second, before it shuts the port. Watches of one service share a
status for a tenth of ``poll_seconds``: however many watch it, a service costs at most
about ten looks per ``poll_seconds``. At most :data:`MAX_WATCHES` watches run at once
(``RESOURCE_EXHAUSTED`` beyond).

Token: ``""``, the service name and ``live`` need it only with ``protect_health``, as the
v2 health RPCs. ``models/<name>`` needs it whenever one is configured, because its
answers tell which models exist, which ``ModelReady`` and ``/v2/health/ready`` keep from
callers without the token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..dataplane import DataPlane
from .servicer import INFERENCE_SERVICE, require_token

__all__ = ["LIVE_SERVICE", "MAX_WATCHES", "MODEL_SERVICE_PREFIX", "HealthServicer"]

LIVE_SERVICE = "live"
MODEL_SERVICE_PREFIX = "models/"
MAX_WATCHES = 1024
"""Watches served at once."""

_SERVING = int(health_pb2.HealthCheckResponse.SERVING)
_NOT_SERVING = int(health_pb2.HealthCheckResponse.NOT_SERVING)
_UNKNOWN = int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
_LONGEST_SERVICE = len(MODEL_SERVICE_PREFIX) + 64  # model names have at most 64 characters
_SHARED_STATUSES = 1024
"""At most this many services' statuses are shared between watches at a time."""


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """``Check`` and ``Watch`` over one :class:`DataPlane` (see the module).

    Args:
        dataplane: the data plane the v2 RPCs use.
        poll_seconds: how often a ``Watch`` looks at the status.
    """

    def __init__(self, dataplane: DataPlane, *, poll_seconds: float = 1.0) -> None:
        self.dataplane = dataplane
        self.poll_seconds = poll_seconds
        self._stopping = asyncio.Event()
        self._shared: dict[str, int] = {}  # service -> status, for the watches
        self._shared_at = 0.0
        self._watches = 0
        self._no_watches = asyncio.Event()
        self._no_watches.set()

    async def stop(self, timeout: float = 1.0) -> None:
        """The server is stopping: ``Check`` answers ``NOT_SERVING`` and every ``Watch``
        sends it and ends; returns once they have (at most ``timeout`` seconds)."""
        self._stopping.set()
        try:
            await asyncio.wait_for(self._no_watches.wait(), timeout)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            pass

    def status(self, service: str) -> int:
        """The ``ServingStatus`` of ``service`` (``SERVICE_UNKNOWN`` for an unknown name)."""
        plane = self.dataplane
        if len(service) > _LONGEST_SERVICE:
            serving: bool | None = None
        elif service in ("", INFERENCE_SERVICE):
            serving = plane.ready(show_names=False)[0]
        elif service == LIVE_SERVICE:
            serving = plane.live()
        elif service.startswith(MODEL_SERVICE_PREFIX):
            serving = plane.model_serving(service[len(MODEL_SERVICE_PREFIX) :])
        else:
            serving = None
        if serving is None:
            return _UNKNOWN
        return _SERVING if serving and not self._stopping.is_set() else _NOT_SERVING

    def _watched_status(self, service: str) -> int:
        """:meth:`status`, shared by the watches of ``service`` for a tenth of a tick."""
        now = time.monotonic()
        if now - self._shared_at > self.poll_seconds / 10 or len(self._shared) >= _SHARED_STATUSES:
            self._shared.clear()
            self._shared_at = now
        status = self._shared.get(service)
        if status is None:
            status = self.status(service)
            if len(service) <= _LONGEST_SERVICE:
                self._shared[service] = status
        return status

    async def _authorize(self, context: grpc.aio.ServicerContext, service: str) -> None:
        plane = self.dataplane
        if plane.settings.api_token is None:
            return
        if plane.protect_health or service.startswith(MODEL_SERVICE_PREFIX):
            await require_token(plane, context)

    async def Check(self, request: Any, context: Any) -> Any:
        service: str = request.service
        await self._authorize(context, service)
        status = self.status(service)
        if status == _UNKNOWN:
            model = service[len(MODEL_SERVICE_PREFIX) :]
            if service.startswith(MODEL_SERVICE_PREFIX) and model:
                what = f"unknown model {model[:80]!r}"
            else:
                what = f"unknown service {service[:80]!r}"
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"health: {what} (expected '', {INFERENCE_SERVICE!r}, {LIVE_SERVICE!r} or "
                f"'{MODEL_SERVICE_PREFIX}<model>' of a registered or expected model)",
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: Any) -> AsyncGenerator[Any, None]:
        service: str = request.service  # read once: each read builds a new str
        await self._authorize(context, service)
        if self._watches >= MAX_WATCHES:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"health: at most {MAX_WATCHES} watches at once (all taken): use Check",
            )
        self._watches += 1
        self._no_watches.clear()
        try:
            sent: int | None = None
            while True:
                status = self._watched_status(service)
                if self._stopping.is_set() and status != _UNKNOWN:
                    status = _NOT_SERVING  # a status shared from before the stop
                if status != sent:
                    yield health_pb2.HealthCheckResponse(status=status)
                    sent = status
                if self._stopping.is_set():
                    return
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.poll_seconds)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._watches -= 1
            if not self._watches:
                self._no_watches.set()
