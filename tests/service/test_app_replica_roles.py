"""What an inference replica needs from the app: readiness that waits for its models
(registered ones and ``RECALIB_EXPECT_MODELS``) and ``RECALIB_ROLE=inference``, which keeps
data sets and recalibration jobs on the control replica."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError
from service_helpers import Api, FakeRuntime

from service.settings import Settings


def _ready(api: Api) -> tuple[int, dict[str, Any]]:
    response = api.client.get("/v2/health/ready")
    return response.status_code, response.json()


def test_an_empty_home_is_ready(api: Api) -> None:
    assert _ready(api) == (200, {"ready": True, "waiting_for": []})


def test_expected_models_keep_the_server_unready_until_they_are_served(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes
) -> None:
    api = make_api(settings.model_copy(update={"expect_models": ["b", "a"]}))
    assert _ready(api) == (400, {"ready": False, "waiting_for": ["a", "b"]})
    assert api.register("a", bn_onnx).status_code == 201
    assert _ready(api) == (400, {"ready": False, "waiting_for": ["b"]})
    assert api.register("b", bn_onnx).status_code == 201
    assert _ready(api) == (200, {"ready": True, "waiting_for": []})
    # liveness does not depend on it
    assert api.client.get("/v2/health/live").status_code == 200


def test_names_in_waiting_for_only_for_token_holders(
    make_api: Callable[..., Api], settings: Settings
) -> None:
    api = make_api(settings.model_copy(update={"expect_models": ["secret-model"]}))
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        anonymous = api.client.get("/v2/health/ready", headers=headers)
        assert (anonymous.status_code, anonymous.json()) == (400, {"ready": False})
    assert _ready(api) == (400, {"ready": False, "waiting_for": ["secret-model"]})
    open_api = make_api(
        settings.model_copy(
            update={
                "api_token": None,
                "expect_models": ["m"],
                "home": settings.home.parent / "open-home",
            }
        )
    )
    plain = open_api.client.get("/v2/health/ready", headers={"Authorization": ""})
    assert plain.json() == {"ready": False, "waiting_for": ["m"]}


def test_a_model_that_failed_to_load_at_start_keeps_the_server_unready(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes
) -> None:
    first = make_api(settings)
    assert first.register("good", bn_onnx).status_code == 201
    assert first.register("bad", bn_onnx).status_code == 201
    first.close()

    broken = FakeRuntime()
    broken.fail.add(("bad", 1))  # e.g. CUDA required (fallback "fail") on a broken node
    api = make_api(settings, runtime=broken)
    assert broken.served == {"good": 1}  # start-up served the other model anyway
    assert _ready(api) == (400, {"ready": False, "waiting_for": ["bad"]})

    broken.fail.clear()  # the cause is fixed: moving production again loads it
    moved = api.client.put("/v1/models/bad/aliases/production", json={"version": 1})
    assert moved.status_code == 200, moved.text
    assert _ready(api) == (200, {"ready": True, "waiting_for": []})


def test_a_deleted_model_is_no_longer_waited_for(api: Api, bn_onnx: bytes) -> None:
    assert api.register("m", bn_onnx).status_code == 201
    api.runtime.served.pop("m")  # as if its load had failed
    assert _ready(api)[0] == 400
    assert api.client.delete("/v1/models/m").status_code == 204
    assert _ready(api) == (200, {"ready": True, "waiting_for": []})


@pytest.fixture
def inference(make_api: Callable[..., Api], settings: Settings) -> Api:
    return make_api(settings.model_copy(update={"role": "inference"}))


def test_inference_role_refuses_data_sets_and_jobs_and_keeps_nothing(
    inference: Api, bn_onnx: bytes, npz: Callable[..., bytes]
) -> None:
    assert inference.register("m", bn_onnx).status_code == 201
    before = inference.files()

    upload = inference.upload(npz())
    assert upload.status_code == 403
    message = upload.json()["error"]
    assert "RECALIB_ROLE=inference" in message and "POST /v1/datasets" in message
    assert "control replica" in message

    job = inference.client.post("/v1/models/m/recalibrations", json={"dataset": "ds-x"})
    assert job.status_code == 403
    assert "POST /v1/models/m/recalibrations" in job.json()["error"]

    assert inference.files() == before
    assert inference.client.get("/v1/datasets").json() == {"datasets": []}
    assert inference.client.get("/v1/models/m/recalibrations").json() == {"jobs": []}


def test_inference_role_takes_pushed_versions_and_alias_moves(
    inference: Api, bn_onnx: bytes
) -> None:
    assert inference.register("m", bn_onnx).status_code == 201
    pushed = inference.client.post(
        "/v1/models/m/versions",
        data={"version": "4", "alias": "production"},
        files={"file": ("model.onnx", bn_onnx)},
    )
    assert pushed.status_code == 201, pushed.text
    assert inference.runtime.served["m"] == 4
    back = inference.client.put("/v1/models/m/aliases/production", json={"version": 1})
    assert back.status_code == 200 and inference.runtime.served["m"] == 1


def test_role_requires_the_token_first(inference: Api, npz: Callable[..., bytes]) -> None:
    response = inference.client.post(
        "/v1/datasets", files={"file": ("d.npz", npz())}, headers={"Authorization": ""}
    )
    assert response.status_code == 401


def test_role_and_expected_models_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECALIB_ROLE", "inference")
    monkeypatch.setenv("RECALIB_EXPECT_MODELS", '["demo", "other"]')
    settings = Settings()
    assert settings.role == "inference" and settings.expect_models == ["demo", "other"]
    monkeypatch.setenv("RECALIB_ROLE", "worker")
    with pytest.raises(ValidationError, match="'all' or 'inference'"):
        Settings()
