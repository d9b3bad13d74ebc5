"""Regression tests for data-plane review findings: empty and oversized shapes, races of
serve/unload on the served pointer, and a batcher whose consumer dies."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import FakeRegistry, build_app, export, make_model

from service.runtime.kserve import HEADER_LENGTH, decode_request
from service.settings import Settings

with warnings.catch_warnings():  # starlette 1.x asks for httpx2 instead of httpx
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(make_model(0), tmp_path_factory.mktemp("fixes") / "v1.onnx")


def _settings(tmp_path: Path, **kwargs: Any) -> Settings:
    base: dict[str, Any] = {"home": tmp_path, "execution_provider": "cpu", "intra_op_threads": 1}
    return Settings(**{**base, **kwargs})


@pytest.fixture
def client(onnx_path: Path, tmp_path: Path) -> Iterator[TestClient]:
    # drift on every request: the tapped graph is the one that broke on 0 rows
    settings = _settings(tmp_path, drift_sample_fraction=1.0)
    with TestClient(build_app(settings, FakeRegistry({1: onnx_path}))) as c:
        yield c


def test_zero_rows_is_400(client: TestClient) -> None:
    body = {"inputs": [{"name": "input", "shape": [0, 3, 8, 8], "datatype": "FP32", "data": []}]}
    response = client.post("/v2/models/m/infer", json=body)
    assert response.status_code == 400, response.text
    assert response.json() == {"error": "expected at least 1 row (got 0)"}


@pytest.mark.parametrize("binary", [False, True])
def test_huge_dimension_of_an_empty_shape_is_400(client: TestClient, binary: bool) -> None:
    entry: dict[str, Any] = {"name": "input", "shape": [0, 3, 8, 2**62], "datatype": "FP32"}
    if binary:
        entry["parameters"] = {"binary_data_size": 0}
    else:
        entry["data"] = []
    header = json.dumps({"inputs": [entry]}).encode()
    response = client.post(
        "/v2/models/m/infer", content=header, headers={HEADER_LENGTH: str(len(header))}
    )
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert "expected dimensions of at most 2147483647" in message
    assert str(2**62) in message


def test_element_count_is_capped() -> None:
    entry = {"name": "input", "shape": [0, 2**20, 2**20, 2**20], "datatype": "FP32", "data": []}
    with pytest.raises(Exception, match="expected at most 2147483647 elements") as info:
        decode_request(json.dumps({"inputs": [entry]}).encode())
    assert type(info.value).__name__ == "InvalidInput"
