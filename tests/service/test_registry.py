"""The registry without HTTP: versions are immutable and appear whole, resolve() rules,
alias switching through the runtime, rollback, sweep after a crash, and name checks."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from service.errors import Conflict, InvalidInput, NotFound
from service.names import check_alias, check_name, is_number
from service.registry import Registry
from service.registry_models import MAX_VERSION, PRODUCTION


@dataclass
class _Upload:
    filename: str | None
    file: BinaryIO


def _register(registry: Registry, data: bytes, name: str = "m") -> Any:
    upload = _Upload("x.onnx", io.BytesIO(data))
    return asyncio.run(registry.register(name=name, upload=upload, metadata={}, max_bytes=1 << 30))


def _staging(registry: Registry, onnx_bytes: bytes, tag: str = "a") -> Path:
    """A job's output directory: model.onnx and a recalibration report."""
    out = registry.home / "work" / tag / "out"
    out.mkdir(parents=True)
    (out / "model.onnx").write_bytes(onnx_bytes)
    report = {"method": "exact", "mode": "train", "passes": 1, "samples": 8, "layers": []}
    (out / "report.json").write_text(json.dumps({"recalibration": report}))
    return out


def _add(registry: Registry, staging: Path, parent: int = 1) -> Any:
    return registry.add_version(
        "m",
        staging,
        parent_version=parent,
        dataset="ds-1",
        job="job1",
        recalibration={"method": "exact"},
        validation=None,
    )


def test_register_writes_version_1_and_serves_it(
    registry: Registry, runtime: Any, bn_onnx: bytes
) -> None:
    model = _register(registry, bn_onnx)
    assert model.aliases == {PRODUCTION: 1}
    path = registry.artifact("m", 1, "onnx")
    assert path.read_bytes() == bn_onnx
    assert path.parent == registry.root / model.id / "1"  # ids, never client names
    assert runtime.calls == [("serve", "m", 1)]
    assert not (registry.home / "tmp").exists() or not any((registry.home / "tmp").iterdir())


def test_add_version_records_lineage_and_moves_files(registry: Registry, bn_onnx: bytes) -> None:
    _register(registry, bn_onnx)
    staging = _staging(registry, bn_onnx)
    v2 = _add(registry, staging)
    assert (v2.version, v2.parent_version, v2.dataset, v2.job) == (2, 1, "ds-1", "job1")
    assert v2.recalibration == {"method": "exact"}
    assert v2.report["kind"] == "recalibration" and v2.report["samples"] == 8
    assert v2.aliases == []
    assert v2.artifacts["onnx"].sha256 == hashlib.sha256(bn_onnx).hexdigest()
    assert not staging.exists()
    assert registry.model("m").latest_version == 2
    with pytest.raises(NotFound, match="no stats artifact"):
        registry.artifact("m", 2, "stats")


def test_resolve_rules(registry: Registry, bn_onnx: bytes) -> None:
    _register(registry, bn_onnx)
    _add(registry, _staging(registry, bn_onnx))
    assert registry.resolve("m", None)[0] == 1  # production, not the latest
    assert registry.resolve("m", "2") == (2, registry.artifact("m", 2, "onnx"))
    asyncio.run(registry.set_alias("m", "canary", 2))
    assert registry.resolve("m", "canary")[0] == 2
    for ref, error in [("3", NotFound), ("nope", NotFound), ("../x", InvalidInput)]:
        with pytest.raises(error):
            registry.resolve("m", ref)
    with pytest.raises(NotFound):
        registry.resolve("other", None)


@pytest.mark.parametrize(
    "ref",
    [
        "99999999999999999999999",
        str(MAX_VERSION + 1),
        "0" * 5000 + "1" * 5000,  # beyond int()'s 4300-digit limit
        MAX_VERSION + 1,
        -(2**70),
        0,
        "0",
    ],
)
def test_numbers_beyond_any_version_are_not_found(
    registry: Registry, bn_onnx: bytes, ref: str | int
) -> None:
    _register(registry, bn_onnx)
    with pytest.raises(NotFound, match="has no version"):
        registry.resolve_version("m", ref)


def test_only_ascii_digits_are_version_numbers(registry: Registry, bn_onnx: bytes) -> None:
    _register(registry, bn_onnx)
    assert registry.resolve_version("m", "0001") == 1
    for ref in ("\u00b2", "\u0661", "\uff11"):  # superscript two, Arabic-Indic and fullwidth one
        with pytest.raises(InvalidInput, match="version number or alias"):
            registry.resolve_version("m", ref)


def test_numeric_alias_refused(registry: Registry, bn_onnx: bytes) -> None:
    _register(registry, bn_onnx)
    with pytest.raises(InvalidInput, match="alias that is not a number"):
        asyncio.run(registry.set_alias("m", "2", 1))
    assert [a.alias for a in registry.aliases("m")] == [PRODUCTION]
    assert check_alias("v2") == "v2"
    assert [is_number(v) for v in ("12", "0", "1a", "\u00b2", "")] == [True] * 2 + [False] * 3


def test_latest_version_without_production(registry: Registry, bn_onnx: bytes) -> None:
    model = _register(registry, bn_onnx)
    _add(registry, _staging(registry, bn_onnx))
    registry.db.execute("DELETE FROM aliases WHERE model_id = ?", (model.id,))
    assert registry.resolve("m", None)[0] == 2


def test_failed_load_leaves_production_alone(
    registry: Registry, runtime: Any, bn_onnx: bytes
) -> None:
    _register(registry, bn_onnx)
    _add(registry, _staging(registry, bn_onnx))
    runtime.fail.add(("m", 2))
    with pytest.raises(InvalidInput, match="could not load"):
        asyncio.run(registry.set_alias("m", PRODUCTION, 2))
    assert registry.alias("m", PRODUCTION).version == 1
    runtime.fail.clear()
    asyncio.run(registry.set_alias("m", PRODUCTION, 2))
    assert registry.alias("m", PRODUCTION).version == 2
    assert runtime.served == {"m": 2}


def test_register_rolled_back_when_serving_fails(
    registry: Registry, runtime: Any, bn_onnx: bytes
) -> None:
    runtime.fail.add(("m", 1))
    with pytest.raises(InvalidInput):
        _register(registry, bn_onnx)
    assert registry.models() == []
    assert not any(registry.root.iterdir())


def test_versions_are_immutable_numbers_never_reused(registry: Registry, bn_onnx: bytes) -> None:
    _register(registry, bn_onnx)
    v2 = _add(registry, _staging(registry, bn_onnx, "a"))
    v3 = _add(registry, _staging(registry, bn_onnx, "b"), parent=2)
    assert (v2.version, v3.version, v3.parent_version) == (2, 3, 2)
    with pytest.raises(Conflict):
        registry.delete_alias("m", PRODUCTION)


def test_sweep_removes_what_a_crash_left(registry: Registry, bn_onnx: bytes) -> None:
    model = _register(registry, bn_onnx)
    committed = registry.root / model.id / "1"
    half = registry.root / model.id / "2"  # renamed in, row never committed
    shutil.copytree(committed, half)
    orphan = registry.root / ("f" * 32) / "1"
    orphan.mkdir(parents=True)
    (registry.home / "tmp" / "model-x").mkdir(parents=True)
    registry.sweep()
    assert committed.is_dir() and not half.exists() and not orphan.parent.exists()
    assert not (registry.home / "tmp").exists()
    assert [v.version for v in registry.versions("m")] == [1]


@pytest.mark.parametrize("good", ["a", "A1", "resnet50_v1.5-cal", "9" * 64])
def test_check_name_accepts(good: str) -> None:
    assert check_name(good, "model name") == good


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "../x", "a/b", "a\\b", "-a", "_a", "a b", "a\n", "é", "9" * 65]
)
def test_check_name_refuses(bad: str) -> None:
    with pytest.raises(InvalidInput, match="model name"):
        check_name(bad, "model name")
