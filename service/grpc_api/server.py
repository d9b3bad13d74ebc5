"""The gRPC server's life: started and stopped by the app's lifespan, on the same event
loop as the REST routes, so both protocols share one data plane, one batcher per model
and one drift monitor. It serves ``inference.GRPCInferenceService`` and gRPC's standard
``grpc.health.v1.Health`` (:mod:`.health`)."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2_grpc
from tritonclient.grpc import service_pb2_grpc

from ..dataplane import DataPlane
from ..settings import Settings
from .health import HealthServicer
from .servicer import InferenceServicer

__all__ = ["GrpcServer"]

log = logging.getLogger(__name__)


class GrpcServer:
    """``inference.GRPCInferenceService`` and ``grpc.health.v1.Health`` on
    ``settings.host:settings.grpc_port``.

    Args:
        settings: ``grpc_port`` (0: any free port, see :attr:`port`),
            ``grpc_max_message_bytes`` (both directions), ``host``.
        dataplane: what the RPCs call.
    """

    def __init__(self, settings: Settings, dataplane: DataPlane) -> None:
        self.settings = settings
        self.dataplane = dataplane
        self.port: int | None = None
        """The bound port once started."""
        self._server: grpc.aio.Server | None = None
        self.health: HealthServicer | None = None
        """The health service while started (its ``Watch`` streams end at stop)."""

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            RuntimeError: the port cannot be bound.
        """
        limit = self.settings.grpc_max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.dataplane), server
        )
        health = HealthServicer(self.dataplane)  # one per start: its event is the loop's
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        address = f"{_host(self.settings.host)}:{self.settings.grpc_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"gRPC: cannot listen on {address} ({exc})") from None
        if port == 0:
            raise RuntimeError(f"gRPC: cannot listen on {address} (is the port in use?)")
        await server.start()
        self._server = server
        self.health = health
        self.port = port
        log.info("gRPC v2 inference service listening on %s:%d", self.settings.host, port)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls; running ones get ``grace`` seconds to finish. Health
        ``Watch`` streams send ``NOT_SERVING`` and end first, while the port still
        delivers it."""
        if self.health is not None:
            await self.health.stop()
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
