"""The registry's vocabulary: its constants and the pydantic models of its answers.

These are the bodies of the ``/v1/models`` routes (and what :class:`service.registry.Registry`
returns); they import nothing heavy, so routes, jobs and clients can use them without the
registry's ingestion code (:mod:`service.artifacts`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "MAX_VERSION",
    "PRODUCTION",
    "AliasInfo",
    "AliasList",
    "AliasUpdate",
    "ArtifactInfo",
    "ModelInfo",
    "ModelList",
    "Signature",
    "TensorSpec",
    "VersionInfo",
    "VersionList",
]

PRODUCTION = "production"
"""The alias ``/v2/models/{name}/infer`` serves."""

MAX_VERSION = 2**53 - 1
"""The largest version number; larger ones name no version. 2**53 - 1, not SQLite's
2**63 - 1: the largest integer a JSON number read as a double (JavaScript clients, the
OpenAPI document's bounds, which FastAPI writes as floats) carries exactly."""


class TensorSpec(BaseModel):
    """A graph input or output: name, NumPy dtype name, shape (``null``/a name if dynamic)."""

    name: str
    dtype: str
    shape: list[int | str | None]


class Signature(BaseModel):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class ArtifactInfo(BaseModel):
    file: str
    bytes: int
    sha256: str


class VersionInfo(BaseModel):
    """One immutable version and its lineage."""

    model: str
    version: int
    created_at: str
    parent_version: int | None = Field(description="version this one was recalibrated from")
    dataset: str | None = Field(description="id of the calibration data set")
    job: str | None = Field(description="id of the recalibration job that made it")
    recalibration: dict[str, Any] | None = Field(description="recalibration parameters")
    report: dict[str, Any] = Field(description="report summary (full report: format=report)")
    validation: dict[str, Any] | None = Field(description="accuracy check, when one was asked")
    signature: Signature
    artifacts: dict[str, ArtifactInfo]
    aliases: list[str]
    weights_digest: str | None = Field(
        default=None,
        description="sha256 of the weights, BN statistics excluded: the stat banks this "
        "version takes were computed with these weights (null until first computed for "
        "versions registered before schema 3)",
    )


class VersionList(BaseModel):
    versions: list[VersionInfo]


class ModelInfo(BaseModel):
    name: str
    id: str
    created_at: str
    source_format: str = Field(description="format of the registered file: onnx or pt2")
    metadata: dict[str, Any]
    aliases: dict[str, int]
    versions: int
    latest_version: int


class ModelList(BaseModel):
    models: list[ModelInfo]


class AliasUpdate(BaseModel):
    # MAX_VERSION is exact as the float OpenAPI carries the bound as (and in its decimal text)
    version: int = Field(ge=1, le=MAX_VERSION)


class AliasInfo(BaseModel):
    model: str
    alias: str
    version: int
    updated_at: str


class AliasList(BaseModel):
    aliases: list[AliasInfo]
