"""Per-request stat banks of the loaded versions: the bank session, its tables, routing.

A request names a bank in ``parameters.bank`` (:func:`requested_bank`): a bank name,
:data:`~service.runtime.bank_refs.AUTO_BANK` (route each row to the nearest bank) or
:data:`~service.runtime.bank_refs.NO_BANK` (the version's own statistics); without one,
the model's default (``ServingRuntime.set_banks``) applies, and without a default the
request is served exactly as before banks existed.

* :class:`VersionBanks` - one loaded version's third session, built from
  ``add_bank_inputs(model, route_layers=1)`` (:mod:`recalib.onnx.banks`), and its
  :class:`~recalib.onnx.banks.BankTables`. The version's plain and drift-tapped sessions
  stay as they are (Conv+BN fused, full speed) and keep serving requests without a bank
  (and ``"none"``); every bank request goes to this one session whatever bank it names,
  so requests naming different banks share a batched run (a bank index per row, the
  tables gathered in the graph). Weights are held once; adding a bank costs its table
  rows and no session rebuild; a bank taken away is retired (its rows stay, so indices
  already handed out stay valid; routing never picks it, new requests cannot name it).
* :class:`ModelBanks` - what the runtime keeps per model (the pushed banks and default,
  surviving unloads) and per version (syncing a version with its banks, off the event
  loop), and the request/response side: a request's bank word to a table index, the
  run's ``recalib_bank`` / ``recalib_bank_distance`` rows to response parameters and
  metrics.

Response parameters of a bank request: ``bank`` (the answering bank's name, ``"none"``
for the version's statistics; per-row names joined by ``","`` for several rows),
``bank_distance`` (KL of the row from the bank that answered, a float for one row, a
``","``-joined ``%.6g`` string for several; absent when the plain session answered) and
``bank_fallback`` (a routed row got the version's statistics: farther than
``Settings.bank_route_threshold`` from every bank, or the version has no bank).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnx

from recalib.errors import RecalibError, StatBankMismatchError
from recalib.onnx.bank_files import read_bank_file, weights_digest
from recalib.onnx.banks import (
    AUTO,
    BANK_INDEX,
    BANK_OUTPUT,
    DISTANCE_OUTPUT,
    ROUTE_THRESHOLD,
    BankTables,
    add_bank_inputs,
)
from recalib.onnx.graph import GraphIndex
from recalib.onnx.names import bn_nodes
from recalib.onnx.taps import add_drift_taps

from ..errors import InvalidInput, NotFound
from ..metrics import ServiceMetrics
from ..settings import Settings
from .bank_drift import BankDrift, BankDriftPublisher
from .bank_refs import AUTO_BANK, NO_BANK, BankRef
from .sessions import ModelSession, TensorSpec, create_session, warmup_sizes, zero_inputs

if TYPE_CHECKING:
    from .versions import LoadedVersion

__all__ = [
    "BANK_PARAMETER",
    "BankRequest",
    "ModelBanks",
    "VersionBanks",
    "bank_parameters",
    "requested_bank",
]

log = logging.getLogger(__name__)

BANK_PARAMETER = "bank"
"""The request (and response) parameter that names a stat bank."""

EXTRA_OUTPUTS = (BANK_OUTPUT, DISTANCE_OUTPUT)
"""What a bank run returns after the model's outputs (``[N]`` each)."""

Array = npt.NDArray[Any]

_PER_RUN = (BANK_INDEX, ROUTE_THRESHOLD)
"""Inputs of :meth:`BankTables.feed` that change with every run (the rest: the tables)."""


def requested_bank(parameters: Mapping[str, Any], default: str | None) -> str | None:
    """The bank word a request asks for: its ``parameters.bank``, else the model's
    ``default``; ``None`` when neither asks for anything (served as without banks).

    Raises:
        InvalidInput: ``parameters.bank`` is not a non-empty string.
    """
    if BANK_PARAMETER not in parameters:
        return None if default in (None, NO_BANK) else default
    value = parameters[BANK_PARAMETER]
    if not isinstance(value, str) or not value:
        raise InvalidInput(
            f"request parameter {BANK_PARAMETER!r}: expected a stat bank name, "
            f"{AUTO_BANK!r} or {NO_BANK!r} (got {type(value).__name__} {repr(value)[:40]})"
        )
    return value


@dataclass(frozen=True)
class BankRequest:
    """What a request's bank word resolved to on the version that answers.

    Attributes:
        word: what was asked (a bank name, ``"auto"`` or ``"none"``).
        index: the table index fed per row (:data:`~recalib.onnx.banks.AUTO` routes),
            ``None`` when the version's plain session answers (its own statistics).
        fallback: ``"auto"`` on a version without banks (answered with its statistics).
    """

    word: str
    index: int | None
    fallback: bool = False

    def feed(self, feed: Mapping[str, Array]) -> Array:
        """The ``recalib_bank_index`` input for ``feed``: one index per row (axis 0)."""
        first = next(iter(feed.values()))
        rows = int(first.shape[0]) if first.ndim else 1
        return np.full(rows, AUTO if self.index is None else self.index, dtype=np.int64)


class VersionBanks:
    """The bank session and tables of one loaded version (build it with :meth:`build`).

    Args:
        session: the session of the bank graph.
        tables: its tables (bank 0: the version's statistics).
        digest: the version's weights digest (a bank of other weights is refused).
        threshold: routed rows farther than this from every bank get bank 0.
        label: ``model 'm' version 2``, for messages.
        tapped: the session of the same bank graph with drift taps at BN inputs, for the
            sampled runs of ``drift`` (:mod:`service.runtime.bank_drift`); ORT runs every
            node of a graph whatever outputs are asked for, so unsampled runs use
            ``session``.
        drift: the per-bank drift windows (``None``: drift off).
    """

    def __init__(
        self,
        session: ModelSession,
        tables: BankTables,
        *,
        digest: str,
        threshold: float,
        label: str,
        tapped: ModelSession | None = None,
        drift: BankDrift | None = None,
        tap_layers: Mapping[str, str] | None = None,
    ) -> None:
        self.session = session
        self.tapped = tapped if drift is not None else None
        self.drift = drift if tapped is not None else None
        self._tap_layers = dict(tap_layers or {})  # tapped layer -> bank node key
        # IOBinding sessions (CUDA): the tables live on the device, copied once per change
        # of the banks (:meth:`_resident`), not once per run
        self._generation = 0  # bumped after every add and retire
        self._device: tuple[tuple[int, int], dict[str, Any]] | None = None
        self._device_lock = threading.Lock()
        self.tables = tables
        self.digest = digest
        self.threshold = threshold
        self.label = label
        # replaced whole, never mutated: the event loop reads them while a sync runs
        self._active: dict[str, int] = {}
        self._sha: dict[str, str] = {}
        self._names: list[str] = [NO_BANK]  # index -> name for responses (retired too)
        self._failed: set[tuple[str, str]] = set()  # (name, sha256): not read again

    @classmethod
    def build(
        cls,
        path: Path,
        settings: Settings,
        *,
        label: str,
        inputs: Sequence[TensorSpec],
        executor: Executor | None = None,
        publish: BankDriftPublisher | None = None,
    ) -> VersionBanks:
        """Worker thread: rewrite the version's graph for banks, build and warm up its
        session (and, with drift sampling on, the tapped one and the per-bank drift
        windows, processed in ``executor`` and published with ``publish``).

        Raises:
            RecalibError: the graph cannot take banks (no BN with stored statistics,
                non-constant scale, ...).
            InvalidInput: ONNX Runtime refuses the rewritten graph, or its warm-up fails.
        """
        proto = onnx.load(str(path))
        digest = weights_digest(proto)
        banked = add_bank_inputs(proto, route_layers=1)
        session = create_session(
            banked.SerializeToString(), settings, label=f"{label} (stat banks)"
        )
        tapped, drift = None, None
        if settings.drift_sample_fraction > 0.0 and settings.bank_metric_limit > 0:
            tapped, drift = cls._drift(proto, settings, label, executor, publish)
        # the taps name a BN node by its name, else its output; the banks by read_bn_map's key
        tap_layers = {
            node.name or node.output[0]: key for key, node in bn_nodes(GraphIndex(proto.graph))
        }
        del proto
        banks = cls(
            session,
            BankTables(banked),
            digest=digest,
            threshold=settings.bank_route_threshold,
            label=label,
            tapped=tapped,
            drift=drift,
            tap_layers=tap_layers,
        )
        banks.warm_up(warmup_sizes(settings), inputs)
        return banks

    @staticmethod
    def _drift(
        proto: onnx.ModelProto,
        settings: Settings,
        label: str,
        executor: Executor | None,
        publish: BankDriftPublisher | None,
    ) -> tuple[ModelSession | None, BankDrift | None]:
        """The tapped bank session and its drift windows (``None``s: the graph cannot be
        tapped; the banks are served without per-bank drift)."""
        try:
            graph = add_bank_inputs(add_drift_taps(proto, source="input"), route_layers=1)
        except (RecalibError, ValueError) as exc:
            log.warning("%s: per-bank drift off, the bank graph cannot be tapped: %s", label, exc)
            return None, None
        session = create_session(
            graph.SerializeToString(), settings, label=f"{label} (stat banks, drift taps)"
        )
        drift = BankDrift(
            graph,
            window_seconds=settings.drift_window_seconds,
            threshold=settings.drift_threshold,
            sample_fraction=settings.drift_sample_fraction,
            min_rows=settings.drift_min_rows,
            limit=settings.bank_metric_limit,
            executor=executor,
            publish=publish,
        )
        return session, drift

    def warm_up(self, sizes: Sequence[int], inputs: Sequence[TensorSpec]) -> None:
        """Run zero inputs (bank 0) once per batch size, as the plain session is."""
        if any(-1 in s.shape[1:] or s.dtype is None for s in inputs):
            return
        for size in sorted(set(sizes)) or [1]:
            feed = zero_inputs(inputs, size)
            feed[BANK_INDEX] = BankRequest(NO_BANK, 0).feed(feed)
            host = self.tables.feed(feed[BANK_INDEX], threshold=self.threshold)
            for session in (self.session, self.tapped):
                if session is not None:
                    self._run(session, feed, host, EXTRA_OUTPUTS)

    # -- what it serves ------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The banks it serves now (not the retired ones), by table index."""
        return sorted(self._active, key=self._active.__getitem__)

    def index(self, name: str) -> int | None:
        """The table index of bank ``name`` (``None``: not served by this version)."""
        return self._active.get(name)

    def name(self, index: int) -> str:
        """The name of table row ``index`` (``"none"`` for 0; retired banks keep theirs)."""
        return self._names[index]

    def current(self) -> dict[str, str]:
        """``{name: sha256}`` of the banks it serves."""
        return dict(self._sha)

    def run(
        self, feed: Mapping[str, Array], output_names: Sequence[str], *, sample: bool = True
    ) -> list[Array]:
        """Worker thread: one run of the bank session; ``output_names`` then
        ``recalib_bank`` and ``recalib_bank_distance``. A sampled run (``drift``'s
        fraction of the runs) goes through the tapped session and hands its tap outputs,
        split by the bank that answered each row, to the per-bank drift windows.

        Raises:
            BankIndexError: an index outside the tables.
        """
        host = self.tables.feed(feed[BANK_INDEX], threshold=self.threshold)
        names = [*output_names, *EXTRA_OUTPUTS]
        drift, tapped = self.drift, self.tapped
        if sample and drift is not None and tapped is not None and drift.should_sample():
            values = self._run(tapped, feed, host, names + drift.tap_names)
            k = len(names)
            drift.submit(values[k:], values[k - 2])  # processed on the drift thread
            return values[:k]
        return self._run(self.session, feed, host, names)

    def _run(
        self,
        session: ModelSession,
        feed: Mapping[str, Array],
        host: Mapping[str, Array],
        names: Sequence[str],
    ) -> list[Array]:
        if not session.uses_binding:
            return session.run({**feed, **host}, names)
        per_run = {n: host[n] for n in _PER_RUN if n in host}
        resident = self._resident(session, host)
        return session.run({**feed, **per_run}, names, resident=resident)

    def _resident(self, session: ModelSession, host: Mapping[str, Array]) -> dict[str, Any]:
        """The tables as device ``OrtValue`` s, copied again only when the banks changed
        (added or retired since the last copy; every IOBinding session of a version is on
        the one device, so they share them)."""
        rows = len(self.tables)
        key = (self._generation, rows)
        with self._device_lock:
            cached = self._device
            if cached is None or cached[0] != key:
                tables = {n: v for n, v in host.items() if n not in _PER_RUN}
                if any(v.shape[0] != rows for v in tables.values() if v.ndim):
                    # the banks changed between this run's feed and now: this run is fed
                    # from the host (its indices fit its own feed), the next one copies
                    return {n: session.to_device(v) for n, v in tables.items()}
                cached = (key, {n: session.to_device(v) for n, v in tables.items()})
                self._device = cached
        return cached[1]

    def drift_reports(self) -> dict[str, dict[str, Any]]:
        """Each tracked bank's drift report, by bank name (empty with drift off)."""
        return {} if self.drift is None else self.drift.reports()

    def reset_drift(self) -> None:
        """Empty every bank's drift window."""
        if self.drift is not None:
            self.drift.reset()

    def close(self) -> None:
        """The version is unloading: process queued drift rows, stop publishing."""
        if self.drift is not None:
            self.drift.close()

    # -- changing the banks ----------------------------------------------------------------

    def sync(self, refs: Sequence[BankRef]) -> list[str]:
        """Worker thread: serve exactly ``refs`` (each valid for this version): retire the
        banks no longer among them (or pushed again with another digest), add the new ones.

        Returns:
            Why each bank that could not be added was skipped (a file whose content is
            wrong is not read again until it is pushed with another digest; one that could
            not be read is tried again at the next sync).
        """
        wanted = {ref.name: ref for ref in refs}
        active, sha = dict(self._active), dict(self._sha)
        for name, index in list(active.items()):
            ref = wanted.get(name)
            if ref is None or ref.sha256 != sha[name]:
                # bumped before and after the in-place write: a device copy taken while
                # it is written is keyed by the first bump and replaced after the second
                self._generation += 1
                self.tables.retire(index)
                self._generation += 1
                if self.drift is not None:
                    self.drift.forget(index)
                del active[name], sha[name]
        problems: list[str] = []
        for ref in refs:
            if ref.name in active or (ref.name, ref.sha256) in self._failed:
                continue
            try:
                index = self._add(ref)
            # whatever a file makes the reader or the tables raise: this bank is skipped,
            # the others are served (RecalibError, OSError, safetensors' own errors, ...)
            except Exception as exc:
                # a file missing or unreadable for now (a store being pruned, a delete
                # racing the load) is read again at the next push; only what the file
                # holds (format, digest, layers, values) makes it skipped for good
                if not (isinstance(exc, OSError) or isinstance(exc.__cause__, OSError)):
                    self._failed.add((ref.name, ref.sha256))
                problems.append(f"{self.label}: stat bank {ref.name!r} skipped: {exc}")
                continue
            active[ref.name], sha[ref.name] = index, ref.sha256
        self._sha, self._active = sha, active
        return problems

    def _add(self, ref: BankRef) -> int:
        bank = read_bank_file(ref.path)
        bank.check_values()
        if bank.digest != self.digest:
            raise StatBankMismatchError(
                f"expected a bank computed with weights {self.digest[:16]}... (got "
                f"{(bank.digest or 'no digest')[:16]}...: statistics of other weights)"
            )
        stats = self.tables.spec.stats_of(bank.stats)  # node-keyed, checked
        names = self._names
        self._names = [*names, ref.name]  # before the row: a routed run may pick it at once
        try:
            index = self.tables.add(stats, name=ref.name, route_limit=bank.route_limit)
        except RecalibError:
            self._names = names
            raise
        self._generation += 1
        if self.drift is not None:
            try:
                reference = {tap: stats[key] for tap, key in self._tap_layers.items()}
                self.drift.track(index, ref.name, reference)
            except ValueError as exc:  # served all the same, without its drift
                log.warning("%s: no drift for stat bank %r: %s", self.label, ref.name, exc)
        return index


class ModelBanks:
    """The runtime's stat banks: per model what was pushed, per version what it serves.

    Args:
        settings: the route threshold and the metric label limit (and what the bank
            sessions are built with).
        metrics: where bank requests, routing distances, fallbacks, load failures and
            per-bank drift go.
        drift_executor: returns the runtime's drift thread (where per-bank drift rows are
            processed; ``None`` before the runtime starts: inline).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        *,
        drift_executor: Callable[[], Executor | None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._drift_executor = drift_executor
        self._pushed: dict[str, tuple[tuple[BankRef, ...], str | None]] = {}
        self._locks: weakref.WeakKeyDictionary[LoadedVersion, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._unbankable: weakref.WeakSet[LoadedVersion] = weakref.WeakSet()

    # -- what was pushed ---------------------------------------------------------------

    def set(self, name: str, banks: Sequence[BankRef], default: str | None) -> None:
        """Replace the banks and default of ``name`` (none of either: forget the model)."""
        if not banks and default is None:
            self._pushed.pop(name, None)
        else:
            self._pushed[name] = (tuple(banks), default)

    def default(self, name: str) -> str | None:
        """The default bank word of ``name`` (``None``: none)."""
        return self._pushed.get(name, ((), None))[1]

    def valid(self, name: str, version: int) -> list[BankRef]:
        """The pushed banks of ``name`` valid for ``version``, in pushed order."""
        return [ref for ref in self._pushed.get(name, ((), None))[0] if version in ref.versions]

    # -- a version's banks ---------------------------------------------------------------

    async def sync(self, entry: LoadedVersion) -> None:
        """Give ``entry`` the banks valid for it now: build its bank session the first
        time (in a worker thread), then add and retire banks without rebuilding it. A
        graph that cannot take banks and bank files that cannot be read or do not fit are
        logged and counted, never raised."""
        lock = self._locks.setdefault(entry, asyncio.Lock())
        async with lock:
            refs = self.valid(entry.name, entry.version)
            banks = entry.banks
            if entry.closed:
                return  # unloaded meanwhile: nothing may come back (sessions, series)
            if banks is None:
                if not refs or entry in self._unbankable:
                    return
                banks = await self._build(entry)
                if banks is None:
                    return
            elif banks.current() == {ref.name: ref.sha256 for ref in refs}:
                return
            before = set(banks.names)
            problems = await asyncio.to_thread(banks.sync, refs)
            if entry.closed:  # unloaded while its banks were read: drop what was built
                if entry.banks is not banks:
                    await asyncio.to_thread(banks.close)
                return
            entry.banks = banks
            for gone in before - set(banks.names):
                self.metrics.forget_bank_drift(entry.name, entry.version, gone)
            for problem in problems:
                log.warning("%s", problem)
                self.metrics.bank_load_failed(entry.name)
            self.metrics.set_banks_loaded(entry.name, entry.version, len(banks.names))

    async def _build(self, entry: LoadedVersion) -> VersionBanks | None:
        metrics, name, version = self.metrics, entry.name, entry.version

        def publish(bank: str, report: dict[str, Any]) -> None:
            metrics.set_bank_drift(
                name, version, bank, score=report["score"], exceeded=report["exceeded"]
            )

        try:
            return await asyncio.to_thread(
                VersionBanks.build,
                entry.path,
                self.settings,
                label=entry.label,
                inputs=entry.inputs,
                executor=self._drift_executor(),
                publish=publish,
            )
        except Exception as exc:  # RecalibError, InvalidInput, OSError, ORT's own types
            self._unbankable.add(entry)
            log.warning("%s: stat banks off, its graph cannot take them: %s", entry.label, exc)
            self.metrics.bank_load_failed(entry.name)
            return None

    # -- requests --------------------------------------------------------------------------

    def request(self, entry: LoadedVersion, parameters: Mapping[str, Any]) -> BankRequest | None:
        """What ``parameters.bank`` (or the model default) asks of ``entry``; ``None``:
        nothing (the request is served as without banks).

        Raises:
            InvalidInput: ``parameters.bank`` is not a string.
            NotFound: it names a bank ``entry`` does not serve (a default that names one
                is answered with the version's statistics instead).
        """
        word = requested_bank(parameters, self.default(entry.name))
        if word is None or word == NO_BANK:
            return None if word is None else BankRequest(word, None)
        banks = entry.banks
        if word == AUTO_BANK:
            if banks is None or not banks.names:
                return BankRequest(word, None, fallback=True)
            return BankRequest(word, AUTO)
        index = None if banks is None else banks.index(word)
        if index is not None:
            return BankRequest(word, index)
        if BANK_PARAMETER not in parameters:  # the default: not the caller's mistake
            return BankRequest(NO_BANK, None)
        raise NotFound(
            f"{entry.label} has no stat bank {_shown(word)} (its banks: {_listed(banks)})"
        )

    def answer(
        self, entry: LoadedVersion, bank: BankRequest, extra: Sequence[Array]
    ) -> dict[str, Any]:
        """The response parameters of a bank request (and its metrics).

        Args:
            entry: the version that answered.
            bank: what the request asked for.
            extra: the run's ``recalib_bank`` and ``recalib_bank_distance`` rows of this
                request (empty when the plain session answered).
        """
        limit = self.settings.bank_metric_limit
        if bank.index is None or entry.banks is None or len(extra) < 2:
            self.metrics.observe_bank_request(
                entry.name, [NO_BANK], limit=limit, fallbacks=int(bank.fallback)
            )
            return {BANK_PARAMETER: NO_BANK, "bank_fallback": bank.fallback}
        chosen, distance = (np.asarray(a).ravel() for a in extra)
        names = [entry.banks.name(int(i)) for i in chosen]
        routed = bank.index == AUTO
        fell_back = (chosen == 0) if routed else np.zeros(chosen.shape, dtype=bool)
        self.metrics.observe_bank_request(
            entry.name,
            list(dict.fromkeys(names)),
            limit=limit,
            distances=distance[~fell_back].tolist() if routed else (),
            fallbacks=int(fell_back.sum()),
        )
        return bank_parameters(names, distance, bool(fell_back.any()))

    def metadata(self, entry: LoadedVersion) -> dict[str, Any]:
        """v2 model metadata ``parameters`` of ``entry``'s banks (empty without any)."""
        default = self.default(entry.name)
        count = 0 if entry.banks is None else len(entry.banks.names)
        if not count and default is None:
            return {}
        return {"stat_banks": count, "default_bank": default or NO_BANK}


def _shown(word: str, limit: int = 64) -> str:
    """``word`` for a message, cut to ``limit`` characters (a request may send megabytes)."""
    return repr(word) if len(word) <= limit else f"{word[:limit]!r}... ({len(word)} characters)"


def _listed(banks: VersionBanks | None, limit: int = 10) -> str:
    """The first ``limit`` bank names a version serves, and how many more."""
    names = [] if banks is None else banks.names
    if not names:
        return "none"
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def bank_parameters(names: Sequence[str], distance: Array, fallback: bool) -> dict[str, Any]:
    """``bank``, ``bank_distance`` and ``bank_fallback`` for per-row bank names and
    distances (one row: the distance as a float; several: joined by ``","``)."""
    if len(names) == 1:
        shown: float | str = float(distance[0])
    else:
        shown = ",".join(f"{float(d):.6g}" for d in distance)
    return {BANK_PARAMETER: ",".join(names), "bank_distance": shown, "bank_fallback": fallback}
