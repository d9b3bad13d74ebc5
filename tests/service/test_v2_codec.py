"""The v2 REST body codec: JSON and binary round trips, datatypes, and every malformed-body
path (the tensor checks against a model's signature are in test_runtime_tensors.py)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from service.api.v2_codec import (
    HEADER_LENGTH,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from service.errors import InvalidInput
from service.runtime.sessions import DATATYPES
from service.runtime.tensors import InferOutput, InferResponse


def _body(obj: dict[str, Any], binary: bytes = b"") -> tuple[bytes, int | None]:
    header = json.dumps(obj).encode()
    return header + binary, (len(header) if binary else None)


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
@pytest.mark.parametrize("binary", [True, False])
def test_round_trip_every_datatype(datatype: str, binary: bool) -> None:
    rng = np.random.default_rng(0)
    dtype = DATATYPES[datatype]
    if dtype.kind == "b":
        x = rng.random((2, 3)) > 0.5
    elif dtype.kind == "f":
        x = rng.standard_normal((2, 3)).astype(dtype)
    else:
        x = rng.integers(0, 100, size=(2, 3)).astype(dtype)
    body, header = encode_request({"x": x}, binary=binary, request_id="r1")
    request = decode_request(body, header)
    assert request.id == "r1"
    (item,) = request.inputs
    assert (item.name, item.datatype, item.shape) == ("x", datatype, (2, 3))
    assert item.data is not None and item.data.dtype == dtype
    np.testing.assert_array_equal(item.data, x)
    response = InferResponse("m", "1", [InferOutput("out", x, binary=binary)], id="r1")
    out_body, out_header = encode_response(response)
    assert (out_header is not None) == binary
    decoded = decode_response(out_body, out_header)
    np.testing.assert_array_equal(decoded["out"], x)
    assert decoded["out"].dtype == dtype


def test_binary_layout_is_little_endian_row_major_in_input_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, 8], dtype=np.int64)
    obj = {
        "inputs": [
            {
                "name": "x",
                "shape": [2, 3],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 24},
            },
            {
                "name": "y",
                "shape": [2],
                "datatype": "INT64",
                "parameters": {"binary_data_size": 16},
            },
        ]
    }
    body, header = _body(obj, a.astype("<f4").tobytes() + b.astype("<i8").tobytes())
    request = decode_request(body, str(header))
    np.testing.assert_array_equal(request.inputs[0].data, a)
    np.testing.assert_array_equal(request.inputs[1].data, b)


def test_json_nested_and_flat_data() -> None:
    nested = {
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP64", "data": [[1, 2], [3, 4]]}]
    }
    flat = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP64", "data": [1, 2, 3, 4]}]}
    for obj in (nested, flat):
        (item,) = decode_request(*_body(obj)).inputs
        np.testing.assert_array_equal(item.data, [[1.0, 2.0], [3.0, 4.0]])


def test_binary_response_header_and_sizes() -> None:
    out = np.ones((2, 4), dtype=np.float32)
    lab = np.array([1, 2], dtype=np.int32)
    response = InferResponse(
        "m", "3", [InferOutput("p", out, binary=True), InferOutput("l", lab, binary=False)], id="a"
    )
    body, header = encode_response(response)
    assert header is not None
    head = json.loads(body[:header])
    assert head["model_name"] == "m" and head["model_version"] == "3" and head["id"] == "a"
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 32}
    assert head["outputs"][1]["data"] == [1, 2]
    assert len(body) == header + 32


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("abc", "expected a non-negative integer (got 'abc')"),
        ("-1", "between 0 and the body size"),
        ("999999", "(got 999999)"),
    ],
)
def test_malformed_header_length(header: str, message: str) -> None:
    body, _ = encode_request({"x": np.zeros((1, 3, 2), np.float32)})
    with pytest.raises(InvalidInput, match=HEADER_LENGTH) as err:
        decode_request(body, header)
    assert message in err.value.message


def test_truncated_binary_body_says_expected_vs_got() -> None:
    body, header = encode_request({"x": np.zeros((2, 3, 2), np.float32)})
    with pytest.raises(
        InvalidInput, match=r"binary_data_size 48 needs bytes \[0, 48\).*has 40 bytes"
    ):
        decode_request(body[:-8], header)


def test_extra_binary_bytes_refused() -> None:
    body, header = encode_request({"x": np.zeros((2, 3, 2), np.float32)})
    with pytest.raises(InvalidInput, match=r"expected 48 bytes of binary tensor data.*\(got 52\)"):
        decode_request(body + b"junk", header)


def test_binary_without_header_is_truncated() -> None:
    body, _ = encode_request({"x": np.zeros((1, 3, 2), np.float32)})
    with pytest.raises(InvalidInput):
        decode_request(body, None)


def test_binary_size_must_match_shape_and_datatype() -> None:
    obj = {
        "inputs": [
            {
                "name": "x",
                "shape": [1, 3, 2],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 12},
            }
        ]
    }
    with pytest.raises(
        InvalidInput, match=r"shape \[1, 3, 2\] of FP32 needs 24 bytes \(got binary_data_size 12\)"
    ):
        decode_request(*_body(obj, b"\0" * 12))


def test_json_element_count_mismatch() -> None:
    obj = {"inputs": [{"name": "x", "shape": [1, 3, 2], "datatype": "FP32", "data": [1, 2, 3]}]}
    with pytest.raises(InvalidInput, match=r"shape \[1, 3, 2\] needs 6 elements \(got 3 in data\)"):
        decode_request(*_body(obj))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "x", "shape": [2], "datatype": "FP17", "data": [1, 2]}, "expected datatype in"),
        (
            {"name": "x", "shape": [2], "datatype": "INT32", "data": [1.5, 2]},
            "expected integers for datatype INT32",
        ),
        (
            {"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, 300]},
            r"expected values in \[0, 255\]",
        ),
        ({"name": "x", "shape": [2], "datatype": "BOOL", "data": [1, 0]}, "expected booleans"),
        ({"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}, "expected numbers"),
        ({"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3]]}, "ragged"),
        ({"name": "x", "shape": [-2], "datatype": "FP32", "data": []}, "non-negative integers"),
        ({"name": "x", "shape": [1], "datatype": "FP32"}, "got neither"),
        ({"shape": [1], "datatype": "FP32", "data": [1]}, "expected 'name'"),
        (
            {
                "name": "x",
                "shape": [1],
                "datatype": "FP32",
                "data": [1],
                "parameters": {"binary_data_size": 4},
            },
            "got both",
        ),
    ],
)
def test_malformed_inputs(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_request(*_body({"inputs": [entry]}))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"inputs": []}', "non-empty list"),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "id": 5}',
            "'id' as a string",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], '
            b'"outputs": [{"name": "y", "parameters": {"classification": 3}}]}',
            "classification",
        ),
    ],
)
def test_malformed_requests(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_request(raw)


def test_json_float16_booleans_and_big_endian_round_trip() -> None:
    x = np.arange(6, dtype=np.float16).reshape(2, 3) / 3
    flags = np.array([True, False])
    body, header = encode_request({"x": x, "f": flags}, binary=False, request_id="j")
    request = decode_request(body, header)
    assert request.id == "j"
    np.testing.assert_array_equal(request.inputs[0].data, x)
    np.testing.assert_array_equal(request.inputs[1].data, flags)
    outputs = [
        InferOutput("x", x),
        InferOutput("f", flags),
        InferOutput("i", np.arange(3, dtype=">i4")),
    ]
    out_body, out_header = encode_response(InferResponse("m", "1", outputs))
    assert out_header is None
    decoded = decode_response(out_body)
    np.testing.assert_array_equal(decoded["x"], x)
    np.testing.assert_array_equal(decoded["f"], flags)
    np.testing.assert_array_equal(decoded["i"], [0, 1, 2])
    with pytest.raises(InvalidInput, match="invalid JSON"):
        decode_request(b'{"inputs": [}')


def test_element_count_is_capped() -> None:
    entry = {"name": "input", "shape": [0, 2**20, 2**20, 2**20], "datatype": "FP32", "data": []}
    with pytest.raises(InvalidInput, match="expected at most 2147483647 elements"):
        decode_request(json.dumps({"inputs": [entry]}).encode())
