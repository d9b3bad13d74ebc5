"""Jobs choose their adaptation plan and never promote blindly (real worker processes, the
bundled demo model): the label-free guard adapts to the new camera and promotes; a
validation set on which no plan beats the source keeps production and says why."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from recalib.demo import ASSETS, make_images

pytestmark = pytest.mark.slow


def _register_demo(api: Any) -> None:
    r = api.register("m", (ASSETS / "demo_model.pt2").read_bytes(), "demo.pt2")
    assert r.status_code == 201, r.text


def test_label_free_guard_adapts_to_the_new_camera_and_promotes(
    api: Any, npz: Callable[..., bytes]
) -> None:
    _register_demo(api)
    cal = api.upload((ASSETS / "demo_calibration.npz").read_bytes(), "cal.npz").json()["id"]
    job = api.client.post("/v1/models/m/recalibrations", json={"dataset": cal, "promote": True})
    job = api.wait(job.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    assert job["promoted"] and job["result_version"] == 2
    plan = job["plan"]
    assert plan["criterion"] == "label-free" and not plan["flagged"]
    assert plan["chosen"] == "full"  # the source collapsed onto one class on the new camera
    names = [c["plan"] for c in plan["candidates"]]
    assert names[0] == "full" and names[-1] == "source" and len(names) >= 5
    report = api.client.get("/v1/models/m/versions/2/artifact?format=report").json()
    assert report["recalibration"]["plan"]["chosen"] == "full"


def test_no_plan_beating_the_source_keeps_production(
    api: Any, npz: Callable[..., bytes]
) -> None:
    _register_demo(api)
    x, _ = make_images(256, seed=3)  # the source camera: nothing to adapt to
    xv, yv = make_images(128, seed=4)
    cal = api.upload(npz(x=x)).json()["id"]
    check = api.upload(npz(x=xv, y=yv)).json()["id"]
    body = {"dataset": cal, "promote": True, "validation": {"dataset": check}}
    job = api.wait(api.client.post("/v1/models/m/recalibrations", json=body).json()["id"])
    assert job["state"] == "failed" and not job["promoted"]
    assert job["error"].startswith("not promoted: no adapted plan beat the source")
    assert job["plan"]["criterion"] == "validation" and job["plan"]["flagged"]
    assert job["plan"]["validation_samples"] == 128
    assert job["result_version"] == 2  # created, inspectable, not served
    assert api.client.get("/v1/models/m/aliases/production").json()["version"] == 1
    assert np.isfinite([c["val_score"] for c in job["plan"]["candidates"]]).all()
