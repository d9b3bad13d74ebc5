"""The shared model store: the Triton layout and its commit point (``ModelStore``), the
store-fed replica's resolver and watcher, and the control replica publishing through the
registry (register, alias moves, pushes, deletes, failures, start-up)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from prometheus_client import CollectorRegistry
from service_helpers import Api, FakeRuntime, replica_settings
from tritonclient.grpc import model_config_pb2

from service.errors import InvalidInput, NotFound
from service.model_store import (
    BANKS_DIR,
    CONFIG_FILE,
    METADATA_FILE,
    ModelStore,
    StoredModel,
    StoreMetrics,
    StoreUnreadable,
    TritonOptions,
    tensor_specs,
)
from service.runtime.bank_refs import BankRef
from service.runtime.sessions import TensorSpec
from service.settings import Settings
from service.store_replica import StoreResolver, StoreWatcher

INPUTS = [TensorSpec("input", "FP32", (-1, 3, 8, 8))]
OUTPUTS = [TensorSpec("output", "FP32", (-1, 3))]


def _onnx(tmp_path: Path, version: int, size: int = 4096) -> Path:
    """A stand-in artifact (the store never parses it): ``size`` bytes tagged by version."""
    path = tmp_path / f"artifact-v{version}.onnx"
    path.write_bytes(bytes([version % 256]) * size)
    return path


def _publish(store: ModelStore, tmp_path: Path, version: int, *, uid: str = "id-1") -> StoredModel:
    return store.publish(
        "m",
        version,
        _onnx(tmp_path, version),
        uid=uid,
        inputs=INPUTS,
        outputs=OUTPUTS,
        metadata={"sha256": f"sha-{version}"},
    )


def _config(store: ModelStore, name: str = "m") -> Any:
    text = (store.root / name / CONFIG_FILE).read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


# -- ModelStore --------------------------------------------------------------------------


def test_publish_writes_the_triton_layout_and_recalib_metadata(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", triton=TritonOptions(max_batch_size=16, gpu=None))
    _publish(store, tmp_path, 1)
    root = store.root
    assert sorted(p.name for p in root.iterdir()) == ["m"]  # nothing but model directories
    assert sorted(p.name for p in (root / "m").iterdir()) == ["1", CONFIG_FILE, METADATA_FILE]
    assert (root / "m" / "1" / "model.onnx").read_bytes() == _onnx(tmp_path, 1).read_bytes()
    meta = json.loads((root / "m" / METADATA_FILE).read_text())
    assert meta == {
        "format": 1,
        "name": "m",
        "uid": "id-1",
        "production": 1,
        "versions": {"1": {"sha256": "sha-1"}},
        "banks": {},
        "default_bank": None,
        "promoted": [1],
    }

    config = _config(store)  # Triton's own ModelConfig message parses it
    assert config.name == "m"
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 16
    assert list(config.version_policy.specific.versions) == [1]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("input", model_config_pb2.TYPE_FP32, [3, 8, 8])
    ]
    assert [(t.name, list(t.dims)) for t in config.output] == [("output", [3])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO


def test_production_moves_and_versions_stay_immutable(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", triton=TritonOptions(gpu=False))
    _publish(store, tmp_path, 1)
    first = (store.root / "m" / "1" / "model.onnx").stat()
    _publish(store, tmp_path, 3)
    model = store.read("m")
    assert model is not None
    assert (model.production, sorted(model.versions)) == (3, [1, 3])
    assert list(_config(store).version_policy.specific.versions) == [3]
    assert _config(store).instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU

    _publish(store, tmp_path, 1)  # a rollback: only the commit point changes
    model = store.read("m")
    assert model is not None and model.production == 1
    again = (store.root / "m" / "1" / "model.onnx").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert list(_config(store).version_policy.specific.versions) == [1]
    assert model.onnx_path(3).read_bytes() == _onnx(tmp_path, 3).read_bytes()


def test_a_store_keeps_production_and_the_newest_versions(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", keep_versions=2)
    for version in (1, 2, 3):
        _publish(store, tmp_path, version)
    model = store.read("m")
    assert model is not None and (model.production, sorted(model.versions)) == (3, [2, 3])
    assert sorted(p.name for p in (store.root / "m").iterdir()) == [
        "2",
        "3",
        CONFIG_FILE,
        METADATA_FILE,
    ]
    assert sorted(p.name for p in store.root.iterdir()) == ["m"]  # no trash left behind
    _publish(store, tmp_path, 1)  # promoting a pruned version copies it back in
    model = store.read("m")
    assert model is not None and (model.production, sorted(model.versions)) == (1, [1, 3])
    assert model.onnx_path(1).read_bytes() == _onnx(tmp_path, 1).read_bytes()
    assert not (store.root / "m" / "2").exists()
    assert list(_config(store).version_policy.specific.versions) == [1]
    assert json.loads((store.root / "m" / METADATA_FILE).read_text())["versions"].keys() == {
        "1",
        "3",
    }
    # a rollback, then a new version: the rolled-back-to version is the previous
    # production (what the replicas serve until they switch): kept, older ones go
    ranked = ModelStore(tmp_path / "ranked", keep_versions=3)
    for version in (3, 8, 9, 10, 3, 11):
        _publish(ranked, tmp_path, version)
    after = ranked.read("m")
    assert after is not None and sorted(after.versions) == [3, 10, 11]
    assert after.promoted == (10, 3, 11)
    every = ModelStore(tmp_path / "all")  # 0: every version ever published
    for version in (1, 2, 3, 4):
        _publish(every, tmp_path, version)
    kept = every.read("m")
    assert kept is not None and sorted(kept.versions) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="keep_versions"):
        ModelStore(tmp_path / "bad", keep_versions=-1)


def test_pruning_waits_for_the_config_and_leaves_odd_names_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "store", keep_versions=1)
    _publish(store, tmp_path, 1)
    model_dir = store.root / "m"
    for odd in ("007", "\u00b2", "x1"):
        (model_dir / odd).mkdir()
    (tmp_path / "elsewhere").mkdir()
    (model_dir / "5").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    import service.model_store as model_store

    write = model_store._write_atomic

    def no_config(path: Path, text: str) -> None:
        if path.name == CONFIG_FILE:
            raise OSError(28, "No space left on device")
        write(path, text)

    monkeypatch.setattr(model_store, "_write_atomic", no_config)
    with pytest.raises(OSError):
        _publish(store, tmp_path, 2)  # committed, but config.pbtxt still names 1
    assert (model_dir / "1" / "model.onnx").is_file()  # not deleted under Triton's config
    assert list(_config(store).version_policy.specific.versions) == [1]
    store.sweep()  # leaves version directories to the next publication
    assert (model_dir / "1").is_dir()
    monkeypatch.setattr(model_store, "_write_atomic", write)
    _publish(store, tmp_path, 3)
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == sorted(["3", "007", "\u00b2", "x1", CONFIG_FILE, METADATA_FILE])
    assert not any(p.name.startswith(".trash") for p in store.root.iterdir())
    assert (tmp_path / "elsewhere").is_dir()  # a link's target is never touched


def test_the_app_store_keeps_the_configured_versions(tmp_path: Path) -> None:
    from service.app import create_app

    settings = Settings(home=tmp_path / "home", model_store=tmp_path / "s", store_keep_versions=5)
    assert create_app(settings).state.model_store.keep_versions == 5
    assert Settings().store_keep_versions == 3


def test_a_reader_never_sees_a_half_published_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    size = 1 << 20  # big enough that a copy takes a while
    artifacts = {v: _onnx(tmp_path, v, size) for v in range(1, 31)}
    seen: list[list[int]] = [[], []]
    problems: list[str] = []
    done = threading.Event()

    def read(mine: list[int]) -> None:
        reader = ModelStore(store.root)
        while not done.is_set():
            models, unreadable = reader.scan()
            if unreadable:
                problems.append(f"unreadable: {unreadable}")
            model = models.get("m")
            if model is None:
                continue
            data = model.onnx_path(model.production).read_bytes()
            if data != bytes([model.production]) * size:
                problems.append(f"version {model.production}: {len(data)} bytes, wrong content")
            mine.append(model.production)

    threads = [threading.Thread(target=read, args=(mine,)) for mine in seen]
    for t in threads:
        t.start()
    try:
        for version, path in artifacts.items():
            store.publish("m", version, path, uid="u", inputs=INPUTS, outputs=OUTPUTS)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not problems
    for mine in seen:
        assert len(set(mine)) > 1  # the reader did watch the publications
        assert mine == sorted(mine)  # and saw them in order


def test_a_publication_that_fails_leaves_the_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "store")
    _publish(store, tmp_path, 1)

    def broken_copy(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("service.model_store.shutil.copyfile", broken_copy)
    with pytest.raises(OSError, match="No space"):
        _publish(store, tmp_path, 2)
    monkeypatch.undo()
    model = store.read("m")
    assert model is not None and (model.production, sorted(model.versions)) == (1, [1])
    assert sorted(p.name for p in (store.root / "m").iterdir()) == ["1", CONFIG_FILE, METADATA_FILE]

    real_replace = os.replace

    def broken_commit(src: Any, dst: Any) -> None:
        if Path(dst).name == METADATA_FILE:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr("service.model_store.os.replace", broken_commit)
    with pytest.raises(OSError, match="Input/output"):
        _publish(store, tmp_path, 2)
    monkeypatch.undo()
    model = store.read("m")
    assert model is not None and model.production == 1  # version 2's files: not committed
    assert list(_config(store).version_policy.specific.versions) == [1]
    assert not [p for p in (store.root / "m").iterdir() if p.name.startswith(".")]
    # a later publication of the same number does not trust the uncommitted directory
    (store.root / "m" / "2" / "model.onnx").write_bytes(b"garbage")
    _publish(store, tmp_path, 2)
    model = store.read("m")
    assert model is not None and model.onnx_path(2).read_bytes() == _onnx(tmp_path, 2).read_bytes()


def test_sweep_removes_what_a_crash_left(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    _publish(store, tmp_path, 1)
    (store.root / ".staging-abc" / "1").mkdir(parents=True)
    (store.root / ".trash-def").mkdir()
    (store.root / "m" / ".staging-123").mkdir()
    (store.root / "m" / f".{METADATA_FILE}.456").write_text("{")
    store.sweep()
    assert sorted(p.name for p in store.root.iterdir()) == ["m"]
    assert sorted(p.name for p in (store.root / "m").iterdir()) == ["1", CONFIG_FILE, METADATA_FILE]


def test_a_new_model_under_an_old_name_replaces_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    _publish(store, tmp_path, 1)
    _publish(store, tmp_path, 2)
    _publish(store, tmp_path, 1, uid="id-2")  # deleted and registered again
    model = store.read("m")
    assert model is not None
    assert (model.uid, model.production, sorted(model.versions)) == ("id-2", 1, [1])
    assert not (store.root / "m" / "2").exists()


def test_remove(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    _publish(store, tmp_path, 1)
    assert store.remove("m") is True
    assert store.read("m") is None and store.models() == {}
    assert list(store.root.iterdir()) == []
    assert store.remove("m") is False
    with pytest.raises(InvalidInput):
        store.remove("../etc")


def test_unreadable_metadata_is_reported_and_replaced_by_the_writer(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    _publish(store, tmp_path, 1)
    (store.root / "m" / METADATA_FILE).write_text('{"name": "m"')
    (store.root / "not a model").mkdir()  # not a model name: ignored
    (store.root / "stray-file").write_text("x")
    models, unreadable = store.scan()
    assert models == {} and list(unreadable) == ["m"]
    _publish(store, tmp_path, 2)
    model = store.read("m")
    assert model is not None and (model.production, sorted(model.versions)) == (2, [2])


def test_tensor_specs_from_the_registry_signature() -> None:
    specs = tensor_specs(
        [
            {"name": "x", "dtype": "float32", "shape": [None, 3, "h", 8]},
            {"name": "ids", "dtype": "int64", "shape": ["N"]},
            {"name": "s", "dtype": "object", "shape": [2]},
        ]
    )
    assert specs == [
        TensorSpec("x", "FP32", (-1, 3, -1, 8)),
        TensorSpec("ids", "INT64", (-1,)),
        TensorSpec("s", "BYTES", (2,)),
    ]


# -- StoreResolver and StoreWatcher ------------------------------------------------------


def test_resolver_answers_from_its_view(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    _publish(store, tmp_path, 1)
    _publish(store, tmp_path, 2)
    resolver = StoreResolver(store)
    assert resolver.model_names() == []  # nothing before the first poll
    with pytest.raises(NotFound):
        resolver.resolve("m", None)
    resolver.install(store.models())
    assert resolver.model_names() == ["m"]
    assert resolver.resolve("m", None) == (2, store.root / "m" / "2" / "model.onnx")
    assert resolver.resolve("m", "production")[0] == 2
    assert resolver.resolve("m", "1")[0] == 1
    assert resolver.version_numbers("m") == [1, 2]  # model metadata lists them all
    for ref in ("3", "9" * 40, "staging"):
        with pytest.raises(NotFound):
            resolver.resolve("m", ref)
    with pytest.raises(NotFound):
        resolver.resolve("other", None)
    with pytest.raises(InvalidInput):
        resolver.resolve("m", "bad ref")


class _Runtime:
    """The watcher's view of the serving runtime; ``fail`` refuses to load; bank pushes
    are recorded in ``bank_calls`` (``fail_banks``: they raise)."""

    def __init__(self) -> None:
        self.served: dict[str, int] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.fail: set[tuple[str, int]] = set()
        self.bank_calls: list[tuple[str, tuple[BankRef, ...], str | None]] = []
        self.fail_banks = False

    async def set_banks(self, name: str, banks: Sequence[BankRef], default: str | None) -> None:
        if self.fail_banks:
            raise OSError(5, "unreadable bank")
        assert all(b.path.is_file() for b in banks)
        self.bank_calls.append((name, tuple(banks), default))

    def served_version(self, name: str) -> int | None:
        return self.served.get(name)

    async def serve(self, name: str, version: int, onnx_path: Path) -> None:
        self.calls.append(("serve", name, version))
        if (name, version) in self.fail:
            raise InvalidInput(f"{name} {version} does not load")
        assert onnx_path.is_file()
        self.served[name] = version

    async def unload_model(self, name: str) -> None:
        self.calls.append(("unload", name))
        self.served.pop(name, None)


def test_watcher_follows_the_store(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    _publish(store, tmp_path, 1)
    runtime = _Runtime()
    resolver = StoreResolver(store)
    metrics_registry = CollectorRegistry()
    watcher = StoreWatcher(resolver, runtime, 60.0, metrics=StoreMetrics(metrics_registry))

    async def scenario() -> None:
        await watcher.start()  # the initial pass, before the replica is ready
        assert runtime.served == {"m": 1} and resolver.model_names() == ["m"]
        await watcher.sync()
        assert runtime.calls == [("serve", "m", 1)]  # nothing to do: nothing done

        _publish(store, tmp_path, 2)
        await watcher.sync()
        assert runtime.served == {"m": 2}

        runtime.fail.add(("m", 3))
        _publish(store, tmp_path, 3)
        await watcher.sync()
        await watcher.sync()  # retried later, not at every poll
        assert runtime.served == {"m": 2}
        assert runtime.calls.count(("serve", "m", 3)) == 1
        failures = metrics_registry.get_sample_value(
            "recalib_model_store_load_failures_total", {"model": "m"}
        )
        assert failures == 1.0

        (store.root / "m" / METADATA_FILE).write_text("{")  # unreadable: keep what we had
        await watcher.sync()
        assert runtime.served == {"m": 2} and resolver.model_names() == ["m"]

        store.remove("m")
        _publish(store, tmp_path, 1, uid="id-2")  # a new model under the old name
        runtime.calls.clear()
        await watcher.sync()
        assert runtime.calls == [("unload", "m"), ("serve", "m", 1)]

        store.remove("m")
        await watcher.sync()
        assert runtime.served == {} and resolver.model_names() == []
        await watcher.close()

    asyncio.run(scenario())


# -- the control replica publishes; a store-fed replica serves ----------------------------


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


def _production(store_dir: Path, name: str = "m") -> int | None:
    model = ModelStore(store_dir).read(name)
    return None if model is None else model.production


def test_the_control_replica_publishes_when_production_moves(
    make_api: Callable[..., Api], settings: Settings, store_dir: Path, bn_onnx: bytes
) -> None:
    api = make_api(settings.model_copy(update={"model_store": store_dir}))
    assert api.register("m", bn_onnx).status_code == 201
    assert _production(store_dir) == 1
    config = text_format.Parse(
        (store_dir / "m" / CONFIG_FILE).read_text(), model_config_pb2.ModelConfig()
    )
    assert [i.name for i in config.input] and config.max_batch_size == settings.max_batch_size

    files = {"file": ("model.onnx", bn_onnx)}
    pushed = api.client.post("/v1/models/m/versions", files=files)
    assert pushed.status_code == 201 and _production(store_dir) == 1  # not promoted
    pushed = api.client.post("/v1/models/m/versions", files=files, data={"alias": "production"})
    assert pushed.status_code == 201 and _production(store_dir) == 3
    moved = api.client.put("/v1/models/m/aliases/production", json={"version": 2})
    assert moved.status_code == 200 and _production(store_dir) == 2
    api.client.put("/v1/models/m/aliases/staging", json={"version": 1})
    model = ModelStore(store_dir).read("m")
    assert model is not None and sorted(model.versions) == [1, 2, 3]
    assert model.uid == api.client.get("/v1/models/m").json()["id"]
    assert (
        model.versions[2]["sha256"]
        == (api.client.get("/v1/models/m/versions/2").json()["artifacts"]["onnx"]["sha256"])
    )

    assert api.client.delete("/v1/models/m").status_code == 204
    assert _production(store_dir) is None and list(store_dir.iterdir()) == []


def test_a_failed_publication_is_counted_and_repaired(
    make_api: Callable[..., Api],
    settings: Settings,
    store_dir: Path,
    bn_onnx: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics_registry = CollectorRegistry()
    api = make_api(
        settings.model_copy(update={"model_store": store_dir}), metrics_registry=metrics_registry
    )
    assert api.register("m", bn_onnx).status_code == 201
    files = {"file": ("model.onnx", bn_onnx)}
    assert api.client.post("/v1/models/m/versions", files=files).status_code == 201

    def unwritable(*_: Any, **__: Any) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(ModelStore, "publish", unwritable)
    moved = api.client.put("/v1/models/m/aliases/production", json={"version": 2})
    assert moved.status_code == 200, moved.text  # committed: the call succeeds
    assert _production(store_dir) == 1  # the store keeps a consistent, older state
    count = metrics_registry.get_sample_value(
        "recalib_model_store_publish_failures_total", {"model": "m"}
    )
    assert count == 1.0

    monkeypatch.undo()
    asyncio.run(api.app.state.store_publisher.reconcile())  # what the periodic pass runs
    assert _production(store_dir) == 2


def test_the_control_replica_republishes_at_start_up(
    make_api: Callable[..., Api], settings: Settings, store_dir: Path, bn_onnx: bytes
) -> None:
    first = make_api(settings)  # no store yet
    assert first.register("a", bn_onnx).status_code == 201
    assert first.register("b", bn_onnx).status_code == 201
    first.close()
    ModelStore(store_dir).publish(  # a model the database does not know
        "gone", 1, _onnx(store_dir.parent, 1), uid="x", inputs=INPUTS, outputs=OUTPUTS
    )
    (store_dir / ".staging-leftover").mkdir()
    make_api(settings.model_copy(update={"model_store": store_dir}))
    assert sorted(ModelStore(store_dir).models()) == ["a", "b"]
    assert sorted(p.name for p in store_dir.iterdir()) == ["a", "b"]


def test_a_store_fed_replica_serves_the_store_without_a_database(
    make_api: Callable[..., Api],
    settings: Settings,
    store_dir: Path,
    bn_onnx: bytes,
    tmp_path: Path,
) -> None:
    control = make_api(settings.model_copy(update={"model_store": store_dir}))
    assert control.register("m", bn_onnx).status_code == 201

    home = tmp_path / "replica-home"
    replica_runtime = FakeRuntime()
    replica = make_api(
        replica_settings(settings, store_dir, home, store_poll_seconds=0.05),
        runtime=replica_runtime,
    )
    assert replica_runtime.served == {"m": 1}  # before the app answered anything
    ready = replica.client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True, "waiting_for": []})
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/m"),
        ("POST", "/v1/models"),
        ("PUT", "/v1/models/m/aliases/production"),
        ("DELETE", "/v1/models/m"),
        ("GET", "/v1/datasets"),
        ("GET", "/v1/recalibrations/abc"),
    ]:
        response = replica.client.request(method, path, json={"version": 1})
        assert response.status_code == 403, (method, path, response.text)
        message = response.json()["error"]
        assert "RECALIB_MODEL_STORE" in message and "\n" not in message
    drift = replica.client.get("/v1/models/m/drift")
    assert drift.status_code == 200 and drift.json()["version"] == 1
    assert replica.client.get("/v1/models/nope/drift").status_code == 404
    assert not home.exists()  # no database, no home

    # a model the replica cannot load keeps it out of the load balancer
    replica_runtime.fail.add(("n", 1))
    assert control.register("n", bn_onnx).status_code == 201
    deadline = time.monotonic() + 10
    while ("serve", "n", 1) not in replica_runtime.calls and time.monotonic() < deadline:
        time.sleep(0.02)
    ready = replica.client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (400, {"ready": False, "waiting_for": ["n"]})
    replica_runtime.fail.clear()  # the cause fixed: the retry serves it
    while replica_runtime.served.get("n") != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert replica.client.get("/v2/health/ready").status_code == 200


# -- stat banks in the store ---------------------------------------------------------------


def _bank(tmp_path: Path, name: str, content: bytes, versions: set[int]) -> BankRef:
    """A stand-in bank file (the store never parses it) as the registry pushes it."""
    path = tmp_path / f"registry-{name}-{hashlib.sha256(content).hexdigest()[:8]}.safetensors"
    path.write_bytes(content)
    return BankRef(name, path, frozenset(versions), hashlib.sha256(content).hexdigest())


def _publish_banks(
    store: ModelStore, tmp_path: Path, version: int, banks: list[BankRef], default: str | None
) -> StoredModel:
    return store.publish(
        "m",
        version,
        _onnx(tmp_path, version),
        uid="id-1",
        inputs=INPUTS,
        outputs=OUTPUTS,
        banks=banks,
        default_bank=default,
    )


def test_banks_are_published_beside_the_versions(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    a, b = _bank(tmp_path, "site_a", b"A" * 64, {1}), _bank(tmp_path, "site_b", b"B" * 64, {1})
    published = _publish_banks(store, tmp_path, 1, [b, a], "site_a")
    model = store.read("m")
    assert model == published and model is not None
    assert [(r.name, r.versions, r.sha256) for r in model.banks] == [
        (r.name, r.versions, r.sha256) for r in (a, b)
    ]
    assert model.default_bank == "site_a"
    for ours, theirs in zip(model.banks, (a, b), strict=True):
        assert ours.path.parent == store.root / "m" / BANKS_DIR
        assert ours.path.read_bytes() == theirs.path.read_bytes()
    meta = json.loads((store.root / "m" / METADATA_FILE).read_text())
    assert meta["banks"] == {
        "site_a": {"sha256": a.sha256, "versions": [1]},
        "site_b": {"sha256": b.sha256, "versions": [1]},
    }
    assert meta["default_bank"] == "site_a"
    # Triton takes the numeric directories for versions and ignores "banks"
    assert sorted(p.name for p in (store.root / "m").iterdir()) == [
        "1",
        BANKS_DIR,
        CONFIG_FILE,
        METADATA_FILE,
    ]
    assert list(_config(store).version_policy.specific.versions) == [1]

    # version 2 with the same weights; site_a deleted, site_b stored again with other stats
    a_file = model.banks[0].path
    new_b = _bank(tmp_path, "site_b", b"C" * 64, {1, 2})
    model = _publish_banks(store, tmp_path, 2, [new_b], None)
    assert store.read("m") == model
    assert [(r.name, r.sha256, r.versions) for r in model.banks] == [
        ("site_b", new_b.sha256, frozenset({1, 2}))
    ]
    assert model.banks[0].path.read_bytes() == b"C" * 64
    assert not a_file.exists()  # removed once recalib.json no longer listed it
    assert [p.name for p in (store.root / "m" / BANKS_DIR).iterdir()] == [model.banks[0].path.name]
    # no banks left: no folder either
    model = _publish_banks(store, tmp_path, 2, [], None)
    assert model.banks == () and not (store.root / "m" / BANKS_DIR).exists()


def test_an_older_recalib_json_has_no_banks_and_a_bad_one_is_unreadable(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    _publish(store, tmp_path, 1)
    path = store.root / "m" / METADATA_FILE
    meta = json.loads(path.read_text())
    del meta["banks"], meta["default_bank"]  # as a recalib before banks wrote it
    path.write_text(json.dumps(meta))
    model = store.read("m")
    assert model is not None and (model.banks, model.default_bank) == ((), None)
    for banks, default in [
        ({"auto": {"sha256": "0" * 64, "versions": [1]}}, None),
        ({"b": {"sha256": "../../etc", "versions": [1]}}, None),
        ({"b": {"sha256": "0" * 64, "versions": ["x"]}}, None),
        ({"b": ["not", "an", "object"]}, None),
        ({}, "site_x"),
    ]:
        path.write_text(json.dumps(meta | {"banks": banks, "default_bank": default}))
        with pytest.raises(StoreUnreadable):
            store.read("m")
    path.write_text(json.dumps(meta | {"banks": {}, "default_bank": "auto"}))
    model = store.read("m")
    assert model is not None and model.default_bank == "auto"


def test_a_failed_bank_copy_leaves_the_previous_state_and_sweep_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "store")
    a = _bank(tmp_path, "site_a", b"A" * 64, {1})
    _publish_banks(store, tmp_path, 1, [a], "site_a")
    before = store.read("m")
    b = _bank(tmp_path, "site_b", b"B" * 64, {1})
    b.path.unlink()  # the registry's file went (deleted meanwhile)
    with pytest.raises(FileNotFoundError):
        _publish_banks(store, tmp_path, 1, [a, b], None)
    assert before is not None and store.read("m") == before  # not committed
    folder, listed = store.root / "m" / BANKS_DIR, [before.banks[0].path.name]
    assert sorted(p.name for p in folder.iterdir()) == listed
    (folder / "site_c.0123456789abcdef.safetensors").write_bytes(b"uncommitted")
    (folder / ".staging-abc").write_bytes(b"half")
    store.sweep()
    assert sorted(p.name for p in folder.iterdir()) == listed


def test_watcher_pushes_the_stores_banks_when_they_change(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    a = _bank(tmp_path, "site_a", b"A" * 64, {1})
    _publish_banks(store, tmp_path, 1, [a], None)
    runtime = _Runtime()
    watcher = StoreWatcher(StoreResolver(store), runtime, 60.0)

    async def scenario() -> None:
        await watcher.start()
        ((name, (ref,), default),) = runtime.bank_calls
        assert (name, ref.name, ref.versions, default) == ("m", "site_a", frozenset({1}), None)
        assert ref.path.parent == store.root / "m" / BANKS_DIR  # the store's copy
        await watcher.sync()
        assert len(runtime.bank_calls) == 1  # nothing changed: nothing pushed
        _publish_banks(store, tmp_path, 2, [a], "auto")  # a new production: same banks
        await watcher.sync()
        assert runtime.bank_calls[-1][2] == "auto" and len(runtime.bank_calls) == 2
        runtime.fail_banks = True
        _publish_banks(store, tmp_path, 2, [], "auto")
        await watcher.sync()
        assert len(runtime.bank_calls) == 2 and runtime.served == {"m": 2}
        runtime.fail_banks = False
        await watcher.sync()  # the failed push is tried again
        assert runtime.bank_calls[-1] == ("m", (), "auto")
        store.remove("m")  # deleted and registered again: a new model, no banks
        store.publish("m", 1, _onnx(tmp_path, 1), uid="id-2", inputs=INPUTS, outputs=OUTPUTS)
        await watcher.sync()
        assert runtime.bank_calls[-1:] == [("m", (), None)]
        calls = len(runtime.bank_calls)
        store.remove("m")
        await watcher.sync()
        assert runtime.bank_calls[calls:] == [("m", (), None)]  # it left the store
        await watcher.close()

    asyncio.run(scenario())
