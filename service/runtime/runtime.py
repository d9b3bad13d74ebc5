"""The serving runtime: the served pointer, unloading, inference, metadata and drift.

:class:`ServingRuntime` is the façade the app, the data plane and the control plane use.
Its base class :class:`~service.runtime.versions.VersionTable` keeps the loaded versions
(:class:`~service.runtime.versions.LoadedVersion`: sessions, batcher, drift monitor,
in-flight count) and does their lifecycle (load, build, retire, drop, the idle sweep). Per
model name the runtime keeps the *served* version (what ``/v2/models/{name}/infer``
without a version answers).

:meth:`ServingRuntime.serve` is the zero-downtime switch: the new version is loaded and
warmed up first (a failed load leaves the old version serving), then the served pointer
moves in one assignment on the event loop; requests that already picked the old version
finish on it, and the old version is retired once its in-flight count reaches zero -
unless an explicitly versioned request used it in the last :data:`PIN_SECONDS` (then it
stays loaded; versions nobody has used for :data:`IDLE_SECONDS` are retired on the next
load).

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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recalib.onnx.banks import BANK_INDEX

from ..errors import GenerationMoved, NotFound, NotReady
from ..metrics import ServiceMetrics
from ..settings import Settings
from .bank_refs import BankRef
from .bank_serving import ModelBanks
from .sessions import TensorSpec
from .tensors import InferOutput, InferRequest, InferResponse, select_outputs, to_feed
from .versions import IDLE_SECONDS, PLATFORM, LoadedVersion, VersionTable, concurrent_runs

__all__ = ["IDLE_SECONDS", "PIN_SECONDS", "PLATFORM", "ServingRuntime", "concurrent_runs"]

log = logging.getLogger(__name__)

PIN_SECONDS = 60.0
"""A version used by an explicitly versioned request this recently stays loaded when the
served pointer moves away from it."""


class ServingRuntime(VersionTable):
    """Loaded model versions and their inference, as the v2 router and the control plane
    use them (the versions' lifecycle is :class:`~service.runtime.versions.VersionTable`'s).

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
        super().__init__(settings, metrics)
        self._locks: dict[str, asyncio.Lock] = {}
        self._wanted: dict[str, int] = {}  # the version the latest serve() asked for
        self._banks = ModelBanks(settings, metrics, drift_executor=lambda: self._drift_executor)

    # -- stat banks ----------------------------------------------------------------------

    async def set_banks(self, name: str, banks: Sequence[BankRef], default: str | None) -> None:
        """Replace the stat banks of ``name`` and its default bank word (``None``,
        ``"auto"``, ``"none"`` or a bank name), kept across unloads; ``([], None)``
        forgets them (the model was deleted).

        Every loaded version of ``name`` gets the banks valid for it (new ones added to its
        tables, gone ones retired; no session rebuild, but the first bank of a version
        builds its bank session, in a worker thread); a version loaded later gets them
        when it loads. Unreadable or unfitting bank files are logged and counted, never
        raised (:class:`~service.runtime.bank_serving.ModelBanks`).
        """
        self._banks.set(name, banks, default)
        entries = [e for (n, _), e in sorted(self._versions.items()) if n == name]
        await asyncio.gather(*(self._banks.sync(entry) for entry in entries))

    async def load(
        self, name: str, version: int, onnx_path: Path, *, generation: int | None = None
    ) -> None:
        """:meth:`VersionTable.load`; the version gets its stat banks before it is
        registered (:meth:`_prepare`), and again after, for banks pushed while it loaded
        (see :meth:`set_banks`; nothing to do when they did not change)."""
        await super().load(name, version, onnx_path, generation=generation)
        entry = self._versions.get((name, version))
        if entry is not None:
            await self._banks.sync(entry)

    async def _prepare(self, entry: LoadedVersion) -> None:
        await self._banks.sync(entry)

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
        detached: LoadedVersion | None = None
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
            raise GenerationMoved(
                f"model {name!r} was deleted or unloaded while version {version} loaded"
            )

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
        self.metrics.forget_model(name)  # its retired versions' and load failures' series
        # loads that resolved the model while the in-flight requests finished
        late = await self._forget(name)
        for entry in late:
            self._drop_later(entry)

    async def _forget(self, name: str) -> list[LoadedVersion]:
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

    def _entry(self, name: str, version: int | None) -> LoadedVersion:
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
        variable dimensions) and ``parameters`` with the execution provider in use (and,
        with stat banks, ``stat_banks``: how many the version serves, ``default_bank``)."""
        entry = self._entry(name, version)
        meta = entry.metadata(self.settings)
        meta["parameters"].update(self._banks.metadata(entry))
        return meta

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
            bank = self._banks.request(entry, request.parameters)
            if bank is not None and bank.index is not None:
                feed[BANK_INDEX] = bank.feed(feed)
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
            if bank is not None:
                extra = values[len(entry.output_names) :]
                response.parameters = self._banks.answer(entry, bank, extra)
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
        bounds, ``threshold``, ``exceeded``, ``sample_fraction``, and ``banks``: the same
        report per stat bank, by name, of the rows that bank answered scored against its
        own statistics (:mod:`service.runtime.bank_drift`; empty without banks)."""
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
                "min_rows": self.settings.drift_min_rows,
                "exceeded": False,
                "sample_fraction": self.settings.drift_sample_fraction,
                "banks": {},
            }
        report = monitor.report()
        if entry is not None:
            self._publish_drift(entry, report)
        banks = {} if entry is None or entry.banks is None else entry.banks.drift_reports()
        return {"model": name, "version": version, "monitoring": True, **report, "banks": banks}

    def reset_drift(self, name: str) -> None:
        """Empty the drift window of the served version of ``name`` (no-op if none)."""
        version = self._served.get(name)
        entry = None if version is None else self._versions.get((name, version))
        if entry is not None and entry.monitor is not None:
            entry.monitor.reset()
        if entry is not None and entry.banks is not None:
            entry.banks.reset_drift()
