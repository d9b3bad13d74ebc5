"""Stat banks reach the runtime (issue 13): every change pushes the model's whole bank set
and default (``set_banks``), start-up pushes every model once, a failed push never fails
the call that committed; the default-bank routes and the reserved words ``auto``/``none``;
the control publishes banks to the model store and a store-fed replica pushes them."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from fastapi.testclient import TestClient
from runtime_helpers import shifted_images
from service_helpers import Api, FakeRuntime, bank_bytes, replica_settings, shifted_stats

from recalib.onnx.names import set_bn_node_stats
from service.model_store import ModelStore
from service.settings import Settings


def _put(api: Api, bank: str, data: bytes, model: str = "m") -> Any:
    return api.client.put(
        f"/v1/models/{model}/banks/{bank}", files={"file": ("b.safetensors", data)}
    )


def _recalibrated(bn_onnx: bytes, by: float) -> bytes:
    """``bn_onnx`` with other statistics (same weights): a recalibrated version."""
    model = onnx.load_from_string(bn_onnx)
    set_bn_node_stats(model, shifted_stats(model, by))
    out: bytes = model.SerializeToString()
    return out


def _default(api: Api, bank: str, model: str = "m") -> Any:
    return api.client.put(f"/v1/models/{model}/default-bank", json={"bank": bank})


@pytest.fixture
def bank(bn_onnx: bytes, tmp_path: Path) -> bytes:
    """A bank file of ``bn_onnx``'s weights."""
    return bank_bytes(onnx.load_from_string(bn_onnx), tmp_path)


def test_every_change_pushes_the_whole_bank_set(
    api: Api, runtime: FakeRuntime, bn_onnx: bytes, bank: bytes
) -> None:
    assert api.register("m", bn_onnx).status_code == 201
    assert runtime.bank_calls[-1] == ("m", (), None)  # registered: no banks yet
    assert _put(api, "site_b", bank).status_code == 201
    (ref,), default = runtime.banks["m"]
    assert (ref.name, ref.versions, default) == ("site_b", frozenset({1}), None)
    assert ref.path.read_bytes() == bank and ref.sha256 == hashlib.sha256(bank).hexdigest()
    # a version with the same weights: the bank is valid for it too
    files = {"file": ("m.onnx", _recalibrated(bn_onnx, 0.3))}
    assert api.client.post("/v1/models/m/versions", files=files).status_code == 201
    assert runtime.bank_names("m") == {"site_b": [1, 2]}
    assert _default(api, "site_b").status_code == 200
    assert runtime.banks["m"][1] == "site_b"
    assert _default(api, "auto").status_code == 200
    assert runtime.banks["m"][1] == "auto"
    assert api.client.delete("/v1/models/m/banks/site_b").status_code == 204
    assert runtime.banks["m"] == ((), "auto")
    assert api.client.delete("/v1/models/m/default-bank").status_code == 204
    assert runtime.banks["m"][1] is None
    assert _put(api, "again", bank).status_code == 201
    calls = len(runtime.bank_calls)
    assert api.client.delete("/v1/models/m").status_code == 204
    assert runtime.bank_calls[calls:] == [("m", (), None)]  # deleted: its banks are gone
    assert api.app.state.banks._locks == {}  # no lock kept per model ever pushed


def test_start_up_pushes_every_model_once(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes, bank: bytes
) -> None:
    first = make_api(settings)
    for name in ("a", "b"):
        assert first.register(name, bn_onnx).status_code == 201
    assert _put(first, "site_b", bank, model="a").status_code == 201
    assert _default(first, "site_b", model="a").status_code == 200
    first.close()
    runtime = FakeRuntime()
    make_api(settings, runtime=runtime)  # returns once the app reports ready
    assert [(n, [r.name for r in refs], d) for n, refs, d in runtime.bank_calls] == [
        ("a", ["site_b"], "site_b"),
        ("b", [], None),
    ]
    assert runtime.served == {"a": 1, "b": 1}


def test_a_failed_push_does_not_fail_the_call_that_committed(
    api: Api,
    runtime: FakeRuntime,
    bn_onnx: bytes,
    bank: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert api.register("m", bn_onnx).status_code == 201
    runtime.fail_banks = True
    with caplog.at_level(logging.ERROR, logger="service.banks"):
        assert _put(api, "site_b", bank).status_code == 201
        assert _default(api, "site_b").status_code == 200
        assert api.client.delete("/v1/models/m/default-bank").status_code == 204
        assert api.client.delete("/v1/models/m/banks/site_b").status_code == 204
    pushes = [r for r in caplog.records if "could not push its stat banks" in r.getMessage()]
    assert len(pushes) == 4
    runtime.fail_banks = False
    assert _put(api, "site_c", bank).status_code == 201  # the next change pushes again
    assert runtime.bank_names("m") == {"site_c": [1]}


def test_the_default_bank_routes(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes, bank: bytes
) -> None:
    api = make_api(settings)
    assert api.register("m", bn_onnx).status_code == 201
    assert _put(api, "site_b", bank).status_code == 201
    listed = api.client.get("/v1/models/m/banks").json()
    assert listed["default"] is None and [b["name"] for b in listed["banks"]] == ["site_b"]
    for word in ("site_b", "auto", "none"):
        r = _default(api, word)
        assert r.status_code == 200 and r.json() == {"bank": word}
        assert api.client.get("/v1/models/m/banks").json()["default"] == word
    missing = _default(api, "site_x")
    assert missing.status_code == 404 and "no stat bank 'site_x'" in missing.json()["error"]
    assert _default(api, "site_b", model="nope").status_code == 404
    for bad in ("42", "bad name!", "Auto"):
        r = _default(api, bad)
        assert r.status_code == 400 and "\n" not in r.json()["error"], (bad, r.text)
    for body in ({}, {"bank": 7}, {"name": "site_b"}):
        r = api.client.put("/v1/models/m/default-bank", json=body)
        assert r.status_code == 422, (body, r.text)
    assert api.client.get("/v1/models/m/banks").json()["default"] == "none"  # unchanged
    # the default's bank cannot go
    assert _default(api, "site_b").status_code == 200
    refused = api.client.delete("/v1/models/m/banks/site_b")
    assert refused.status_code == 409 and "default bank" in refused.json()["error"]
    assert api.client.delete("/v1/models/m/default-bank").status_code == 204
    assert api.client.delete("/v1/models/m/default-bank").status_code == 204  # none to clear
    assert api.client.get("/v1/models/m/banks").json()["default"] is None
    assert api.client.delete("/v1/models/m/banks/site_b").status_code == 204
    assert api.client.delete("/v1/models/nope/default-bank").status_code == 404
    # durable: a restart keeps it
    assert _put(api, "kept", bank).status_code == 201 and _default(api, "kept").status_code == 200
    api.close()
    again = make_api(settings)
    assert again.client.get("/v1/models/m/banks").json()["default"] == "kept"
    # the token, as every /v1 route
    anonymous = TestClient(again.app)
    assert anonymous.put("/v1/models/m/default-bank", json={"bank": "auto"}).status_code == 401
    assert anonymous.delete("/v1/models/m/default-bank").status_code == 401
    again.close()
    inference = make_api(settings.model_copy(update={"role": "inference"}))
    assert _default(inference, "auto").status_code == 403
    assert inference.client.delete("/v1/models/m/default-bank").status_code == 403


def test_reserved_words_are_not_bank_names(
    api: Api, bn_onnx: bytes, bank: bytes, npz: Callable[..., bytes]
) -> None:
    assert api.register("m", bn_onnx).status_code == 201
    for word in ("auto", "none", "NONE"):
        r = _put(api, word, bank)
        assert r.status_code == 400, r.text
        message = r.json()["error"]
        assert "'auto' and 'none'" in message and "\n" not in message
    dataset = api.upload(npz(x=shifted_images(8, seed=1))).json()["id"]
    job = api.client.post(
        "/v1/models/m/recalibrations", json={"dataset": dataset, "output": {"bank": "auto"}}
    )
    assert job.status_code == 400 and "'auto' and 'none'" in job.json()["error"]
    for label in ("other", "Other"):  # the metrics' overflow label
        r = _put(api, label, bank)
        assert r.status_code == 400 and "RECALIB_BANK_METRIC_LIMIT" in r.json()["error"]
    assert api.client.get("/v1/models/m/banks").json()["banks"] == []


def _until(what: str, check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_the_control_publishes_banks_and_a_replica_pushes_them(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes, bank: bytes, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    control = make_api(settings.model_copy(update={"model_store": store}))
    assert control.register("m", bn_onnx).status_code == 201
    assert _put(control, "site_b", bank).status_code == 201
    assert _default(control, "site_b").status_code == 200
    model = ModelStore(store).read("m")
    assert model is not None and model.default_bank == "site_b"
    ((ref,),) = (model.banks,)
    assert (ref.name, ref.versions) == ("site_b", frozenset({1}))
    assert ref.path.read_bytes() == bank and ref.path.is_relative_to(store / "m")

    replica_runtime = FakeRuntime()
    make_api(
        replica_settings(settings, store, tmp_path / "replica", store_poll_seconds=0.05),
        runtime=replica_runtime,
    )
    # the first pass, before the replica reports ready: the store's copies
    (pushed,), default = replica_runtime.banks["m"]
    assert (pushed.name, pushed.path, default) == ("site_b", ref.path, "site_b")

    # a version with the same weights: the bank's valid versions follow, in the store too
    files = {"file": ("m.onnx", _recalibrated(bn_onnx, 0.3))}
    assert control.client.post("/v1/models/m/versions", files=files).status_code == 201
    _until("the new valid versions", lambda: replica_runtime.bank_names("m") == {"site_b": [1, 2]})
    assert _put(control, "site_c", bank).status_code == 201
    _until("site_c", lambda: "site_c" in replica_runtime.bank_names("m"))
    pushes = len(replica_runtime.bank_calls)
    time.sleep(0.2)  # polls that find nothing new push nothing
    assert len(replica_runtime.bank_calls) == pushes

    assert control.client.delete("/v1/models/m/default-bank").status_code == 204
    assert control.client.delete("/v1/models/m/banks/site_b").status_code == 204
    _until("site_b gone", lambda: replica_runtime.bank_names("m") == {"site_c": [1, 2]})
    assert replica_runtime.banks["m"][1] is None
    assert not ref.path.exists()  # removed from the store after recalib.json dropped it
    assert control.client.delete("/v1/models/m").status_code == 204
    _until("the model gone", lambda: replica_runtime.banks["m"] == ((), None))
    assert list(store.iterdir()) == []


def test_start_up_reconciles_the_stores_banks(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes, bank: bytes, tmp_path: Path
) -> None:
    first = make_api(settings)  # no store yet
    assert first.register("m", bn_onnx).status_code == 201
    assert _put(first, "site_b", bank).status_code == 201
    first.close()
    store = tmp_path / "store"
    make_api(settings.model_copy(update={"model_store": store}))
    model = ModelStore(store).read("m")
    assert model is not None and [b.name for b in model.banks] == ["site_b"]


def test_a_bank_put_on_the_control_serves_requests_on_a_store_fed_replica(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes, bank: bytes, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    control = make_api(settings.model_copy(update={"model_store": store}))
    assert control.register("m", bn_onnx).status_code == 201
    replica = make_api(
        replica_settings(
            settings,
            store,
            tmp_path / "replica",
            store_poll_seconds=0.05,
            execution_provider="cpu",
            intra_op_threads=1,
            warmup_batch_sizes=[1],
        ),
        runtime=None,  # the real serving runtime
    )
    x = shifted_images(1, seed=3)
    body = {
        "parameters": {"bank": "site_b"},
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ],
    }
    missing = replica.client.post("/v2/models/m/infer", json=body)
    assert missing.status_code == 404, missing.text  # no such bank yet
    assert _put(control, "site_b", bank).status_code == 201

    def answered() -> bool:
        return replica.client.post("/v2/models/m/infer", json=body).status_code == 200

    _until("the replica serving site_b", answered)
    served = replica.client.post("/v2/models/m/infer", json=body).json()
    assert served["parameters"]["bank"] == "site_b"
    plain = replica.client.post("/v2/models/m/infer", json=body | {"parameters": {}}).json()
    assert plain["outputs"][0]["data"] != served["outputs"][0]["data"]  # other statistics
