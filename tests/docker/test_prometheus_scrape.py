"""End to end against the real thing: Debian's Prometheus scrapes a running recalib service.

The service runs as ``python -m service serve`` (the container's ``recalib serve``) on loopback
with its own home; Prometheus runs from the shipped ``docker/prometheus/prometheus.yml``
with only the target addresses and intervals swapped, and loads the shipped alert rules.
The test registers the bundled demo model, sends inference traffic from the demo's shifted
domain (plus one malformed request) and polls Prometheus' HTTP API until the request
counters, drift gauges and the drift alert show up with the right labels and values; every
Grafana dashboard query is then run through the same Prometheus. Everything is bounded by
one deadline and stopped at the end.
"""

from __future__ import annotations

import functools
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from promhelpers import PROMETHEUS_DIR, REPO, dashboard_targets, grafana_to_promql

pytestmark = pytest.mark.slow

# One deadline for the whole test. Generous for CI on 2 cores (service start with the torch
# import, the .pt2 export on registration, 1 s scrapes and rule evaluations); polling stays
# at POLL_SECONDS so a fast machine finishes in seconds.
DEADLINE_SECONDS = 180.0
POLL_SECONDS = 0.25
MODEL = "demo"
REQUESTS = 12
ROWS = 4
THRESHOLD = 1.0  # the default drift threshold; the demo's shifted domain scores ~180


_TARGET_LABELS = ("__name__", "job", "instance", "service")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def remaining(self, floor: float = 5.0) -> float:
        """Seconds left (at least ``floor``): the timeout of a single slow call."""
        return max(floor, self.end - time.monotonic())

    def until(self, what: str, check: Callable[[], Any], *, logs: Callable[[], str]) -> Any:
        """Poll ``check`` until it returns something truthy; fail at the deadline."""
        last: Any = None
        while time.monotonic() < self.end:
            try:
                last = check()
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                last = exc
            else:
                if last:
                    return last
            time.sleep(POLL_SECONDS)
        pytest.fail(f"timed out waiting for {what} (last: {last!r})\n{logs()}")


@contextmanager
def _process(args: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _prometheus_config(tmp: Path, service_port: int, prometheus_port: int) -> Path:
    """The shipped config with loopback targets and 1 s intervals, next to the shipped rules."""
    text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    swaps = {
        "scrape_interval: 15s": "scrape_interval: 1s",
        "evaluation_interval: 15s": "evaluation_interval: 1s",
        'targets: ["recalib:8000"]': f'targets: ["127.0.0.1:{service_port}"]',
        'targets: ["localhost:9090"]': f'targets: ["127.0.0.1:{prometheus_port}"]',
    }
    for old, new in swaps.items():
        assert text.count(old) == 1, f"expected {old!r} once in prometheus.yml"
        text = text.replace(old, new)
    (tmp / "alerts.yml").write_text((PROMETHEUS_DIR / "alerts.yml").read_text())
    config = tmp / "prometheus.yml"
    config.write_text(text)
    return config


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path.name}: no output)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path.name} ---\n" + "\n".join(text)


def _demo_file(name: str) -> bytes:
    return (resources.files("recalib") / "demo_assets" / name).read_bytes()


def _shifted_rows(count: int) -> np.ndarray:
    with np.load(io.BytesIO(_demo_file("demo_test.npz")), allow_pickle=False) as data:
        return np.asarray(data["x"][:count], dtype=np.float32)


class _Prometheus:
    def __init__(self, port: int) -> None:
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0)

    def close(self) -> None:
        self.client.close()

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = self.client.get("/api/v1/query", params={"query": expr})
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def values(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """``{sorted labels: value}`` of an instant vector, without the labels Prometheus
        adds (name, job, instance and the config's target label ``service``)."""
        out = {}
        for series in self.query(expr):
            labels = {k: v for k, v in series["metric"].items() if k not in _TARGET_LABELS}
            out[tuple(sorted(labels.items()))] = float(series["value"][1])
        return out


def test_prometheus_scrapes_service_metrics(prometheus_binary: str, tmp_path: Path) -> None:
    deadline = _Deadline(DEADLINE_SECONDS)
    service_port, prometheus_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECALIB_")}
    env |= {
        "RECALIB_DRIFT_PER_LAYER_METRICS": "true",
        "RECALIB_DRIFT_THRESHOLD": str(THRESHOLD),
        "RECALIB_WARMUP_BATCH_SIZES": f"[{ROWS}]",
        "RECALIB_INTRA_OP_THREADS": "1",
        "RECALIB_EXECUTION_PROVIDER": "cpu",
        "RECALIB_DRIFT_SAMPLE_FRACTION": "1.0",
        "RECALIB_GRPC_PORT": "0",  # never the default 8001: it may be taken
        "RECALIB_DRIFT_MIN_ROWS": str(REQUESTS * ROWS),  # flagged once all traffic is in
        "PYTHONPATH": str(REPO),
    }
    service_log, prometheus_log = tmp_path / "service.log", tmp_path / "prometheus.log"
    (tmp_path / "prom").mkdir()
    config = _prometheus_config(tmp_path / "prom", service_port, prometheus_port)

    def logs() -> str:
        return _tail(service_log) + "\n" + _tail(prometheus_log)

    prometheus_args = [
        prometheus_binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'prom' / 'data'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
        "--log.level=warn",
    ]
    serve_args = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1"]
    serve_args += ["--port", str(service_port), "--home", str(tmp_path / "home")]
    with (
        _process(prometheus_args, prometheus_log, env) as prometheus_proc,
        _process(serve_args, service_log, env) as service_proc,
        httpx.Client(base_url=f"http://127.0.0.1:{service_port}", timeout=30.0) as api,
        ExitStack() as stack,
    ):
        prom = stack.enter_context(closing(_Prometheus(prometheus_port)))

        def alive() -> None:
            for proc, what in ((prometheus_proc, "prometheus"), (service_proc, "service")):
                if proc.poll() is not None:
                    pytest.fail(f"{what} exited with {proc.returncode}\n{logs()}")

        def service_ready() -> bool:
            alive()
            return api.get("/v2/health/ready").status_code == 200

        deadline.until("the service to be ready", service_ready, logs=logs)
        registered = api.post(  # exports the .pt2 to ONNX: the slowest call
            "/v1/models",
            data={"name": MODEL},
            files={"file": ("demo_model.pt2", _demo_file("demo_model.pt2"))},
            timeout=deadline.remaining(),
        )
        assert registered.status_code == 201, registered.text
        metadata = api.get(f"/v2/models/{MODEL}").json()
        name = metadata["inputs"][0]["name"]

        rows = _shifted_rows(REQUESTS * ROWS).reshape(REQUESTS, ROWS, 3, 16, 16)
        for batch in rows:
            body = {
                "inputs": [
                    {
                        "name": name,
                        "shape": list(batch.shape),
                        "datatype": "FP32",
                        "data": batch.ravel().tolist(),
                    }
                ]
            }
            answer = api.post(f"/v2/models/{MODEL}/infer", json=body)
            assert answer.status_code == 200, answer.text
        wrong_shape = {"name": name, "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}
        bad = {"inputs": [wrong_shape]}
        rejected = api.post(f"/v2/models/{MODEL}/infer", json=bad)
        assert rejected.status_code == 400, rejected.text
        served = api.get(f"/v1/models/{MODEL}/drift").json()

        def scraped() -> bool:
            alive()
            done = prom.values(f'recalib_requests_total{{model="{MODEL}"}}')
            return sum(done.values()) == REQUESTS + 1

        deadline.until("Prometheus to scrape every request", scraped, logs=logs)

        # Request counter: one series per (model, version, outcome, reason), counts exactly
        # as sent.
        requests = prom.values(f'recalib_requests_total{{model="{MODEL}"}}')
        answered = (("outcome", "ok"), ("reason", "none"))
        refused = (("outcome", "client_error"), ("reason", "invalid_input"))
        assert requests == {
            (("model", MODEL), *answered, ("version", "1")): REQUESTS,
            (("model", MODEL), *refused, ("version", "1")): 1,
        }
        # the process collector is scraped too, and no _created series
        assert prom.values('process_resident_memory_bytes{job="recalib"}')
        assert not prom.values('recalib_requests_created{job="recalib"}')
        rows_run = prom.values(f'recalib_batch_size_sum{{model="{MODEL}",version="1"}}')
        assert list(rows_run.values()) == [REQUESTS * ROWS]
        latency = prom.values(f'recalib_request_duration_seconds_count{{model="{MODEL}"}}')
        assert sum(latency.values()) == REQUESTS + 1
        up = prom.values('up{job="recalib"}')
        assert list(up.values()) == [1.0]

        # Drift: the shifted domain is far above the threshold, and Prometheus holds the
        # very score the service reports.
        drift = prom.values(f'recalib_drift_score{{model="{MODEL}"}}')
        assert list(drift) == [(("model", MODEL), ("version", "1"))]
        score = next(iter(drift.values()))
        assert score > THRESHOLD
        assert score == pytest.approx(served["score"], rel=1e-9)
        exceeded = prom.values(f'recalib_drift_threshold_exceeded{{model="{MODEL}"}}')
        assert list(exceeded.values()) == [1.0]
        threshold = prom.values('recalib_drift_threshold{job="recalib"}')
        assert list(threshold.values()) == [THRESHOLD] == [served["threshold"]]
        samples = prom.values(f'recalib_drift_window_samples{{model="{MODEL}"}}')
        assert list(samples.values()) == [served["samples"]] == [REQUESTS * ROWS]
        layers = prom.values(f'recalib_layer_drift_score{{model="{MODEL}",version="1"}}')
        assert len(layers) == len(served["layers"]) > 0
        assert max(layers.values()) == pytest.approx(served["max_score"], rel=1e-9)
        provider = prom.values(f'recalib_execution_provider_info{{model="{MODEL}"}}')
        assert list(provider) == [
            (
                ("model", MODEL),
                ("provider", "CPUExecutionProvider"),
                ("requested", "cpu"),
                ("version", "1"),
            )
        ]

        # The shipped rules load, evaluate without error, and the drift alert is pending
        # (its 15-minute `for` keeps it from firing within the test) with the latest score
        # as its value (earlier evaluations saw the score of a partial window).
        def drift_alert() -> list[dict[str, Any]]:
            alerts = prom.client.get("/api/v1/alerts").json()["data"]["alerts"]
            wanted = "RecalibDriftThresholdExceeded"
            found = [a for a in alerts if a["labels"]["alertname"] == wanted]
            current = found and float(found[0]["value"]) == pytest.approx(score, rel=1e-9)
            return found if current else []

        alerts = deadline.until("the drift alert", drift_alert, logs=logs)
        assert [(a["labels"]["model"], a["labels"]["version"], a["state"]) for a in alerts] == [
            (MODEL, "1", "pending")
        ]
        groups = prom.client.get("/api/v1/rules").json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) >= 8
        assert all(rule["health"] == "ok" for rule in rules), rules

        # Every dashboard query runs; all but the job and load-failure panels (no job ran,
        # no load failed) get data once Prometheus holds two samples for rate().
        for where, expr in dashboard_targets():
            query = grafana_to_promql(expr)
            if "recalibration_job" in expr or "load_failures" in expr:
                prom.query(query)
            else:
                panel = f"data in dashboard panel {where}"
                deadline.until(panel, functools.partial(prom.query, query), logs=logs)
