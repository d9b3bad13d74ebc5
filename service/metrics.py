"""The service's Prometheus metrics, created against an injected ``CollectorRegistry``.

:class:`ServiceMetrics` owns every metric the service exports; nothing is registered at
import time, so tests (and several apps in one process) use fresh registries. Names follow
the Prometheus conventions: ``recalib_`` prefix, base units (``_seconds``), counters end in
``_total``, histograms rather than summaries, and bounded label values only (model name,
version number, outcome, layer name behind a setting) - never request ids.

Metrics (labels in braces):

* ``recalib_requests_total{model,version,outcome}`` - inference requests; ``outcome`` is
  ``ok``, ``client_error`` or ``server_error``.
* ``recalib_request_duration_seconds{model,version}`` - request latency (histogram).
* ``recalib_queue_wait_seconds{model,version}`` - time a request waited for its batch.
* ``recalib_batch_size{model,version}`` - rows per session run (histogram).
* ``recalib_inflight_requests{model}`` - inference requests being handled.
* ``recalib_drift_score{model,version}``, ``recalib_layer_drift_score{model,version,layer}``
  (only with ``Settings.drift_per_layer_metrics``), ``recalib_drift_threshold_exceeded``
  (0/1), ``recalib_drift_window_samples``.
* ``recalib_drift_threshold`` - the configured drift threshold (``RECALIB_DRIFT_THRESHOLD``,
  one for every model), exported once the serving runtime has set it; dashboards draw it
  next to ``recalib_drift_score``.
* ``recalib_recalibration_jobs_total{outcome}`` and
  ``recalib_recalibration_job_duration_seconds`` - recalibration jobs by final state.
* ``recalib_loaded_versions`` - model versions with live sessions.
* ``recalib_execution_provider_info{model,version,requested,provider}`` (always 1) and
  ``recalib_provider_fallbacks_total{model,version}`` - the ONNX Runtime provider in use,
  so "requested cuda, running on CPU" can be alerted on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["JOB_OUTCOMES", "REQUEST_OUTCOMES", "ServiceMetrics"]

REQUEST_OUTCOMES = ("ok", "client_error", "server_error")
"""Values of the ``outcome`` label of ``recalib_requests_total``."""

JOB_OUTCOMES = ("succeeded", "failed", "cancelled", "interrupted")
"""Values of the ``outcome`` label of ``recalib_recalibration_jobs_total``."""

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


class ServiceMetrics:
    """Every metric of the service, registered in ``registry``.

    Args:
        registry: where the metrics live; ``/metrics`` exposes this registry.

    Examples::

        >>> metrics = ServiceMetrics(CollectorRegistry())
        >>> metrics.observe_request("demo", 2, "ok", 0.004)
        >>> metrics.job_finished("succeeded", 12.5)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        mv = ("model", "version")
        self.requests = Counter(
            "recalib_requests_total",
            "Inference requests by model, version and outcome.",
            (*mv, "outcome"),
            registry=registry,
        )
        self.request_duration = Histogram(
            "recalib_request_duration_seconds",
            "Inference request latency inside the service.",
            mv,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "recalib_queue_wait_seconds",
            "Time a request waited in the dynamic-batching queue before its batch ran.",
            mv,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "recalib_batch_size",
            "Rows per ONNX Runtime session run.",
            mv,
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.inflight = Gauge(
            "recalib_inflight_requests",
            "Inference requests being handled.",
            ("model",),
            registry=registry,
        )
        self.drift_score = Gauge(
            "recalib_drift_score",
            "Model drift score (mean symmetric KL over BN layers) in the rolling window.",
            mv,
            registry=registry,
        )
        self.layer_drift_score = Gauge(
            "recalib_layer_drift_score",
            "Per-layer drift score (mean symmetric KL over channels) in the rolling window.",
            (*mv, "layer"),
            registry=registry,
        )
        self.drift_exceeded = Gauge(
            "recalib_drift_threshold_exceeded",
            "1 when the drift score is above the configured threshold, else 0.",
            mv,
            registry=registry,
        )
        self.drift_samples = Gauge(
            "recalib_drift_window_samples",
            "Samples (batch rows) in the rolling drift window.",
            mv,
            registry=registry,
        )
        # Registered by set_drift_threshold(): an unset threshold is absent, not 0.
        self.drift_threshold = Gauge(
            "recalib_drift_threshold",
            "Configured drift threshold (RECALIB_DRIFT_THRESHOLD) the drift score is compared to.",
            registry=None,
        )
        self._threshold_registered = False
        self.jobs = Counter(
            "recalib_recalibration_jobs_total",
            "Recalibration jobs by final outcome.",
            ("outcome",),
            registry=registry,
        )
        self.job_duration = Histogram(
            "recalib_recalibration_job_duration_seconds",
            "Recalibration job duration, start to final state.",
            buckets=_JOB_BUCKETS,
            registry=registry,
        )
        self.loaded_versions = Gauge(
            "recalib_loaded_versions",
            "Model versions with live ONNX Runtime sessions.",
            registry=registry,
        )
        self.provider_info = Gauge(
            "recalib_execution_provider_info",
            "ONNX Runtime execution provider in use per model version (value always 1).",
            (*mv, "requested", "provider"),
            registry=registry,
        )
        self.provider_fallbacks = Counter(
            "recalib_provider_fallbacks_total",
            "Sessions that fell back to another execution provider than requested.",
            mv,
            registry=registry,
        )
        self._providers: dict[tuple[str, str], tuple[str, str]] = {}
        self._layers: dict[tuple[str, str], set[str]] = {}

    # -- inference ---------------------------------------------------------------------

    def observe_request(self, model: str, version: int | str, outcome: str, seconds: float) -> None:
        """Count one finished inference request and its latency.

        Args:
            model, version: the model version that answered (``"none"`` if unresolved).
            outcome: one of :data:`REQUEST_OUTCOMES`.
            seconds: wall time spent in the service.
        """
        if outcome not in REQUEST_OUTCOMES:
            raise ValueError(f"expected outcome in {REQUEST_OUTCOMES} (got {outcome!r})")
        v = str(version)
        self.requests.labels(model, v, outcome).inc()
        self.request_duration.labels(model, v).observe(seconds)

    def observe_batch(
        self, model: str, version: int | str, rows: int, queue_waits: Sequence[float]
    ) -> None:
        """Record one session run: its rows and the queue wait of each request in it."""
        v = str(version)
        self.batch_size.labels(model, v).observe(rows)
        wait = self.queue_wait.labels(model, v)
        for seconds in queue_waits:
            wait.observe(seconds)

    def inflight_add(self, model: str, delta: int) -> None:
        """Move the in-flight gauge of ``model`` by ``delta`` (+1 on entry, -1 on exit)."""
        self.inflight.labels(model).inc(delta)

    # -- drift -------------------------------------------------------------------------

    def set_drift(
        self,
        model: str,
        version: int | str,
        *,
        score: float | None,
        exceeded: bool,
        samples: int,
        layers: Mapping[str, float] | None = None,
    ) -> None:
        """Publish the drift gauges of a model version.

        Args:
            score: model drift score, ``None`` while the window is empty (the gauge is then
                removed rather than set to a made-up value).
            exceeded: whether ``score`` is above the threshold.
            samples: rows in the window.
            layers: per-layer scores, exported only when given (the per-layer setting).
        """
        v = str(version)
        if score is None:
            self._remove(self.drift_score, model, v)
        else:
            self.drift_score.labels(model, v).set(score)
        self.drift_exceeded.labels(model, v).set(1.0 if exceeded else 0.0)
        self.drift_samples.labels(model, v).set(samples)
        if layers is None:
            return
        key = (model, v)
        for gone in self._layers.get(key, set()) - set(layers):
            self._remove(self.layer_drift_score, model, v, gone)
        for layer, value in layers.items():
            self.layer_drift_score.labels(model, v, layer).set(value)
        self._layers[key] = set(layers)

    def set_drift_threshold(self, threshold: float) -> None:
        """Publish the drift threshold (``Settings.drift_threshold``); the serving runtime
        calls this when it is created. The gauge is registered on the first call."""
        if not self._threshold_registered:
            self.registry.register(self.drift_threshold)
            self._threshold_registered = True
        self.drift_threshold.set(threshold)

    # -- providers and loaded versions -------------------------------------------------

    def set_provider(self, model: str, version: int | str, requested: str, provider: str) -> None:
        """Record the provider a model version runs on (``requested`` from the settings)."""
        key = (model, str(version))
        old = self._providers.get(key)
        if old is not None:
            self._remove(self.provider_info, *key, *old)
        self.provider_info.labels(*key, requested, provider).set(1.0)
        self._providers[key] = (requested, provider)

    def provider_fallback(self, model: str, version: int | str) -> None:
        """Count a session that runs on another provider than requested."""
        self.provider_fallbacks.labels(model, str(version)).inc()

    def set_loaded_versions(self, count: int) -> None:
        self.loaded_versions.set(count)

    def forget_version(self, model: str, version: int | str) -> None:
        """Drop the per-version gauges of an unloaded version (counters and histograms
        keep their history)."""
        v = str(version)
        for gauge in (self.drift_score, self.drift_exceeded, self.drift_samples):
            self._remove(gauge, model, v)
        for layer in self._layers.pop((model, v), set()):
            self._remove(self.layer_drift_score, model, v, layer)
        provider = self._providers.pop((model, v), None)
        if provider is not None:
            self._remove(self.provider_info, model, v, *provider)

    # -- recalibration jobs ------------------------------------------------------------

    def job_finished(self, outcome: str, seconds: float) -> None:
        """Count a recalibration job that reached a final state, and its duration.

        Args:
            outcome: one of :data:`JOB_OUTCOMES`.
            seconds: time from start to the final state.
        """
        if outcome not in JOB_OUTCOMES:
            raise ValueError(f"expected outcome in {JOB_OUTCOMES} (got {outcome!r})")
        self.jobs.labels(outcome).inc()
        self.job_duration.observe(seconds)

    @staticmethod
    def _remove(metric: Gauge, *labels: str) -> None:
        try:
            metric.remove(*labels)
        except KeyError:
            pass
