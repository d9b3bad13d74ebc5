"""Fixtures of the container / observability tests (helpers live in ``promhelpers``).

``service_exposition`` is the ``/metrics`` text of a real app (``create_app`` with the real
serving runtime) after every :class:`service.metrics.ServiceMetrics` method ran at least
once: a tiny BN model is registered and served, answers good and malformed inference
requests, reports drift; the two events a test cannot cause cheaply (a provider fallback,
a finished recalibration job) are recorded through the same metrics object with values the
service produces.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from promhelpers import (
    Exposition,
    labels_from_exposition,
    names_from_exposition,
    require_binary,
)

TINY_MODEL = "tiny"
GONE_MODEL = "gone"
_IMAGE = (3, 4, 4)


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_binary("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return require_binary("prometheus")


def _tiny_bn_onnx() -> bytes:
    """``y = BatchNormalization(x)`` on ``(N, 3, 4, 4)`` with stored statistics."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    channels = _IMAGE[0]
    params = {
        "scale": np.array([1.0, 0.5, 2.0], dtype=np.float32),
        "bias": np.array([0.0, 0.1, -0.2], dtype=np.float32),
        "mean": np.zeros(channels, dtype=np.float32),
        "var": np.ones(channels, dtype=np.float32),
    }
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *_IMAGE])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *_IMAGE])
    node = helper.make_node("BatchNormalization", ["x", *params], ["y"], name="bn1", epsilon=1e-5)
    graph = helper.make_graph(
        [node],
        "tiny_bn",
        [x],
        [y],
        initializer=[numpy_helper.from_array(v, k) for k, v in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    serialised: bytes = model.SerializeToString()
    return serialised


def _recording(original: Callable[..., Any], name: str, called: set[str]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        called.add(name)
        return original(*args, **kwargs)

    return wrapper


def _infer_body(rows: np.ndarray) -> dict[str, Any]:
    tensor = {"name": "x", "shape": list(rows.shape), "datatype": "FP32"}
    return {"inputs": [{**tensor, "data": rows.ravel().tolist()}]}


@pytest.fixture(scope="session")
def service_exposition(tmp_path_factory: pytest.TempPathFactory) -> Exposition:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.metrics import ServiceMetrics
    from service.settings import Settings

    public = frozenset(
        name
        for name, value in vars(ServiceMetrics).items()
        if callable(value) and not name.startswith("_")
    )
    called: set[str] = set()
    settings = Settings(
        home=tmp_path_factory.mktemp("home"),
        execution_provider="cpu",
        intra_op_threads=1,
        warmup_batch_sizes=[2],
        drift_sample_fraction=1.0,
        drift_per_layer_metrics=True,
        drift_threshold=0.5,
        drift_min_rows=4,  # the 4 rows sent below
    )
    rng = np.random.default_rng(0)
    with pytest.MonkeyPatch.context() as patch:
        for name in public:
            patch.setattr(
                ServiceMetrics, name, _recording(getattr(ServiceMetrics, name), name, called)
            )
        app = create_app(settings)
        with TestClient(app) as client:
            files = {"file": ("tiny.onnx", _tiny_bn_onnx())}
            registered = client.post("/v1/models", data={"name": TINY_MODEL}, files=files)
            assert registered.status_code == 201, registered.text
            shifted = (rng.standard_normal((4, *_IMAGE)) * 3.0 + 2.0).astype(np.float32)
            ok = client.post(f"/v2/models/{TINY_MODEL}/infer", json=_infer_body(shifted))
            assert ok.status_code == 200, ok.text
            wrong = _infer_body(np.zeros((1, 3, 2, 2), dtype=np.float32))
            rejected = client.post(f"/v2/models/{TINY_MODEL}/infer", json=wrong)
            assert rejected.status_code == 400, rejected.text
            deadline = time.monotonic() + 60.0
            while True:  # the drift window is updated off the request path
                drift = client.get(f"/v1/models/{TINY_MODEL}/drift").json()
                if drift["samples"] > 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert drift["samples"] == 4 and drift["exceeded"], drift
            # Not caused for real here (they need a GPU build without CUDA, or a worker
            # process): recorded with values the service produces.
            metrics = app.state.metrics
            metrics.provider_fallback(TINY_MODEL, 1)
            metrics.job_finished("failed", 3.5)
            # stat banks (tests/service/test_runtime_banks.py serves them for real)
            metrics.observe_bank_request(TINY_MODEL, ["night"], limit=8, distances=[0.05])
            metrics.observe_bank_request(TINY_MODEL, ["none"], limit=8, fallbacks=1)
            metrics.set_banks_loaded(TINY_MODEL, 1, 1)
            metrics.set_bank_drift(TINY_MODEL, 1, "night", score=0.2, exceeded=False)
            metrics.set_bank_drift(TINY_MODEL, 1, "gone", score=0.3, exceeded=True)
            metrics.forget_bank_drift(TINY_MODEL, 1, "gone")
            metrics.bank_load_failed(TINY_MODEL)
            # a broken file cannot be registered (its checks run first): a load failure
            # of the runtime recorded as it records one
            from service.errors import InvalidInput

            metrics.model_load_failed(TINY_MODEL, InvalidInput("expected an ONNX model file"))
            # a second model served, then deleted: its series go with it (forget_model)
            files = {"file": ("gone.onnx", _tiny_bn_onnx())}
            assert client.post("/v1/models", data={"name": GONE_MODEL}, files=files).is_success
            gone = client.post(f"/v2/models/{GONE_MODEL}/infer", json=_infer_body(shifted))
            assert gone.status_code == 200, gone.text
            assert client.delete(f"/v1/models/{GONE_MODEL}").status_code == 204
            response = client.get("/metrics")
            assert response.status_code == 200, response.text
            assert f'model="{GONE_MODEL}"' not in response.text
    # Leaving the client ran the shutdown: the runtime unloaded the version (forget_version).
    return Exposition(response.text, frozenset(called), public)


@pytest.fixture(scope="session")
def exported_metrics(service_exposition: Exposition) -> set[str]:
    """Sample names the live ``/metrics`` of ``service_exposition`` exposes."""
    return names_from_exposition(service_exposition.text)


@pytest.fixture(scope="session")
def exported_labels(service_exposition: Exposition) -> dict[str, frozenset[str]]:
    """``{sample name: label names}`` of the samples in ``service_exposition``."""
    return labels_from_exposition(service_exposition.text)
