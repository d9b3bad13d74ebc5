"""The whole story with real worker processes: register -> recalibrate -> promote -> infer
-> drift (ONNX model, real serving runtime), NaN data failing its job, and an
ExportedProgram (.pt2) whose failed validation leaves production alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from runtime_helpers import shifted_images

from recalib.demo import ASSETS
from recalib.statbank import load_stat_bank
from service.settings import Settings

pytestmark = pytest.mark.slow


def _infer(api: Any, x: np.ndarray) -> dict[str, Any]:
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    r = api.client.post("/v2/models/m/infer", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_register_recalibrate_promote_infer_drift(
    make_api: Callable[..., Any], settings: Settings, bn_onnx: bytes, npz: Callable[..., bytes]
) -> None:
    update = {"job_workers": 2, "drift_min_rows": 64}  # flagged with the 64 rows sent
    api = make_api(settings.model_copy(update=update), runtime=None)  # real runtime
    assert api.register("m", bn_onnx).status_code == 201
    traffic = shifted_images(64, seed=7)
    assert _infer(api, traffic)["model_version"] == "1"
    before = api.client.get("/v1/models/m/drift").json()
    assert before["version"] == 1 and before["samples"] == 64 and before["exceeded"]

    calibration = shifted_images(256, seed=1)
    poisoned = calibration.copy()
    poisoned[200, 1, 3, 3] = np.nan
    ds = api.upload(npz(x=calibration)).json()["id"]
    bad = api.upload(npz(x=poisoned)).json()["id"]
    # Labels: version 1's own predictions (so its accuracy is ~1 and the drop is what the
    # recalibration changed); any drop passes with max_accuracy_drop=1.
    held_out = shifted_images(32, seed=2)
    logits = np.reshape(_infer(api, held_out)["outputs"][0]["data"], (32, -1))
    check = api.upload(npz(x=held_out, y=logits.argmax(axis=1))).json()["id"]

    # plan "full": these labels make the source right by definition, so "auto" would keep it.
    body = {
        "dataset": ds,
        "promote": True,
        "plan": "full",
        "validation": {"dataset": check, "max_accuracy_drop": 1.0},
    }
    good = api.client.post("/v1/models/m/recalibrations", json=body).json()
    nan = api.client.post(
        "/v1/models/m/recalibrations", json={"dataset": bad, "promote": True, "plan": "full"}
    ).json()
    nan, good = api.wait(nan["id"]), api.wait(good["id"])

    assert nan["state"] == "failed" and nan["result_version"] is None
    assert "NaN/Inf in the input of layer" in nan["error"]
    assert good["state"] == "succeeded", good["error"]
    assert (good["result_version"], good["promoted"]) == (2, True)
    progress = good["progress"]
    assert (
        progress["stage"] == "succeeded"
        and progress["batches"] == progress["batches_per_pass"] == 4
    )
    assert good["validation"]["passed"] and good["validation"]["dataset"] == check
    assert good["validation"]["base_accuracy"] > 0.95
    assert good["validation"]["accuracy_drop"] == pytest.approx(
        good["validation"]["base_accuracy"] - good["validation"]["new_accuracy"]
    )

    v2 = api.client.get("/v1/models/m/versions/2").json()
    assert (v2["parent_version"], v2["dataset"], v2["job"]) == (1, ds, good["id"])
    assert v2["recalibration"]["method"] == "exact" and v2["recalibration"]["key"] == "x"
    assert v2["report"]["kind"] == "recalibration" and v2["report"]["samples"] == 256
    assert v2["aliases"] == ["production"]
    assert [v["version"] for v in api.client.get("/v1/models/m/versions").json()["versions"]] == [
        1,
        2,
    ]

    assert _infer(api, traffic)["model_version"] == "2"
    after = api.client.get("/v1/models/m/drift").json()
    assert after["version"] == 2 and after["samples"] == 64
    assert after["score"] < 0.1 * before["score"]  # recalibrated on this domain

    reg = api.app.state.metrics_registry
    for outcome in ("succeeded", "failed"):
        value = reg.get_sample_value("recalib_recalibration_jobs_total", {"outcome": outcome})
        assert value == 1.0


def test_pt2_failed_validation_creates_version_but_keeps_production(
    api: Any, npz: Callable[..., bytes]
) -> None:
    r = api.register("m", (ASSETS / "demo_model.pt2").read_bytes(), "demo.pt2")
    assert r.status_code == 201, r.text
    v1 = api.client.get("/v1/models/m/versions/1").json()
    assert set(v1["artifacts"]) == {"onnx", "pt2", "stats", "report"}
    assert v1["report"] == {"kind": "registration", "source_format": "pt2", "bn_layers": 4}
    report = api.client.get("/v1/models/m/versions/1/artifact?format=report").json()
    assert report["export"]["bn_nodes"] == 4 and report["export"]["path"] == "model.onnx"

    cal = api.upload((ASSETS / "demo_calibration.npz").read_bytes(), "cal.npz").json()["id"]
    test = np.load(ASSETS / "demo_test.npz")
    check = api.upload(npz(x=test["x"], y=test["y"])).json()["id"]
    body = {
        "dataset": cal,
        "promote": True,
        "validation": {"dataset": check, "max_accuracy_drop": -1.0},  # demands +100 points
    }
    job = api.wait(api.client.post("/v1/models/m/recalibrations", json=body).json()["id"])
    assert job["state"] == "failed" and job["result_version"] == 2 and not job["promoted"]
    assert "validation failed" in job["error"] and "not promoted" in job["error"]
    validation = job["validation"]
    assert not validation["passed"]
    assert validation["new_accuracy"] > validation["base_accuracy"] + 0.3  # it did help

    v2 = api.client.get("/v1/models/m/versions/2").json()
    assert set(v2["artifacts"]) == {"onnx", "pt2", "stats", "report"}
    assert v2["validation"] == validation and v2["aliases"] == []
    assert api.client.get("/v1/models/m/aliases/production").json()["version"] == 1
    assert ("serve", "m", 2) not in api.runtime.calls

    banks = []
    for version in (1, 2):
        raw = api.client.get(f"/v1/models/m/versions/{version}/artifact?format=stats").content
        path = api.home / f"bank{version}.safetensors"
        path.write_bytes(raw)
        banks.append(load_stat_bank(path))
    assert banks[0].signature == banks[1].signature
    layer = next(iter(banks[0].stats))
    assert not np.allclose(banks[0].stats[layer][0].numpy(), banks[1].stats[layer][0].numpy())
    assert len(raw) == v2["artifacts"]["stats"]["bytes"]
