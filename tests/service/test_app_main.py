"""``service.main.serve`` (what ``recalib serve`` runs): settings from the environment,
overridden by the arguments, handed to uvicorn with the app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from service.main import serve


def test_serve_builds_the_app_from_arguments_and_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        seen.update(kwargs, app=app)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv("RECALIB_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("RECALIB_PORT", "9000")
    serve(host="127.0.0.1", home=tmp_path / "state")
    assert isinstance(seen["app"], FastAPI)
    settings = seen["app"].state.settings
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 9000)
    assert settings.home == tmp_path / "state" and settings.max_batch_size == 7
    assert not (tmp_path / "state").exists()  # nothing touched before the app starts


def test_serve_refuses_a_public_host_without_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.delenv("RECALIB_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match="non-loopback host without RECALIB_API_TOKEN"):
        serve(host="0.0.0.0", home=tmp_path)  # the refusal is the point
