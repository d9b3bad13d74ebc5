"""The model registry: how models, versions and aliases change, and what serves.

A *model* is a name (see :mod:`service.names`) with numbered *versions*. A version never
changes once written: its artifacts and lineage (parent version, data set, job,
recalibration parameters, report summary, validation) are stored by
:class:`service.catalog.Catalog`, which also answers every read; its files are checked
and prepared by :mod:`service.artifacts`. :class:`Registry` is the state machine on top.

*Aliases* name versions. ``production`` is the version ``/v2/models/{name}/infer``
serves: pointing it elsewhere first has the runtime load and warm the version
(``runtime.serve``) and only then commits the alias, so a version that fails to load
leaves the alias and the traffic where they were. Registering a model creates version 1
and points ``production`` at it, so it serves right away. The registry is given its
runtime once, at construction (:func:`service.app.create_app` does it).

Versions come from recalibration jobs (:meth:`Registry.add_version`) or are *pushed*: an
uploaded artifact added to an existing model (:meth:`Registry.push_version`), checked like
a registration, with the signature of the model's versions, optionally under a given
number (so inference replicas can mirror the control replica's numbering). Version
numbers of a model only increase and are never reused.

With a shared model store (:mod:`service.model_store`), the registry is also given a
:class:`~service.store_publisher.StorePublisher`: whenever ``production`` moves
(registration, :meth:`Registry.set_alias`, a push or a job that promotes) or a model is
deleted, it has the publisher bring the store to the model's new state after the database
commit. A failed publication never fails the call that committed (see the publisher).

A model's stat banks are valid for the versions with their weights, so they change when
versions come and go: after registering, pushing a version or deleting a model, the
registry awaits the ``on_change`` hook it was given (:func:`service.app.create_app` gives
it :meth:`service.banks.BankStore.push`: the model's banks to the runtime and the store);
a job's version (:meth:`Registry.add_version`, synchronous) is pushed by the job manager.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from .artifacts import (
    ARTIFACT_FILES,
    MODEL_SUFFIXES,
    check_signature,
    prepare_upload,
    read_signature,
)
from .catalog import Catalog, new_version_number
from .db import Database, loads, utcnow
from .errors import Conflict, InvalidInput, NotFound, ServiceError
from .names import check_alias, check_name
from .registry_models import MAX_VERSION, PRODUCTION, AliasInfo, ModelInfo, Signature, VersionInfo
from .store_publisher import StorePublisher
from .uploads import Upload, staging, upload_suffix

__all__ = ["Registry", "Runtime"]

log = logging.getLogger(__name__)


class Runtime(Protocol):
    """The serving runtime as the control plane uses it (``service.runtime.ServingRuntime``)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def serve(self, name: str, version: int, onnx_path: Path) -> None: ...

    async def unload_model(self, name: str) -> None: ...

    def drift(self, name: str) -> dict[str, Any]: ...

    def reset_drift(self, name: str) -> None: ...


async def _unchanged(_: str) -> None:
    """The default ``on_change`` hook: nothing to tell."""


def _alias_not_moved(exc: Exception, message: str) -> ServiceError:
    """The error of a failed alias switch after a push, with ``message`` saying so."""
    from recalib.errors import RecalibError

    if isinstance(exc, ServiceError):
        return type(exc)(message)
    if isinstance(exc, RecalibError):
        return InvalidInput(message)
    return ServiceError(message)


class Registry(Catalog):
    """Registration, versions, alias moves (through the runtime) and deletion.

    The reads (:meth:`model`, :meth:`version`, :meth:`resolve`, ...) are
    :class:`~service.catalog.Catalog`'s.

    Args:
        db: the metadata store.
        home: the service's state directory.
        runtime: what serves ``production`` versions.
        publisher: what brings the shared model store to the database's state after
            ``production`` moves or a model is deleted (``None``: no store).
        on_change: awaited with a model's name after its versions changed or it was
            registered or deleted (never raises: the bank push).
    """

    def __init__(
        self,
        db: Database,
        home: Path,
        runtime: Runtime,
        *,
        publisher: StorePublisher | None = None,
        on_change: Callable[[str], Awaitable[None]] = _unchanged,
    ) -> None:
        super().__init__(db, home)
        self._runtime = runtime
        self._on_change = on_change
        self._locks: dict[str, asyncio.Lock] = {}
        self.publisher = publisher

    def _lock(self, model_id: str) -> asyncio.Lock:
        return self._locks.setdefault(model_id, asyncio.Lock())

    async def register(
        self, *, name: str, upload: Upload, metadata: dict[str, Any], max_bytes: int
    ) -> ModelInfo:
        """Create a model with version 1 from an uploaded ``.onnx`` or ``.pt2`` and serve it.

        The file is checked and prepared by :func:`service.artifacts.prepare_upload`. Then
        ``production`` -> 1 (loaded by the runtime first): if loading fails, the model is
        removed again and the error raised.

        Raises:
            InvalidInput: bad name, file type or file; Conflict: the name is taken;
            PayloadTooLarge: upload above ``max_bytes``; RecalibError: export failures.
        """
        check_name(name, "model name")
        suffix = upload_suffix(upload.filename, MODEL_SUFFIXES, "model")
        if self.db.query_one("SELECT 1 FROM models WHERE name = ?", (name,)) is not None:
            raise Conflict(f"model {name!r} exists already (register under a new name)")
        with staging(self.home, "model") as files:
            report = await asyncio.to_thread(prepare_upload, upload, files, suffix, max_bytes)
            model_id = uuid.uuid4().hex
            self._insert_model(model_id, name, suffix[1:], metadata)
            try:
                self._commit_version(
                    model_id, files, version=1, report=report, signature=report["signature"]
                )
            except BaseException:
                self._remove_model(model_id)
                raise
        try:
            await self.set_alias(name, PRODUCTION, 1)
        except BaseException:
            self._remove_model(model_id)
            raise
        log.info("model %s registered from %s (version 1 in production)", name, suffix)
        await self._on_change(name)
        return self.model(name)

    def add_version(
        self,
        name: str,
        files: Path,
        *,
        parent_version: int,
        dataset: str,
        job: str,
        recalibration: dict[str, Any],
        validation: dict[str, Any] | None,
    ) -> VersionInfo:
        """Add the next version of ``name`` from a job's output directory ``files``.

        ``files`` holds ``model.onnx`` and ``report.json`` (the recalibration report,
        :meth:`recalib.report.RecalibrationReport.to_dict`), optionally ``model.pt2`` and
        ``stats.safetensors``; it is moved (renamed) into the registry.
        """
        model = self._model_row(name)
        report = json.loads((files / ARTIFACT_FILES["report"]).read_text())
        version = self._commit_version(
            model["id"],
            files,
            version=None,
            report=report.get("recalibration", report),
            signature=read_signature(files / ARTIFACT_FILES["onnx"]).model_dump(),
            parent_version=parent_version,
            dataset=dataset,
            job=job,
            recalibration=recalibration,
            validation=validation,
        )
        log.info("model %s: version %d added by job %s", name, version, job)
        return self.version(name, version)

    async def push_version(
        self,
        name: str,
        *,
        upload: Upload,
        max_bytes: int,
        version: int | None = None,
        parent: int | str | None = None,
        metadata: dict[str, Any] | None = None,
        alias: str | None = None,
    ) -> VersionInfo:
        """Add a version to an existing model from an uploaded artifact; optionally move
        ``alias`` to it.

        The file is checked as in :meth:`register` (``.pt2`` only when the model was
        registered from one). Its signature must equal the model's highest version's
        (:func:`service.artifacts.check_signature`). ``version`` (default: the next
        number) must be above every existing version. ``parent`` (a number or an alias of
        this model) is recorded as ``parent_version``; ``metadata`` goes into the version's
        report. All of this is all-or-nothing: the files are staged and the row committed
        under the model's lock, or nothing is left.

        ``alias`` is then pointed at the new version with :meth:`set_alias`. If that
        fails, the version stays (it is immutable and its number is taken), the alias is
        unchanged, and the error is raised with a message saying so.

        Raises:
            NotFound: no such model, or ``parent`` names no version of it;
            InvalidInput: bad file type or file, malformed alias or version number;
            Conflict: ``version`` is not above the model's highest version;
            Incompatible: another signature than the model's versions;
            PayloadTooLarge: upload above ``max_bytes``; RecalibError: export failures;
            whatever the alias switch raises (the version is stored then).
        """
        model = self._model_row(name)
        fmt = str(model["source_format"])
        suffix = upload_suffix(upload.filename, MODEL_SUFFIXES, "model")
        if suffix != ".onnx" and fmt != "pt2":
            raise InvalidInput(
                f"expected an .onnx file for model {name!r}, registered from {fmt} (got "
                f"{upload.filename!r}: a .pt2 can only be added to a model registered from one)"
            )
        if alias is not None:
            check_alias(alias)
        if version is not None and not 1 <= version <= MAX_VERSION:
            raise InvalidInput(f"expected a version number in 1..{MAX_VERSION} (got {version})")
        parent_version = None if parent is None else self.resolve_version(name, parent)
        latest = self._latest(model["id"])
        # Checked again when committing; here so a doomed push does no work.
        new_version_number(0 if latest is None else int(latest["version"]), version)
        with staging(self.home, "version") as files:
            report = await asyncio.to_thread(
                prepare_upload, upload, files, suffix, max_bytes, kind="upload", metadata=metadata
            )
            async with self._lock(model["id"]):
                if self._model_row(name)["id"] != model["id"]:  # deleted and registered anew
                    raise NotFound(f"model {name!r} was deleted while the version was checked")
                latest = self._latest(model["id"])
                if latest is not None:
                    check_signature(
                        Signature.model_validate(loads(latest["signature"])),
                        Signature.model_validate(report["signature"]),
                        model=name,
                        version=int(latest["version"]),
                    )
                number = self._commit_version(
                    model["id"],
                    files,
                    version=version,
                    report=report,
                    signature=report["signature"],
                    parent_version=parent_version,
                )
        log.info("model %s: version %d pushed from %s", name, number, suffix)
        await self._on_change(name)
        if alias is not None:
            await self._move_alias_to_pushed(name, alias, number)
        return self.version(name, number)

    async def _move_alias_to_pushed(self, name: str, alias: str, version: int) -> None:
        """:meth:`set_alias` for a just-pushed version; a failure says the version stays."""
        try:
            await self.set_alias(name, alias, version)
        # Any failure of the switch (ONNX Runtime raises its own types) is reported the
        # same way: the version exists, the alias did not move.
        except Exception as exc:
            try:
                where = f"it still points at version {self.alias(name, alias).version}"
            except NotFound:
                where = "it does not exist"
            message = (
                f"version {version} of model {name!r} was stored, but alias {alias!r} was not "
                f"moved to it ({where}): {exc}. The version stays; point the alias at it "
                "again once the cause is fixed"
            )
            raise _alias_not_moved(exc, message) from exc

    async def set_alias(self, name: str, alias: str, version: int) -> AliasInfo:
        """Point ``alias`` at ``version``; for ``production`` the runtime serves it first.

        Raises:
            NotFound: no such model or version; InvalidInput: malformed alias, or a
            number (it would be read as a version); whatever ``runtime.serve`` raises (the
            alias is then unchanged).
        """
        check_alias(alias)
        model = self._model_row(name)
        path = self.artifact(name, version, "onnx")
        async with self._lock(model["id"]):
            # a delete may have run while this waited for the lock: its files are gone
            if self._model_row(name)["id"] != model["id"]:
                raise NotFound(f"model {name!r} was deleted while setting alias {alias!r}")
            if alias == PRODUCTION:
                await self._runtime.serve(name, version, path)
            try:
                with self.db.transaction() as conn:
                    conn.execute(
                        "INSERT INTO aliases (model_id, alias, version, updated_at) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (model_id, alias) DO UPDATE SET "
                        "version = excluded.version, updated_at = excluded.updated_at",
                        (model["id"], alias, version, utcnow()),
                    )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"model {name!r} changed while setting {alias!r}") from exc
        log.info("model %s: alias %s -> version %d", name, alias, version)
        if alias == PRODUCTION and self.publisher is not None:
            await self.publisher.sync(name)
        return self.alias(name, alias)

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove an alias (``production`` cannot be removed: point it elsewhere).

        Raises:
            NotFound: no such model or alias; Conflict: ``production``.
        """
        info = self.alias(name, alias)
        if alias == PRODUCTION:
            raise Conflict(
                f"alias {PRODUCTION!r} cannot be deleted (it is what inference serves); point "
                "it at another version, or delete the model"
            )
        model = self._model_row(name)
        self.db.execute(
            "DELETE FROM aliases WHERE model_id = ? AND alias = ?", (model["id"], info.alias)
        )

    async def delete(self, name: str) -> None:
        """Delete a model, its versions, aliases, jobs and files; unload it.

        Raises:
            NotFound: no such model; Conflict: a job for it is queued or running.
        """
        model = self._model_row(name)
        async with self._lock(model["id"]):
            busy = self.db.query_one(
                "SELECT id FROM jobs WHERE model_id = ? AND state IN ('queued', 'running')",
                (model["id"],),
            )
            if busy is not None:
                raise Conflict(
                    f"model {name!r} has an unfinished job {busy['id']!r}; cancel it first"
                )
            await self._runtime.unload_model(name)
            self._remove_model(model["id"])
        self._locks.pop(model["id"], None)
        log.info("model %s deleted", name)
        if self.publisher is not None:
            await self.publisher.sync(name)  # removes its entry (or what replaced it)
        await self._on_change(name)

    async def serve_all(self) -> None:
        """Have the runtime serve every model's production version (at startup; the app
        then has the store publisher, if any, reconcile the store).

        A model that fails to load is logged and skipped: one bad file must not keep the
        others from serving.
        """
        for model in self.models():
            try:
                version, path = self.resolve(model.name, None)
                await self._runtime.serve(model.name, version, path)
            # Startup must survive any failure of one model (ORT raises its own types).
            except Exception:
                log.exception("model %s: could not load its production version", model.name)

    def sweep(self) -> None:
        """Remove what an interrupted process left (see :meth:`Catalog.sweep`)."""
        self._locks.clear()  # asyncio locks belong to the previous event loop
        super().sweep()
