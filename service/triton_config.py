"""Triton's model configuration for a served ONNX model: one builder for the model
configuration extension (``GET /v2/models/{name}/config``, gRPC ``ModelConfig``) and for
the ``config.pbtxt`` a model repository holds beside ``<version>/model.onnx``.

The message is Triton's own ``inference.ModelConfig`` (``model_config.proto``, as
``tritonclient`` ships it), so what recalib writes parses in a real Triton:

* ``platform: "onnxruntime_onnx"``, ``backend: "onnxruntime"``;
* ``max_batch_size``: the service's ``max_batch_size`` when every input and output has a
  variable axis 0 (the dims then leave it out, as Triton wants), else 0 with the full dims;
* ``dynamic_batching`` with ``max_queue_delay_microseconds`` when the service batches;
* ``version_policy``: ``all`` (recalib answers every version), or ``specific`` on the
  production version in a published repository (see :mod:`service.model_store`).

:func:`config_json` is the JSON form (protobuf's JSON mapping, as Triton's HTTP endpoint
answers: ``maxBatchSize`` becomes ``max_batch_size`` with ``preserving_proto_field_name``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import model_config_pb2 as mc

from .runtime.sessions import TensorSpec

__all__ = [
    "PLATFORM",
    "config_json",
    "config_text",
    "model_config",
    "parse_config_text",
]

PLATFORM = "onnxruntime_onnx"
"""Triton's platform name of ONNX Runtime models."""

_TRITON_TYPES: dict[str, int] = {
    "BOOL": mc.TYPE_BOOL,
    "UINT8": mc.TYPE_UINT8,
    "UINT16": mc.TYPE_UINT16,
    "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64,
    "INT8": mc.TYPE_INT8,
    "INT16": mc.TYPE_INT16,
    "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16,
    "FP32": mc.TYPE_FP32,
    "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING,
}


def _batched(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> bool:
    """Whether every input and output has a variable axis 0 (Triton's batch dimension:
    with ``max_batch_size > 0`` it applies to all of them)."""
    return bool(inputs) and all(spec.batched for spec in (*inputs, *outputs))


def _tensor(spec: TensorSpec, batched: bool, target: Any) -> None:
    target.name = spec.name
    target.data_type = _TRITON_TYPES.get(spec.datatype, mc.TYPE_INVALID)
    dims = spec.shape[1:] if batched and spec.batched else spec.shape
    target.dims.extend(dims)


def model_config(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_batch_size: int,
    dynamic_batching: bool,
    max_queue_delay_ms: float,
    gpu: bool = False,
    versions: Sequence[int] | None = None,
) -> Any:
    """Triton's ``ModelConfig`` of one served ONNX model.

    Args:
        name: the model's name.
        inputs, outputs: its signature (``-1`` for variable dimensions).
        max_batch_size: the most rows one run takes (used when axis 0 is variable).
        dynamic_batching: whether concurrent requests are gathered.
        max_queue_delay_ms: the longest a request waits for others.
        gpu: one instance on the GPU instead of the CPU.
        versions: ``version_policy: specific`` on these versions (``None``: ``all``).

    Returns:
        An ``inference.ModelConfig`` message.
    """
    batched = _batched(inputs, outputs)
    config = mc.ModelConfig(
        name=name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=max_batch_size if batched else 0,
    )
    if versions is None:
        config.version_policy.all.SetInParent()
    else:
        config.version_policy.specific.versions.extend(versions)
    for spec in inputs:
        _tensor(spec, batched, config.input.add())
    for spec in outputs:
        _tensor(spec, batched, config.output.add())
    if batched and dynamic_batching:
        config.dynamic_batching.max_queue_delay_microseconds = round(max_queue_delay_ms * 1000)
    group = config.instance_group.add()
    group.count = 1
    group.kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    return config


def config_text(config: Any) -> str:
    """``config`` in protobuf text format (a ``config.pbtxt``)."""
    text: str = text_format.MessageToString(config)
    return text


def parse_config_text(text: str) -> Any:
    """A ``config.pbtxt`` parsed as Triton parses it.

    Raises:
        google.protobuf.text_format.ParseError: not a valid ``ModelConfig``.
    """
    return text_format.Parse(text, mc.ModelConfig())


def config_json(config: Any) -> dict[str, Any]:
    """``config`` as the JSON object Triton's ``GET /v2/models/{name}/config`` answers:
    protobuf's JSON mapping with the proto field names, and 64-bit integers as numbers
    (as Triton writes them; the plain mapping makes them strings)."""
    result: dict[str, Any] = json_format.MessageToDict(config, preserving_proto_field_name=True)
    _numbers(config, result)
    return result


_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _numbers(message: Any, obj: dict[str, Any]) -> None:
    """Turn the 64-bit integers of ``obj`` (``message`` in JSON) back into numbers."""
    for field, value in message.ListFields():
        key = field.name
        if key not in obj:
            continue
        if field.type in _INT64:
            obj[key] = [int(v) for v in obj[key]] if _repeated(field) else int(obj[key])
        elif (
            field.type == FieldDescriptor.TYPE_MESSAGE
            and not field.message_type.GetOptions().map_entry
        ):
            if _repeated(field):
                for item, entry in zip(value, obj[key], strict=True):
                    _numbers(item, entry)
            else:
                _numbers(value, obj[key])


def _repeated(field: Any) -> bool:
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)
