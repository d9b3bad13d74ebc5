"""Open Inference Protocol (KServe v2) codec: JSON tensors and the binary tensor extension.

Requests (``POST /v2/models/{name}[/versions/{version}]/infer``) are JSON::

    {"id": "...", "parameters": {...},
     "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
     "outputs": [{"name": "y", "parameters": {"binary_data": true}}]}

``data`` is flat or nested, row-major. With the binary tensor extension (Triton's; what
``tritonclient.http`` sends by default) the body is the JSON header followed by the raw
tensor bytes: the ``Inference-Header-Content-Length`` HTTP header gives the JSON length,
and each binary input carries ``parameters.binary_data_size`` instead of ``data``; the
bytes are little-endian, row-major, in input order. Outputs asked for with
``parameters.binary_data: true`` (per output) or request parameter
``binary_data_output: true`` (all outputs without their own setting) come back the same
way: the response header gives the JSON length and each binary output has
``parameters.binary_data_size``.

Datatypes: ``BOOL``, ``UINT8``..``UINT64``, ``INT8``..``INT64``, ``FP16``, ``FP32``,
``FP64``. ``BYTES`` is parsed but refused by :func:`to_feed`: the served ONNX models take
numeric tensors.

Every malformed request raises :class:`service.errors.InvalidInput` with a message that
says what was expected and what arrived.

* :func:`decode_request` - body bytes (+ header value) to :class:`InferRequest`.
* :func:`to_feed` - validate against the model's inputs, giving the ORT feed and rows.
* :func:`select_outputs` - which outputs to return, each in JSON or binary.
* :func:`encode_response` - :class:`InferResponse` to body bytes (+ header value).
* :func:`encode_request` / :func:`decode_response` - the client side (tests, benchmark).

JSON goes through ``orjson`` when it is installed (about 10x faster on tensor payloads;
NumPy arrays are serialized without ``tolist()``), else through the standard library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from service.errors import InvalidInput

from .sessions import DATATYPES, TensorSpec

try:
    import orjson as _orjson
except ImportError:  # optional speed-up
    _orjson = None  # type: ignore[assignment]

__all__ = [
    "HEADER_LENGTH",
    "MAX_DIMENSION",
    "MAX_ELEMENTS",
    "MAX_RANK",
    "InferInput",
    "InferOutput",
    "InferRequest",
    "InferResponse",
    "RequestedOutput",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "select_outputs",
    "to_feed",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
"""HTTP header giving the length of the JSON part of a binary-extension body."""

MAX_RANK = 32
"""Most dimensions a tensor shape may have."""

MAX_DIMENSION = 2**31 - 1
"""Largest size of one dimension."""

MAX_ELEMENTS = 2**31 - 1
"""Largest product of a shape's dimensions (a 0 dimension counted as 1)."""

Array = npt.NDArray[Any]

_KNOWN = frozenset(DATATYPES) | {"BYTES"}
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
            self.datatype = _datatype_of(self.data.dtype)


@dataclass(eq=False)
class InferResponse:
    """An inference response (``model_version`` is a string, as the protocol has it)."""

    model_name: str
    model_version: str
    outputs: list[InferOutput]
    id: str | None = None
    parameters: dict[str, Any] | None = None


_DTYPE_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


def _datatype_of(dtype: np.dtype[Any]) -> str:
    name = _DTYPE_NAMES.get(dtype if dtype.isnative else dtype.newbyteorder("="))
    if name is None:
        raise InvalidInput(f"expected a numeric or boolean tensor (got dtype {dtype})")
    return name


# -- decoding --------------------------------------------------------------------------


def _header_length(value: str | int | None, body_size: int) -> int:
    if value is None:
        return body_size
    try:
        length = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(
            f"{HEADER_LENGTH}: expected a non-negative integer (got {str(value)[:40]!r})"
        ) from None
    if length < 0 or length > body_size:
        raise InvalidInput(
            f"{HEADER_LENGTH}: expected a JSON length between 0 and the body size {body_size} "
            f"(got {length})"
        )
    return length


def _loads(raw: bytes) -> Any:
    if _orjson is not None:
        return _orjson.loads(raw)
    return json.loads(raw)


def _load_json(raw: bytes) -> dict[str, Any]:
    try:
        obj = _loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"request: expected a JSON object (got invalid JSON: {exc})") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"request: expected a JSON object (got {type(obj).__name__})")
    return obj


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: expected an object (got {type(value).__name__})")
    return value


def _shape(value: Any, name: str) -> tuple[int, ...]:
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


def _json_tensor(data: Any, name: str, datatype: str, shape: tuple[int, ...]) -> Array:
    count = math.prod(shape)
    if not isinstance(data, list):
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


def decode_request(body: bytes, header_length: str | int | None = None) -> InferRequest:
    """Parse a v2 inference request.

    Args:
        body: the whole HTTP body.
        header_length: the ``Inference-Header-Content-Length`` header value, ``None``
            when absent (the body is then all JSON).

    Raises:
        InvalidInput: malformed JSON or header, unknown datatype, shape / element count /
            binary size mismatch, truncated or over-long binary section.
    """
    json_size = _header_length(header_length, len(body))
    obj = _load_json(body[:json_size] if json_size < len(body) else body)
    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput(
            f"request: expected 'inputs' as a non-empty list (got {type(raw_inputs).__name__})"
        )
    offset = json_size
    inputs: list[InferInput] = []
    for i, item in enumerate(raw_inputs):
        entry = _object(item, f"inputs[{i}]")
        name = entry.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"inputs[{i}]: expected 'name' as a string (got {name!r})")
        datatype = entry.get("datatype")
        if datatype not in _KNOWN:
            raise InvalidInput(
                f"input {name!r}: expected datatype in {sorted(_KNOWN)} (got {datatype!r})"
            )
        shape = _shape(entry.get("shape"), name)
        params = _object(entry.get("parameters"), f"input {name!r} parameters")
        size = params.get("binary_data_size")
        data: Array | None
        if size is not None:
            if "data" in entry:
                raise InvalidInput(
                    f"input {name!r}: expected either 'data' or parameters.binary_data_size "
                    "(got both)"
                )
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(
                    f"input {name!r}: expected binary_data_size as a non-negative integer "
                    f"(got {size!r})"
                )
            if offset + size > len(body):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size} needs bytes "
                    f"[{offset - json_size}, {offset - json_size + size}) of the binary "
                    f"section, but the body has {len(body) - json_size} bytes after the "
                    "JSON header (truncated body, or a missing/wrong "
                    f"{HEADER_LENGTH} header)"
                )
            data = _binary_tensor(body, offset, size, name, datatype, shape)
            offset += size
        elif datatype == "BYTES":
            data = None
        elif "data" not in entry:
            raise InvalidInput(
                f"input {name!r}: expected 'data' or parameters.binary_data_size (got neither)"
            )
        else:
            data = _json_tensor(entry["data"], name, datatype, shape)
        inputs.append(InferInput(name, datatype, shape, data, params))
    if offset != len(body):
        raise InvalidInput(
            f"request: expected {offset - json_size} bytes of binary tensor data after the "
            f"JSON header (the sum of binary_data_size) (got {len(body) - json_size})"
        )
    return InferRequest(
        inputs=inputs,
        id=_request_id(obj.get("id")),
        parameters=_object(obj.get("parameters"), "request parameters"),
        outputs=_requested(obj.get("outputs")),
    )


def _binary_tensor(
    body: bytes, offset: int, size: int, name: str, datatype: str, shape: tuple[int, ...]
) -> Array | None:
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
    return np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)


def _request_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"request: expected 'id' as a string (got {type(value).__name__})")
    return value


def _requested(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidInput(f"request: expected 'outputs' as a list (got {type(value).__name__})")
    out = []
    for i, item in enumerate(value):
        entry = _object(item, f"outputs[{i}]")
        name = entry.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"outputs[{i}]: expected 'name' as a string (got {name!r})")
        params = _object(entry.get("parameters"), f"output {name!r} parameters")
        if params.get("classification"):
            raise InvalidInput(
                f"output {name!r}: the classification extension is not supported "
                "(expected no 'classification' parameter)"
            )
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidInput(
                f"output {name!r}: expected binary_data as a boolean (got {binary!r})"
            )
        out.append(RequestedOutput(name, binary))
    return out


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


# -- encoding --------------------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    if _orjson is not None:
        fast: bytes = _orjson.dumps(obj, option=_orjson.OPT_SERIALIZE_NUMPY)
        return fast
    return json.dumps(obj, separators=(",", ":")).encode()


def _json_values(arr: Array) -> Any:
    """Row-major values of ``arr`` for a JSON ``data`` field."""
    flat = np.ascontiguousarray(arr).ravel()
    if _orjson is not None and flat.dtype.byteorder in "=|<":
        return flat
    return flat.tolist()


def _little_endian(arr: Array) -> Array:
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr)


def encode_response(response: InferResponse) -> tuple[bytes, int | None]:
    """Serialize a response.

    Returns:
        ``(body, json_length)``; ``json_length`` is ``None`` when no output is binary
        (the body is plain JSON), else the value for the ``Inference-Header-Content-Length``
        response header.
    """
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in response.outputs:
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": list(out.data.shape),
        }
        if out.binary:
            arr = _little_endian(out.data)
            entry["parameters"] = {"binary_data_size": arr.nbytes}
            chunks.append(arr.tobytes())
        else:
            entry["data"] = _json_values(out.data)
        tensors.append(entry)
    obj: dict[str, Any] = {"model_name": response.model_name}
    obj["model_version"] = response.model_version
    if response.id is not None:
        obj["id"] = response.id
    if response.parameters:
        obj["parameters"] = response.parameters
    obj["outputs"] = tensors
    header = _dumps(obj)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def encode_request(
    inputs: Mapping[str, Array],
    *,
    binary: bool = True,
    binary_output: bool = True,
    outputs: Sequence[str] | None = None,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """Client side: serialize ``inputs`` (name to array) as a v2 request.

    Args:
        inputs: input tensors, sent in this order.
        binary: send the tensors in the binary section (else as JSON ``data``).
        binary_output: ask for binary outputs.
        outputs: output names to ask for (all when ``None``).
        request_id: the ``id`` to send.

    Returns:
        ``(body, json_length)``, ``json_length`` ``None`` when nothing is binary.
    """
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, value in inputs.items():
        arr = np.asarray(value)
        entry: dict[str, Any] = {
            "name": name,
            "shape": list(arr.shape),
            "datatype": _datatype_of(arr.dtype),
        }
        if binary:
            le = _little_endian(arr)
            entry["parameters"] = {"binary_data_size": le.nbytes}
            chunks.append(le.tobytes())
        else:
            entry["data"] = _json_values(arr)
        tensors.append(entry)
    obj: dict[str, Any] = {"inputs": tensors}
    if request_id is not None:
        obj["id"] = request_id
    if outputs is not None:
        obj["outputs"] = [
            {"name": name, "parameters": {"binary_data": binary_output}} for name in outputs
        ]
    elif binary_output:
        obj["parameters"] = {"binary_data_output": True}
    header = _dumps(obj)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def decode_response(body: bytes, header_length: str | int | None = None) -> dict[str, Array]:
    """Client side: the output tensors of a v2 response, name to array.

    Raises:
        InvalidInput: malformed response (the same checks as requests).
    """
    json_size = _header_length(header_length, len(body))
    obj = _load_json(body[:json_size])
    offset = json_size
    result: dict[str, Array] = {}
    for i, item in enumerate(obj.get("outputs") or []):
        entry = _object(item, f"outputs[{i}]")
        name = str(entry.get("name"))
        datatype = entry.get("datatype")
        if datatype not in DATATYPES:
            raise InvalidInput(f"output {name!r}: expected a numeric datatype (got {datatype!r})")
        shape = _shape(entry.get("shape"), name)
        size = _object(entry.get("parameters"), "parameters").get("binary_data_size")
        if size is None:
            result[name] = _json_tensor(entry.get("data"), name, datatype, shape)
            continue
        if offset + size > len(body):
            raise InvalidInput(f"output {name!r}: expected {size} bytes (body truncated)")
        arr = _binary_tensor(body, offset, size, name, datatype, shape)
        if arr is not None:
            result[name] = arr
        offset += size
    return result
