"""All service settings, in one pydantic-settings class (environment prefix ``RECALIB_``).

Nothing else in the service reads the environment: ``create_app(settings)`` receives one
:class:`Settings` and passes the parts each component needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """recalib service configuration. Every field can be set as ``RECALIB_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="RECALIB_", extra="ignore", use_attribute_docstrings=True
    )

    home: Path = Field(default=Path(".recalib"))
    """State directory: artifacts/, datasets/ and the SQLite database live here."""

    host: str = "127.0.0.1"
    """Interface ``recalib serve`` binds to."""

    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port ``recalib serve`` listens on."""

    grpc: bool = True
    """Serve the v2 gRPC protocol (``inference.GRPCInferenceService``, and
    ``grpc.health.v1.Health``) beside REST."""

    grpc_port: int = Field(default=8001, ge=0, le=65535)
    """TCP port of the gRPC service on ``host`` (0: any free port)."""

    grpc_max_message_bytes: int = Field(default=64 << 20, gt=0)
    """Largest gRPC message, received or sent (RESOURCE_EXHAUSTED above)."""

    api_token: SecretStr | None = None
    """Bearer token required on every /v1 and /v2 inference call when set."""

    protect_health: bool = False
    """Also require the token on /v2/health/* and server metadata (REST and gRPC, and
    gRPC's grpc.health.v1)."""

    protect_metrics: bool = False
    """Also require the token on /metrics."""

    public_docs: bool = False
    """Serve /docs, /redoc and /openapi.json without the token (behind it by default)."""

    max_upload_bytes: int = Field(default=1 << 30, gt=0)
    """Largest model or dataset upload (413 above)."""

    max_dataset_uncompressed_bytes: int = Field(default=2 << 30, gt=0)
    """Largest data set once decompressed: the sum of its arrays' sizes, read from the
    ``.npy`` headers (and sizes) of an ``.npz`` before anything is decompressed (413
    above). A small ``.npz`` can hold huge arrays of zeros; jobs load the arrays whole."""

    max_request_bytes: int = Field(default=64 << 20, gt=0)
    """Largest inference request body (413 above)."""

    execution_provider: Literal["auto", "cpu", "cuda"] = "auto"
    """ONNX Runtime provider: ``auto`` uses CUDA when available, else CPU."""

    provider_fallback: Literal["fail", "warn"] = "warn"
    """When CUDA was requested but is not in use: refuse to load, or fall back to CPU with a
    warning (always logged and exposed as a metric)."""

    intra_op_threads: int = Field(default=0, ge=0)
    """ORT intra-op threads per session (0: ORT's default, all physical cores)."""

    max_batch_size: int = Field(default=32, ge=1)
    """Dynamic batching: most rows gathered into one session run."""

    max_queue_delay_ms: float = Field(default=2.0, ge=0.0)
    """Dynamic batching: longest a request waits for others to join its batch."""

    dynamic_batching: bool = True
    """Gather concurrent requests into batches (off: one session run per request)."""

    inline_run_ms: float = Field(default=1.0, ge=0.0)
    """A session run expected to take at most this long (the version's moving average of
    milliseconds per row, times the batch's rows) runs on the event loop instead of a
    worker thread, which it blocks for about that long: the hand-off to a thread costs
    ~0.1-0.4 ms of CPU per run, most of a small model's request (0: never inline). CPU
    sessions only, and only where their runs go one at a time (``intra_op_threads`` 0)."""

    inline_run_alone_ms: float = Field(default=5.0, ge=0.0)
    """The same bound for a request that has its model version to itself: nothing queued,
    no other run in flight, a batch of one (a lone client's sequential requests). Its
    model's next request waits for the run anyway, so a worker thread adds only the
    hand-off; the loop, blocked meanwhile, delays only other models' and endpoints'
    requests. The runs made on the loop in one turn of it, over every model, add up to
    this at most under this bound (a burst then goes to the worker threads). Never below
    ``inline_run_ms``, and only where that is > 0."""

    warmup_batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32])
    """Batch sizes run once before a version reports ready (clipped to max_batch_size)."""

    drift_sample_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    """Fraction of batches run through the drift-tapped session (0 disables drift). Tapping
    every BN layer costs ~1.3x ORT compute on CPU at batch 32 (~1.5x at batch 1); a tapped
    batch also returns the predictions, so 0.1 costs ~3-5%. Batches are picked
    deterministically (every 1/f-th)."""

    drift_window_seconds: float = Field(default=3600.0, gt=0)
    """Rolling drift window length."""

    drift_threshold: float = Field(default=1.0, ge=0.0)
    """Model drift score (mean symmetric KL over layers) above which drift is flagged."""

    drift_min_rows: int = Field(default=256, ge=0)
    """Rows the drift window needs before drift is flagged (``exceeded``); the score of a
    few rows is noise (about 2/rows with no drift at all). 0: flag from the first row."""

    drift_per_layer_metrics: bool = False
    """Export a per-layer drift gauge (one series per BN layer: mind cardinality)."""

    bank_route_threshold: float = Field(default=2.0, ge=0.0)
    """Stat banks: a row routed with ``parameters.bank="auto"`` whose distance (KL of its
    stem BN-input moments from the nearest bank's, mean over channels) exceeds this gets
    the version's own statistics instead, and is counted (``bank_fallback`` in the
    response, ``recalib_bank_fallbacks_total``). A ceiling for every model: a bank whose
    file carries its own route limit (``metadata.route_limit``: the banks recalibration
    jobs make carry the 99th percentile of their calibration rows' distance) falls back
    past the smaller of the two. ``inf``: only the banks' own limits."""

    bank_metric_limit: int = Field(default=32, ge=0)
    """Stat banks: most distinct bank names per model given their own ``bank`` label in
    ``recalib_bank_requests_total`` (the first seen); later ones are counted as ``other``."""

    role: Literal["all", "inference"] = "all"
    """``all``: every endpoint. ``inference``: an inference replica - serves models and
    takes pushed versions and alias moves, but refuses data set uploads and recalibration
    jobs (403), which belong on the control replica."""

    expect_models: list[str] = Field(default_factory=list)
    """Models this process must serve before ``/v2/health/ready`` says ready (JSON list,
    e.g. ``RECALIB_EXPECT_MODELS='["demo"]'``): a new inference replica starts empty and
    stays out of the load balancer until the rollout step has pushed them. Every
    registered model's production version must be loaded too, expected or not."""

    model_store: Path | None = None
    """Shared model store (a Triton model repository, see docs/design.md "Model store"). With
    ``role=all`` the control replica publishes every model's production version there;
    with ``role=inference`` the replica serves what it holds, read-only, with no database
    of its own, and answers the /v1 routes with 403."""

    store_keep_versions: int = Field(default=3, ge=0)
    """Versions each model keeps in the model store, its production version included: a
    publication deletes the others, least recently promoted first (the previous production
    stays longest: replicas serve it until they switch, and it is the rollback target);
    0 keeps every version ever published. Only the store: the control's registry keeps
    every version, and promoting a pruned one publishes it again. Store-fed replicas serve
    only what the store holds (an explicit request for a pruned version answers 404)."""

    store_poll_seconds: float = Field(default=2.0, gt=0)
    """How often a store-fed replica looks for new production versions (and the control
    replica repairs publications that failed)."""

    job_workers: int = Field(default=1, ge=1)
    """Recalibration jobs run at once (each in its own worker process)."""

    job_timeout_seconds: float = Field(default=3600.0, gt=0)
    """A job running longer is stopped and marked failed."""

    allow_open: bool = False
    """Allow a non-loopback host without a token (only behind an authenticating proxy)."""

    @property
    def store_fed(self) -> bool:
        """An inference replica fed by the model store (no database, no /v1 writes)."""
        return self.role == "inference" and self.model_store is not None

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        public = self.host not in ("127.0.0.1", "localhost", "::1")
        if public and self.api_token is None and not self.allow_open:
            raise ValueError(
                "refusing to serve on a non-loopback host without RECALIB_API_TOKEN; "
                "set a token (or RECALIB_ALLOW_OPEN=1 behind an authenticating proxy)"
            )
        return self
