"""Control-plane fixtures: a fake serving runtime, tiny ONNX files, apps on temp homes.

The fake runtime implements the runtime contract the control plane uses (``start``,
``close``, ``serve``, ``unload_model``, ``drift``, ``reset_drift``) and records calls, so
registry, alias and job tests need no ONNX Runtime sessions; tests of the whole story use
the real ``ServingRuntime``. The control plane is built by ``create_app`` only
(``make_api``, ``registry``), never wired by hand.
"""

from __future__ import annotations

import io
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
from service_helpers import AUTH, TOKEN, Api, FakeRuntime

from service.app import create_app
from service.registry import Registry
from service.settings import Settings


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
