"""Protocol-neutral inference tensors: the decoded request and response, and their checks.

Both bindings of the Open Inference Protocol (the REST body codec of
:mod:`service.api.v2_codec`, and gRPC) decode into :class:`InferRequest` and encode from
:class:`InferResponse`; what does not depend on the wire format lives here:

* :class:`InferInput`, :class:`RequestedOutput`, :class:`InferRequest`,
  :class:`InferOutput`, :class:`InferResponse` - the request and response.
* :func:`check_shape`, :func:`tensor_from_values`, :func:`tensor_from_bytes` - build an
  input tensor from a shape and row-major values or raw little-endian bytes, with the
  limits :data:`MAX_RANK`, :data:`MAX_DIMENSION`, :data:`MAX_ELEMENTS`.
* :func:`datatype_of`, :func:`little_endian` - the protocol datatype of a NumPy array and
  its little-endian, row-major form (what the binary sections carry).
* :func:`to_feed` - validate against the model's inputs, giving the ORT feed and rows.
* :func:`select_outputs` - which outputs to return, each in JSON or binary.
* :func:`check_parameters` - refuse the request parameters the server does not honour
  (sequences, priorities, timeouts: :data:`UNSUPPORTED_PARAMETERS`).

Datatypes: ``BOOL``, ``UINT8``..``UINT64``, ``INT8``..``INT64``, ``FP16``, ``FP32``,
``FP64``. ``BYTES`` is parsed but refused by :func:`to_feed`: the served ONNX models take
numeric tensors. Every malformed tensor raises :class:`service.errors.InvalidInput` with a
message that says what was expected and what arrived.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import InvalidInput
from .sessions import DATATYPES, TensorSpec

__all__ = [
    "KNOWN_DATATYPES",
    "MAX_DIMENSION",
    "MAX_ELEMENTS",
    "MAX_RANK",
    "InferInput",
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "RequestedOutput",
    "UNSUPPORTED_PARAMETERS",
    "check_parameters",
    "check_shape",
    "datatype_of",
    "little_endian",
    "select_outputs",
    "tensor_from_bytes",
    "tensor_from_values",
    "to_feed",
]

MAX_RANK = 32
"""Most dimensions a tensor shape may have."""

MAX_DIMENSION = 2**31 - 1
"""Largest size of one dimension."""

MAX_ELEMENTS = 2**31 - 1
"""Largest product of a shape's dimensions (a 0 dimension counted as 1)."""

KNOWN_DATATYPES = frozenset(DATATYPES) | {"BYTES"}
"""The datatypes a request may name (``BYTES`` is then refused by :func:`to_feed`)."""

UNSUPPORTED_PARAMETERS: dict[str, str] = {
    "sequence_id": "sequence batching is not supported by this server",
    "sequence_start": "sequence batching is not supported by this server",
    "sequence_end": "sequence batching is not supported by this server",
    "priority": "request priorities are not supported by this server (one first-come, "
    "first-served queue per model version)",
    "timeout": "request timeouts are not supported by this server (a request waits until "
    "it is answered; set a deadline on the client)",
}
"""Request parameters (Triton's, as ``tritonclient`` sends them) that the server does not
honour, and why: a request carrying one with a value other than its neutral default
(``0``, ``""``, ``false``) is refused rather than silently served differently."""

_UNSUPPORTED_KEYS = frozenset(UNSUPPORTED_PARAMETERS)

Array = npt.NDArray[Any]

_KINDS: dict[str, str] = {"b": "b", "i": "iu", "u": "iu", "f": "fiu"}
_KIND_WORDS = {"b": "booleans", "iu": "integers", "fiu": "numbers"}


@dataclass(eq=False)
class InferInput:
    """One decoded input tensor.

    Attributes:
        name, datatype, shape: as sent.
        data: the values with ``shape`` and the datatype's dtype (``None`` for BYTES).
        parameters: the input's ``parameters`` object.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Array | None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestedOutput:
    """An entry of the request's ``outputs``: the name and whether it goes back binary
    (``None``: the request-level ``binary_data_output`` decides)."""

    name: str
    binary: bool | None = None


@dataclass(eq=False)
class InferRequest:
    """A decoded inference request.

    Attributes:
        inputs: the input tensors, in request order.
        id: the request id, echoed in the response.
        parameters: request-level parameters.
        outputs: requested outputs, ``None`` for all of them.
    """

    inputs: list[InferInput]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None

    @property
    def binary_output(self) -> bool:
        """Request-level ``binary_data_output`` (default for outputs without a setting)."""
        return bool(self.parameters.get("binary_data_output", False))


@dataclass(eq=False)
class InferOutput:
    """One output tensor of a response; ``binary`` sends it in the binary section."""

    name: str
    data: Array
    binary: bool = False
    datatype: str = ""

    def __post_init__(self) -> None:
        if not self.datatype:
            self.datatype = datatype_of(self.data.dtype)


@dataclass(eq=False)
class InferResponse:
    """An inference response (``model_version`` is a string, as the protocol has it)."""

    model_name: str
    model_version: str
    outputs: list[InferOutput]
    id: str | None = None
    parameters: dict[str, Any] | None = None


_DTYPE_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The protocol datatype of ``dtype`` (either byte order).

    Raises:
        InvalidInput: not a numeric or boolean dtype.
    """
    name = _DTYPE_NAMES.get(dtype if dtype.isnative else dtype.newbyteorder("="))
    if name is None:
        raise InvalidInput(f"expected a numeric or boolean tensor (got dtype {dtype})")
    return name


# -- building input tensors ------------------------------------------------------------


def check_shape(value: Any, name: str) -> tuple[int, ...]:
    """``value`` as a shape, checked against :data:`MAX_RANK`, :data:`MAX_DIMENSION` and
    :data:`MAX_ELEMENTS`.

    Args:
        value: the shape as sent (a list of non-negative integers).
        name: the tensor's name, for the messages.

    Returns:
        The shape as a tuple.

    Raises:
        InvalidInput: not a list of non-negative integers, or above a limit.
    """
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise InvalidInput(
            f"input {name!r}: expected shape as a list of non-negative integers (got {value!r})"
        )
    if len(value) > MAX_RANK:
        raise InvalidInput(
            f"input {name!r}: expected at most {MAX_RANK} dimensions (got {len(value)})"
        )
    if any(d > MAX_DIMENSION for d in value):
        raise InvalidInput(
            f"input {name!r}: expected dimensions of at most {MAX_DIMENSION} (got {_fmt(value)})"
        )
    # zeros count as 1: numpy refuses a shape whose other dimensions overflow, even empty
    if math.prod(max(d, 1) for d in value) > MAX_ELEMENTS:
        raise InvalidInput(
            f"input {name!r}: expected at most {MAX_ELEMENTS} elements, counting a 0 "
            f"dimension as 1 (got shape {_fmt(value)})"
        )
    return tuple(value)


def tensor_from_values(data: Any, name: str, datatype: str, shape: tuple[int, ...]) -> Array:
    """An input tensor from row-major values (flat or nested lists, or one scalar).

    Args:
        data: the values (lists from JSON, or an array read from typed gRPC contents).
        name: the tensor's name, for the messages.
        datatype: a numeric or ``BOOL`` datatype (a key of ``DATATYPES``).
        shape: a shape checked by :func:`check_shape`.

    Returns:
        The values with ``shape`` and the datatype's dtype.

    Raises:
        InvalidInput: ragged lists, the wrong element count, values of another kind
            (e.g. floats for ``INT64``) or out of the integer datatype's range.
    """
    count = math.prod(shape)
    if not isinstance(data, (list, np.ndarray)):  # an array (the gRPC codec's) as it is
        data = [data]
    try:
        raw = np.asarray(data)
    except ValueError:
        raise InvalidInput(
            f"input {name!r}: expected data as a flat or rectangular nested list "
            "(got a ragged nested list)"
        ) from None
    if raw.size != count:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} needs {count} elements (got {raw.size} in data)"
        )
    dtype = DATATYPES[datatype]
    allowed = _KINDS[dtype.kind]
    if raw.size and raw.dtype.kind not in allowed:
        raise InvalidInput(
            f"input {name!r}: expected {_KIND_WORDS[allowed]} for datatype {datatype} "
            f"(got {raw.dtype.kind!r} values, e.g. {raw.ravel()[0]!r})"
        )
    if dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        low, high = raw.min(), raw.max()
        if low < info.min or high > info.max:
            raise InvalidInput(
                f"input {name!r}: expected values in [{info.min}, {info.max}] for {datatype} "
                f"(got values in [{low}, {high}])"
            )
    return raw.astype(dtype, copy=False).reshape(shape)


def tensor_from_bytes(
    buffer: bytes, offset: int, size: int, name: str, datatype: str, shape: tuple[int, ...]
) -> Array | None:
    """An input tensor from ``size`` raw little-endian, row-major bytes of ``buffer``
    (a view, no copy).

    Args:
        buffer: the bytes holding the tensor at ``offset`` (the caller checked that
            ``offset + size`` fits).
        offset, size: where the tensor's bytes are.
        name: the tensor's name, for the messages.
        datatype: a datatype of :data:`KNOWN_DATATYPES`.
        shape: a shape checked by :func:`check_shape`.

    Returns:
        The tensor, or ``None`` for ``BYTES``.

    Raises:
        InvalidInput: ``size`` is not what ``shape`` and ``datatype`` need.
    """
    if datatype == "BYTES":
        return None
    dtype = DATATYPES[datatype].newbyteorder("<")
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if size != expected:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} of {datatype} needs {expected} bytes "
            f"(got binary_data_size {size})"
        )
    return np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)


def little_endian(arr: Array) -> Array:
    """``arr`` as a contiguous little-endian array (what binary sections carry)."""
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr)


# -- validation against the model ------------------------------------------------------


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _takes(inputs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{s.name} ({s.datatype} {_fmt(s.shape)})" for s in inputs)


def to_feed(request: InferRequest, inputs: Sequence[TensorSpec]) -> tuple[dict[str, Array], int]:
    """Check the request's inputs against the model's and build the ORT feed.

    Args:
        request: a decoded request.
        inputs: the model's input signature.

    Returns:
        ``(feed, rows)``: input name to array, and the batch rows (axis 0 of the inputs
        when every model input has a variable axis 0, else 1).

    Raises:
        InvalidInput: unknown, missing or repeated input; wrong datatype, rank or fixed
            dimension; BYTES; inputs with different batch sizes.
    """
    specs = {spec.name: spec for spec in inputs}
    feed: dict[str, Array] = {}
    for item in request.inputs:
        spec = specs.get(item.name)
        if spec is None:
            raise InvalidInput(f"unexpected input {item.name!r}: the model takes {_takes(inputs)}")
        if item.name in feed:
            raise InvalidInput(f"input {item.name!r}: expected once (got it twice)")
        if item.datatype != spec.datatype:
            raise InvalidInput(
                f"input {item.name!r}: expected datatype {spec.datatype} (got {item.datatype})"
            )
        if item.data is None or spec.dtype is None:
            raise InvalidInput(
                f"input {item.name!r}: {spec.datatype} tensors are not supported by this server "
                "(expected a numeric or BOOL input)"
            )
        shape = item.shape
        if len(shape) != len(spec.shape) or any(
            d != -1 and d != g for d, g in zip(spec.shape, shape, strict=True)
        ):
            raise InvalidInput(
                f"input {item.name!r}: expected shape {_fmt(spec.shape)} (-1: any size) "
                f"(got {_fmt(shape)})"
            )
        feed[item.name] = item.data
    missing = [s for s in inputs if s.name not in feed]
    if missing:
        raise InvalidInput(f"missing input {missing[0].name!r}: the model takes {_takes(inputs)}")
    rows = 1
    if inputs and all(spec.batched for spec in inputs):
        sizes = {name: arr.shape[0] for name, arr in feed.items()}
        if len(set(sizes.values())) > 1:
            raise InvalidInput(f"expected inputs with one batch size on axis 0 (got {sizes})")
        rows = next(iter(sizes.values()))
        if rows == 0:
            raise InvalidInput("expected at least 1 row (got 0)")
    for name, arr in feed.items():
        if arr.size == 0:
            raise InvalidInput(
                f"input {name!r}: expected a non-empty tensor (got shape {_fmt(arr.shape)})"
            )
    return feed, rows


def select_outputs(
    request: InferRequest, outputs: Sequence[TensorSpec]
) -> list[tuple[TensorSpec, bool]]:
    """The outputs to return and whether each goes back binary.

    Args:
        request: a decoded request.
        outputs: the model's output signature.

    Returns:
        ``(spec, binary)`` per output to return, in the order asked for (all outputs in
        model order when the request names none).

    Raises:
        InvalidInput: an unknown or repeated output name.
    """
    default = request.binary_output
    if request.outputs is None:
        return [(spec, default) for spec in outputs]
    specs = {spec.name: spec for spec in outputs}
    chosen: list[tuple[TensorSpec, bool]] = []
    seen: set[str] = set()
    for item in request.outputs:
        spec = specs.get(item.name)
        if spec is None:
            raise InvalidInput(f"unknown output {item.name!r}: the model has outputs {list(specs)}")
        if item.name in seen:
            raise InvalidInput(f"output {item.name!r}: expected once (got it twice)")
        seen.add(item.name)
        chosen.append((spec, default if item.binary is None else item.binary))
    return chosen


def check_parameters(parameters: dict[str, Any]) -> None:
    """Refuse request parameters the server does not honour.

    Args:
        parameters: the request-level ``parameters``.

    Raises:
        InvalidInput: one of :data:`UNSUPPORTED_PARAMETERS` with a value other than
            ``0``, ``""`` or ``false`` (which ask for nothing).
    """
    if not parameters or _UNSUPPORTED_KEYS.isdisjoint(parameters):
        return
    for key in UNSUPPORTED_PARAMETERS:
        value = parameters.get(key)
        if value is not None and value not in (0, "", False):
            raise InvalidInput(
                f"request parameter {key!r}: {UNSUPPORTED_PARAMETERS[key]} "
                f"(expected no {key!r}, got {str(value)[:40]!r})"
            )
