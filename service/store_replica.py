"""An inference replica fed by the shared model store (``RECALIB_MODEL_STORE`` with
``RECALIB_ROLE=inference``): what it serves is what the store holds, with no database.

* :class:`StoreResolver` answers the data plane's version questions (``resolve``,
  ``model_names``) from the replica's latest view of the store, in place of the
  registry: a version is known once a poll has seen it committed (see
  :mod:`service.model_store`).
* :class:`StoreWatcher` polls the store every ``store_poll_seconds`` and makes the runtime
  serve each model's production version - the same zero-downtime swap a promote does on
  the control replica (the new version is loaded and warmed up before traffic moves) - and
  stops serving models that left the store. A version that fails to load is logged,
  counted (``recalib_model_store_load_failures_total``) and retried with a growing delay;
  the previous version keeps serving meanwhile. A store that cannot be read (a mount
  gone, one unreadable ``recalib.json``) changes nothing: what was served stays served.
  It also gives the runtime each model's stat banks and default bank as the store lists
  them (``set_banks``: the files inside the store), when they changed since the last
  push: once per model on the first pass, then after each change; a model that left the
  store gets ``([], None)``. A push that fails is logged and tried again at the next poll.
* :class:`Periodic` runs a coroutine function every few seconds (the watcher's loop, and
  the control replica's store reconciliation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from .errors import NotFound
from .model_store import ModelStore, StoredModel, StoreMetrics, bank_key
from .names import check_name, is_number
from .registry_models import PRODUCTION
from .runtime.bank_refs import BankRef

__all__ = ["Periodic", "StoreResolver", "StoreRuntime", "StoreWatcher"]

log = logging.getLogger(__name__)

RETRY_MAX_SECONDS = 60.0
"""Longest wait before a version that failed to load is tried again."""


class StoreRuntime(Protocol):
    """What the watcher asks the serving runtime (``ServingRuntime``)."""

    def served_version(self, name: str) -> int | None: ...

    async def serve(self, name: str, version: int, onnx_path: Path) -> None: ...

    async def unload_model(self, name: str) -> None: ...

    async def set_banks(self, name: str, banks: Sequence[BankRef], default: str | None) -> None:
        """A model's whole bank set and default (see :mod:`service.runtime.bank_refs`)."""


class StoreResolver:
    """Version resolution over the replica's view of a model store (read-only).

    The view is what :meth:`install` was last given (the watcher's latest poll), so the
    data plane's questions cost no file system access.

    Args:
        store: the shared store.
    """

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._models: dict[str, StoredModel] = {}

    @property
    def view(self) -> dict[str, StoredModel]:
        """The models of the latest poll, by name."""
        return self._models

    def install(self, models: dict[str, StoredModel]) -> None:
        """Make ``models`` the view (one assignment, on the event loop)."""
        self._models = dict(models)

    def model_names(self) -> list[str]:
        """The models the store held at the latest poll."""
        return sorted(self._models)

    def version_numbers(self, name: str) -> list[int]:
        """The published versions of ``name`` (model metadata lists them all).

        Raises:
            NotFound: the store does not hold ``name``.
        """
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} not found in the model store")
        return sorted(model.versions)

    def resolve(self, name: str, ref: str | None) -> tuple[int, Path]:
        """``(version, onnx path)`` of ``ref``: a published version number, ``production``,
        or ``None`` for production.

        Raises:
            InvalidInput: a malformed name or reference.
            NotFound: an unknown model, version or alias.
        """
        check_name(name, "model name")
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} not found in the model store")
        if ref is None or ref == PRODUCTION:
            version = model.production
        elif is_number(ref):
            version = int(ref) if len(ref) <= 19 else -1
            if version not in model.versions:
                raise NotFound(
                    f"model {name!r} has no version {ref[:40]} in the model store (published: "
                    f"{', '.join(map(str, sorted(model.versions)))})"
                )
        else:
            check_name(ref, "version number or alias")
            raise NotFound(
                f"model {name!r} has no alias {ref!r} here (a replica fed by the model store "
                f"knows {PRODUCTION!r} and the published version numbers)"
            )
        return version, model.onnx_path(version)


class Periodic:
    """Calls ``work`` every ``interval`` seconds until closed; a failing call is logged and
    the next one runs on time.

    Args:
        interval: seconds between the end of one call and the start of the next.
        work: the coroutine function.
        what: what ``work`` does, for the log.
    """

    def __init__(self, interval: float, work: Callable[[], Awaitable[None]], what: str) -> None:
        self.interval = interval
        self.work = work
        self.what = what
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start calling (the first call after one interval)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.what)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.work()
            except Exception:  # one bad pass must not end the loop
                log.exception("%s failed; trying again in %gs", self.what, self.interval)

    async def close(self) -> None:
        """Stop calling (a call under way is cancelled)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _bank_state(model: StoredModel) -> Any:
    """What a push of ``model``'s banks says (a new model of the name is pushed again)."""
    return model.uid, bank_key(model.banks), model.default_bank


class StoreWatcher:
    """Keeps the runtime serving what the store holds.

    Args:
        resolver: the data plane's resolver (its view is updated here).
        runtime: the serving runtime.
        interval: seconds between polls.
        metrics: where failed loads are counted.
    """

    def __init__(
        self,
        resolver: StoreResolver,
        runtime: StoreRuntime,
        interval: float,
        metrics: StoreMetrics | None = None,
    ) -> None:
        self.resolver = resolver
        self.runtime = runtime
        self.metrics = metrics
        self._loop = Periodic(interval, self.sync, "model store watch")
        self._failed: dict[tuple[str, int], tuple[float, float]] = {}  # -> (retry at, delay)
        self._banks: dict[str, Any] = {}  # name -> what its last push said (_bank_state)

    async def start(self) -> None:
        """The first pass (the replica starts with what the store holds), then polls."""
        await self.sync()
        await self._loop.start()

    async def close(self) -> None:
        """Stop polling."""
        await self._loop.close()

    async def sync(self) -> None:
        """One pass: read the store, drop models that left it (or were replaced by another
        model of that name), install the new view, serve each production version."""
        found, unreadable = await asyncio.to_thread(self.resolver.store.scan)
        previous = self.resolver.view
        for name, why in unreadable.items():
            log.warning("model store: %s; keeping what this replica had", why)
            if name in previous:
                found[name] = previous[name]
        for name, old in previous.items():
            new = found.get(name)
            if new is None or new.uid != old.uid:
                # Before the new view: a request must not get the old model's weights
                # under the new model's version numbers.
                await self.runtime.unload_model(name)
                self._forget_failures(name)
                self._banks.pop(name, None)  # the new model's banks are pushed below
                if new is None:
                    await self._push_banks(name, None)
                log.info(
                    "model store: %s %s; its old versions are no longer served",
                    name,
                    "left the store" if new is None else "was registered anew",
                )
        self.resolver.install(found)
        await asyncio.gather(*(self._follow(model) for model in found.values()))

    async def _follow(self, model: StoredModel) -> None:
        """Push ``model``'s banks if they changed, then serve its production version:
        in this order, a new version loads with the banks valid for it before it serves
        (pushed after, it would answer a request naming one of them 404 meanwhile)."""
        if self._banks.get(model.name) != _bank_state(model):
            await self._push_banks(model.name, model)
        await self._serve(model)

    async def _push_banks(self, name: str, model: StoredModel | None) -> None:
        """``set_banks`` with ``model``'s banks (``None``: it left the store, none)."""
        banks, default = ((), None) if model is None else (model.banks, model.default_bank)
        try:
            await self.runtime.set_banks(name, banks, default)
        # whatever the runtime raised (it reads the files): tried again at the next poll
        except Exception as exc:
            log.warning("model store: could not give %s its stat banks (%s); will retry", name, exc)
            if model is not None:
                self._banks.pop(name, None)
            return
        if model is not None:
            self._banks[name] = _bank_state(model)
            log.info(
                "model store: %s has stat banks %s (default %s)",
                name,
                ", ".join(b.name for b in banks) or "none",
                default,
            )

    def _forget_failures(self, name: str) -> None:
        for key in [k for k in self._failed if k[0] == name]:
            del self._failed[key]

    async def _serve(self, model: StoredModel) -> None:
        name, version = model.name, model.production
        if self.runtime.served_version(name) == version:
            return
        key = (name, version)
        now = time.monotonic()
        retry_at, delay = self._failed.get(key, (0.0, 0.0))
        if now < retry_at:
            return
        try:
            await self.runtime.serve(name, version, model.onnx_path(version))
        # whatever the load raised (ONNX Runtime has its own types): the old version stays
        except Exception as exc:
            delay = min(RETRY_MAX_SECONDS, max(1.0, 2 * delay))
            self._failed[key] = (now + delay, delay)
            if self.metrics is not None:
                self.metrics.load_failed(name)
            log.error(
                "model store: %s version %d does not load (%s); still serving %s; retry in %gs",
                name,
                version,
                exc,
                self.runtime.served_version(name),
                delay,
            )
        else:
            self._forget_failures(name)
            log.info("model store: serving %s version %d", name, version)
