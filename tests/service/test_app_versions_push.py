"""``POST /v1/models/{name}/versions``: pushing an uploaded artifact as a new version of
an existing model (numbering, lineage, signature check, alias switch), and pushes that
fail leaving nothing behind."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from runtime_helpers import export, make_model

from recalib.demo import ASSETS
from service.artifacts import signature_difference
from service.errors import Conflict
from service.registry import Registry
from service.registry_models import Signature, TensorSpec
from service.settings import Settings


def _bn_onnx(
    *,
    input_name: str = "input",
    shape: tuple[int | str, ...] = ("N", 3, 8, 8),
    output_name: str = "output",
    dtype: int = TensorProto.FLOAT,
) -> bytes:
    """BatchNormalization -> GlobalAveragePool -> Flatten on a 3-channel input (by default
    the tiny model's signature, its batch axis named ``N`` instead of ``batch``)."""
    x = helper.make_tensor_value_info(input_name, dtype, list(shape))
    y = helper.make_tensor_value_info(output_name, dtype, [shape[0], 3])
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    inits = [
        numpy_helper.from_array(np.full(3, value, np_dtype), name)
        for name, value in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0))
    ]
    nodes = [
        helper.make_node(
            "BatchNormalization", [input_name, "scale", "bias", "mean", "var"], ["bn"], name="bn"
        ),
        helper.make_node("GlobalAveragePool", ["bn"], ["pool"]),
        helper.make_node("Flatten", ["pool"], [output_name]),
    ]
    graph = helper.make_graph(nodes, "bn", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    serialised: bytes = model.SerializeToString()
    return serialised


@pytest.fixture(scope="module")
def other_onnx(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Another tiny model (seed 1) with the same signature as ``bn_onnx``."""
    return export(make_model(1), tmp_path_factory.mktemp("push") / "v.onnx").read_bytes()


def _push(api: Any, name: str, data: bytes, filename: str = "model.onnx", **form: Any) -> Any:
    return api.client.post(
        f"/v1/models/{name}/versions",
        data={k: str(v) for k, v in form.items()},
        files={"file": (filename, data)},
    )


def _numbers(api: Any, name: str = "m") -> list[int]:
    versions = api.client.get(f"/v1/models/{name}/versions").json()["versions"]
    return [v["version"] for v in versions]


def _tree(home: Path) -> list[str]:
    """Every file and directory under the home but the database."""
    return sorted(
        str(p.relative_to(home)) for p in home.rglob("*") if not p.name.startswith("recalib.db")
    )


def test_push_with_alias_production_serves_it(
    make_api: Callable[..., Any], settings: Settings, bn_onnx: bytes, other_onnx: bytes
) -> None:
    api = make_api(settings, runtime=None)  # the real serving runtime
    assert api.register("m", bn_onnx).status_code == 201
    r = _push(
        api,
        "m",
        other_onnx,
        version=5,
        parent=1,
        alias="production",
        metadata=json.dumps({"control_version": 5}),
    )
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/v1/models/m/versions/5"
    info = r.json()
    assert info == api.client.get("/v1/models/m/versions/5").json()
    assert (info["version"], info["parent_version"], info["aliases"]) == (5, 1, ["production"])
    assert (info["dataset"], info["job"], info["recalibration"]) == (None, None, None)
    assert info["report"] == {
        "kind": "upload",
        "source_format": "onnx",
        "bn_layers": 2,
        "metadata": {"control_version": 5},
    }
    assert set(info["artifacts"]) == {"onnx", "report"}
    download = api.client.get("/v1/models/m/versions/5/artifact?format=onnx")
    assert download.content == other_onnx

    assert _numbers(api) == [1, 5]
    assert api.client.get("/v1/models/m/aliases/production").json()["version"] == 5
    model = api.client.get("/v1/models/m").json()
    assert (model["versions"], model["latest_version"]) == (2, 5)

    x = np.zeros((2, 3, 8, 8), np.float32)
    body = {"inputs": [{"name": "input", "shape": [2, 3, 8, 8], "datatype": "FP32"}]}
    body["inputs"][0]["data"] = x.ravel().tolist()
    out = api.client.post("/v2/models/m/infer", json=body)
    assert out.status_code == 200, out.text
    assert out.json()["model_version"] == "5"
    metadata = api.client.get("/v2/models/m").json()
    assert metadata["versions"] == ["1", "5"]  # every registered version
    assert metadata["parameters"]["version"] == "5"  # the one served


def test_default_numbering_and_no_alias(api: Any, bn_onnx: bytes) -> None:
    api.register("m", bn_onnx)
    first = _push(api, "m", bn_onnx)
    assert first.status_code == 201, first.text
    assert (first.json()["version"], first.json()["parent_version"]) == (2, None)
    assert first.json()["aliases"] == []
    assert first.json()["report"]["metadata"] == {}
    second = _push(api, "m", _bn_onnx(), parent="production", version="")
    assert second.status_code == 201, second.text
    assert (second.json()["version"], second.json()["parent_version"]) == (3, 1)
    assert _numbers(api) == [1, 2, 3]
    assert api.client.get("/v1/models/m").json()["aliases"] == {"production": 1}
    assert api.runtime.calls == [("serve", "m", 1)]  # nothing else loaded


def test_other_alias_moves_without_loading(api: Any, bn_onnx: bytes) -> None:
    api.register("m", bn_onnx)
    r = _push(api, "m", bn_onnx, version=3, alias="staging")
    assert r.status_code == 201 and r.json()["aliases"] == ["staging"]
    assert api.client.get("/v1/models/m").json()["aliases"] == {"production": 1, "staging": 3}
    assert api.runtime.calls == [("serve", "m", 1)]


def test_non_increasing_version_is_409(api: Any, bn_onnx: bytes) -> None:
    api.register("m", bn_onnx)
    assert _push(api, "m", bn_onnx, version=3).status_code == 201
    for number in (3, 2, 1):
        r = _push(api, "m", bn_onnx, version=number)
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert f"expected a version number above 3, the model's highest (got {number})" in error
    assert _numbers(api) == [1, 3]
    assert _push(api, "m", bn_onnx).json()["version"] == 4


@pytest.mark.parametrize(
    ("url", "form", "message"),
    [
        ("/v1/models/nope/versions", {}, "model 'nope' not found"),
        ("/v1/models/m/versions", {"parent": 9}, "has no version 9"),
        ("/v1/models/m/versions", {"parent": "canary"}, "has no alias 'canary'"),
    ],
)
def test_unknown_model_or_parent_is_404(
    api: Any, bn_onnx: bytes, url: str, form: dict[str, Any], message: str
) -> None:
    api.register("m", bn_onnx)
    r = api.client.post(url, data=form, files={"file": ("m.onnx", bn_onnx)})
    assert r.status_code == 404, r.text
    assert message in r.json()["error"]
    assert _numbers(api) == [1]


@pytest.mark.parametrize(
    ("artifact", "difference"),
    [
        (_bn_onnx(shape=("N", 3, 16, 16)), "input 'input' is float32 [N, 3, 16, 16], expected"),
        (_bn_onnx(shape=(4, 3, 8, 8)), "input 'input' is float32 [4, 3, 8, 8], expected"),
        (_bn_onnx(dtype=TensorProto.DOUBLE), "input 'input' is float64 [N, 3, 8, 8], expected"),
        (_bn_onnx(input_name="x"), "input 'input' is missing"),
        (_bn_onnx(output_name="logits"), "output 'output' is missing"),
    ],
)
def test_other_signature_is_422(api: Any, bn_onnx: bytes, artifact: bytes, difference: str) -> None:
    api.register("m", bn_onnx)
    before = _tree(api.home)
    r = _push(api, "m", artifact, alias="production")
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert "expected the signature of version 1 of model 'm'" in error
    assert difference in error
    assert _numbers(api) == [1]
    assert _tree(api.home) == before
    assert api.runtime.calls == [("serve", "m", 1)]


def test_signature_rules() -> None:
    def sig(*shape: int | str | None, out: str = "y") -> Signature:
        return Signature(
            inputs=[TensorSpec(name="x", dtype="float32", shape=list(shape))],
            outputs=[TensorSpec(name=out, dtype="float32", shape=["n", 3])],
        )

    assert signature_difference(sig("batch", 3), sig("N", 3)) is None  # names of dynamic axes
    assert signature_difference(sig(None, 3), sig("N", 3)) is None
    assert signature_difference(sig("batch", 3), sig(2, 3)) == (
        "input 'x' is float32 [2, 3], expected float32 [batch, 3]"
    )
    assert signature_difference(sig(2, 3), sig(None, 3)) == (
        "input 'x' is float32 [?, 3], expected float32 [2, 3]"
    )
    assert signature_difference(sig(2, 3), sig(2, 3, 1)) is not None
    extra = sig(2, 3)
    extra.outputs.append(TensorSpec(name="z", dtype="float32", shape=[2]))
    assert signature_difference(sig(2, 3), extra) == "output 'z' is new"


def test_failed_alias_switch_keeps_the_version(api: Any, bn_onnx: bytes) -> None:
    api.register("m", bn_onnx)
    api.runtime.fail.add(("m", 2))
    r = _push(api, "m", bn_onnx, alias="production")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "version 2 of model 'm' was stored, but alias 'production' was not moved" in error
    assert "it still points at version 1" in error and "could not load m version 2" in error
    assert _numbers(api) == [1, 2]
    assert api.client.get("/v1/models/m").json()["aliases"] == {"production": 1}
    assert api.runtime.served == {"m": 1}
    api.runtime.fail.clear()
    r = api.client.put("/v1/models/m/aliases/production", json={"version": 2})
    assert r.status_code == 200 and api.runtime.served == {"m": 2}


@pytest.mark.parametrize(
    ("filename", "payload", "form", "status", "message"),
    [
        ("m.onnx", "BN", {"metadata": "[1, 2]"}, 400, "JSON object"),
        ("m.onnx", "BN", {"metadata": "{oops"}, 400, "invalid JSON"),
        ("m.onnx", b"\x08\x07not a protobuf", {}, 400, "valid ONNX model"),
        ("m.onnx", "NO_BN", {}, 400, "BatchNormalization"),
        ("m.pt2", b"PK\x03\x04", {}, 400, "a .pt2 can only be added to a model registered"),
        ("m.pkl", "BN", {}, 400, "ending in .onnx, .pt2"),
        ("m.onnx", "BN", {"alias": "-x"}, 400, "alias"),
        ("m.onnx", "BN", {"alias": "7"}, 400, "not a number"),
        ("m.onnx", "BN", {"version": 0}, 422, "version"),
        ("m.onnx", "BN", {"version": 2**63}, 422, "version"),
        ("m.onnx", "BN", {"version": "two"}, 422, "version"),
        ("m.onnx", "BN", {"version": 1}, 409, "above 1"),
        ("m.onnx", "BN", {"parent": 2}, 404, "no version 2"),
        ("m.onnx", "OTHER_SIGNATURE", {}, 422, "signature"),
    ],
)
def test_failed_push_leaves_nothing(
    api: Any,
    bn_onnx: bytes,
    no_bn_onnx: bytes,
    filename: str,
    payload: Any,
    form: dict[str, Any],
    status: int,
    message: str,
) -> None:
    api.register("m", bn_onnx)
    before_versions = api.client.get("/v1/models/m/versions").json()
    before_model = api.client.get("/v1/models/m").json()
    before = _tree(api.home)
    data = {
        "BN": bn_onnx,
        "NO_BN": no_bn_onnx,
        "OTHER_SIGNATURE": _bn_onnx(input_name="image"),
    }.get(payload, payload)
    r = _push(api, "m", data, filename, **form)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert api.client.get("/v1/models/m/versions").json() == before_versions
    assert api.client.get("/v1/models/m").json() == before_model
    assert _tree(api.home) == before
    assert not any((api.home / "tmp").iterdir())
    assert api.runtime.calls == [("serve", "m", 1)]


def test_upload_limit_applies_to_pushes(
    make_api: Callable[..., Any], settings: Settings, bn_onnx: bytes
) -> None:
    # The request limit is far below the model: pushes get the upload limit.
    limit = len(bn_onnx) + 1024
    api = make_api(
        settings.model_copy(update={"max_upload_bytes": limit, "max_request_bytes": 512})
    )
    assert api.register("m", bn_onnx).status_code == 201
    assert _push(api, "m", bn_onnx).status_code == 201
    before = _tree(api.home)
    r = _push(api, "m", bn_onnx + b"\0" * limit)
    assert r.status_code == 413, r.text
    assert f"at most {limit} bytes" in r.json()["error"]
    assert _numbers(api) == [1, 2]
    assert _tree(api.home) == before


@dataclass
class _Upload:
    filename: str | None
    file: BinaryIO


def test_file_above_the_limit_is_413_after_copying(registry: Registry, bn_onnx: bytes) -> None:
    """The file part itself is counted too (the middleware counts the whole body)."""
    from service.errors import PayloadTooLarge

    async def story() -> None:
        await registry.register(
            name="m",
            upload=_Upload("m.onnx", io.BytesIO(bn_onnx)),
            metadata={},
            max_bytes=1 << 30,
        )
        with pytest.raises(PayloadTooLarge, match="at most 100 bytes"):
            await registry.push_version(
                "m", upload=_Upload("m.onnx", io.BytesIO(bn_onnx)), max_bytes=100
            )

    asyncio.run(story())
    assert [v.version for v in registry.versions("m")] == [1]
    assert not any((registry.home / "tmp").iterdir())


def test_concurrent_pushes_of_one_number_make_one_version(
    registry: Registry, bn_onnx: bytes
) -> None:
    def upload() -> _Upload:
        return _Upload("m.onnx", io.BytesIO(bn_onnx))

    async def story() -> list[Any]:
        await registry.register(name="m", upload=upload(), metadata={}, max_bytes=1 << 30)
        pushes = [
            registry.push_version("m", upload=upload(), max_bytes=1 << 30, version=4)
            for _ in range(3)
        ] + [registry.push_version("m", upload=upload(), max_bytes=1 << 30)]
        return await asyncio.gather(*pushes, return_exceptions=True)

    results = asyncio.run(story())
    made = sorted(r.version for r in results if not isinstance(r, BaseException))
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, Conflict) for r in refused), refused
    assert 4 in made and len(made) + len(refused) == 4
    assert [v.version for v in registry.versions("m")] == [1, *made]
    assert sorted(p.name for p in next(registry.root.iterdir()).iterdir()) == sorted(
        str(v) for v in [1, *made]
    )
    assert not any((registry.home / "tmp").iterdir())


def test_push_requires_the_token(api: Any, bn_onnx: bytes) -> None:
    api.register("m", bn_onnx)
    api.client.headers.pop("Authorization")
    r = _push(api, "m", bn_onnx, alias="production")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = api.client.post(
        "/v1/models/m/versions",
        files={"file": ("m.onnx", bn_onnx)},
        headers={"Authorization": "Bearer wrong-token"},
    )
    assert r.status_code == 401
    api.client.headers["Authorization"] = "Bearer s3cret-token"
    assert _numbers(api) == [1]


def test_schema_documents_the_push(api: Any) -> None:
    schema = api.app.openapi()
    operation = schema["paths"]["/v1/models/{name}/versions"]["post"]
    assert operation["security"] == [{"HTTPBearer": []}]
    assert list(operation["requestBody"]["content"]) == ["multipart/form-data"]
    assert {"201", "401", "404", "409", "413", "422"} <= set(operation["responses"])


@pytest.mark.slow
def test_push_pt2_to_a_pt2_model(api: Any) -> None:
    program = (ASSETS / "demo_model.pt2").read_bytes()
    assert api.register("m", program, "demo.pt2").status_code == 201
    r = _push(api, "m", program, "demo.pt2", version=3, alias="production")
    assert r.status_code == 201, r.text
    info = r.json()
    assert set(info["artifacts"]) == {"onnx", "pt2", "stats", "report"}
    assert info["report"]["source_format"] == "pt2" and info["aliases"] == ["production"]
    assert api.runtime.served == {"m": 3}
