"""/v1/models over HTTP (fake runtime): register, read, download, aliases, delete, drift,
and bad inputs that must change nothing."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest


def test_register_onnx_creates_version_1_in_production(api: Any, bn_onnx: bytes) -> None:
    r = api.register("tiny", bn_onnx, metadata=json.dumps({"team": "vision"}))
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["name"] == "tiny" and model["source_format"] == "onnx"
    assert model["metadata"] == {"team": "vision"}
    assert model["aliases"] == {"production": 1}
    assert (model["versions"], model["latest_version"]) == (1, 1)
    assert api.runtime.served == {"tiny": 1}
    assert api.client.get("/v1/models/tiny").json() == model
    assert api.client.get("/v1/models").json() == {"models": [model]}


def test_version_lineage_and_artifacts(api: Any, bn_onnx: bytes) -> None:
    api.register("tiny", bn_onnx)
    version = api.client.get("/v1/models/tiny/versions/production").json()
    assert version["version"] == 1 and version["parent_version"] is None
    assert version["aliases"] == ["production"]
    assert version["report"] == {"kind": "registration", "source_format": "onnx", "bn_layers": 2}
    assert version["signature"]["inputs"] == [
        {"name": "input", "dtype": "float32", "shape": ["batch", 3, 8, 8]}
    ]
    assert set(version["artifacts"]) == {"onnx", "report"}
    assert version["artifacts"]["onnx"]["sha256"] == hashlib.sha256(bn_onnx).hexdigest()
    assert api.client.get("/v1/models/tiny/versions").json() == {"versions": [version]}

    onnx_file = api.client.get("/v1/models/tiny/versions/1/artifact", params={"format": "onnx"})
    assert onnx_file.status_code == 200 and onnx_file.content == bn_onnx
    assert 'filename="tiny-v1.onnx"' in onnx_file.headers["content-disposition"]
    report = api.client.get("/v1/models/tiny/versions/1/artifact?format=report").json()
    assert report["bn_layers"] == ["bn1", "bn2"]

    missing = api.client.get("/v1/models/tiny/versions/1/artifact?format=pt2")
    assert missing.status_code == 404 and "no pt2 artifact" in missing.json()["error"]
    bad = api.client.get("/v1/models/tiny/versions/1/artifact?format=exe")
    assert bad.status_code == 422 and "error" in bad.json()


def test_aliases_put_get_list_delete(api: Any, bn_onnx: bytes) -> None:
    api.register("tiny", bn_onnx)
    r = api.client.put("/v1/models/tiny/aliases/staging", json={"version": 1})
    assert r.status_code == 200 and r.json()["version"] == 1
    assert api.client.get("/v1/models/tiny/aliases/staging").json()["alias"] == "staging"
    listed = api.client.get("/v1/models/tiny/aliases").json()["aliases"]
    assert [a["alias"] for a in listed] == ["production", "staging"]
    assert api.client.get("/v1/models/tiny/versions/staging").json()["version"] == 1
    assert api.runtime.calls == [("serve", "tiny", 1)]  # only production loads
    assert api.client.delete("/v1/models/tiny/aliases/staging").status_code == 204
    assert api.client.get("/v1/models/tiny/aliases/staging").status_code == 404


def test_production_cannot_be_deleted(api: Any, bn_onnx: bytes) -> None:
    api.register("tiny", bn_onnx)
    r = api.client.delete("/v1/models/tiny/aliases/production")
    assert r.status_code == 409 and "production" in r.json()["error"]
    assert api.client.get("/v1/models/tiny").json()["aliases"] == {"production": 1}


def test_production_switch_that_fails_to_load_changes_nothing(api: Any, bn_onnx: bytes) -> None:
    api.register("tiny", bn_onnx)
    api.runtime.fail.add(("tiny", 1))
    r = api.client.put("/v1/models/tiny/aliases/production", json={"version": 1})
    assert r.status_code == 400 and "could not load" in r.json()["error"]
    alias = api.client.get("/v1/models/tiny/aliases/production").json()
    assert alias["version"] == 1
    r = api.client.put("/v1/models/tiny/aliases/production", json={"version": 7})
    assert r.status_code == 404 and "no version 7" in r.json()["error"]


def test_delete_model_unloads_and_removes_files(api: Any, bn_onnx: bytes) -> None:
    api.register("tiny", bn_onnx)
    assert api.client.delete("/v1/models/tiny").status_code == 204
    assert ("unload", "tiny") in api.runtime.calls
    assert api.client.get("/v1/models/tiny").status_code == 404
    assert api.files() == []
    assert api.register("tiny", bn_onnx).status_code == 201  # the name is free again


def test_drift_delegates_to_the_runtime(api: Any, bn_onnx: bytes) -> None:
    api.register("tiny", bn_onnx)
    drift = api.client.get("/v1/models/tiny/drift").json()
    assert drift == {"model": "tiny", "version": 1, "score": 0.5, "exceeded": False}
    assert api.client.post("/v1/models/tiny/drift/reset").status_code == 204
    assert ("reset_drift", "tiny") in api.runtime.calls


def test_duplicate_name_conflicts(api: Any, bn_onnx: bytes) -> None:
    api.register("tiny", bn_onnx)
    r = api.register("tiny", bn_onnx)
    assert r.status_code == 409 and "exists already" in r.json()["error"]
    assert api.client.get("/v1/models/tiny").json()["versions"] == 1


@pytest.mark.parametrize(
    ("name", "filename", "payload", "form", "message"),
    [
        ("m", "m.onnx", b"\x08\x07not a protobuf at all", {}, "valid ONNX model"),
        ("m", "m.onnx", "NO_BN", {}, "BatchNormalization"),
        ("m", "m.pt2", b"PK\x03\x04 truncated zip", {}, "torch.export.load"),
        ("m", "m.pkl", b"whatever", {}, "ending in .onnx, .pt2"),
        ("../evil", "m.onnx", "BN", {}, "model name"),
        ("a/b", "m.onnx", "BN", {}, "model name"),
        (".hidden", "m.onnx", "BN", {}, "model name"),
        ("m", "m.onnx", "BN", {"metadata": "[1, 2]"}, "JSON object"),
        ("m", "m.onnx", "BN", {"metadata": "{oops"}, "invalid JSON"),
    ],
)
def test_bad_registration_is_400_and_changes_nothing(
    api: Any,
    bn_onnx: bytes,
    no_bn_onnx: bytes,
    name: str,
    filename: str,
    payload: Any,
    form: dict[str, str],
    message: str,
) -> None:
    data = {"BN": bn_onnx, "NO_BN": no_bn_onnx}.get(payload, payload)
    r = api.register(name, data, filename, **form)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert api.client.get("/v1/models").json() == {"models": []}
    assert api.files() == []
    assert api.runtime.calls == []


def test_registration_that_fails_to_serve_is_rolled_back(api: Any, bn_onnx: bytes) -> None:
    api.runtime.fail.add(("tiny", 1))
    r = api.register("tiny", bn_onnx)
    assert r.status_code == 400 and "could not load" in r.json()["error"]
    assert api.client.get("/v1/models").json() == {"models": []}
    assert api.files() == []


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/v1/models/nope"),
        ("DELETE", "/v1/models/nope"),
        ("GET", "/v1/models/nope/versions"),
        ("GET", "/v1/models/nope/versions/1"),
        ("GET", "/v1/models/nope/versions/1/artifact"),
        ("GET", "/v1/models/nope/aliases/production"),
        ("GET", "/v1/models/nope/drift"),
        ("POST", "/v1/models/nope/drift/reset"),
        ("GET", "/v1/models/tiny/versions/2"),
        ("GET", "/v1/models/tiny/versions/canary"),
        ("GET", "/v1/models/tiny/aliases/canary"),
        ("DELETE", "/v1/models/tiny/aliases/canary"),
    ],
)
def test_unknown_model_version_alias_404(api: Any, bn_onnx: bytes, method: str, url: str) -> None:
    api.register("tiny", bn_onnx)
    r = api.client.request(method, url)
    assert r.status_code == 404 and "error" in r.json()


def test_malformed_alias_400(api: Any, bn_onnx: bytes) -> None:
    api.register("tiny", bn_onnx)
    r = api.client.put("/v1/models/tiny/aliases/-x", json={"version": 1})
    assert r.status_code == 400 and "alias" in r.json()["error"]
    r = api.client.put("/v1/models/tiny/aliases/canary", json={"version": 0})
    assert r.status_code == 422 and "version" in r.json()["error"]


@pytest.mark.parametrize(
    ("method", "url", "body", "status"),
    [
        ("GET", "/v1/models/tiny/versions/99999999999999999999999", None, 404),
        ("GET", "/v1/models/tiny/versions/99999999999999999999999/artifact", None, 404),
        ("GET", "/v1/models/tiny/versions/%C2%B2", None, 400),
        ("PUT", "/v1/models/tiny/aliases/production", {"version": 2**63}, 422),
        ("PUT", "/v1/models/tiny/aliases/canary", {"version": 2**70}, 422),
        ("PUT", "/v1/models/tiny/aliases/2", {"version": 1}, 400),
        ("GET", "/v2/models/tiny/versions/99999999999999999999999", None, 404),
        ("POST", "/v2/models/tiny/versions/99999999999999999999999/infer", {"inputs": []}, 404),
    ],
)
def test_out_of_range_and_numeric_refs_are_client_errors(
    api: Any, bn_onnx: bytes, method: str, url: str, body: Any, status: int
) -> None:
    api.register("tiny", bn_onnx)
    r = api.client.request(method, url, json=body)
    assert r.status_code == status, r.text
    assert "error" in r.json()
    assert api.client.get("/v1/models/tiny").json()["aliases"] == {"production": 1}
