"""The README's main job: the whole pipeline over REST on a fresh service."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from service.story import serve_with_story


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_story_recovers_accuracy_and_drift_falls(tmp_path: Path) -> None:
    lines: list[str] = []
    result = serve_with_story(
        host="127.0.0.1", port=_free_port(), home=tmp_path, keep_running=False, out=lines.append
    )
    before, after = result["accuracy"]
    drift_before, drift_after = result["drift"]
    assert before < 0.5 < 0.9 < after
    assert drift_before > result["threshold"] > drift_after
    assert drift_after < drift_before / 100
    assert result["version"] == 2
    assert any("accuracy" in line for line in lines)
