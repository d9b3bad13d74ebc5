"""Publishing production versions to the shared model store (the control replica's job).

With a model store (:mod:`service.model_store`), whenever ``production`` moves
(registration, :meth:`~service.registry.Registry.set_alias`, a push or a job that
promotes) or a model is deleted, :class:`~service.registry.Registry` has the
:class:`StorePublisher` it was given bring the model's store entry to the database's new
state (:meth:`StorePublisher.sync`), after the database commit. The store always follows
the database, never the other way round, so a failed publication (logged, counted in
``recalib_model_store_publish_failures_total``) leaves the store at the model's previous
production version - still published - and is repaired by the next reconciliation
(:meth:`StorePublisher.reconcile`: at start-up, after a sweep of the store's leftovers,
and every ``store_poll_seconds``); the REST call that moved the alias has committed and
succeeds.

A model's stat banks and default bank (:func:`service.banks.bank_set`) are part of its
state: :class:`~service.banks.BankStore` has the publisher :meth:`~StorePublisher.sync`
after each bank change (and after versions come and go: they change the versions a bank
is valid for), and an entry whose banks differ from the database's is republished like
one whose production version does (new bank files copied in before ``recalib.json``,
dropped ones deleted after it; see :mod:`service.model_store`).

The publisher only reads the catalog (which production version a model has, that
version's file and lineage, its banks); it decides nothing about what serves. The reads
run in a thread: a bank's valid versions may compute an old version's weights digest.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .banks import BankSet, bank_set
from .catalog import Catalog
from .model_store import ModelStore, StoredModel, StoreMetrics, bank_key, tensor_specs
from .registry_models import PRODUCTION

__all__ = ["StorePublisher"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Wanted:
    """What the store should hold for a model: its production version and banks."""

    uid: str
    production: int
    banks: BankSet


def _matches(entry: StoredModel | None, wanted: _Wanted | None) -> bool:
    """Whether the store's ``entry`` is the database's state ``wanted`` (both ``None``:
    nothing to hold, nothing held)."""
    if entry is None or wanted is None:
        return entry is None and wanted is None
    return (entry.uid, entry.production, bank_key(entry.banks), entry.default_bank) == (
        wanted.uid,
        wanted.production,
        bank_key(wanted.banks.banks),
        wanted.banks.default,
    )


class StorePublisher:
    """Keeps a model store's entries at the catalog's production versions.

    Args:
        catalog: the registry's rows and files (read only).
        store: the shared model store to publish to.
        metrics: where failed publications are counted (``None``: nowhere).
    """

    def __init__(
        self, catalog: Catalog, store: ModelStore, metrics: StoreMetrics | None = None
    ) -> None:
        self.catalog = catalog
        self.store = store
        self._metrics = metrics
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _wanted(self, name: str) -> _Wanted | None:
        """What the store should hold for ``name``, ``None`` for nothing (no such model,
        or no ``production`` alias yet: a registration whose version 1 is still loading).
        Synchronous (the banks' valid versions): call it in a thread."""
        row = self.catalog.db.query_one(
            "SELECT m.id AS id, a.version AS version FROM models m JOIN aliases a "
            "ON a.model_id = m.id AND a.alias = ? WHERE m.name = ?",
            (PRODUCTION, name),
        )
        if row is None:
            return None
        return _Wanted(str(row["id"]), int(row["version"]), bank_set(self.catalog, name))

    async def sync(self, name: str) -> bool:
        """Bring the store's entry of ``name`` to the database's state: publish its
        production version and banks, or remove it. Never raises: a failure is logged and
        counted, and the next :meth:`reconcile` tries again.

        The state is read under a per-name lock, so whatever order concurrent alias moves
        (or a delete and a new registration) finish in, the last sync applies the latest.

        Returns:
            Whether the store now holds the database's state.
        """
        store = self.store
        async with self._lock(name):
            try:
                current = await asyncio.to_thread(store.read, name)
            except Exception:
                current = None  # unreadable: publish over it (or fail doing so)
            try:
                wanted = await asyncio.to_thread(self._wanted, name)
                if wanted is None:
                    if await asyncio.to_thread(store.remove, name):
                        log.info("model store: %s removed", name)
                elif not _matches(current, wanted):
                    await asyncio.to_thread(self._publish, name, wanted)
                    log.info(
                        "model store: %s version %d published (banks: %s)",
                        name,
                        wanted.production,
                        ", ".join(b.name for b in wanted.banks.banks) or "none",
                    )
            # Any failure of the store (OSError, a full disk, a vanished mount...): the
            # database has committed; the store keeps its previous, consistent state.
            except Exception:
                log.exception("model store: could not bring %s up to date; will retry", name)
                if self._metrics is not None:
                    self._metrics.publish_failed(name)
                return False
        return True

    def _publish(self, name: str, wanted: _Wanted) -> StoredModel:
        model_id, version = wanted.uid, wanted.production
        info = self.catalog.version(name, version)
        signature = info.signature.model_dump()
        onnx = info.artifacts["onnx"]
        return self.store.publish(
            name,
            version,
            self.catalog.root / model_id / str(version) / onnx.file,
            uid=model_id,
            inputs=tensor_specs(signature["inputs"]),
            outputs=tensor_specs(signature["outputs"]),
            metadata={
                "sha256": onnx.sha256,
                "bytes": onnx.bytes,
                "created_at": info.created_at,
                "parent_version": info.parent_version,
            },
            banks=wanted.banks.banks,
            default_bank=wanted.banks.default,
        )

    async def start(self) -> None:
        """At start-up (after the registry served its models): remove what an interrupted
        publication left in the store, then :meth:`reconcile`, so a store that was wiped or
        created since converges."""
        await asyncio.to_thread(self.store.sweep)
        await self.reconcile()

    async def reconcile(self) -> None:
        """Bring every model of the database and of the store to the database's state
        (at start-up, so a wiped or new store is filled, and periodically, so failed
        publications are repaired). A model already in its state costs one read."""
        store = self.store
        try:
            in_store, unreadable = await asyncio.to_thread(store.scan)
        except OSError:
            log.exception("model store: cannot list %s; will retry", store.root)
            return
        names = set(self.catalog.model_names()) | set(in_store) | set(unreadable)
        for name in sorted(names):
            if name in unreadable or not await self._in_state(name, in_store.get(name)):
                await self.sync(name)

    async def _in_state(self, name: str, entry: StoredModel | None) -> bool:
        """Whether the store's ``entry`` of ``name`` is the database's state."""
        try:
            wanted = await asyncio.to_thread(self._wanted, name)
        except Exception:  # e.g. the database busy: sync() tries, logs and counts it
            return False
        return _matches(entry, wanted)
