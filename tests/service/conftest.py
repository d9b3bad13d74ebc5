"""Control-plane fixtures: a fake serving runtime, tiny ONNX files, apps on temp homes.

The fake runtime implements the runtime contract the control plane uses (``start``,
``close``, ``serve``, ``unload_model``, ``drift``, ``reset_drift``) and records calls, so
registry, alias and job tests need no ONNX Runtime sessions; tests of the whole story use
the real ``ServingRuntime``. The control plane is built by ``create_app`` only
(``make_api``, ``registry``), never wired by hand.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from service.app import create_app
from service.errors import InvalidInput, NotFound
from service.registry import Registry
from service.settings import Settings

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeRuntime:
    """Records what the control plane asks; ``fail`` holds ``(name, version)`` that
    refuse to load."""

    def __init__(self) -> None:
        self.served: dict[str, int] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.fail: set[tuple[str, int]] = set()
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def serve(
        self,
        name: str,
        version: int,
        onnx_path: Path,
        *,
        if_unserved: bool = False,
        generation: int | None = None,  # noqa: ARG002 - the data plane's race guard
    ) -> None:
        if if_unserved and name in self.served:
            return
        self.calls.append(("serve", name, version))
        if (name, version) in self.fail or not onnx_path.is_file():
            raise InvalidInput(f"could not load {name} version {version}")
        self.served[name] = version

    def served_version(self, name: str) -> int | None:
        return self.served.get(name)

    def generation(self, name: str) -> int:  # noqa: ARG002 - no deletes race here
        """The data plane reads it before resolving (see ``service.dataplane``)."""
        return 0

    async def unload_model(self, name: str) -> None:
        self.calls.append(("unload", name))
        self.served.pop(name, None)

    def drift(self, name: str) -> dict[str, Any]:
        if name not in self.served:
            raise NotFound(f"model {name!r} is not served")
        return {"model": name, "version": self.served[name], "score": 0.5, "exceeded": False}

    def reset_drift(self, name: str) -> None:
        self.calls.append(("reset_drift", name))


@pytest.fixture(scope="session")
def bn_onnx(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small BN CNN on ``(N, 3, 8, 8)`` (BN statistics of its source domain), as ONNX."""
    from runtime_helpers import export, make_model

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export(make_model(0), path)
    return path.read_bytes()


@pytest.fixture
def runtime() -> FakeRuntime:
    """A fresh fake runtime (give ``make_api`` ``runtime=`` for the real one)."""
    return FakeRuntime()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", api_token=SecretStr(TOKEN), drift_sample_fraction=1.0)


class Api:
    """A started app's client with the calls tests repeat."""

    def __init__(self, client: TestClient, runtime: Any) -> None:
        self.client = client
        self.runtime = runtime
        self.app: Any = cast(Any, client.app)
        self.home: Path = self.app.state.settings.home
        self.closed = False

    def close(self) -> None:
        """Stop the app (its lifespan's shutdown runs)."""
        if not self.closed:
            self.closed = True
            self.client.__exit__(None, None, None)

    def register(self, name: str, data: bytes, filename: str = "model.onnx", **form: str) -> Any:
        """POST /v1/models."""
        return self.client.post(
            "/v1/models", data={"name": name, **form}, files={"file": (filename, data)}
        )

    def upload(self, data: bytes, filename: str = "data.npz") -> Any:
        """POST /v1/datasets."""
        return self.client.post("/v1/datasets", files={"file": (filename, data)})

    def wait(self, job_id: str, *, limit: float = 120.0) -> dict[str, Any]:
        """Poll a job until it is final (``limit`` only guards against a hang)."""
        end = time.monotonic() + limit
        while True:
            job: dict[str, Any] = self.client.get(f"/v1/recalibrations/{job_id}").json()
            if job["state"] not in ("queued", "running"):
                return job
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} still {job['state']} after {limit} s")
            time.sleep(0.05)

    def files(self) -> list[str]:
        """Every file under the home but the database (for "nothing changed" checks)."""
        return sorted(
            str(p.relative_to(self.home))
            for p in self.home.rglob("*")
            if p.is_file() and not p.name.startswith("recalib.db")
        )


@pytest.fixture
def make_api(runtime: FakeRuntime) -> Iterator[Callable[..., Api]]:
    """``make_api(settings, **create_app_kwargs)``: a started app (the fake runtime unless
    ``runtime=`` is given), stopped at teardown."""
    opened: list[Api] = []

    def make(settings: Settings, **kwargs: Any) -> Api:
        kwargs.setdefault("runtime", runtime)
        kwargs.setdefault("metrics_registry", CollectorRegistry())
        client = TestClient(create_app(settings, **kwargs), headers=AUTH)
        client.__enter__()
        opened.append(Api(client, kwargs["runtime"]))
        return opened[-1]

    yield make
    for api in reversed(opened):
        api.close()


@pytest.fixture
def api(make_api: Callable[..., Api], settings: Settings) -> Api:
    return make_api(settings)


@pytest.fixture
def registry(settings: Settings, runtime: FakeRuntime) -> Iterator[Registry]:
    """The registry as :func:`create_app` wires it (over the fake runtime), without HTTP
    and without starting the app; its database is closed at teardown."""
    app = create_app(settings, runtime=runtime, metrics_registry=CollectorRegistry())
    yield app.state.registry
    app.state.db.close()


@pytest.fixture(scope="session")
def no_bn_onnx() -> bytes:
    """A valid ONNX model without BatchNormalization (one Relu)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    serialised: bytes = model.SerializeToString()
    return serialised


@pytest.fixture(scope="session")
def npz() -> Callable[..., bytes]:
    """``npz(x=..., y=...)``: the bytes of an ``.npz`` holding those arrays."""

    def make(**arrays: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **cast("dict[str, Any]", arrays))
        return buf.getvalue()

    return make
