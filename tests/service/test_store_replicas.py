"""Replicas fed by a shared model store, as separate processes (``python -m service
serve``): one control replica and two inference replicas (``RECALIB_ROLE=inference``,
``RECALIB_MODEL_STORE``) on one repository directory. Under steady load on both inference
replicas, a promote on the control reaches both within a few seconds with no failed
request; a third replica started later is ready with every model without any call to it
but its health probe.

The measured numbers (promote-to-replica times, requests sent and failed) are printed
(``pytest -s``) and recorded in docs/deployment.md.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from runtime_helpers import export_versions, reference_outputs, source_images

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MODEL = "m"
POLL_SECONDS = 0.25  # the inference replicas' RECALIB_STORE_POLL_SECONDS
REACH_SECONDS = 5.0  # "within a few seconds"
THREADS_PER_REPLICA = 2
MAX_REQUESTS = 4000  # per thread: bounds the load whatever happens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class _Server:
    name: str
    port: int
    home: Path
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return f"--- {self.name} ---\n" + self.log.read_text(errors="replace")[-4000:]


def _start(
    name: str, tmp: Path, store: Path, *, role: str, opened: list[_Server], **env: str
) -> _Server:
    port = _free_port()
    home = tmp / f"{name}-home"
    log = tmp / f"{name}.log"
    environ = {
        **os.environ,
        "RECALIB_ROLE": role,
        "RECALIB_MODEL_STORE": str(store),
        "RECALIB_STORE_POLL_SECONDS": str(POLL_SECONDS),
        "RECALIB_GRPC": "false",  # no port to clash over
        "RECALIB_EXECUTION_PROVIDER": "cpu",
        "RECALIB_INTRA_OP_THREADS": "1",
        "RECALIB_WARMUP_BATCH_SIZES": "[1, 4]",
        "RECALIB_DRIFT_SAMPLE_FRACTION": "0.1",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    environ.pop("RECALIB_API_TOKEN", None)
    args = [sys.executable, "-m", "service", "serve", "--port", str(port), "--home", str(home)]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=environ, cwd=tmp)
    server = _Server(name, port, home, log, proc)
    opened.append(server)
    return server


def _stop(servers: list[_Server]) -> None:
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=5)


def _until(what: str, check: Callable[[], Any], seconds: float, servers: list[_Server]) -> Any:
    end = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < end:
        for server in servers:
            if server.proc.poll() is not None:
                pytest.fail(f"{server.name} exited ({server.proc.returncode})\n{server.logs()}")
        try:
            last = check()
        except httpx.HTTPError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.05)
    logs = "\n".join(s.logs() for s in servers)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})\n{logs}")


def _ready(server: _Server) -> bool:
    return httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200


def _model_ready(server: _Server) -> bool:
    url = f"{server.url}/v2/models/{MODEL}/ready"
    return httpx.get(url, timeout=5).status_code == 200


def _infer_body(x: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ]
    }


@dataclass
class _Load:
    """One thread of steady load on one replica: every answer, in order."""

    server: _Server
    answers: list[tuple[float, int, str]] = field(default_factory=list)  # (t, status, version)
    errors: list[str] = field(default_factory=list)

    def run(self, stop: threading.Event, body: dict[str, Any]) -> None:
        with httpx.Client(base_url=self.server.url, timeout=10) as client:
            for _ in range(MAX_REQUESTS):
                if stop.is_set():
                    return
                try:
                    response = client.post(f"/v2/models/{MODEL}/infer", json=body)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    self.answers.append((time.monotonic(), 0, ""))
                    continue
                version = response.json().get("model_version", "") if response.is_success else ""
                self.answers.append((time.monotonic(), response.status_code, version))
                if not response.is_success:
                    self.errors.append(response.text[:200])
                time.sleep(0.005)


def test_a_promote_reaches_every_store_fed_replica_without_a_failed_request(
    tmp_path: Path,
) -> None:
    versions = export_versions(tmp_path)
    store = tmp_path / "repository"
    x = source_images(1, seed=7)
    body = _infer_body(x)
    servers: list[_Server] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        control = _start("control", tmp_path, store, role="all", opened=servers)
        replicas = [
            _start(f"replica{i}", tmp_path, store, role="inference", opened=servers) for i in (1, 2)
        ]
        _until("the control to be ready", lambda: _ready(control), 60, servers)
        with versions[1][1].open("rb") as f:
            registered = httpx.post(
                f"{control.url}/v1/models", data={"name": MODEL}, files={"file": f}, timeout=60
            )
        assert registered.status_code == 201, registered.text
        for replica in replicas:  # they started empty and pick the new model up
            _until(
                f"{replica.name} to serve {MODEL}",
                functools.partial(_model_ready, replica),
                60,
                servers,
            )
            metadata = httpx.get(f"{replica.url}/v2/models/{MODEL}", timeout=5)
            assert metadata.status_code == 200 and metadata.json()["versions"] == ["1"]

        loads = [_Load(r) for r in replicas for _ in range(THREADS_PER_REPLICA)]
        threads = [threading.Thread(target=load.run, args=(stop, body)) for load in loads]
        for t in threads:
            t.start()
        time.sleep(1.0)  # steady state on version 1

        push_started = time.monotonic()
        with versions[2][1].open("rb") as f:
            pushed = httpx.post(
                f"{control.url}/v1/models/{MODEL}/versions",
                data={"alias": "production"},
                files={"file": f},
                timeout=60,
            )
        push_seconds = time.monotonic() - push_started
        assert pushed.status_code == 201, pushed.text
        assert pushed.json()["version"] == 2

        def switched(replica: _Server) -> float | None:
            times = [
                t
                for load in loads
                if load.server is replica
                for t, _, v in load.answers
                if v == "2"
            ]
            return min(times) if times else None

        reach: dict[str, float] = {}
        for replica in replicas:
            first = _until(
                f"{replica.name} to answer with version 2",
                functools.partial(switched, replica),
                REACH_SECONDS + 10,
                servers,
            )
            reach[replica.name] = first - push_started
        time.sleep(1.0)  # steady state on version 2
        stop.set()
        for t in threads:
            t.join(timeout=15)

        sent = sum(len(load.answers) for load in loads)
        failed = sum(len(load.errors) for load in loads)
        print(  # noqa: T201 - the measured numbers, with -s
            f"\nmodel store: promote (push with alias=production, {push_seconds:.2f} s on the "
            "control) reached "
            + ", ".join(f"{name} {seconds:.2f} s after it began" for name, seconds in reach.items())
            + f"; {sent} requests sent, {failed} failed"
        )
        assert failed == 0, [e for load in loads for e in load.errors][:5]
        assert all(seconds < REACH_SECONDS for seconds in reach.values()), reach
        for load in loads:
            seen = [v for _, _, v in load.answers]
            assert set(seen) == {"1", "2"}
            # each thread's answers switch once: never back to 1 after a 2
            assert seen == sorted(seen), f"{load.server.name} went back to version 1"
        # the weights behind "2" are version 2's
        answer = httpx.post(f"{replicas[0].url}/v2/models/{MODEL}/infer", json=body, timeout=10)
        logits = np.asarray(answer.json()["outputs"][0]["data"], dtype=np.float32)
        np.testing.assert_allclose(
            logits.reshape(1, -1), reference_outputs(versions[2][0], x), rtol=1e-4, atol=1e-4
        )

        # a third replica, started later: ready with every model, nothing sent to it
        third = _start("replica3", tmp_path, store, role="inference", opened=servers)
        started = time.monotonic()
        _until("replica3 to be ready", lambda: _ready(third), 60, servers)
        ready_after = time.monotonic() - started
        print(f"model store: replica3 ready {ready_after:.2f} s after it was started")  # noqa: T201
        exposition = httpx.get(f"{third.url}/metrics", timeout=5).text
        assert "\nrecalib_loaded_versions 1.0\n" in exposition  # loaded before any request
        answer = httpx.post(f"{third.url}/v2/models/{MODEL}/infer", json=body, timeout=10)
        assert answer.status_code == 200 and answer.json()["model_version"] == "2"
        for replica in [*replicas, third]:
            assert not replica.home.exists()  # no database, no home of their own
            refused = httpx.get(f"{replica.url}/v1/models", timeout=5)
            assert refused.status_code == 403
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        _stop(servers)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """httpx must reach 127.0.0.1 directly, whatever proxy the environment names."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    yield
