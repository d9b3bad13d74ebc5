"""``serve``: run the service with uvicorn (what ``recalib serve`` calls)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

from .settings import Settings

__all__ = ["PortInUse", "check_ports", "serve", "settings_from"]


class PortInUse(RuntimeError):
    """A port the settings name cannot be bound (the message says which setting)."""


def _bindable(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def check_ports(settings: Settings) -> None:
    """Refuse to start when the REST or gRPC port is taken, before anything starts (so the
    answer is one line naming the setting, not a start-up traceback).

    Raises:
        PortInUse: ``port`` or (with ``grpc``) ``grpc_port`` cannot be bound on ``host``.
    """
    ports = [("RECALIB_PORT / --port", settings.port)]
    if settings.grpc and settings.grpc_port:
        ports.append(
            ("RECALIB_GRPC_PORT / --grpc-port (or RECALIB_GRPC=false)", settings.grpc_port)
        )
    for setting, port in ports:
        problem = _bindable(settings.host, port)
        if problem is not None:
            raise PortInUse(
                f"cannot listen on {settings.host}:{port} ({problem}): choose another "
                f"port with {setting}"
            )


def settings_from(**overrides: Any) -> Settings:
    """The environment's settings with the given (non-``None``) overrides."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def serve(
    host: str | None = None,
    port: int | None = None,
    home: str | Path | None = None,
    grpc_port: int | None = None,
) -> None:
    """Run the service until interrupted.

    Settings come from the environment (``RECALIB_*``); the arguments, when given,
    override ``host``, ``port``, ``home`` and ``grpc_port``.

    Args:
        host: interface to bind.
        port: TCP port of REST.
        home: state directory (models, data sets, database).
        grpc_port: TCP port of gRPC.

    Raises:
        PortInUse: a port is taken.
        pydantic.ValidationError: invalid settings.
    """
    import uvicorn

    from .app import create_app

    settings = settings_from(host=host, port=port, home=home, grpc_port=grpc_port)
    check_ports(settings)
    # INFO (DEBUG with the CLI's -v) and a timestamped format. The CLI has already set the
    # root logger to WARNING for the core commands, so it is replaced here (force): else
    # the service's INFO lines (the gRPC port, loads, the store) would never show.
    level = logging.DEBUG if logging.getLogger().isEnabledFor(logging.DEBUG) else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )
