"""The service's Prometheus metrics, created against an injected ``CollectorRegistry``.

:class:`ServiceMetrics` owns every metric the service exports; nothing is registered at
import time, so tests (and several apps in one process) use fresh registries. Names follow
the Prometheus conventions: ``recalib_`` prefix, base units (``_seconds``), counters end in
``_total``, histograms rather than summaries, and bounded label values only (model name,
version number, outcome, reason, phase, layer name behind a setting) - never request ids
or error messages.

Metrics (labels in braces):

* ``recalib_requests_total{model,version,outcome,reason}`` - inference requests;
  ``outcome`` is ``ok``, ``client_error`` or ``server_error``, ``reason`` the error class
  (:data:`REQUEST_REASONS`, ``none`` when ok; :func:`error_reason`).
* ``recalib_request_duration_seconds{model,version}`` - request latency (histogram).
* ``recalib_queue_wait_seconds{model,version}`` - time a request waited for its batch.
* ``recalib_batch_size{model,version}`` - rows per session run (histogram).
* ``recalib_inflight_requests{model}`` - inference requests being handled.
* ``recalib_inference_phase_seconds_total{model,version,phase}`` - seconds successful
  requests spent per phase (``queue``, ``input``, ``infer``, ``output``; every request of
  a batch charged its whole run, as Triton), ``recalib_inference_successes_total`` (what
  those sums divide by), ``recalib_inference_rows_total`` and
  ``recalib_session_runs_total``: read at scrape time from the runtime's Triton-style
  counters (:mod:`service.runtime.stats`), nothing added to the hot path; loaded versions
  only.
* ``recalib_drift_score{model,version}``, ``recalib_layer_drift_score{model,version,layer}``
  (only with ``Settings.drift_per_layer_metrics``), ``recalib_drift_threshold_exceeded``
  (0/1; 0 until the window holds ``RECALIB_DRIFT_MIN_ROWS`` rows),
  ``recalib_drift_window_samples``.
* ``recalib_drift_threshold`` - the configured drift threshold (``RECALIB_DRIFT_THRESHOLD``,
  one for every model), exported once the serving runtime has set it; dashboards draw it
  next to ``recalib_drift_score``.
* ``recalib_recalibration_jobs_total{outcome}`` and
  ``recalib_recalibration_job_duration_seconds`` - recalibration jobs by final state.
* ``recalib_loaded_versions`` - model versions with live sessions.
* ``recalib_model_load_failures_total{model,reason}`` - failed loads of a model version,
  every path (first request, promotion, repository load, model store);
  ``reason`` in :data:`LOAD_FAILURE_REASONS`.
* ``recalib_ready`` (0/1, what ``/v2/health/ready`` answers) and
  ``recalib_model_ready{model}`` (0/1 per model the server waits for), read at scrape time.
* ``recalib_execution_provider_info{model,version,requested,provider}`` (always 1) and
  ``recalib_provider_fallbacks_total{model,version}`` - the ONNX Runtime provider in use,
  so "requested cuda, running on CPU" can be alerted on.
* ``recalib_bank_requests_total{model,bank}`` - requests answered with a stat bank
  (``parameters.bank`` or the model's default): ``bank`` is the bank that answered (a
  routed request under the bank it was routed to; a request whose rows got several banks
  once under each), ``none`` for the version's own statistics (``"none"``, fallbacks),
  ``other`` past the first ``RECALIB_BANK_METRIC_LIMIT`` names of the model.
* ``recalib_bank_route_distance{model}`` - distance of each routed row from the bank it
  was routed to (histogram; rows that fell back are not in it).
* ``recalib_bank_fallbacks_total{model}`` - routed rows answered with the version's own
  statistics (farther than ``RECALIB_BANK_ROUTE_THRESHOLD`` from every bank, or no bank).
* ``recalib_stat_banks{model,version}`` - banks a loaded version serves;
  ``recalib_bank_load_failures_total{model}`` - bank files skipped (unreadable, other
  weights or layers) and versions whose graph cannot take banks.
* ``recalib_bank_drift_score{model,version,bank}``,
  ``recalib_bank_drift_threshold_exceeded{model,version,bank}`` - drift of the rows each
  stat bank answered, against that bank's own statistics (the first
  ``RECALIB_BANK_METRIC_LIMIT`` banks of a version; :mod:`service.runtime.bank_drift`).
* ``process_*`` (CPU, resident memory, open files, start time), ``python_info`` and
  ``python_gc_*``: prometheus_client's process, platform and GC collectors, registered in
  the injected registry too (two apps in one process do not clash).

Series lifetime: a retired (unloaded) version's series are removed, counters and
histograms included (:meth:`ServiceMetrics.forget_version`); a deleted or unloaded model's
every series (:meth:`ServiceMetrics.forget_model`). ``_created`` series are not exposed
(:meth:`ServiceMetrics.exposition` filters them per registry; prometheus_client's
``disable_created_metrics()`` would change every registry of the process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Metric,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "BANK_OTHER",
    "JOB_OUTCOMES",
    "LOAD_FAILURE_REASONS",
    "PHASES",
    "REQUEST_OUTCOMES",
    "REQUEST_REASONS",
    "ServiceMetrics",
    "error_reason",
    "load_failure_reason",
]

REQUEST_OUTCOMES = ("ok", "client_error", "server_error")
"""Values of the ``outcome`` label of ``recalib_requests_total``."""

# error class name (looked up along the exception's MRO, so subclasses map to their
# nearest listed base) -> reason label
_REASONS = {
    "ProviderUnavailable": "provider_unavailable",
    "InvalidInput": "invalid_input",
    "Unauthorized": "unauthorized",
    "Forbidden": "forbidden",
    "NotFound": "not_found",
    "Conflict": "conflict",
    "Incompatible": "incompatible",
    "PayloadTooLarge": "payload_too_large",
    "NotReady": "not_ready",
    "CancelledError": "cancelled",
    "ClientGone": "cancelled",
}

REQUEST_REASONS = ("none", *dict.fromkeys(_REASONS.values()), "internal")
"""Values of the ``reason`` label of ``recalib_requests_total``: ``none`` for ``ok``,
else the error's class (:func:`error_reason`), never its message."""

LOAD_FAILURE_REASONS = ("invalid_model", "provider_unavailable", "unreadable", "internal")
"""Values of the ``reason`` label of ``recalib_model_load_failures_total``."""

PHASES = ("queue", "input", "infer", "output")
"""Values of the ``phase`` label of ``recalib_inference_phase_seconds_total``."""


def error_reason(exc: BaseException | None) -> str:
    """The ``reason`` label of a request that ended with ``exc`` (``None``: ``none``).

    The class decides (the nearest of :class:`~service.errors.InvalidInput`,
    ``NotFound``, ``NotReady``... along its MRO; a cancelled caller is ``cancelled``);
    anything else, including a bare :class:`~service.errors.ServiceError`, is
    ``internal``."""
    if exc is None:
        return "none"
    for cls in type(exc).__mro__:
        reason = _REASONS.get(cls.__name__)
        if reason is not None:
            return reason
    return "internal"


def load_failure_reason(exc: BaseException) -> str:
    """The ``reason`` label of a failed version load: ``invalid_model`` (not an ONNX
    file, ONNX Runtime refuses it, or its warm-up fails), ``provider_unavailable`` (CUDA
    required and not usable), ``unreadable`` (the file could not be read), else
    ``internal``."""
    reason = error_reason(exc)
    if reason in ("invalid_input", "provider_unavailable"):
        return "invalid_model" if reason == "invalid_input" else reason
    names = {cls.__name__ for cls in type(exc).__mro__}
    return "unreadable" if "ServiceError" in names else "internal"


class PhaseStats(Protocol):
    """What the scrape reads of one version's :class:`service.runtime.stats.ModelStats`."""

    success_count: int
    inference_count: int
    execution_count: int
    queue_s: float
    input_s: float
    infer_s: float
    output_s: float


StatisticsSource = Callable[[], Iterable[tuple[str, int, PhaseStats]]]
"""``() -> [(model, version, counters)]`` of the loaded versions (called at scrape)."""

ReadinessSource = Callable[[], tuple[bool, Mapping[str, bool]]]
"""``() -> (server ready, {model: ready})`` (called at scrape)."""


class _ScrapeCollector(Collector):
    """The metrics read at scrape time from the runtime and the data plane."""

    def __init__(self) -> None:
        self.statistics: StatisticsSource | None = None
        self.readiness: ReadinessSource | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # names unknown to the registry: nothing to clash with

    def collect(self) -> Iterator[Metric]:
        if self.statistics is not None:
            yield from self._statistics(self.statistics)
        if self.readiness is not None:
            ready, models = self.readiness()
            yield GaugeMetricFamily(
                "recalib_ready",
                "1 when the server is ready (GET /v2/health/ready answers 200), else 0.",
                value=1.0 if ready else 0.0,
            )
            per_model = GaugeMetricFamily(
                "recalib_model_ready",
                "1 when the served version of a model the server waits for is loaded, else 0.",
                labels=("model",),
            )
            for model, up in sorted(models.items()):
                per_model.add_metric((model,), 1.0 if up else 0.0)
            yield per_model

    @staticmethod
    def _statistics(source: StatisticsSource) -> Iterator[Metric]:
        mv = ("model", "version")
        phases = CounterMetricFamily(
            "recalib_inference_phase_seconds",
            "Seconds successful requests spent per phase (queue, input, infer, output), "
            "summed over requests; each request of a batch is charged its whole run.",
            labels=(*mv, "phase"),
        )
        successes = CounterMetricFamily(
            "recalib_inference_successes",
            "Requests the runtime answered (the count the phase seconds are summed over).",
            labels=mv,
        )
        rows = CounterMetricFamily(
            "recalib_inference_rows", "Inferences (batch rows) answered.", labels=mv
        )
        runs = CounterMetricFamily(
            "recalib_session_runs", "Successful ONNX Runtime session runs.", labels=mv
        )
        for model, version, stats in source():
            key = (model, str(version))
            for phase, seconds in zip(
                PHASES, (stats.queue_s, stats.input_s, stats.infer_s, stats.output_s), strict=True
            ):
                phases.add_metric((*key, phase), seconds)
            successes.add_metric(key, stats.success_count)
            rows.add_metric(key, stats.inference_count)
            runs.add_metric(key, stats.execution_count)
        yield from (phases, successes, rows, runs)


class _WithoutCreated(Collector):
    """A registry's families without their ``_created`` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            created = family.name + "_created"
            if any(sample.name == created for sample in family.samples):
                copy = Metric(family.name, family.documentation, family.type, family.unit)
                copy.samples = [s for s in family.samples if s.name != created]
                family = copy
            yield family


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
_DISTANCE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
BANK_OTHER = "other"
"""The ``bank`` label of ``recalib_bank_requests_total`` past the per-model limit."""
_JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


class _Series:
    """Series by metric and label values: ``labels()`` takes a lock and checks its
    arguments on every call, too slow for the request path; :meth:`remove` drops a series
    and its entry together (a kept entry would count into a removed series)."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def get(self, metric: Counter | Gauge | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept until :meth:`remove` removes that series."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def remove(self, metric: Counter | Gauge | Histogram, *labels: str) -> None:
        """Remove one series (none there: nothing happens)."""
        self._children.pop((id(metric), labels), None)
        try:
            metric.remove(*labels)
        except KeyError:
            pass


class ServiceMetrics:
    """Every metric of the service, registered in ``registry``.

    Args:
        registry: where the metrics live; ``/metrics`` exposes this registry.

    Examples::

        >>> metrics = ServiceMetrics(CollectorRegistry())
        >>> metrics.observe_request("demo", 2, "ok", 0.004)
        >>> metrics.observe_request("demo", 2, "client_error", 0.001, reason="invalid_input")
        >>> metrics.job_finished("succeeded", 12.5)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        mv = ("model", "version")
        # process_*, python_info, python_gc_*: prometheus_client registers them in its
        # global registry only; /metrics exposes this one.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self._scraped = _ScrapeCollector()
        registry.register(self._scraped)
        self._exposed = _WithoutCreated(registry)
        self.requests = Counter(
            "recalib_requests_total",
            "Inference requests by model, version, outcome and reason (the error class).",
            (*mv, "outcome", "reason"),
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
        self.load_failures = Counter(
            "recalib_model_load_failures_total",
            "Model version loads that failed, by model and reason.",
            ("model", "reason"),
            registry=registry,
        )
        self.bank_requests = Counter(
            "recalib_bank_requests_total",
            "Requests answered with a stat bank, by the bank that answered (none: the "
            "version's statistics; other: past RECALIB_BANK_METRIC_LIMIT names).",
            ("model", "bank"),
            registry=registry,
        )
        self.bank_route_distance = Histogram(
            "recalib_bank_route_distance",
            "Distance (KL, mean over channels) of each routed row from the bank it got.",
            ("model",),
            buckets=_DISTANCE_BUCKETS,
            registry=registry,
        )
        self.bank_fallbacks = Counter(
            "recalib_bank_fallbacks_total",
            "Routed rows answered with the version's statistics (no bank near enough).",
            ("model",),
            registry=registry,
        )
        self.stat_banks = Gauge(
            "recalib_stat_banks", "Stat banks a loaded version serves.", mv, registry=registry
        )
        self.bank_drift_score = Gauge(
            "recalib_bank_drift_score",
            "Drift score of the rows a stat bank answered, against that bank's statistics "
            "(the first RECALIB_BANK_METRIC_LIMIT banks of a version).",
            (*mv, "bank"),
            registry=registry,
        )
        self.bank_drift_exceeded = Gauge(
            "recalib_bank_drift_threshold_exceeded",
            "1 when a stat bank's drift score is above the threshold (after "
            "RECALIB_DRIFT_MIN_ROWS rows).",
            (*mv, "bank"),
            registry=registry,
        )
        self.bank_load_failures = Counter(
            "recalib_bank_load_failures_total",
            "Stat bank files skipped (unreadable, other weights or layers) and versions "
            "whose graph cannot take banks.",
            ("model",),
            registry=registry,
        )
        # what forget_version / forget_model remove series from (the in-flight gauge is
        # handled apart: a request may be in flight)
        self._by_model: tuple[Counter | Gauge | Histogram, ...] = (
            self.requests,
            self.request_duration,
            self.queue_wait,
            self.batch_size,
            self.drift_score,
            self.layer_drift_score,
            self.drift_exceeded,
            self.drift_samples,
            self.provider_info,
            self.provider_fallbacks,
            self.load_failures,
            self.bank_requests,
            self.bank_route_distance,
            self.bank_fallbacks,
            self.stat_banks,
            self.bank_drift_score,
            self.bank_drift_exceeded,
            self.bank_load_failures,
        )
        self._bank_labels: dict[str, set[str]] = {}
        self._providers: dict[tuple[str, str], tuple[str, str]] = {}
        self._layers: dict[tuple[str, str], set[str]] = {}
        self._series = _Series()

    # -- inference ---------------------------------------------------------------------

    def observe_request(
        self,
        model: str,
        version: int | str,
        outcome: str,
        seconds: float,
        *,
        reason: str | None = None,
    ) -> None:
        """Count one finished inference request and its latency.

        Args:
            model, version: the model version that answered (``"none"`` if unresolved).
            outcome: one of :data:`REQUEST_OUTCOMES`.
            seconds: wall time spent in the service.
            reason: one of :data:`REQUEST_REASONS` (:func:`error_reason`); ``None``:
                ``none`` when ok, else ``internal``.
        """
        if outcome not in REQUEST_OUTCOMES:
            raise ValueError(f"expected outcome in {REQUEST_OUTCOMES} (got {outcome!r})")
        if reason is None:
            reason = "none" if outcome == "ok" else "internal"
        elif reason not in REQUEST_REASONS:
            raise ValueError(f"expected reason in {REQUEST_REASONS} (got {reason!r})")
        v = str(version)
        self._series.get(self.requests, model, v, outcome, reason).inc()
        self._series.get(self.request_duration, model, v).observe(seconds)

    def observe_batch(
        self, model: str, version: int | str, rows: int, queue_waits: Sequence[float]
    ) -> None:
        """Record one session run: its rows and the queue wait of each request in it."""
        v = str(version)
        self._series.get(self.batch_size, model, v).observe(rows)
        wait = self._series.get(self.queue_wait, model, v)
        for seconds in queue_waits:
            wait.observe(seconds)

    def inflight_add(self, model: str, delta: int) -> None:
        """Move the in-flight gauge of ``model`` by ``delta`` (+1 on entry, -1 on exit)."""
        self._series.get(self.inflight, model).inc(delta)

    # -- stat banks ----------------------------------------------------------------------

    def observe_bank_request(
        self,
        model: str,
        banks: Sequence[str],
        *,
        limit: int,
        distances: Sequence[float] = (),
        fallbacks: int = 0,
    ) -> None:
        """Count one request answered with stat banks.

        Args:
            model: the model.
            banks: the distinct banks that answered its rows (``"none"``: the version's
                statistics).
            limit: most bank names of ``model`` with a label of their own (the first
                seen; ``none`` not counted); the rest are counted as :data:`BANK_OTHER`.
            distances: the routed rows' distances from their banks.
            fallbacks: routed rows answered with the version's statistics.
        """
        seen = self._bank_labels.setdefault(model, set())
        labels: dict[str, None] = {}  # once per request each, "other" included
        for bank in banks:
            if bank != "none" and bank not in seen:
                if len(seen) >= limit:
                    bank = BANK_OTHER
                else:
                    seen.add(bank)
            labels[bank] = None
        for label in labels:
            self.bank_requests.labels(model, label).inc()
        if distances:
            histogram = self.bank_route_distance.labels(model)
            for value in distances:
                histogram.observe(value)
        if fallbacks:
            self.bank_fallbacks.labels(model).inc(fallbacks)

    def set_banks_loaded(self, model: str, version: int | str, count: int) -> None:
        """Publish how many stat banks a loaded version serves."""
        self.stat_banks.labels(model, str(version)).set(count)

    def set_bank_drift(
        self, model: str, version: int | str, bank: str, *, score: float | None, exceeded: bool
    ) -> None:
        """Publish one stat bank's drift (``score=None``: nothing scored yet)."""
        labels = (model, str(version), bank)
        if score is None:
            self._series.remove(self.bank_drift_score, *labels)
        else:
            self.bank_drift_score.labels(*labels).set(score)
        self.bank_drift_exceeded.labels(*labels).set(1.0 if exceeded else 0.0)

    def forget_bank_drift(self, model: str, version: int | str, bank: str) -> None:
        """Remove a retired stat bank's drift series."""
        for gauge in (self.bank_drift_score, self.bank_drift_exceeded):
            self._series.remove(gauge, model, str(version), bank)

    def bank_load_failed(self, model: str) -> None:
        """Count a bank file skipped, or a version whose graph cannot take banks."""
        self.bank_load_failures.labels(model).inc()

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
            self._series.remove(self.drift_score, model, v)
        else:
            self.drift_score.labels(model, v).set(score)
        self.drift_exceeded.labels(model, v).set(1.0 if exceeded else 0.0)
        self.drift_samples.labels(model, v).set(samples)
        if layers is None:
            return
        key = (model, v)
        for gone in self._layers.get(key, set()) - set(layers):
            self._series.remove(self.layer_drift_score, model, v, gone)
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
            self._series.remove(self.provider_info, *key, *old)
        self.provider_info.labels(*key, requested, provider).set(1.0)
        self._providers[key] = (requested, provider)

    def provider_fallback(self, model: str, version: int | str) -> None:
        """Count a session that runs on another provider than requested."""
        self.provider_fallbacks.labels(model, str(version)).inc()

    def set_loaded_versions(self, count: int) -> None:
        self.loaded_versions.set(count)

    def model_load_failed(self, model: str, exc: BaseException) -> None:
        """Count a failed load of a version of ``model`` (reason from the error's class,
        :func:`load_failure_reason`)."""
        self.load_failures.labels(model, load_failure_reason(exc)).inc()

    def forget_version(self, model: str, version: int | str, *, keep_totals: bool = False) -> None:
        """Remove every series of an unloaded version: gauges, counters and histograms
        (a version loaded again starts them over, which ``rate()`` reads as a new
        series). With ``keep_totals`` (the runtime shutting down) only the gauges go."""
        v = str(version)
        self._layers.pop((model, v), None)
        self._providers.pop((model, v), None)
        kinds = (Gauge,) if keep_totals else (Counter, Gauge, Histogram)
        self._forget(
            lambda labels: labels.get("model") == model and labels.get("version") == v, kinds
        )

    def forget_model(self, model: str) -> None:
        """Remove every series of ``model`` (deleted, or unloaded by the repository
        extension): its versions' series, its load failures, and its in-flight gauge
        once no request of it is in flight."""
        self._bank_labels.pop(model, None)
        for key in [k for k in (*self._layers, *self._providers) if k[0] == model]:
            self._layers.pop(key, None)
            self._providers.pop(key, None)
        self._forget(lambda labels: labels.get("model") == model, (Counter, Gauge, Histogram))
        for family in self.inflight.collect():
            for sample in family.samples:
                if sample.labels.get("model") == model and sample.value == 0:
                    self._series.remove(self.inflight, model)

    def _forget(self, match: Callable[[dict[str, str]], bool], kinds: tuple[type, ...]) -> None:
        for metric in self._by_model:
            if not isinstance(metric, kinds):
                continue
            names = metric._labelnames  # noqa: SLF001 - the label order remove() takes
            seen: set[tuple[str, ...]] = set()
            for family in metric.collect():
                for sample in family.samples:
                    if match(sample.labels):
                        seen.add(tuple(sample.labels[n] for n in names))
            for values in seen:
                self._series.remove(metric, *values)

    # -- read at scrape time -------------------------------------------------------------

    def watch_statistics(self, source: StatisticsSource) -> None:
        """Export the compute split of the loaded versions from ``source`` at scrape
        time (the runtime's :class:`~service.runtime.stats.ModelStats`, measured once, on
        the event loop)."""
        self._scraped.statistics = source

    def watch_readiness(self, source: ReadinessSource) -> None:
        """Export ``recalib_ready`` and ``recalib_model_ready`` from ``source`` at scrape
        time."""
        self._scraped.readiness = source

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format, without ``_created`` series."""
        return generate_latest(self._exposed)  # type: ignore[arg-type]

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
