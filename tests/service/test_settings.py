"""Settings: documented in the README, and unsafe combinations refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()
    missing = [n for n in Settings.model_fields if f"RECALIB_{n.upper()}" not in text]
    assert not missing


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECALIB_MAX_BATCH_SIZE", "7")
    assert Settings().max_batch_size == 7


def test_public_host_without_token_is_refused() -> None:
    with pytest.raises(ValidationError, match="RECALIB_API_TOKEN"):
        Settings(host="0.0.0.0")
    token: Any = "s3cret"  # a str, as the environment gives it; pydantic makes it a SecretStr
    assert Settings(host="0.0.0.0", api_token=token).api_token is not None
    assert Settings(host="0.0.0.0", allow_open=True).allow_open
