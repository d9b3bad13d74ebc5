"""The quickstart story: the whole pipeline against a running service, over REST only.

:func:`run_story` is what a deployment pipeline does, written with the standard library's
HTTP client so it shows the raw API: register the bundled demo model, send the new
camera's images to ``/v2/models/demo/infer`` (accuracy and drift before), upload unlabeled
calibration images, start a recalibration job with ``promote=true``, wait for it, then
infer again (accuracy and drift after). :func:`serve_with_story` starts the service, runs
the story once it is up, and keeps serving for curl and Prometheus.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_story", "serve_with_story"]

log = logging.getLogger(__name__)

MODEL = "demo"


class _Client:
    """A minimal JSON/multipart client over urllib (no third-party dependency)."""

    def __init__(self, base: str, token: str | None) -> None:
        self.base = base.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def call(
        self, method: str, path: str, body: bytes | None = None, ctype: str | None = None
    ) -> Any:
        headers = dict(self.headers)
        if ctype:
            headers["Content-Type"] = ctype
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"{method} {path} -> {exc.code}: {detail}") from exc
        return json.loads(raw) if raw else None

    def json(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        return self.call(method, path, body, "application/json" if body else None)

    def upload(self, path: str, fields: dict[str, str], file: Path) -> Any:
        boundary = uuid.uuid4().hex
        parts = []
        for k, v in fields.items():
            disposition = f'Content-Disposition: form-data; name="{k}"'
            parts.append(f"--{boundary}\r\n{disposition}\r\n\r\n{v}\r\n".encode())
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{file.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        )
        parts.append(head.encode() + file.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return self.call("POST", path, b"".join(parts), f"multipart/form-data; boundary={boundary}")


def _accuracy(client: _Client, x: np.ndarray, y: np.ndarray, input_name: str) -> float:
    correct = 0
    for i in range(0, len(x), 64):
        chunk = np.ascontiguousarray(x[i : i + 64], dtype=np.float32)
        req = {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(chunk.shape),
                    "datatype": "FP32",
                    "data": chunk.ravel().tolist(),
                }
            ]
        }
        out = client.json("POST", f"/v2/models/{MODEL}/infer", req)["outputs"][0]
        logits = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        correct += int((logits.argmax(1) == y[i : i + 64]).sum())
    return correct / len(x)


def _wait_job(client: _Client, job_id: str, timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.json("GET", f"/v1/recalibrations/{job_id}")
        if job["state"] in ("succeeded", "failed", "cancelled", "interrupted"):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"recalibration job {job_id} did not finish in {timeout:.0f} s")


def run_story(
    base_url: str, *, token: str | None = None, say: Callable[[str], None] = log.info
) -> dict[str, Any]:
    """Run the pipeline against ``base_url``; returns the before/after numbers."""
    from recalib.demo import ASSETS

    client = _Client(base_url, token)
    test = np.load(ASSETS / "demo_test.npz", allow_pickle=False)
    x, y = test["x"].astype(np.float32), test["y"]
    if any(m["name"] == MODEL for m in client.json("GET", "/v1/models")["models"]):
        client.json("DELETE", f"/v1/models/{MODEL}")
    say("1. register the demo model (a .pt2 trained on the source camera)")
    client.upload("/v1/models", {"name": MODEL}, ASSETS / "demo_model.pt2")
    input_name = client.json("GET", f"/v2/models/{MODEL}")["inputs"][0]["name"]
    say("2. serve 512 images from the new camera")
    acc_before = _accuracy(client, x, y, input_name)
    drift_before = client.json("GET", f"/v1/models/{MODEL}/drift")
    say("3. upload 512 unlabeled calibration images from the new camera")
    ds = client.upload("/v1/datasets", {}, ASSETS / "demo_calibration.npz")
    say("4. recalibrate (exact statistics, promote when done)")
    job = client.json(
        "POST", f"/v1/models/{MODEL}/recalibrations", {"dataset": ds["id"], "promote": True}
    )
    job = _wait_job(client, job["id"])
    if job["state"] != "succeeded":
        raise RuntimeError(f"recalibration job ended {job['state']}: {job.get('error')}")
    client.json("POST", f"/v1/models/{MODEL}/drift/reset")
    say(f"5. version {job['result_version']} is production; serve the same images again")
    acc_after = _accuracy(client, x, y, input_name)
    drift_after = client.json("GET", f"/v1/models/{MODEL}/drift")
    return {
        "accuracy": (acc_before, acc_after),
        "drift": (drift_before.get("score"), drift_after.get("score")),
        "threshold": drift_after.get("threshold"),
        "version": job["result_version"],
        "job": job["id"],
    }


def _report(result: dict[str, Any], base: str, out: Callable[[str], None]) -> None:
    (a0, a1), (d0, d1) = result["accuracy"], result["drift"]
    out("")
    out(f"{'new camera':28}{'before':>10}{'after':>10}")
    out(f"{'accuracy':28}{a0:>10.3f}{a1:>10.3f}")
    out(f"{'drift score (sym. KL)':28}{d0:>10.3f}{d1:>10.3f}   threshold {result['threshold']}")
    out("")
    out(f"service running at {base}  (Ctrl-C to stop). Try:")
    out(f"  curl {base}/v1/models/{MODEL}/versions/{result['version']}")
    out(f"  curl {base}/v1/models/{MODEL}/drift")
    out(f"  curl {base}/metrics | grep recalib_")


def serve_with_story(
    *,
    host: str | None = None,
    port: int | None = None,
    home: str | Path | None = None,
    grpc_port: int | None = None,
    keep_running: bool = True,
    out: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Start the service, run :func:`run_story` once it answers, and keep serving."""
    import uvicorn

    from .app import create_app
    from .main import check_ports, settings_from

    # The story sends only a few requests: watch every batch so drift is measured on all.
    settings = settings_from(
        host=host, port=port, home=home, grpc_port=grpc_port, drift_sample_fraction=1.0
    )
    check_ports(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host=settings.host, port=settings.port, log_level="warning"
        )
    )
    base = f"http://{settings.host}:{settings.port}"
    token = settings.api_token.get_secret_value() if settings.api_token else None
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    def story() -> None:
        try:
            deadline = time.monotonic() + 60
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.05)
            result.update(run_story(base, token=token, say=out))
            _report(result, base, out)
        except Exception as exc:  # reported, and the server is stopped
            failure.append(exc)
            server.should_exit = True
            return
        if not keep_running:
            server.should_exit = True

    threading.Thread(target=story, name="recalib-story", daemon=True).start()
    server.run()
    if failure:
        raise RuntimeError(f"the quickstart story failed: {failure[0]}") from failure[0]
    return result
