"""REST documents of the Open Inference Protocol extensions recalib implements beyond the
core (model repository, model configuration, statistics), for the OpenAPI document and
the small request bodies of the repository routes.

The shapes are Triton's (``tritonclient.http`` reads them): the statistics are
``inference.ModelStatistics`` in JSON, the configuration ``inference.ModelConfig`` in
protobuf's JSON mapping with the proto field names.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BatchStatistics",
    "InferStatistics",
    "ModelConfiguration",
    "ModelLoaded",
    "ModelStatistics",
    "ModelUnloaded",
    "RepositoryIndexEntry",
    "RepositoryIndexRequest",
    "RepositoryModelRequest",
    "StatisticDuration",
    "StatisticsResponse",
]


class RepositoryIndexRequest(BaseModel):
    """``POST /v2/repository/index`` (the body may be empty; other keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    ready: bool = Field(default=False, description="only the versions that are READY")


class RepositoryIndexEntry(BaseModel):
    """One registered version in the repository index."""

    name: str
    version: str
    state: str = Field(description="READY, LOADING or UNAVAILABLE")
    reason: str = Field(
        description="why not READY: the last load failure, 'unloaded', 'not loaded' "
        "(explicit versions load on first use) or 'loading'; empty when READY"
    )


class RepositoryModelRequest(BaseModel):
    """``POST /v2/repository/models/{name}/load`` and ``.../unload`` (the body may be
    empty; other keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, Any] | None = Field(
        default=None,
        description="load: none supported (Triton's config and file: overrides are refused); "
        "unload: unload_dependents (accepted, a model has no dependents)",
    )


class ModelLoaded(BaseModel):
    """The answer of a load."""

    name: str
    load: bool


class ModelUnloaded(BaseModel):
    """The answer of an unload."""

    name: str
    unload: bool


class StatisticDuration(BaseModel):
    """A count and the nanoseconds summed over it."""

    count: int
    ns: int


class InferStatistics(BaseModel):
    """Per request: success / fail (time in the runtime), queue (queued until a worker
    took its batch), compute_input (feed building and concatenation), compute_infer (the
    session run), compute_output (splitting and selecting the outputs)."""

    success: StatisticDuration
    fail: StatisticDuration
    queue: StatisticDuration
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration
    cache_hit: StatisticDuration
    cache_miss: StatisticDuration


class BatchStatistics(BaseModel):
    """Session runs of one batch size and their compute times."""

    batch_size: int
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration


class ModelStatistics(BaseModel):
    """Triton's statistics of one model version."""

    name: str
    version: str
    last_inference: int = Field(description="ms since the epoch of the last success, 0: none")
    inference_count: int = Field(description="inferences answered (rows of batched requests)")
    execution_count: int = Field(description="session runs (a batch of requests is one)")
    inference_stats: InferStatistics
    batch_stats: list[BatchStatistics]
    memory_usage: list[dict[str, Any]] = Field(default_factory=list)


class StatisticsResponse(BaseModel):
    """``GET /v2/models[/{name}[/versions/{version}]]/stats``."""

    model_stats: list[ModelStatistics]


class ModelConfiguration(BaseModel):
    """Triton's ``ModelConfig`` (the fields recalib fills; protobuf's JSON mapping)."""

    model_config = ConfigDict(extra="allow")

    name: str
    platform: str = Field(description="onnxruntime_onnx")
    backend: str = Field(description="onnxruntime")
    max_batch_size: int = Field(
        default=0,
        description="the service's max_batch_size when every input and output has a "
        "variable axis 0 (dims then omit it), else 0 (omitted)",
    )
    input: list[dict[str, Any]] = Field(description="name, data_type (TYPE_FP32...), dims")
    output: list[dict[str, Any]]
    dynamic_batching: dict[str, Any] | None = Field(
        default=None, description="max_queue_delay_microseconds, when the service batches"
    )
    version_policy: dict[str, Any] = Field(description='{"all": {}}: every version answers')
    instance_group: list[dict[str, Any]]
