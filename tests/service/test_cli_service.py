"""Tests of ``service.cli``, the ``recalib`` console script: the core commands plus
``serve`` and the demo through the REST API, run in-process through ``main(argv)``."""

from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

import service.cli
import service.story
from service.cli import _parser, main


def _stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("recalib: error: ")
    return err


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--host", "0.0.0.0"], "refusing to serve on a non-loopback host without RECALIB_API"),
        (["--port", "99999"], "port: Input should be less than or equal to 65535 (got 99999)"),
    ],
)
def test_serve_with_bad_settings_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    reason: str,
) -> None:
    for name in ("RECALIB_API_TOKEN", "RECALIB_ALLOW_OPEN", "RECALIB_HOST", "RECALIB_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", *argv]) == 2
    line = _stderr_line(capsys)
    assert line.startswith("recalib: error: invalid service settings: ")
    assert reason in line


@pytest.mark.parametrize("which", ["--port", "--grpc-port"])
def test_serve_on_a_taken_port_exits_2_naming_the_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, which: str
) -> None:
    for name in ("RECALIB_API_TOKEN", "RECALIB_HOST", "RECALIB_PORT", "RECALIB_GRPC"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        other = "--grpc-port" if which == "--port" else "--port"
        argv = ["serve", "--home", str(tmp_path), which, port, other, "0"]
        assert main(argv) == 2
    line = _stderr_line(capsys)
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert ("RECALIB_GRPC_PORT" if which == "--grpc-port" else "RECALIB_PORT") in line


@pytest.mark.parametrize(("verbose", "level"), [(False, logging.INFO), (True, logging.DEBUG)])
def test_serve_logs_the_service_at_info_despite_the_cli_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, verbose: bool, level: int
) -> None:
    """The CLI sets WARNING for the core commands; ``serve`` must still show the
    service's INFO lines (the gRPC port, model loads, the store), DEBUG with ``-v``."""
    import uvicorn

    for name in ("RECALIB_API_TOKEN", "RECALIB_HOST", "RECALIB_PORT", "RECALIB_GRPC"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    root.handlers[:] = []  # as in a fresh process (pytest's own handlers are put back below)
    root.setLevel(logging.WARNING)
    seen: list[int] = []
    monkeypatch.setattr(
        uvicorn,
        "run",
        lambda app, **kw: seen.append(logging.getLogger("service.x").getEffectiveLevel()),
    )
    try:
        argv = ["serve", "--home", str(tmp_path), "--port", "0", "--grpc-port", "0"]
        assert main(["-v", *argv] if verbose else argv) == 0
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
    assert seen == [level]


def test_demo_runs_the_story_with_the_service_options(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(service.story, "serve_with_story", lambda **kw: calls.append(kw))
    argv = ["--host", "127.0.0.2", "--port", "9001", "--grpc-port", "9002", "--home", "h"]
    assert main(["demo", "--exit", *argv]) == 0
    (call,) = calls
    assert call["host"] == "127.0.0.2" and call["port"] == 9001 and call["home"] == "h"
    assert call["grpc_port"] == 9002
    assert call["keep_running"] is False
    assert "through the REST API of a fresh service" in capsys.readouterr().out

    assert main(["demo"]) == 0
    assert calls[-1]["keep_running"] is True and calls[-1]["host"] is None


def test_demo_failure_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(**kwargs: object) -> None:
        raise RuntimeError("the service did not start on\n127.0.0.1:8000")

    monkeypatch.setattr(service.story, "serve_with_story", fail)
    assert main(["demo", "--exit"]) == 2
    assert "the service did not start on" in _stderr_line(capsys)


def test_demo_offline_is_the_core_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(service.cli, "demo_offline", lambda args: seen.append(args) or 0)  # type: ignore[func-returns-value]
    monkeypatch.setattr(service.story, "serve_with_story", pytest.fail)
    assert main(["demo", "--offline", "--method", "ema"]) == 0
    assert seen[0].method == "ema"


def test_the_core_commands_are_there_with_their_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export", "--model", str(tmp_path / "missing.pt2"), "--example", "x.npz"]
    assert main([*argv, "--out", str(tmp_path / "o.txt")]) == 2
    assert "expected --out ending in .pt2 or .onnx (got 'o.txt')" in _stderr_line(capsys)


def test_every_option_has_a_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    top = capsys.readouterr().out
    assert "run the service (REST and v2 gRPC)" in top and "``" not in top
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"recalibrate", "export", "demo", "serve"}
    for name, cmd in sub.choices.items():
        for action in cmd._actions:
            assert action.help, (name, action.option_strings)
        assert "``" not in cmd.format_help(), name
    assert "(default: RECALIB_PORT or 8000)" in sub.choices["serve"].format_help()
