"""Protocol-neutral tensors: the checks of shapes and values, the feed built against a
model's signature, and the outputs chosen (the REST body codec is in test_v2_codec.py)."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import InvalidInput
from service.runtime.sessions import TensorSpec
from service.runtime.tensors import (
    MAX_DIMENSION,
    MAX_RANK,
    InferInput,
    InferRequest,
    RequestedOutput,
    check_shape,
    datatype_of,
    little_endian,
    select_outputs,
    tensor_from_bytes,
    tensor_from_values,
    to_feed,
)

SPEC_X = TensorSpec("x", "FP32", (-1, 3, 2))
SPEC_Y = TensorSpec("y", "INT64", (-1,))


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([1, -1], "non-negative integers"),
        ([1, True], "non-negative integers"),
        ((1, 2), "non-negative integers"),
        ([1] * (MAX_RANK + 1), f"at most {MAX_RANK} dimensions"),
        ([MAX_DIMENSION + 1], f"dimensions of at most {MAX_DIMENSION}"),
        ([0, 2**20, 2**20, 2**20], "at most 2147483647 elements, counting a 0"),
    ],
)
def test_check_shape_refuses(shape: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_shape(shape, "x")


def test_check_shape_gives_a_tuple() -> None:
    assert check_shape([0, 3], "x") == (0, 3)


def test_tensors_from_values_and_from_bytes_agree() -> None:
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    from_values = tensor_from_values([[0, 1, 2], [3, 4, 5]], "x", "INT32", (2, 3))
    raw = b"pad" + little_endian(x.astype(">i4")).tobytes()
    from_bytes = tensor_from_bytes(raw, 3, 24, "x", "INT32", (2, 3))
    assert from_bytes is not None
    np.testing.assert_array_equal(from_values, x)
    np.testing.assert_array_equal(from_bytes, x)
    assert tensor_from_bytes(raw, 3, 0, "x", "BYTES", (2,)) is None
    with pytest.raises(InvalidInput, match=r"needs 24 bytes \(got binary_data_size 20\)"):
        tensor_from_bytes(raw, 3, 20, "x", "INT32", (2, 3))


def test_datatype_of_either_byte_order() -> None:
    assert datatype_of(np.dtype(">f4")) == datatype_of(np.dtype("<f4")) == "FP32"
    with pytest.raises(InvalidInput, match="numeric or boolean"):
        datatype_of(np.dtype("U3"))


def _request(
    inputs: dict[str, np.ndarray],
    *,
    outputs: list[RequestedOutput] | None = None,
    binary_output: bool = False,
) -> InferRequest:
    return InferRequest(
        inputs=[
            InferInput(name, datatype_of(x.dtype), tuple(x.shape), x) for name, x in inputs.items()
        ],
        parameters={"binary_data_output": binary_output},
        outputs=outputs,
    )


def test_to_feed_ok_and_rows() -> None:
    x = np.zeros((4, 3, 2), np.float32)
    y = np.zeros(4, np.int64)
    feed, rows = to_feed(_request({"y": y, "x": x}), [SPEC_X, SPEC_Y])
    assert rows == 4 and set(feed) == {"x", "y"}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"x": np.zeros((1, 3, 2), np.float64), "y": np.zeros(1, np.int64)},
            r"input 'x': expected datatype FP32 \(got FP64\)",
        ),
        (
            {"x": np.zeros((1, 3, 3), np.float32), "y": np.zeros(1, np.int64)},
            r"input 'x': expected shape \[-1, 3, 2\] \(-1: any size\) \(got \[1, 3, 3\]\)",
        ),
        (
            {"x": np.zeros((3, 2), np.float32), "y": np.zeros(3, np.int64)},
            r"expected shape \[-1, 3, 2\]",
        ),
        (
            {"x": np.zeros((1, 3, 2), np.float32)},
            r"missing input 'y': the model takes x \(FP32 \[-1, 3, 2\]\), y \(INT64 \[-1\]\)",
        ),
        (
            {
                "x": np.zeros((1, 3, 2), np.float32),
                "y": np.zeros(1, np.int64),
                "z": np.zeros(1, np.int64),
            },
            "unexpected input 'z': the model takes x",
        ),
        ({"x": np.zeros((2, 3, 2), np.float32), "y": np.zeros(3, np.int64)}, "one batch size"),
    ],
)
def test_to_feed_refuses_with_expected_vs_got(inputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        to_feed(_request(inputs), [SPEC_X, SPEC_Y])


def test_bytes_refused_clearly() -> None:
    request = InferRequest([InferInput("x", "BYTES", (1,), None)])
    with pytest.raises(InvalidInput, match="expected datatype FP32 \\(got BYTES\\)"):
        to_feed(request, [TensorSpec("x", "FP32", (-1,))])
    with pytest.raises(InvalidInput, match="BYTES tensors are not supported"):
        to_feed(request, [TensorSpec("x", "BYTES", (-1,))])


def test_select_outputs_binary_flags() -> None:
    specs = [TensorSpec("a", "FP32", (-1,)), TensorSpec("b", "FP32", (-1,))]
    x = {"x": np.zeros((1, 3, 2), np.float32)}
    all_binary = _request(x, binary_output=True)
    assert [(s.name, b) for s, b in select_outputs(all_binary, specs)] == [("a", True), ("b", True)]
    none_binary = _request(x, binary_output=False)
    assert [b for _, b in select_outputs(none_binary, specs)] == [False, False]
    only_b = _request(x, outputs=[RequestedOutput("b", True)])
    assert [(s.name, b) for s, b in select_outputs(only_b, specs)] == [("b", True)]
    mixed = _request(
        x, outputs=[RequestedOutput("b"), RequestedOutput("a", False)], binary_output=True
    )
    assert [(s.name, b) for s, b in select_outputs(mixed, specs)] == [("b", True), ("a", False)]
    unknown = _request(x, outputs=[RequestedOutput("c")])
    with pytest.raises(
        InvalidInput, match=r"unknown output 'c': the model has outputs \['a', 'b'\]"
    ):
        select_outputs(unknown, specs)
