"""``GET /metrics``: Prometheus exposition of the app's injected registry.

The registry is the one :class:`service.metrics.ServiceMetrics` was created with
(``app.state.metrics``), never the process-global default, so each app (and each test)
exposes only its own metrics. Open unless ``Settings.protect_metrics`` is set, then the
bearer token is required.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.metrics import ServiceMetrics

__all__ = ["router"]

router = APIRouter(tags=["monitoring"])


def _metrics(request: Request) -> ServiceMetrics:
    state = request.app.state
    metrics = getattr(state, "metrics", None)
    if metrics is None:
        metrics = state.runtime.metrics
    result: ServiceMetrics = metrics
    return result


def _settings(request: Request) -> Any:
    state = request.app.state
    return getattr(state, "settings", None) or state.runtime.settings


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        }
    },
)
def metrics(request: Request) -> Response:
    """Every service metric, in the Prometheus text format."""
    if _settings(request).protect_metrics:
        from service.api.v2 import _require_token

        _require_token(request)
    body = generate_latest(_metrics(request).registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
