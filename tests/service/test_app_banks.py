"""Stat banks in the registry (issue 13): ``PUT/GET/DELETE /v1/models/{name}/banks/...``,
their checks (format, weights digest, layers, values), ``valid_versions`` across versions
with the same weights, the inference role, model deletion, the schema migration, and a
recalibration job whose output is a bank."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from runtime_helpers import export, make_model, shifted_images
from safetensors.numpy import load, save_file
from service_helpers import Api, FakeRuntime, bank_bytes, replica_settings, shifted_stats

from recalib.onnx.bank_files import (
    ROUTE_LIMIT_KEY,
    ROUTE_LIMIT_QUANTILE_KEY,
    WEIGHTS_DIGEST_KEY,
    read_bank_file,
    save_onnx_bank,
    weights_digest,
)
from recalib.onnx.bank_routing import DEFAULT_QUANTILE, bank_route_limit
from recalib.onnx.names import bn_node_stats, read_bn_map, set_bn_node_stats
from recalib.statbank import save_stat_bank
from service.settings import Settings


def _put(
    api: Api, bank: str, data: bytes, model: str = "m", filename: str = "b.safetensors"
) -> Any:
    return api.client.put(f"/v1/models/m/banks/{bank}", files={"file": (filename, data)})


def _put_own(api: Api, bank: str, bn_onnx: bytes, tmp_path: Path) -> int:
    """PUT a bank of ``bn_onnx``'s own weights; its status."""
    status: int = _put(api, bank, bank_bytes(onnx.load_from_string(bn_onnx), tmp_path)).status_code
    return status


def _recalibrated(bn_onnx: bytes, by: float) -> bytes:
    """``bn_onnx`` with other statistics (same weights): a recalibrated version."""
    model = onnx.load_from_string(bn_onnx)
    set_bn_node_stats(model, shifted_stats(model, by))
    out: bytes = model.SerializeToString()
    return out


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The tiny model with other weights (another seed): same layers, another digest."""
    return export(make_model(1), tmp_path_factory.mktemp("other") / "o.onnx").read_bytes()


def test_upload_list_get_download_delete(api: Api, bn_onnx: bytes, tmp_path: Path) -> None:
    assert api.register("m", bn_onnx).status_code == 201
    model = onnx.load_from_string(bn_onnx)
    data = bank_bytes(model, tmp_path)
    r = _put(api, "site_b", data)
    assert r.status_code == 201, r.text
    info = r.json()
    assert r.headers["location"] == "/v1/models/m/banks/site_b"
    assert info["name"] == "site_b" and info["model"] == "m"
    assert info["layers"] == 2 and info["size_bytes"] == len(data)
    assert info["weights_digest"] == weights_digest(model)
    assert info["valid_versions"] == [1]
    assert info["source"]["kind"] == "upload" and info["source"]["metadata"] == {"name": "b"}
    assert api.client.get("/v1/models/m/banks").json() == {"banks": [info], "default": None}
    assert api.client.get("/v1/models/m/banks/site_b").json() == info
    file = api.client.get("/v1/models/m/banks/site_b/file")
    assert file.status_code == 200 and file.content == data
    # immutable: the name is taken, whatever the file
    again = _put(api, "site_b", data)
    assert again.status_code == 409 and "immutable" in again.json()["error"]
    assert api.client.delete("/v1/models/m/banks/site_b").status_code == 204
    assert api.client.get("/v1/models/m/banks").json() == {"banks": [], "default": None}
    missing = api.client.get("/v1/models/m/banks/site_b")
    assert missing.status_code == 404 and "no stat bank" in missing.json()["error"]
    assert api.client.delete("/v1/models/m/banks/site_b").status_code == 404
    assert not any("banks/" in f for f in api.files())
    assert _put(api, "site_b", data).status_code == 201  # a deleted name can be used again


def test_bad_bank_files_are_refused_with_one_line(api: Api, bn_onnx: bytes, tmp_path: Path) -> None:
    assert api.register("m", bn_onnx).status_code == 201
    model = onnx.load_from_string(bn_onnx)
    before = api.files()

    def error(data: bytes, *, bank: str = "b", filename: str = "b.safetensors") -> str:
        r = _put(api, bank, data, filename=filename)
        assert r.status_code == 400, r.text
        message: str = r.json()["error"]
        assert "\n" not in message
        return message

    assert "expected a recalib stat bank" in error(b"junk")
    assert ".safetensors" in error(b"junk", filename="b.npz")
    assert "not a number" in error(bank_bytes(model, tmp_path), bank="42")
    # no digest: the file does not say which weights it is for
    save_stat_bank(make_model(0), tmp_path / "u.safetensors")
    assert "save_onnx_bank" in error((tmp_path / "u.safetensors").read_bytes())
    # another network's layers
    meta = {
        "format": "recalib.statbank/1",
        "signature": "x",
        "layers": json.dumps(["head.bn"]),
        "metadata": json.dumps({WEIGHTS_DIGEST_KEY: weights_digest(model)}),
    }
    one = np.ones(4, dtype=np.float32)
    save_file({"head.bn.running_mean": one, "head.bn.running_var": one}, tmp_path / "o", meta)
    message = error((tmp_path / "o").read_bytes())
    assert "missing ['bn1', 'bn2']" in message and "unexpected ['head.bn']" in message
    # non-finite statistics
    meta["layers"] = json.dumps(["bn1", "bn2"])
    arrays = {
        "bn1.running_mean": np.full(6, np.nan, dtype=np.float32),
        "bn1.running_var": np.ones(6, dtype=np.float32),
        "bn2.running_mean": np.zeros(8, dtype=np.float32),
        "bn2.running_var": np.ones(8, dtype=np.float32),
    }
    save_file(arrays, tmp_path / "n", meta)
    assert "finite" in error((tmp_path / "n").read_bytes())
    arrays["bn1.running_mean"] = np.zeros(6, dtype=np.float32)
    arrays["bn2.running_var"] = -np.ones(8, dtype=np.float32)
    save_file(arrays, tmp_path / "v", meta)
    assert "var >= 0" in error((tmp_path / "v").read_bytes())
    assert api.files() == before and api.client.get("/v1/models/m/banks").json()["banks"] == []


def test_an_uploaded_bank_may_carry_a_route_limit(api: Api, bn_onnx: bytes, tmp_path: Path) -> None:
    assert api.register("m", bn_onnx).status_code == 201
    model = onnx.load_from_string(bn_onnx)
    path = tmp_path / "r.safetensors"
    save_onnx_bank(model, shifted_stats(model, 0.5), path, metadata={ROUTE_LIMIT_KEY: 0.3})
    r = _put(api, "limited", path.read_bytes())
    assert r.status_code == 201, r.text
    assert r.json()["source"]["metadata"][ROUTE_LIMIT_KEY] == 0.3
    save_onnx_bank(model, shifted_stats(model, 0.5), path, metadata={ROUTE_LIMIT_KEY: "far"})
    refused = _put(api, "bad", path.read_bytes())
    assert refused.status_code == 400 and "'route_limit' to be a number >= 0" in refused.text


def test_a_bank_of_other_weights_is_incompatible(
    api: Api, bn_onnx: bytes, other_weights: bytes, tmp_path: Path
) -> None:
    assert api.register("m", bn_onnx).status_code == 201
    r = _put(api, "b", bank_bytes(onnx.load_from_string(other_weights), tmp_path))
    assert r.status_code == 422, r.text
    assert "statistics of other weights" in r.json()["error"]


def test_valid_versions_follow_the_weights(
    api: Api, bn_onnx: bytes, other_weights: bytes, tmp_path: Path
) -> None:
    assert api.register("m", bn_onnx).status_code == 201
    for data in (_recalibrated(bn_onnx, 0.3), other_weights, _recalibrated(bn_onnx, 0.7)):
        pushed = api.client.post("/v1/models/m/versions", files={"file": ("m.onnx", data)})
        assert pushed.status_code == 201, pushed.text
    versions = api.client.get("/v1/models/m/versions").json()["versions"]
    digests = [v["weights_digest"] for v in versions]
    assert digests[0] == digests[1] == digests[3] != digests[2]
    # computed on version 2 (recalibrated from 1): valid for 1, 2 and 4, not 3
    bank = bank_bytes(onnx.load_from_string(_recalibrated(bn_onnx, 0.3)), tmp_path)
    assert _put(api, "site_b", bank).json()["valid_versions"] == [1, 2, 4]
    other = bank_bytes(onnx.load_from_string(other_weights), tmp_path)
    assert _put(api, "alien", other).json()["valid_versions"] == [3]
    # versions from before schema 3 get their digest on first use
    db = api.app.state.db
    db.execute("UPDATE versions SET weights_digest = NULL, bn_layers = NULL")
    listed = api.client.get("/v1/models/m/banks").json()["banks"]
    assert [(b["name"], b["valid_versions"]) for b in listed] == [
        ("alien", [3]),
        ("site_b", [1, 2, 4]),
    ]
    assert db.query_one("SELECT COUNT(*) AS n FROM versions WHERE weights_digest IS NULL")["n"] == 0


def test_inference_role_refuses_bank_writes(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes, tmp_path: Path
) -> None:
    control = make_api(settings)
    assert control.register("m", bn_onnx).status_code == 201
    data = bank_bytes(onnx.load_from_string(bn_onnx), tmp_path)
    assert _put(control, "kept", data).status_code == 201
    control.close()
    inference = make_api(settings.model_copy(update={"role": "inference"}))
    r = _put(inference, "b", data)
    assert r.status_code == 403 and "RECALIB_ROLE=inference" in r.json()["error"]
    assert inference.client.delete("/v1/models/m/banks/kept").status_code == 403
    assert [b["name"] for b in inference.client.get("/v1/models/m/banks").json()["banks"]] == [
        "kept"
    ]


def test_deleting_the_model_deletes_its_banks(api: Api, bn_onnx: bytes, tmp_path: Path) -> None:
    assert api.register("m", bn_onnx).status_code == 201
    assert _put(api, "b", bank_bytes(onnx.load_from_string(bn_onnx), tmp_path)).status_code == 201
    assert api.client.delete("/v1/models/m").status_code == 204
    assert api.files() == [] or not any("banks" in f for f in api.files())
    assert api.app.state.db.query("SELECT * FROM banks") == []
    assert api.client.get("/v1/models/m/banks").status_code == 404
    assert api.register("m", bn_onnx).status_code == 201
    assert api.client.get("/v1/models/m/banks").json() == {"banks": [], "default": None}


def test_sweep_removes_uncommitted_bank_files(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes, tmp_path: Path
) -> None:
    api = make_api(settings)
    assert api.register("m", bn_onnx).status_code == 201
    assert (
        _put(api, "kept", bank_bytes(onnx.load_from_string(bn_onnx), tmp_path)).status_code == 201
    )
    model_id = api.client.get("/v1/models/m").json()["id"]
    folder = settings.home / "artifacts" / model_id / "banks"
    (folder / "crashed.safetensors").write_bytes(b"half")
    api.close()
    again = make_api(settings)
    assert sorted(p.name for p in folder.iterdir()) == ["kept.safetensors"]
    assert again.client.get("/v1/models/m/banks/kept").status_code == 200


def test_a_schema_2_database_is_migrated(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes
) -> None:
    api = make_api(settings)
    assert api.register("m", bn_onnx).status_code == 201
    api.close()
    conn = sqlite3.connect(settings.home / "recalib.db")
    conn.execute("DROP TABLE banks")
    for table, column in (("versions", "weights_digest"), ("versions", "bn_layers")):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    conn.execute("ALTER TABLE jobs DROP COLUMN result_bank")
    conn.execute("ALTER TABLE models DROP COLUMN default_bank")
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    conn.close()
    again = make_api(settings)
    assert again.client.get("/v1/models/m/banks").json() == {"banks": [], "default": None}
    version = again.client.get("/v1/models/m/versions/1").json()
    assert version["weights_digest"] is None  # filled in when a bank needs it
    assert again.app.state.db.query_one("PRAGMA user_version")[0] == 5


def test_a_schema_4_database_computes_its_weights_digests_again(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes, tmp_path: Path
) -> None:
    """Schema 4's digests could skip weights held in Constant nodes: 5 recomputes them."""
    api = make_api(settings)
    assert api.register("m", bn_onnx).status_code == 201
    digest = api.client.get("/v1/models/m/versions/1").json()["weights_digest"]
    assert digest is not None
    api.close()
    conn = sqlite3.connect(settings.home / "recalib.db")
    conn.execute("UPDATE versions SET weights_digest = 'stale'")
    conn.execute("PRAGMA user_version=4")
    conn.commit()
    conn.close()
    again = make_api(settings)
    assert again.client.get("/v1/models/m/versions/1").json()["weights_digest"] is None
    bank = bank_bytes(onnx.load_from_string(bn_onnx), tmp_path)  # its check computes them
    assert _put(again, "site", bank).status_code == 201
    assert again.client.get("/v1/models/m/versions/1").json()["weights_digest"] == digest
    assert again.app.state.db.query_one("PRAGMA user_version")[0] == 5


def test_job_requests_for_banks_are_checked(
    api: Api, bn_onnx: bytes, npz: Callable[..., bytes], tmp_path: Path
) -> None:
    assert api.register("m", bn_onnx).status_code == 201
    ds = api.upload(npz(x=shifted_images(8, seed=1))).json()["id"]
    url = "/v1/models/m/recalibrations"
    both = api.client.post(url, json={"dataset": ds, "promote": True, "output": {"bank": "b"}})
    assert both.status_code == 422 and "promote" in both.json()["error"]
    assert api.client.post(url, json={"dataset": ds, "output": {"bank": "7"}}).status_code == 422
    assert (
        _put(api, "taken", bank_bytes(onnx.load_from_string(bn_onnx), tmp_path)).status_code == 201
    )
    taken = api.client.post(url, json={"dataset": ds, "output": {"bank": "taken"}})
    assert taken.status_code == 409 and "immutable" in taken.json()["error"]
    assert api.client.get(url).json()["jobs"] == []


@pytest.mark.slow
def test_recalibration_jobs_make_versions_and_banks(
    make_api: Callable[..., Api],
    settings: Settings,
    runtime: FakeRuntime,
    bn_onnx: bytes,
    npz: Callable[..., bytes],
    tmp_path: Path,
) -> None:
    api = make_api(settings)
    assert api.register("m", bn_onnx).status_code == 201
    ds = api.upload(npz(x=shifted_images(128, seed=1))).json()["id"]
    url = "/v1/models/m/recalibrations"
    version_job = api.client.post(url, json={"dataset": ds, "plan": "full"}).json()
    assert version_job["output"] is None
    done = api.wait(version_job["id"])
    assert done["state"] == "succeeded" and done["result_version"] == 2, done["error"]
    body = {"dataset": ds, "plan": "full", "base_version": 2, "output": {"bank": "site_b"}}
    bank_job = api.client.post(url, json=body).json()
    assert bank_job["output"] == {"bank": "site_b"}
    done = api.wait(bank_job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert (done["result_bank"], done["result_version"]) == ("site_b", None)
    assert api.client.get("/v1/models/m").json()["latest_version"] == 2  # no new version
    bank = api.client.get("/v1/models/m/banks/site_b").json()
    assert bank["valid_versions"] == [1, 2]
    assert runtime.bank_names("m") == {"site_b": [1, 2]}  # pushed before it succeeded
    assert bank["source"]["kind"] == "recalibration"
    assert (bank["source"]["job"], bank["source"]["base_version"]) == (bank_job["id"], 2)
    # the bank holds the recalibrated statistics: on the same data as version 2, so those
    tensors = load(api.client.get("/v1/models/m/banks/site_b/file").content)
    v2 = onnx.load_from_string(api.client.get("/v1/models/m/versions/2/artifact").content)
    infos = read_bn_map(v2)
    for key, (mean, var) in bn_node_stats(v2).items():
        layer = infos[key].layer
        np.testing.assert_allclose(tensors[f"{layer}.running_mean"], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(tensors[f"{layer}.running_var"], var, rtol=1e-4, atol=1e-5)
    # ... and its route limit: the 99th percentile of the job's rows' distance to it
    (tmp_path / "b.safetensors").write_bytes(
        api.client.get("/v1/models/m/banks/site_b/file").content
    )
    stored = read_bank_file(tmp_path / "b.safetensors")
    assert stored.metadata[ROUTE_LIMIT_QUANTILE_KEY] == DEFAULT_QUANTILE
    expected = bank_route_limit(v2, stored.stats, shifted_images(128, seed=1))
    assert stored.route_limit == pytest.approx(expected, rel=1e-5)
    assert 0 < stored.route_limit < float("inf")
    # a flagged plan or failed validation stores nothing
    labels = api.upload(npz(x=shifted_images(16, seed=2), y=np.zeros(16, dtype=np.int64))).json()
    strict = {
        "dataset": ds,
        "plan": "full",
        "output": {"bank": "strict"},
        "validation": {"dataset": labels["id"], "max_accuracy_drop": -1.0},
    }
    failed = api.wait(api.client.post(url, json=strict).json()["id"])
    assert failed["state"] == "failed" and failed["error"].startswith("not saved: validation")
    assert failed["result_bank"] is None
    assert api.client.get("/v1/models/m/banks/strict").status_code == 404


def test_a_store_fed_replica_has_no_banks(
    make_api: Callable[..., Api], settings: Settings, bn_onnx: bytes, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    control = make_api(settings.model_copy(update={"model_store": store}))
    assert control.register("m", bn_onnx).status_code == 201
    replica = make_api(replica_settings(settings, store, tmp_path / "replica"))
    data = bank_bytes(onnx.load_from_string(bn_onnx), tmp_path)
    for method, path in [
        ("GET", "/v1/models/m/banks"),
        ("GET", "/v1/models/m/banks/b"),
        ("GET", "/v1/models/m/banks/b/file"),
        ("DELETE", "/v1/models/m/banks/b"),
    ]:
        response = replica.client.request(method, path)
        assert response.status_code == 403, (method, path, response.text)
    assert _put(replica, "b", data).status_code == 403


def test_a_bank_stored_before_its_name_was_reserved_stays_readable_and_deletable(
    api: Api, bn_onnx: bytes, tmp_path: Path
) -> None:
    assert api.register("m", bn_onnx).status_code == 201
    assert _put_own(api, "legacy", bn_onnx, tmp_path) == 201
    model_id = api.app.state.db.query_one("SELECT id FROM models WHERE name = 'm'")["id"]
    folder = api.app.state.settings.home / "artifacts" / model_id / "banks"
    (folder / "legacy.safetensors").rename(folder / "other.safetensors")
    api.app.state.db.execute("UPDATE banks SET name = 'other' WHERE name = 'legacy'")
    assert api.client.get("/v1/models/m/banks/other").status_code == 200
    assert api.client.get("/v1/models/m/banks/other/file").status_code == 200
    assert api.client.delete("/v1/models/m/banks/other").status_code == 204
    assert _put_own(api, "other", bn_onnx, tmp_path) == 400  # but not created anew


def test_a_route_limit_past_float_range_is_read_as_no_limit(
    api: Api, bn_onnx: bytes, tmp_path: Path
) -> None:
    from recalib.onnx.bank_files import ROUTE_LIMIT_KEY, read_bank_file, save_onnx_bank

    assert api.register("m", bn_onnx).status_code == 201
    model = onnx.load_from_string(bn_onnx)
    path = tmp_path / "huge.safetensors"
    save_onnx_bank(model, shifted_stats(model, 0.5), path, metadata={ROUTE_LIMIT_KEY: 10**400})
    assert _put(api, "huge", path.read_bytes()).status_code == 201
    assert read_bank_file(path).route_limit == float("inf")
