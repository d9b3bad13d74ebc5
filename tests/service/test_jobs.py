"""Job lifecycle with stand-in worker functions (real processes, no torch): cancel while
running or queued, timeout, a crashing worker, shutdown and restart with a job in flight.

The stand-ins live at module level: the ``spawn`` start method pickles them by name and
the child imports this module (pytest put its directory on ``sys.path``, which the child
inherits).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from service.settings import Settings

if TYPE_CHECKING:  # the worker processes import this module: keep torch out of it
    from service.worker import JobSpec


def slow_worker(spec: JobSpec) -> None:
    """Writes half a version, then hangs."""
    out = Path(spec.work_dir) / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(b"half")
    time.sleep(600)


def crashing_worker(spec: JobSpec) -> None:
    os._exit(3)


def _write_result(spec: JobSpec, text: str) -> None:
    (Path(spec.work_dir) / "result.json").write_text(text)


def garbled_result_worker(spec: JobSpec) -> None:
    _write_result(spec, "{not json")


def list_result_worker(spec: JobSpec) -> None:
    _write_result(spec, "[1, 2]")


def odd_validation_worker(spec: JobSpec) -> None:
    """Claims success with a validation that is not an object (the server trips on it)."""
    _write_result(spec, json.dumps({"ok": True, "validation": 5}))


def quick_worker(spec: JobSpec) -> None:
    """A whole new version (the base ONNX copied), written at once."""
    out = Path(spec.work_dir) / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(Path(spec.base_onnx).read_bytes())
    (out / "report.json").write_text(json.dumps({"recalibration": {"method": "exact"}}))
    _write_result(spec, json.dumps({"ok": True, "validation": None}))


def _setup(api: Any, bn_onnx: bytes, npz: Callable[..., bytes]) -> str:
    assert api.register("m", bn_onnx).status_code == 201
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    ds: str = api.upload(npz(x=x)).json()["id"]
    return ds


def _start(api: Any, ds: str) -> dict[str, Any]:
    r = api.client.post("/v1/models/m/recalibrations", json={"dataset": ds, "promote": True})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/recalibrations/{r.json()['id']}"
    job: dict[str, Any] = r.json()
    return job


def _wait_half_written(api: Any, job_id: str, limit: float = 60.0) -> None:
    half = api.home / "work" / job_id / "out" / "model.onnx"
    end = time.monotonic() + limit
    while not half.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"the worker of job {job_id} did not start within {limit} s")
        time.sleep(0.05)


def _outcomes(api: Any) -> dict[str, float]:
    reg = api.app.state.metrics_registry
    return {
        o: reg.get_sample_value("recalib_recalibration_jobs_total", {"outcome": o}) or 0.0
        for o in ("succeeded", "failed", "cancelled", "interrupted")
    }


def _untouched(api: Any) -> None:
    """Only version 1; production on it; no job directory left."""
    assert [v["version"] for v in api.client.get("/v1/models/m/versions").json()["versions"]] == [1]
    assert api.client.get("/v1/models/m").json()["aliases"] == {"production": 1}
    assert not (api.home / "work").exists() or not any((api.home / "work").iterdir())


@pytest.fixture
def slow(make_api: Callable[..., Any], settings: Settings) -> Any:
    return make_api(settings, worker=slow_worker)


def test_cancel_running_then_queued(slow: Any, bn_onnx: bytes, npz: Callable[..., bytes]) -> None:
    ds = _setup(slow, bn_onnx, npz)
    running, queued = _start(slow, ds), _start(slow, ds)  # one worker slot
    assert queued["state"] == "queued" and queued["progress"] == {"stage": "queued"}
    _wait_half_written(slow, running["id"])
    assert slow.client.get(f"/v1/recalibrations/{running['id']}").json()["state"] == "running"

    r = slow.client.delete(f"/v1/recalibrations/{queued['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert r.json()["error"] == "cancelled before it started"
    r = slow.client.delete(f"/v1/recalibrations/{running['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert r.json()["error"] == "cancelled while running" and r.json()["result_version"] is None
    assert slow.client.delete(f"/v1/recalibrations/{running['id']}").status_code == 409
    _untouched(slow)
    jobs = slow.client.get("/v1/models/m/recalibrations").json()["jobs"]
    assert [j["id"] for j in jobs] == [running["id"], queued["id"]]
    assert _outcomes(slow)["cancelled"] == 2


def test_timeout_fails_the_job(
    make_api: Callable[..., Any], settings: Settings, bn_onnx: bytes, npz: Callable[..., bytes]
) -> None:
    api = make_api(settings.model_copy(update={"job_timeout_seconds": 0.5}), worker=slow_worker)
    job = api.wait(_start(api, _setup(api, bn_onnx, npz))["id"])
    assert job["state"] == "failed" and "timed out after 0.5 s" in job["error"]
    _untouched(api)
    assert _outcomes(api)["failed"] == 1


def test_crashing_worker_fails_the_job_not_the_server(
    make_api: Callable[..., Any], settings: Settings, bn_onnx: bytes, npz: Callable[..., bytes]
) -> None:
    api = make_api(settings, worker=crashing_worker)
    job = api.wait(_start(api, _setup(api, bn_onnx, npz))["id"])
    assert job["state"] == "failed" and "exit code 3" in job["error"]
    assert api.client.get("/v1/models/m").status_code == 200
    _untouched(api)


@pytest.mark.parametrize(
    ("worker", "message"),
    [
        (garbled_result_worker, "unreadable result.json from the worker"),
        (list_result_worker, "expected a JSON object in result.json (got list)"),
        (odd_validation_worker, "internal error: TypeError"),
    ],
)
def test_unexpected_worker_output_fails_the_job(
    make_api: Callable[..., Any],
    settings: Settings,
    bn_onnx: bytes,
    npz: Callable[..., bytes],
    worker: Callable[[JobSpec], None],
    message: str,
) -> None:
    api = make_api(settings, worker=worker)
    job = api.wait(_start(api, _setup(api, bn_onnx, npz))["id"], limit=30.0)
    assert job["state"] == "failed" and message in job["error"], job
    assert job["finished_at"] is not None
    _untouched(api)
    assert _outcomes(api)["failed"] == 1


def test_cancel_as_the_worker_exits_cancels(
    make_api: Callable[..., Any], settings: Settings, bn_onnx: bytes, npz: Callable[..., bytes]
) -> None:
    from service.jobs import RecalibrationRequest  # not at the top: it imports torch

    api = make_api(settings, worker=quick_worker)
    ds = _setup(api, bn_onnx, npz)
    jobs = api.app.state.jobs

    async def race() -> dict[str, Any]:
        job = await jobs.submit("m", RecalibrationRequest(dataset=ds, promote=True))
        handle = jobs._live[job.id]
        while handle.process is None:
            await asyncio.sleep(0.01)
        # Blocking the event loop while the worker finishes: the job's poll cannot see
        # the process exit before the cancel below arrives.
        handle.process.join(60)
        assert handle.process.exitcode == 0
        cancelled: dict[str, Any] = (await jobs.cancel(job.id)).model_dump()
        return cancelled

    job = api.client.portal.call(race)
    assert job["state"] == "cancelled" and job["error"] == "cancelled while running", job
    assert job["result_version"] is None and not job["promoted"]
    _untouched(api)
    assert api.runtime.served == {"m": 1}
    assert _outcomes(api)["cancelled"] == 1 and _outcomes(api)["succeeded"] == 0


def test_shutdown_with_job_in_flight_then_restart(
    make_api: Callable[..., Any], settings: Settings, bn_onnx: bytes, npz: Callable[..., bytes]
) -> None:
    first = make_api(settings, worker=slow_worker)
    job = _start(first, _setup(first, bn_onnx, npz))
    _wait_half_written(first, job["id"])
    first.close()
    assert _outcomes(first)["interrupted"] == 1

    second = make_api(settings, runtime=type(first.runtime)())
    after = second.client.get(f"/v1/recalibrations/{job['id']}").json()
    assert after["state"] == "interrupted"
    assert after["error"] == "the service shut down while the job was running"
    _untouched(second)
    assert second.runtime.served == {"m": 1}  # production loaded again at startup


def test_restart_after_a_crash_interrupts_leftover_jobs(
    make_api: Callable[..., Any], settings: Settings, bn_onnx: bytes, npz: Callable[..., bytes]
) -> None:
    first = make_api(settings)
    ds = _setup(first, bn_onnx, npz)
    model_id = first.client.get("/v1/models/m").json()["id"]
    first.close()
    # What a killed server leaves: rows still queued/running, a half-written output.
    db = first.app.state.db
    ids = [uuid.uuid4().hex, uuid.uuid4().hex]
    for job_id, state in zip(ids, ("running", "queued"), strict=True):
        db.execute(
            "INSERT INTO jobs (id, model_id, state, base_version, dataset_id, params, "
            "created_at, progress) VALUES (?, ?, ?, 1, ?, '{}', '2020', ?)",
            (job_id, model_id, state, ds, json.dumps({"stage": "recalibrating"})),
        )
    half = settings.home / "work" / ids[0] / "out"
    half.mkdir(parents=True)
    (half / "model.onnx").write_bytes(b"half")
    db.close()

    second = make_api(settings)
    for job_id, state in zip(ids, ("running", "queued"), strict=True):
        job = second.client.get(f"/v1/recalibrations/{job_id}").json()
        assert job["state"] == "interrupted"
        assert job["error"] == f"the service stopped while the job was {state}"
        assert job["finished_at"] is not None and job["progress"]["stage"] == "interrupted"
    _untouched(second)
    assert _outcomes(second)["interrupted"] == 2


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"dataset": "ds-nope"}, 404, "dataset 'ds-nope' not found"),
        ({"dataset": "DS", "base_version": 9}, 404, "no version 9"),
        ({"dataset": "DS", "base_version": "canary"}, 404, "no alias 'canary'"),
        ({"dataset": "DS", "base_version": 2**70}, 404, "no version 1180591620717411303424"),
        ({"dataset": "DS", "base_version": "\u00b2"}, 400, "version number or alias"),
        ({"dataset": "DS", "key": "z"}, 400, "array named 'z'"),
        ({"dataset": "WRONG_SHAPE"}, 400, "expected data samples of shape (3, 8, 8)"),
        ({"dataset": "DS", "validation": {"dataset": "DS"}}, 400, "labels y"),
        ({"dataset": "DS", "method": "prior"}, 422, "prior_strength"),
        ({"dataset": "DS", "mode": "sideways"}, 422, "mode"),
        ({"dataset": "DS", "batch_size": 0}, 422, "batch_size"),
        ({"dataset": "DS", "surprise": 1}, 422, "surprise"),
    ],
)
def test_bad_submission_is_refused_and_queues_nothing(
    slow: Any,
    bn_onnx: bytes,
    npz: Callable[..., bytes],
    body: dict[str, Any],
    status: int,
    message: str,
) -> None:
    ds = _setup(slow, bn_onnx, npz)
    wrong = slow.upload(npz(x=np.zeros((4, 3, 4, 4), np.float32))).json()["id"]
    body = {
        k: {"DS": ds, "WRONG_SHAPE": wrong}.get(v, v) if isinstance(v, str) else v
        for k, v in body.items()
    }
    if "validation" in body:
        body["validation"] = {"dataset": ds}
    r = slow.client.post("/v1/models/m/recalibrations", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert slow.client.get("/v1/models/m/recalibrations").json() == {"jobs": []}


def test_unknown_job_404_and_bad_id_400(api: Any) -> None:
    assert api.client.get("/v1/recalibrations/abc").status_code == 404
    assert api.client.delete("/v1/recalibrations/abc").status_code == 404
    assert api.client.get("/v1/recalibrations/..x").status_code == 400


def test_busy_dataset_and_model_cannot_be_deleted(
    slow: Any, bn_onnx: bytes, npz: Callable[..., bytes]
) -> None:
    ds = _setup(slow, bn_onnx, npz)
    job = _start(slow, ds)
    r = slow.client.delete(f"/v1/datasets/{ds}")
    assert r.status_code == 409 and job["id"] in r.json()["error"]
    r = slow.client.delete("/v1/models/m")
    assert r.status_code == 409 and "cancel it first" in r.json()["error"]
    slow.client.delete(f"/v1/recalibrations/{job['id']}")
    assert slow.client.delete(f"/v1/datasets/{ds}").status_code == 204
    assert slow.client.delete("/v1/models/m").status_code == 204
