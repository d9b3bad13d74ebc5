"""The version table under the serving runtime: loaded model versions and their lifecycle.

:class:`VersionTable` keeps, per loaded ``(model, version)``, a :class:`LoadedVersion`: its
ONNX Runtime sessions (the plain graph and the drift-tapped graph, see
:mod:`service.runtime.drift_monitor`), its :class:`~service.runtime.batching.Batcher`, its
:class:`~service.runtime.drift_monitor.DriftMonitor` and an in-flight count. It does the
work of a version's lifecycle: not loaded -> loading (sessions built and warmed up in a
worker thread; concurrent loads of one version share the work) -> ready -> retired (no
new requests; in-flight ones finish; the batcher drains; sessions dropped), and retires
versions that are neither served nor used for :data:`IDLE_SECONDS` on the next load.

Which version serves, unloading a model and inference are
:class:`service.runtime.runtime.ServingRuntime`'s, the subclass; it moves the served
pointer (``_served``) and the generations (``_generations``) this table reads.

Session runs use a bounded thread pool (runs in flight per version bounded by
:func:`concurrent_runs`, see the batcher); drift moments are computed on a separate single
thread, off the request path; loads use ``asyncio.to_thread``. Nothing heavy happens
before :meth:`VersionTable.start` or the first load.
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
from recalib.onnx.banks import BANK_INDEX
from recalib.onnx.taps import add_drift_taps

from ..errors import GenerationMoved, InvalidInput, NotFound, NotReady, ServiceError, without_path
from ..metrics import ServiceMetrics
from ..settings import Settings
from .bank_serving import VersionBanks
from .batching import Batcher, LoopBudget
from .drift_monitor import DriftMonitor
from .sessions import CUDA, ModelSession, TensorSpec, create_session, warmup_sizes
from .stats import ModelStats

__all__ = ["IDLE_SECONDS", "PLATFORM", "LoadedVersion", "VersionTable", "concurrent_runs"]

log = logging.getLogger(__name__)

PLATFORM = "onnx_onnxv1"
"""The v2 platform string of ONNX models (as Triton names it)."""

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


class LoadedVersion:
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
        self.banks: VersionBanks | None = None  # set by ModelBanks.sync on the event loop
        self.closed = False  # set when it is dropped: nothing may be added to it after
        self.stats = ModelStats()  # the runtime's, set when the version is registered
        self.rows_counted = self.batchable  # inference_count: rows, or 1 per request
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.last_used = time.monotonic()
        self.last_explicit = -float("inf")
        self.label = f"model {name!r} version {version}"

    def run(self, feed: dict[str, Array], rows: int) -> list[Array]:
        """Worker thread: one session run; sampled batches go through the tapped graph,
        bank requests (a ``recalib_bank_index`` in ``feed``) through the bank session."""
        try:
            if self.banks is not None and BANK_INDEX in feed:
                return self.banks.run(feed, self.output_names)
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


def _discard(entry: LoadedVersion) -> None:
    """A version built but never registered: close what it holds that outlives it."""
    entry.closed = True
    if entry.banks is not None:
        entry.banks.close()


class VersionTable:
    """Loaded model versions: build, warm up, register, retire and drop them.

    Args:
        settings: provider, threads, batching, warm-up and drift settings.
        metrics: where batch, drift, provider and loaded-version metrics go (the drift
            threshold is published there on construction).
    """

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        # One threshold for every model version (DriftMonitor(threshold=...) below).
        metrics.set_drift_threshold(settings.drift_threshold)
        self._versions: dict[tuple[str, int], LoadedVersion] = {}
        self._served: dict[str, int] = {}  # moved by ServingRuntime.serve; spared by _sweep
        self._loading: dict[tuple[str, int], asyncio.Task[LoadedVersion]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._generations: dict[str, int] = {}  # see generation()
        self._stats: dict[tuple[str, int], ModelStats] = {}  # see statistics()
        self._load_errors: dict[tuple[str, int], str] = {}  # see load_error()
        self._executor: ThreadPoolExecutor | None = None
        self._drift_executor: ThreadPoolExecutor | None = None
        # every batcher's runs on the event loop, per turn of it (lone requests' bound)
        self._loop_budget = LoopBudget(settings.inline_run_alone_ms / 1000.0)
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
        """How many times ``name`` was unloaded (``ServingRuntime.unload_model``) so far.

        A caller that resolves a version in the registry and then loads or serves it takes
        the generation *before* resolving and passes it on (``generation=``): if the model
        was deleted meanwhile, the load is refused (:class:`NotFound`) instead of bringing
        a deleted version back.
        """
        return self._generations.get(name, 0)

    def _check_generation(self, name: str, generation: int | None, what: str) -> None:
        if generation is not None and self._generations.get(name, 0) != generation:
            raise GenerationMoved(f"model {name!r} was deleted or unloaded while {what}")

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
            raise GenerationMoved(
                f"model {name!r} was deleted or unloaded while version {version} loaded"
            ) from None
        # unload_model() drops what was loaded meanwhile; a later load is someone else's
        self._check_generation(name, generation, what)

    async def _load(self, key: tuple[str, int], path: Path) -> LoadedVersion:
        started = time.perf_counter()
        try:
            entry = await asyncio.to_thread(self._build, key[0], key[1], path)
        except NotFound:
            raise
        except ServiceError as exc:
            self._load_errors[key] = exc.message
            self.metrics.model_load_failed(key[0], exc)
            raise
        except Exception as exc:  # ORT's own exception types
            self._load_errors[key] = f"model {key[0]!r} version {key[1]}: loading failed ({exc})"
            self.metrics.model_load_failed(key[0], exc)
            raise
        self._load_errors.pop(key, None)
        try:  # before its batcher and before it is registered: ready means ready
            await self._prepare(entry)
        except BaseException:  # cancelled (an unload): nothing of it may stay
            _discard(entry)
            raise
        if self._closed or self._executor is None:
            _discard(entry)
            raise NotReady(
                f"the serving runtime is {'shut down' if self._closed else 'not started'}"
            )
        settings = self.settings
        metrics = self.metrics
        name, version = key

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
            # a GPU run mostly waits for the device: other models' runs overlap it in
            # the worker threads, which a run on the loop would stop
            inline_seconds=settings.inline_run_ms / 1000.0 if entry.provider() != CUDA else 0.0,
            alone_inline_seconds=settings.inline_run_alone_ms / 1000.0,
            loop_budget=self._loop_budget,
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
            self._publish_drift(entry, entry.monitor.report())
        log.info(
            "%s ready on %s in %.2fs (drift %s, batching %s)",
            entry.label,
            entry.provider(),
            time.perf_counter() - started,
            "on" if entry.monitor else "off",
            "on" if entry.batcher.gathers else "off",
        )
        return entry

    async def _prepare(self, entry: LoadedVersion) -> None:
        """What a loaded version needs before it is registered as ready (the subclass
        gives it its stat banks); nothing here."""

    def _publish_drift(self, entry: LoadedVersion, report: dict[str, Any]) -> None:
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

    def _build(self, name: str, version: int, path: Path) -> LoadedVersion:
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
            try:
                plain = create_session(path, settings, label=label)
            except InvalidInput:
                if not path.exists():  # deleted since it was read (a store pruned it)
                    raise NotFound(f"{label} was deleted while it was being loaded") from None
                raise
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
        entry_ref: list[LoadedVersion] = []
        if tapped_proto is not None:

            def publish(report: dict[str, Any]) -> None:
                if entry_ref:
                    self._publish_drift(entry_ref[0], report)

            monitor = DriftMonitor(
                tapped_proto,
                window_seconds=settings.drift_window_seconds,
                threshold=settings.drift_threshold,
                sample_fraction=fraction,
                min_rows=settings.drift_min_rows,
                publish=publish,
                executor=self._drift_executor,
            )
        entry = LoadedVersion(
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

    def _drop_later(self, entry: LoadedVersion) -> None:
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

    async def _drop(self, entry: LoadedVersion) -> None:
        """Let a version taken out of ``_versions`` finish its in-flight requests, drop it."""
        entry.closed = True
        await entry.idle.wait()
        if entry.batcher is not None:
            await entry.batcher.close()
        if entry.monitor is not None:
            await asyncio.to_thread(entry.monitor.close)
        if entry.banks is not None:
            await asyncio.to_thread(entry.banks.close)
        # at shutdown the counters stay: a last scrape still sees the totals
        self.metrics.forget_version(entry.name, entry.version, keep_totals=self._closed)
        self.metrics.set_loaded_versions(len(self._versions))
        log.info("%s unloaded", entry.label)

    # -- what the table holds ----------------------------------------------------------

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
