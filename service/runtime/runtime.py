"""The serving runtime: loaded model versions, the served pointer, inference and drift.

:class:`ServingRuntime` keeps, per loaded ``(model, version)``, a :class:`_Version`: its
ONNX Runtime sessions (the plain graph and the drift-tapped graph, see
:mod:`service.runtime.drift_monitor`), its :class:`~service.runtime.batching.Batcher`, its
:class:`~service.runtime.drift_monitor.DriftMonitor` and an in-flight count. Per model
name it keeps the *served* version (what ``/v2/models/{name}/infer`` without a version
answers).

Lifecycle of a version: not loaded -> loading (sessions built and warmed up in a worker
thread; concurrent loads of one version share the work) -> ready -> retired (no new
requests; in-flight ones finish; the batcher drains; sessions dropped).

:meth:`ServingRuntime.serve` is the zero-downtime switch: the new version is loaded and
warmed up first (a failed load leaves the old version serving), then the served pointer
moves in one assignment on the event loop; requests that already picked the old version
finish on it, and the old version is retired once its in-flight count reaches zero -
unless an explicitly versioned request used it in the last :data:`PIN_SECONDS` (then it
stays loaded; versions nobody has used for :data:`IDLE_SECONDS` are retired on the next
load).

Session runs use a bounded thread pool (runs in flight per version bounded by
:func:`concurrent_runs`, see the batcher);
drift moments are computed on a separate single thread, off the request path; loads use
``asyncio.to_thread``. Nothing heavy happens before :meth:`ServingRuntime.start`
or the first load.

Statistics (Triton's statistics extension, :mod:`service.runtime.stats`): one
:class:`~service.runtime.stats.ModelStats` per version, kept while the model exists (a
version retired after an alias move keeps its counters, and a reload continues them);
:meth:`ServingRuntime.unload_model` drops the model's. The last load failure of each
version is kept too (:meth:`ServingRuntime.load_error`), for the repository index and
readiness.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy.typing as npt
import onnx
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from recalib.errors import RecalibError
from recalib.onnx.taps import add_drift_taps

from ..errors import InvalidInput, NotFound, NotReady, ServiceError, without_path
from ..metrics import ServiceMetrics
from ..settings import Settings
from .batching import Batcher
from .drift_monitor import DriftMonitor
from .sessions import CUDA, ModelSession, TensorSpec, create_session, warmup_sizes
from .stats import ModelStats
from .tensors import InferOutput, InferRequest, InferResponse, select_outputs, to_feed

__all__ = ["IDLE_SECONDS", "PIN_SECONDS", "PLATFORM", "ServingRuntime", "concurrent_runs"]

log = logging.getLogger(__name__)

PLATFORM = "onnx_onnxv1"
"""The v2 platform string of ONNX models (as Triton names it)."""

PIN_SECONDS = 60.0
"""A version used by an explicitly versioned request this recently stays loaded when the
served pointer moves away from it."""

IDLE_SECONDS = 300.0
"""A loaded version that is not served and unused this long is retired on the next load."""

Array = npt.NDArray[Any]


def concurrent_runs(settings: Settings, provider: str) -> int:
    """Session runs of one version in flight at once: 1 on CUDA (one stream: batch
    instead), else the CPUs divided by the intra-op threads of a run (``0``: ONNX
    Runtime's default, all cores, so 1), so runs never oversubscribe the cores."""
    if provider == CUDA:
        return 1
    cpus = os.cpu_count() or 1
    threads = settings.intra_op_threads or cpus
    return max(1, cpus // threads)


class _Version:
    """One loaded model version: sessions, batcher, drift monitor, in-flight count."""

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        *,
        plain: ModelSession | None,
        tapped: ModelSession | None,
        monitor: DriftMonitor | None,
        num_outputs: int,
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.plain = plain
        self.tapped = tapped
        self.monitor = monitor
        main = plain if plain is not None else tapped
        if main is None:
            raise ValueError("expected at least one session")
        self.session = main
        self.inputs: tuple[TensorSpec, ...] = main.inputs
        self.outputs: tuple[TensorSpec, ...] = main.outputs[:num_outputs]
        self.output_names = [spec.name for spec in self.outputs]
        self.batchable = all(s.batched for s in (*self.inputs, *self.outputs))
        self.batcher: Batcher | None = None
        self.stats = ModelStats()  # the runtime's, set when the version is registered
        self.rows_counted = self.batchable  # inference_count: rows, or 1 per request
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.last_used = time.monotonic()
        self.last_explicit = -float("inf")
        self.label = f"model {name!r} version {version}"

    def run(self, feed: dict[str, Array], rows: int) -> list[Array]:
        """Worker thread: one session run; sampled batches go through the tapped graph."""
        try:
            monitor = self.monitor
            if monitor is not None and self.tapped is not None and monitor.should_sample():
                values = self.tapped.run(feed, self.output_names + monitor.tap_names)
                k = len(self.output_names)
                monitor.submit(values[k:], rows)  # processed on the drift thread
                return values[:k]
            if self.plain is None:  # only the tapped session exists
                return self.session.run(feed, self.output_names)
            return self.plain.run(feed, self.output_names)
        except InvalidArgument as exc:
            raise InvalidInput(f"{self.label}: ONNX Runtime refused the input: {exc}") from exc
        except ServiceError:
            raise
        except Exception as exc:  # ORT's own exception types
            raise ServiceError(f"{self.label}: inference failed: {exc}") from exc

    def enter(self, explicit: bool) -> None:
        self.active += 1
        self.idle.clear()
        now = time.monotonic()
        self.last_used = now
        if explicit:
            self.last_explicit = now

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle.set()

    def provider(self) -> str:
        return self.session.provider

    def metadata(self, settings: Settings) -> dict[str, Any]:
        """Open Inference Protocol model metadata (plus the provider in ``parameters``)."""
        return {
            "name": self.name,
            "versions": [str(self.version)],
            "platform": PLATFORM,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "parameters": {
                "version": str(self.version),
                "execution_provider": self.session.provider,
                "requested_execution_provider": self.session.requested,
                "provider_fallback": self.session.fell_back,
                "dynamic_batching": self.batcher is not None and self.batcher.gathers,
                "max_batch_size": settings.max_batch_size,
                "concurrent_runs": 0 if self.batcher is None else self.batcher.max_concurrent,
                "drift_monitoring": self.monitor is not None,
                "drift_sample_fraction": 0.0
                if self.monitor is None
                else settings.drift_sample_fraction,
            },
        }


class ServingRuntime:
    """Loaded model versions and their inference, as the v2 router and the control plane
    use them.

    Args:
        settings: provider, threads, batching, warm-up and drift settings.
        metrics: where request, batch, drift, provider and loaded-version metrics go (the
            drift threshold is published there on construction).

    Examples::

        >>> runtime = ServingRuntime(settings, metrics)
        >>> await runtime.start()
        >>> await runtime.serve("demo", 1, Path("demo.onnx"))
        >>> response = await runtime.infer("demo", None, decode_request(body, header))
        >>> await runtime.close()
    """

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        # One threshold for every model version (DriftMonitor(threshold=...) below).
        metrics.set_drift_threshold(settings.drift_threshold)
        self._versions: dict[tuple[str, int], _Version] = {}
        self._served: dict[str, int] = {}
        self._loading: dict[tuple[str, int], asyncio.Task[_Version]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._wanted: dict[str, int] = {}  # the version the latest serve() asked for
        self._generations: dict[str, int] = {}  # see generation()
        self._stats: dict[tuple[str, int], ModelStats] = {}  # see statistics()
        self._load_errors: dict[tuple[str, int], str] = {}  # see load_error()
        self._executor: ThreadPoolExecutor | None = None
        self._drift_executor: ThreadPoolExecutor | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Create the session-run thread pool (idempotent; loads call it too)."""
        if self._closed:
            raise NotReady("the serving runtime is shut down")
        if self._executor is None:
            workers = max(1, min(8, os.cpu_count() or 1))
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="recalib-run")
        if self._drift_executor is None:
            self._drift_executor = ThreadPoolExecutor(1, thread_name_prefix="recalib-drift")

    async def close(self) -> None:
        """Retire every version (in-flight requests finish) and stop the thread pool."""
        self._closed = True
        for task in list(self._loading.values()):
            task.cancel()
        self._served.clear()
        await asyncio.gather(*(self._retire(key) for key in list(self._versions)))
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for pool in (self._executor, self._drift_executor):
            if pool is not None:
                pool.shutdown(wait=True)
        self._executor = self._drift_executor = None

    @property
    def started(self) -> bool:
        return self._executor is not None and not self._closed

    # -- loading -----------------------------------------------------------------------

    def generation(self, name: str) -> int:
        """How many times ``name`` was unloaded (:meth:`unload_model`) so far.

        A caller that resolves a version in the registry and then loads or serves it takes
        the generation *before* resolving and passes it on (``generation=``): if the model
        was deleted meanwhile, the load is refused (:class:`NotFound`) instead of bringing
        a deleted version back.
        """
        return self._generations.get(name, 0)

    def _check_generation(self, name: str, generation: int | None, what: str) -> None:
        if generation is not None and self._generations.get(name, 0) != generation:
            raise NotFound(f"model {name!r} was deleted or unloaded while {what}")

    async def load(
        self, name: str, version: int, onnx_path: Path, *, generation: int | None = None
    ) -> None:
        """Build, warm up and register ``name`` ``version`` (idempotent; concurrent calls
        share one load).

        Args:
            name, version, onnx_path: the version and its ONNX file.
            generation: :meth:`generation` of ``name`` when ``version`` was resolved;
                ``None`` for a caller that holds the registry's lock of the model.

        Raises:
            NotFound: the model was unloaded (deleted) since ``generation``, or during the
                load.
            InvalidInput: the file is not a loadable ONNX model or fails its warm-up.
            ProviderUnavailable: CUDA requested, not in use, and fallback forbidden.
        """
        what = f"version {version} loaded"
        self._check_generation(name, generation, what)
        await self.start()
        key = (name, version)
        if key in self._versions:
            return
        task = self._loading.get(key)
        if task is None:
            self._sweep()
            task = asyncio.get_running_loop().create_task(self._load(key, Path(onnx_path)))
            self._loading[key] = task
            task.add_done_callback(lambda _t: self._loading.pop(key, None))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if (current is not None and current.cancelling()) or not task.cancelled():
                raise  # this caller was cancelled
            # the load was cancelled by unload_model() or close()
            raise NotFound(
                f"model {name!r} was deleted or unloaded while version {version} loaded"
            ) from None
        # unload_model() drops what was loaded meanwhile; a later load is someone else's
        self._check_generation(name, generation, what)

    async def _load(self, key: tuple[str, int], path: Path) -> _Version:
        started = time.perf_counter()
        try:
            entry = await asyncio.to_thread(self._build, key[0], key[1], path)
        except NotFound:
            raise
        except ServiceError as exc:
            self._load_errors[key] = exc.message
            raise
        except Exception as exc:  # ORT's own exception types
            self._load_errors[key] = f"model {key[0]!r} version {key[1]}: loading failed ({exc})"
            raise
        self._load_errors.pop(key, None)
        if self._closed:
            raise NotReady("the serving runtime is shut down")
        settings = self.settings
        metrics = self.metrics
        name, version = key
        if self._executor is None:
            raise NotReady("the serving runtime is not started")

        def observe(rows: int, waits: Any) -> None:
            metrics.observe_batch(name, version, rows, waits)

        entry.stats = self._stats.setdefault(key, entry.stats)
        entry.batcher = Batcher(
            entry.run,
            executor=self._executor,
            max_batch_size=settings.max_batch_size,
            max_delay=settings.max_queue_delay_ms / 1000.0,
            enabled=settings.dynamic_batching,
            batchable=entry.batchable,
            observe=observe,
            stats=entry.stats,
            max_concurrent=concurrent_runs(settings, entry.provider()),
            name=entry.label,
        )
        entry.batcher.start()
        self._versions[key] = entry
        metrics.set_provider(name, version, entry.session.requested, entry.provider())
        for session in (entry.plain, entry.tapped):
            if session is not None and session.fell_back:
                metrics.provider_fallback(name, version)
        metrics.set_loaded_versions(len(self._versions))
        if entry.monitor is not None:
            self._publish(entry, entry.monitor.report())
        log.info(
            "%s ready on %s in %.2fs (drift %s, batching %s)",
            entry.label,
            entry.provider(),
            time.perf_counter() - started,
            "on" if entry.monitor else "off",
            "on" if entry.batcher.gathers else "off",
        )
        return entry

    def _publish(self, entry: _Version, report: dict[str, Any]) -> None:
        layers = None
        if self.settings.drift_per_layer_metrics:
            layers = {
                layer["module"] or layer["name"]: layer["symmetric_kl"]
                for layer in report["layers"]
            }
        self.metrics.set_drift(
            entry.name,
            entry.version,
            score=report["score"],
            exceeded=report["exceeded"],
            samples=report["samples"],
            layers=layers,
        )

    def _build(self, name: str, version: int, path: Path) -> _Version:
        """Worker thread: read the graph, tap it, create and warm up the sessions."""
        settings = self.settings
        label = f"model {name!r} version {version}"
        try:
            proto = onnx.load(str(path))
        except FileNotFoundError:
            # the model (or version) was deleted between resolving and loading it
            raise NotFound(f"{label} was deleted while it was being loaded") from None
        except OSError as exc:
            raise ServiceError(
                f"{label}: its ONNX file could not be read ({exc.strerror or 'I/O error'})"
            ) from None
        except Exception as exc:  # protobuf DecodeError, ...
            raise InvalidInput(
                f"{label}: expected an ONNX model file (got {without_path(str(exc), path)})"
            ) from exc
        fraction = settings.drift_sample_fraction
        tapped_proto: onnx.ModelProto | None = None
        if fraction > 0.0:
            try:
                tapped_proto = add_drift_taps(proto, source="auto")
            except (RecalibError, ValueError) as exc:
                log.warning("%s: drift monitoring off, the graph cannot be tapped: %s", label, exc)
        plain = None
        if tapped_proto is None or fraction < 1.0:
            plain = create_session(path, settings, label=label)
        tapped = None
        if tapped_proto is not None:
            tapped = create_session(
                tapped_proto.SerializeToString(), settings, label=f"{label} (drift taps)"
            )
        sizes = warmup_sizes(settings)
        for session in (plain, tapped):
            if session is not None:
                session.warm_up(sizes)
        monitor = None
        entry_ref: list[_Version] = []
        if tapped_proto is not None:

            def publish(report: dict[str, Any]) -> None:
                if entry_ref:
                    self._publish(entry_ref[0], report)

            monitor = DriftMonitor(
                tapped_proto,
                window_seconds=settings.drift_window_seconds,
                threshold=settings.drift_threshold,
                sample_fraction=fraction,
                publish=publish,
                executor=self._drift_executor,
            )
        entry = _Version(
            name,
            version,
            path,
            plain=plain,
            tapped=tapped,
            monitor=monitor,
            num_outputs=len(proto.graph.output),
        )
        entry_ref.append(entry)
        return entry

    def _sweep(self) -> None:
        """Retire versions that are neither served nor used for :data:`IDLE_SECONDS`."""
        now = time.monotonic()
        for key, entry in list(self._versions.items()):
            served = self._served.get(key[0]) == key[1]
            if not served and entry.active == 0 and now - entry.last_used > IDLE_SECONDS:
                self._retire_later(key)

    def _retire_later(self, key: tuple[str, int]) -> None:
        self._background(self._retire(key))

    def _drop_later(self, entry: _Version) -> None:
        self._background(self._drop(entry))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, key: tuple[str, int]) -> None:
        """Stop routing to a version, let its in-flight requests finish, drop it."""
        entry = self._versions.pop(key, None)
        if entry is not None:
            await self._drop(entry)

    async def _drop(self, entry: _Version) -> None:
        """Let a version taken out of ``_versions`` finish its in-flight requests, drop it."""
        await entry.idle.wait()
        if entry.batcher is not None:
            await entry.batcher.close()
        if entry.monitor is not None:
            await asyncio.to_thread(entry.monitor.close)
        self.metrics.forget_version(entry.name, entry.version)
        self.metrics.set_loaded_versions(len(self._versions))
        log.info("%s unloaded", entry.label)

    # -- serving pointer ---------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def serve(
        self,
        name: str,
        version: int,
        onnx_path: Path,
        *,
        if_unserved: bool = False,
        generation: int | None = None,
    ) -> None:
        """Make ``version`` the one unversioned requests get, with no downtime.

        The new version is loaded and warmed up before the pointer moves (if that fails,
        the previous version keeps serving and the error propagates). Requests already
        running on the previous version finish there; it is retired once idle unless an
        explicitly versioned request used it in the last :data:`PIN_SECONDS`.

        Concurrent calls for one model move the pointer in the order they were made: a
        call overtaken by a later ``serve`` of another version, or by
        :meth:`unload_model`, returns without moving it.

        Args:
            name, version, onnx_path: the version to serve and its ONNX file.
            if_unserved: only serve it if ``name`` has no served version by then (the
                lazy first request); it never overrides another call.
            generation: :meth:`generation` of ``name`` when ``version`` was resolved (see
                :meth:`load`); ``None``: the generation at this call.

        Raises:
            NotFound: ``generation`` was given and the model was unloaded since.
        """
        guarded = generation is not None
        epoch = self.generation(name) if generation is None else generation
        if not if_unserved:
            self._wanted[name] = version
        await self.load(name, version, onnx_path, generation=generation)
        key = (name, version)
        detached: _Version | None = None
        async with self._lock(name):
            old = self._served.get(name)
            if self.generation(name) != epoch:  # the model was unloaded meanwhile
                if old != version:
                    detached = self._versions.pop(key, None)
            elif if_unserved and old is not None:
                return
            elif not if_unserved and self._wanted.get(name) != version:
                return  # a later serve() asked for another version
            elif key not in self._versions:
                raise NotReady(f"model {name!r} version {version} was unloaded; retry")
            else:
                self._served[name] = version
                if old is None or old == version:
                    return
                log.info("model %r: serving version %d (was %d)", name, version, old)
                entry = self._versions.get((name, old))
                if entry is not None and time.monotonic() - entry.last_explicit > PIN_SECONDS:
                    detached = self._versions.pop((name, old))
        if detached is not None:
            await self._drop(detached)
        if guarded and self.generation(name) != epoch:
            raise NotFound(f"model {name!r} was deleted or unloaded while version {version} loaded")

    async def unload_model(self, name: str) -> None:
        """Forget every version of ``name`` (the model was deleted, or the repository
        extension unloaded it), with its statistics and load errors; in-flight requests
        finish first. A :meth:`serve` or :meth:`load` of ``name`` still under way does not
        serve it, nor leave it loaded.

        The generation of ``name`` moves on when this starts and again when it returns,
        and what a load resolved before that second step brought in is dropped then; the
        caller removes the model's records right after (before awaiting anything else),
        so a request that resolves the model later finds nothing.
        """
        entries = await self._forget(name)
        await asyncio.gather(*(self._drop(entry) for entry in entries))
        # loads that resolved the model while the in-flight requests finished
        late = await self._forget(name)
        for entry in late:
            self._drop_later(entry)

    async def _forget(self, name: str) -> list[_Version]:
        """Move ``name`` to its next generation: cancel its loads, unserve it, and take
        its loaded versions out (returned, for dropping)."""
        self._generations[name] = self._generations.get(name, 0) + 1
        self._wanted.pop(name, None)
        for key in [k for k in (*self._stats, *self._load_errors) if k[0] == name]:
            self._stats.pop(key, None)
            self._load_errors.pop(key, None)
        async with self._lock(name):
            self._served.pop(name, None)
            for key, task in list(self._loading.items()):
                if key[0] == name:
                    task.cancel()
            return [self._versions.pop(k) for k in list(self._versions) if k[0] == name]

    def served_version(self, name: str) -> int | None:
        """The version unversioned requests for ``name`` get, ``None`` if none."""
        return self._served.get(name)

    def loaded_versions(self, name: str) -> list[int]:
        """Versions of ``name`` with live sessions, ascending."""
        return sorted(v for (n, v) in self._versions if n == name)

    def is_loading(self, name: str, version: int) -> bool:
        """Whether a load of ``name`` ``version`` is under way."""
        return (name, version) in self._loading

    def load_error(self, name: str, version: int) -> str | None:
        """Why the last load of ``name`` ``version`` failed (``None``: it did not, or it
        loaded since)."""
        return self._load_errors.get((name, version))

    def statistics(self, name: str | None = None) -> list[tuple[str, int, ModelStats]]:
        """``(model, version, counters)`` of every version that was loaded (of ``name``,
        or of every model), by model and version; see :mod:`service.runtime.stats`."""
        return sorted(
            (key[0], key[1], stats)
            for key, stats in self._stats.items()
            if name is None or key[0] == name
        )

    def signature(
        self, name: str, version: int | None = None
    ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], str]:
        """``(inputs, outputs, execution provider)`` of a loaded version (the served one
        for ``None``).

        Raises:
            NotFound: no served version; NotReady: the version is not loaded.
        """
        entry = self._entry(name, version)
        return entry.inputs, entry.outputs, entry.provider()

    def is_ready(self, name: str, version: int | None = None) -> bool:
        """Whether ``name`` (its served version, or ``version``) can answer now."""
        if self._closed:
            return False
        if version is None:
            version = self._served.get(name)
            if version is None:
                return False
        return (name, version) in self._versions

    def _entry(self, name: str, version: int | None) -> _Version:
        if version is None:
            served = self._served.get(name)
            if served is None:
                raise NotFound(f"model {name!r} has no served version")
            version = served
        entry = self._versions.get((name, version))
        if entry is None:
            raise NotReady(f"model {name!r} version {version} is not loaded")
        return entry

    def metadata(self, name: str, version: int | None = None) -> dict[str, Any]:
        """v2 model metadata: name, versions, platform, inputs, outputs (``-1`` for
        variable dimensions) and ``parameters`` with the execution provider in use."""
        return self._entry(name, version).metadata(self.settings)

    # -- inference ---------------------------------------------------------------------

    async def infer(self, name: str, version: int | None, request: InferRequest) -> InferResponse:
        """Validate ``request`` against the version's signature, run it (batched with
        concurrent requests) and build the response.

        Args:
            name: the model.
            version: an explicit version, or ``None`` for the served one.
            request: a decoded v2 request.

        Raises:
            NotFound: no served version (``version=None``).
            NotReady: the version is not loaded, or is being unloaded.
            InvalidInput: the inputs do not match the model, or unknown outputs.
        """
        started = time.perf_counter()
        entry = self._entry(name, version)
        stats = entry.stats
        entry.enter(explicit=version is not None)
        try:
            feed, rows = to_feed(request, entry.inputs)
            chosen = select_outputs(request, entry.outputs)
            if entry.batcher is None:
                raise NotReady(f"{entry.label} is not ready")
            fed = time.perf_counter()
            values = await entry.batcher.submit(feed, rows)
            answered = time.perf_counter()
            index = {name: i for i, name in enumerate(entry.output_names)}
            outputs = [
                InferOutput(spec.name, values[index[spec.name]], binary) for spec, binary in chosen
            ]
            response = InferResponse(
                model_name=name, model_version=str(entry.version), outputs=outputs, id=request.id
            )
        except BaseException:  # refused input, failed run, cancelled caller
            stats.add_failure(time.perf_counter() - started)
            raise
        finally:
            entry.leave()
        done = time.perf_counter()
        stats.add_success(
            rows if entry.rows_counted else 1, started, done, fed - started, done - answered
        )
        return response

    # -- drift -------------------------------------------------------------------------

    def drift(self, name: str) -> dict[str, Any]:
        """Drift of the served version of ``name``: ``model``, ``version``, ``monitoring``
        (False when no version is served or drift is off), ``score``, ``max_score``,
        ``worst_layer``, per-layer ``layers``, ``samples`` in the window, ``window``
        bounds, ``threshold``, ``exceeded``, ``sample_fraction``."""
        version = self._served.get(name)
        entry = None if version is None else self._versions.get((name, version))
        monitor = None if entry is None else entry.monitor
        if monitor is None:
            return {
                "model": name,
                "version": version,
                "monitoring": False,
                "score": None,
                "max_score": None,
                "worst_layer": None,
                "layers": [],
                "samples": 0,
                "tapped_batches": 0,
                "window": {
                    "seconds": self.settings.drift_window_seconds,
                    "start": None,
                    "end": None,
                },
                "threshold": self.settings.drift_threshold,
                "exceeded": False,
                "sample_fraction": self.settings.drift_sample_fraction,
            }
        report = monitor.report()
        if entry is not None:
            self._publish(entry, report)
        return {"model": name, "version": version, "monitoring": True, **report}

    def reset_drift(self, name: str) -> None:
        """Empty the drift window of the served version of ``name`` (no-op if none)."""
        version = self._served.get(name)
        entry = None if version is None else self._versions.get((name, version))
        if entry is not None and entry.monitor is not None:
            entry.monitor.reset()
