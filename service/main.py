"""``serve``: run the service with uvicorn (what ``recalib serve`` calls)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .settings import Settings

__all__ = ["serve"]


def serve(host: str | None = None, port: int | None = None, home: str | Path | None = None) -> None:
    """Run the service until interrupted.

    Settings come from the environment (``RECALIB_*``); the arguments, when given,
    override ``host``, ``port`` and ``home``.

    Args:
        host: interface to bind.
        port: TCP port.
        home: state directory (models, data sets, database).
    """
    import uvicorn

    from .app import create_app

    overrides: dict[str, Any] = {"host": host, "port": port, "home": home}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )
