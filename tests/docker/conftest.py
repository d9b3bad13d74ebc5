"""Fixtures of the container / observability tests (helpers live in ``promhelpers``)."""

from __future__ import annotations

import pytest
from promhelpers import names_from_exposition, require_binary


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_binary("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return require_binary("prometheus")


@pytest.fixture(scope="session")
def exported_metrics(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Metric names a live ``/metrics`` of ``create_app(Settings(home=tmp))`` exposes."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(home=tmp_path_factory.mktemp("home"), drift_per_layer_metrics=True)
    with TestClient(create_app(settings)) as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return names_from_exposition(response.text)
