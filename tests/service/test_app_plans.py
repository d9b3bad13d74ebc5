"""Jobs choose their adaptation plan and never promote blindly (real worker processes, the
bundled demo model): the label-free guard adapts to the new camera and promotes; a
validation set keeps full adaptation away from a one-class calibration set; a flagged
result (no class scores to guard with) is created but not promoted, and the job says why."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import recalib
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


def test_validation_refuses_full_adaptation_on_a_one_class_calibration_set(
    api: Any, npz: Callable[..., bytes]
) -> None:
    _register_demo(api)
    x, y = make_images(1024, seed=3)
    one_class = x[y == 2][:200]  # label shift: full adaptation learns one class's statistics
    xv, yv = make_images(128, seed=4)
    cal = api.upload(npz(x=one_class)).json()["id"]
    check = api.upload(npz(x=xv, y=yv)).json()["id"]
    body = {"dataset": cal, "promote": True, "validation": {"dataset": check}}
    job = api.wait(api.client.post("/v1/models/m/recalibrations", json=body).json()["id"])
    assert job["state"] == "succeeded", job["error"]
    plan = job["plan"]
    assert plan["criterion"] == "validation" and plan["validation_samples"] == 128
    scores = {c["plan"]: c["val_score"] for c in plan["candidates"]}
    assert scores["full"] < scores["source"] - 0.05  # what update_bn would have deployed
    assert plan["chosen"] != "full" and scores[plan["chosen"]] >= scores["source"]
    assert job["validation"]["passed"] and job["validation"]["accuracy_drop"] <= 0.0


def test_a_flagged_plan_is_not_promoted(api: Any, npz: Callable[..., bytes], tmp_path: Any) -> None:
    torch.manual_seed(0)
    scorer = nn.Sequential(  # one output per item: no class scores for the guard
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 1)
    ).eval()
    recalib.export_onnx(scorer, torch.randn(4, 3, 8, 8), tmp_path / "scorer.onnx")
    assert api.register("s", (tmp_path / "scorer.onnx").read_bytes()).status_code == 201
    cal = api.upload(npz(x=np.random.default_rng(0).normal(2, 3, (64, 3, 8, 8)))).json()["id"]
    job = api.client.post("/v1/models/s/recalibrations", json={"dataset": cal, "promote": True})
    job = api.wait(job.json()["id"])
    assert job["state"] == "failed" and not job["promoted"] and job["result_version"] == 2
    assert job["error"].startswith("not promoted: the label-free guard cannot run")
    assert job["plan"]["flagged"] and job["plan"]["chosen"] == "full"
    assert api.client.get("/v1/models/s/aliases/production").json()["version"] == 1


@pytest.mark.parametrize(
    ("x_shape", "y", "reason"),
    [
        ((8, 2, 16, 16), np.zeros(8, np.int64), "expected data samples of shape (3, 16, 16)"),
        ((8, 3, 16, 16), np.zeros(8, np.float32), "expected integer class labels y"),
    ],
)
def test_unusable_validation_sets_are_refused_at_submit(
    api: Any, npz: Callable[..., bytes], x_shape: tuple[int, ...], y: np.ndarray, reason: str
) -> None:
    _register_demo(api)
    cal = api.upload((ASSETS / "demo_calibration.npz").read_bytes(), "cal.npz").json()["id"]
    check = api.upload(npz(x=np.zeros(x_shape, np.float32), y=y)).json()["id"]
    body = {"dataset": cal, "validation": {"dataset": check}}
    r = api.client.post("/v1/models/m/recalibrations", json=body)
    assert r.status_code == 400 and reason in r.json()["error"], r.text
    assert api.client.get("/v1/models/m/recalibrations").json()["jobs"] == []
