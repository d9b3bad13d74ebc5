"""``GET /metrics``: Prometheus exposition of the app's injected registry.

The registry is the one :class:`service.metrics.ServiceMetrics` was created with
(``app.state.metrics``), never the process-global default, so each app (and each test)
exposes only its own metrics. Open unless ``Settings.protect_metrics`` is set, then the
bearer token is required.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from .deps import ERROR_RESPONSES, get_metrics, require_metrics_token

__all__ = ["router"]

router = APIRouter(tags=["monitoring"])

MetricsAuth = Annotated[None, Depends(require_metrics_token)]


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        },
        401: ERROR_RESPONSES[401],
    },
)
async def metrics(request: Request, _: MetricsAuth) -> Response:
    """Every service metric, in the Prometheus text format. Open unless
    RECALIB_PROTECT_METRICS is set; then the bearer token (RECALIB_API_TOKEN) is
    required."""
    # On the event loop (async route): the runtime's counters and the readiness the
    # scrape reads are only ever updated there.
    body = get_metrics(request).exposition()  # without _created series
    return Response(body, media_type=CONTENT_TYPE_LATEST)
