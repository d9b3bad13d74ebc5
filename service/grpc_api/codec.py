"""The v2 gRPC codec: ``inference.ModelInferRequest`` / ``ModelInferResponse`` messages to
and from the protocol-neutral :class:`~service.runtime.tensors.InferRequest` /
:class:`~service.runtime.tensors.InferResponse` the data plane takes.

Inputs come either all in ``raw_input_contents`` (one little-endian, row-major buffer per
input, in input order: what ``tritonclient.grpc`` sends) or each in its typed
``contents`` field (``fp32_contents``, ``int64_contents``, ...: what KServe's client sends
for ``InferInput.set_data_from_numpy`` without ``binary_data``). Mixing the two in one
request is refused, as Triton does. ``FP16`` exists only as raw bytes.

Outputs always go back in ``raw_output_contents`` (Triton's behaviour; both clients'
``as_numpy`` read it). Every malformed message raises
:class:`service.errors.InvalidInput` with what was expected and what arrived: the same
messages as the REST codec where the mistake is the same.

The generated message classes are tritonclient's (``tritonclient.grpc.service_pb2``):
the Open Inference Protocol's ``inference`` package, a superset of KServe's
``grpc_predict_v2.proto``, so KServe's client speaks to the same service.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from ..errors import InvalidInput
from ..runtime.tensors import (
    KNOWN_DATATYPES,
    InferInput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    check_shape,
    little_endian,
    tensor_from_bytes,
    tensor_from_values,
)

__all__ = [
    "CONTENTS_FIELDS",
    "decode_infer_request",
    "encode_infer_response",
    "from_parameters",
    "to_parameters",
    "typed_elements",
]

CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""Datatype -> the ``InferTensorContents`` field that carries it (``FP16``: raw only)."""


def from_parameters(params: Any) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as a plain dict of Python values."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        out[key] = None if which is None else getattr(param, which)
    return out


def to_parameters(target: Any, values: dict[str, Any]) -> None:
    """Fill a protobuf ``map<string, InferParameter>`` from ``values`` (bool, int, float,
    str; anything else as its ``str``)."""
    for key, value in values.items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            if value < 2**63:
                param.int64_param = value
            else:
                param.uint64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)


def _typed_contents(tensor: Any, datatype: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if datatype == "BYTES":
        return None
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:  # FP16
        raise InvalidInput(
            f"input {tensor.name!r}: {datatype} data must come in raw_input_contents (got none)"
        )
    values = getattr(tensor.contents, field)
    raw = np.fromiter(values, dtype=_WIDE[field], count=len(values))
    return tensor_from_values(raw, tensor.name, datatype, shape)


_WIDE: dict[str, type[np.generic]] = {
    "bool_contents": np.bool_,
    "int_contents": np.int64,
    "int64_contents": np.int64,
    "uint_contents": np.uint64,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}
"""The dtype a typed field's values are read into before the datatype's range check."""


def typed_elements(message: Any) -> int:
    """How many values ``message`` carries in typed ``contents`` (0 when raw)."""
    if message.raw_input_contents:
        return 0
    return sum(math.prod(tensor.shape) for tensor in message.inputs)


def decode_infer_request(message: Any) -> InferRequest:
    """A ``ModelInferRequest`` as an :class:`InferRequest`.

    Raises:
        InvalidInput: no inputs, an unknown datatype, a bad shape, element or byte counts
            that do not match the shape, raw and typed contents mixed, a repeated output.
    """
    if not message.inputs:
        raise InvalidInput("request: expected at least one input (got none)")
    raw_buffers = list(message.raw_input_contents)
    if raw_buffers and len(raw_buffers) != len(message.inputs):
        raise InvalidInput(
            f"request: expected raw_input_contents for every input ({len(message.inputs)}) "
            f"or for none (got {len(raw_buffers)})"
        )
    inputs: list[InferInput] = []
    for i, tensor in enumerate(message.inputs):
        name = tensor.name
        if not name:
            raise InvalidInput(f"inputs[{i}]: expected a non-empty name")
        datatype = tensor.datatype
        if datatype not in KNOWN_DATATYPES:
            raise InvalidInput(
                f"input {name!r}: expected datatype one of {', '.join(sorted(KNOWN_DATATYPES))} "
                f"(got {datatype!r})"
            )
        shape = check_shape(list(tensor.shape), name)
        if raw_buffers:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {name!r}: expected its data in raw_input_contents or in "
                    "contents, not both (the request uses raw_input_contents)"
                )
            raw = raw_buffers[i]
            data = tensor_from_bytes(raw, 0, len(raw), name, datatype, shape)
        else:
            data = _typed_contents(tensor, datatype, shape)
        inputs.append(InferInput(name, datatype, shape, data, from_parameters(tensor.parameters)))
    outputs: list[RequestedOutput] | None = None
    if message.outputs:
        outputs = []
        for item in message.outputs:
            params = from_parameters(item.parameters)
            if params.get("classification"):
                raise InvalidInput(
                    f"output {item.name!r}: the classification extension is not supported "
                    "(expected no 'classification' parameter)"
                )
            outputs.append(RequestedOutput(item.name, True))
    return InferRequest(
        inputs=inputs,
        id=message.id or None,
        parameters=from_parameters(message.parameters),
        outputs=outputs,
    )


def encode_infer_response(response: InferResponse) -> Any:
    """An :class:`InferResponse` as a ``ModelInferResponse`` (outputs raw)."""
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id or "",
    )
    if response.parameters:
        to_parameters(message.parameters, response.parameters)
    for out in response.outputs:
        tensor = message.outputs.add()
        tensor.name = out.name
        tensor.datatype = out.datatype
        tensor.shape.extend(out.data.shape)
        message.raw_output_contents.append(little_endian(out.data).tobytes())
    return message
