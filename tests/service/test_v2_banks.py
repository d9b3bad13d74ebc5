"""Stat banks over the wire (issue 13): ``parameters.bank`` on REST (JSON) and gRPC
(``tritonclient.grpc``, ``InferParameter.string_param``) through the real app; the
response's ``bank`` / ``bank_distance`` / ``bank_fallback``; unknown bank 404, a
non-string 400; metadata. The banks are pushed with ``runtime.set_banks`` on the app's
runtime (the registry's own push is tested with the registry)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from bank_helpers import bank_ref, domain_images, domain_model, reference64, write_bank
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from runtime_helpers import export, make_model, runtime_settings
from tritonclient.utils import InferenceServerException

from service.app import create_app

TOKEN = "bank-token"
GRPC_AUTH = {"authorization": f"Bearer {TOKEN}"}
RTOL, ATOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str, Any]]:
    """The app with model ``m`` version 1 and banks ``a``, ``b``; yields ``(REST client,
    gRPC address, {domain: torch model with that bank})``."""
    root = tmp_path_factory.mktemp("v2-banks")
    path = export(make_model(0), root / "m.onnx")
    proto = onnx.load(path)
    models = {d: domain_model(d) for d in "ab"}
    refs = [bank_ref(d, write_bank(proto, models[d], root / f"{d}.st"), {1}) for d in "ab"]
    settings = runtime_settings(
        root / "home", api_token=TOKEN, grpc=True, grpc_port=0, warmup_batch_sizes=[1]
    )
    app = create_app(settings, metrics_registry=CollectorRegistry())
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app, headers=headers) as client:
        files = {"file": ("model.onnx", path.read_bytes())}
        assert client.post("/v1/models", data={"name": "m"}, files=files).status_code == 201
        assert client.get("/v2/models/m/ready").status_code == 200
        assert client.portal is not None
        client.portal.call(app.state.runtime.set_banks, "m", refs, None)
        yield client, f"127.0.0.1:{app.state.grpc_port}", models


def _body(x: np.ndarray, **parameters: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    return {"inputs": [{**tensor, "data": x.ravel().tolist()}], "parameters": parameters}


def test_rest_bank_parameter(served: tuple[TestClient, str, Any]) -> None:
    client, _, models = served
    x = domain_images(2, 3, "b")
    r = client.post("/v2/models/m/infer", json=_body(x, bank="b"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"]["bank"] == "b,b" and body["parameters"]["bank_fallback"] is False
    assert len(body["parameters"]["bank_distance"].split(",")) == 2
    out = np.array(body["outputs"][0]["data"]).reshape(body["outputs"][0]["shape"])
    np.testing.assert_allclose(out, reference64(models["b"], x), rtol=RTOL, atol=ATOL)
    one = client.post("/v2/models/m/infer", json=_body(x[:1], bank="auto")).json()
    assert one["parameters"]["bank"] == "b" and isinstance(
        one["parameters"]["bank_distance"], float
    )
    plain = client.post("/v2/models/m/infer", json=_body(x)).json()
    assert "parameters" not in plain
    missing = client.post("/v2/models/m/infer", json=_body(x, bank="zzz"))
    assert missing.status_code == 404
    assert "has no stat bank 'zzz' (its banks: a, b)" in missing.json()["error"]
    wrong = client.post("/v2/models/m/infer", json=_body(x, bank=["a"]))
    assert wrong.status_code == 400 and "got list ['a']" in wrong.json()["error"]
    meta = client.get("/v2/models/m").json()["parameters"]
    assert (meta["stat_banks"], meta["default_bank"]) == (2, "none")
    metrics = client.get("/metrics").text
    assert 'recalib_bank_requests_total{bank="b",model="m"} 2.0' in metrics


def test_grpc_bank_parameter(served: tuple[TestClient, str, Any]) -> None:
    _, address, models = served
    x = domain_images(1, 4, "a")
    item = grpcclient.InferInput("input", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(address) as triton:
        result = triton.infer("m", [item], headers=GRPC_AUTH, parameters={"bank": "a"})
        params = result.get_response().parameters
        assert params["bank"].string_param == "a" and not params["bank_fallback"].bool_param
        assert params["bank_distance"].double_param >= 0.0
        np.testing.assert_allclose(
            result.as_numpy("output"), reference64(models["a"], x), rtol=RTOL, atol=ATOL
        )
        routed = triton.infer("m", [item], headers=GRPC_AUTH, parameters={"bank": "auto"})
        assert routed.get_response().parameters["bank"].string_param == "a"
        with pytest.raises(InferenceServerException, match="has no stat bank 'zzz'") as unknown:
            triton.infer("m", [item], headers=GRPC_AUTH, parameters={"bank": "zzz"})
        assert unknown.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException, match="got int 7") as bad:
            triton.infer("m", [item], headers=GRPC_AUTH, parameters={"bank": 7})
        assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
