"""The Open Inference Protocol's REST documents, for the OpenAPI document only.

Pydantic models of the v2 request and response bodies, and the ``responses`` /
``openapi_extra`` tables of the routes of :mod:`service.api.v2`. The routes never build
these models: responses are plain dicts and the inference body is decoded by
:mod:`service.api.v2_codec`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from .deps import ErrorBody
from .v2_codec import HEADER_LENGTH

__all__ = [
    "ERRORS",
    "INFER_OPENAPI",
    "INFER_RESPONSES",
    "READY_RESPONSES",
    "InferenceRequest",
    "InferenceResponse",
    "ModelMetadata",
    "ModelReady",
    "RequestInput",
    "RequestOutput",
    "ResponseOutput",
    "ServerLive",
    "ServerMetadata",
    "ServerReady",
    "TensorMetadata",
]


class ServerMetadata(BaseModel):
    """``GET /v2``: the server's name, version and protocol extensions."""

    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    """``GET /v2/health/live``."""

    live: bool


class ServerReady(BaseModel):
    """``GET /v2/health/ready``."""

    ready: bool
    waiting_for: list[str] = Field(
        default_factory=list,
        description="Models (registered, or expected via RECALIB_EXPECT_MODELS) that this "
        "process does not serve yet; the server is ready when this is empty. Omitted for a "
        "caller without the bearer token when one is configured (health is open to probes).",
    )


class ModelReady(BaseModel):
    """``GET /v2/models/{name}[/versions/{version}]/ready``."""

    name: str
    ready: bool
    error: str | None = Field(
        default=None, description="why the version cannot answer (omitted when ready)"
    )


class TensorMetadata(BaseModel):
    """An input or output of the model metadata."""

    name: str
    datatype: str = Field(description="BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64")
    shape: list[int] = Field(description="-1 for a variable dimension")


class ModelMetadata(BaseModel):
    """``GET /v2/models/{name}[/versions/{version}]``."""

    name: str
    versions: list[str]
    platform: str = Field(description="onnx_onnxv1")
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(
        description="execution_provider (in use), requested_execution_provider, "
        "dynamic_batching, max_batch_size, drift_monitoring, ..."
    )


class RequestInput(BaseModel):
    """An input tensor of an inference request."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data_size: bytes of this tensor in the binary section"
    )
    data: list[Any] | None = Field(
        default=None, description="row-major values, flat or nested (absent when binary)"
    )


class RequestOutput(BaseModel):
    """An output an inference request asks for."""

    name: str
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data: return this output in the binary section"
    )


class InferenceRequest(BaseModel):
    """A v2 inference request (the JSON part of a binary-extension body)."""

    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="binary_data_output: all outputs in the binary section"
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    """An output tensor of an inference response."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    """A v2 inference response (the JSON part of a binary-extension body)."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` references inlined (for ``openapi_extra``).

    Args:
        schema: a pydantic JSON schema (``model_json_schema()``); its ``$defs`` is taken.

    Returns:
        The schema without ``$ref``.
    """
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                return walk(defs[ref.rsplit("/", 1)[-1]])
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    result: dict[str, Any] = walk(schema)
    return result


INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "JSON inference request; with the binary tensor extension, the JSON part "
            f"followed by raw little-endian tensor bytes, and the {HEADER_LENGTH} header "
            "giving the JSON length."
        ),
        "content": {
            "application/json": {"schema": _inline(InferenceRequest.model_json_schema())},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": "length of the JSON part of a binary-extension body",
            "schema": {"type": "integer", "minimum": 0},
        }
    ],
}

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "invalid request (expected vs got)"},
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    404: {"model": ErrorBody, "description": "unknown model, version or alias"},
    413: {"model": ErrorBody, "description": "request body above max_request_bytes"},
    503: {"model": ErrorBody, "description": "model version not ready"},
}

INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferenceResponse,
        "description": (
            f"outputs; binary outputs follow the JSON part, whose length is in the "
            f"{HEADER_LENGTH} response header"
        ),
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **ERRORS,
}

READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ModelReady | ErrorBody,
        "description": "not ready (a malformed model name or version: the error object)",
    },
    401: ERRORS[401],
    404: ERRORS[404],
}
