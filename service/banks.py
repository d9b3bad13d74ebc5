"""Stat banks in the registry: named, immutable sets of BN statistics of one model.

A bank belongs to a model and is *valid for* the versions whose weights it was computed
with: its file (:mod:`recalib.onnx.bank_files`, the StatBank safetensors format) carries
the weights digest it was stamped with, and each version's row holds its own
(:meth:`service.catalog.Catalog.version_weights`). ``valid_versions`` are the versions
with that digest *and* the bank's BN layers (names and channel counts): recalibrated
versions of one model share their weights, so a bank computed on version 1 serves
version 3 recalibrated from it, and not a fine-tuned version 4. The layer names alone are
not enough: BN statistics depend on every weight before the layer.

A bank is refused (nothing is stored) when it is not a bank file (400), carries no weights
digest (400: the file does not say which weights it is for), has non-finite statistics or
negative variances (400), other BN layers than the model's versions (400), or a digest
that matches none of its versions (``Incompatible``, 422). Names follow the alias rule
(:func:`service.names.check_alias`); a bank is never replaced (409): delete it and put it
again. Files are ``home/artifacts/<model id>/banks/<name>.safetensors``, written in a
staging directory and renamed in inside the transaction that inserts the row; deleting
the model removes them with its folder (rows cascade).

Banks come from uploads (:meth:`BankStore.put`) or from recalibration jobs that asked for
``"output": {"bank": name}`` (:meth:`BankStore.add_file`, called by
:mod:`service.jobs`). The words ``auto`` and ``none`` are never bank names: they are what a
request's ``parameters.bank`` (or the model's default) says instead of a name
(:data:`service.runtime.bank_refs.RESERVED_BANK_WORDS`).

A model may have a *default bank* (``models.default_bank``, schema 4): ``auto``, ``none``
or the name of one of its banks, used for requests that name none. The default's bank
cannot be deleted (409: clear or move the default first), so the default always names a
bank that exists.

*Pushes.* The serving runtime holds every model's whole bank set (:class:`BankRuntime`):
after each change (a bank stored or deleted, the default set or cleared, a version added,
a model registered or deleted; :mod:`service.registry` and :mod:`service.jobs` call
:meth:`BankStore.push` after theirs) and once per model at start-up
(:meth:`BankStore.push_all`), the store reads the model's :class:`BankSet` (in a thread:
valid versions may compute old versions' weights digests) and gives it to the runtime with
``set_banks``; with a model store it then has the publisher bring the store's entry up to
date (banks and default beside the versions, :mod:`service.model_store`). Pushes of one
model are serialised, each reading the state when it runs, so the last push a runtime
gets is the latest state. A failed push is logged and never fails the call that committed;
the next change (or restart) pushes again.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from .catalog import BANK_SUFFIX, BANKS_DIR, Catalog
from .db import dumps, loads, utcnow
from .errors import Conflict, Incompatible, InvalidInput, NotFound
from .metrics import BANK_OTHER
from .names import check_name, is_number
from .runtime.bank_refs import RESERVED_BANK_WORDS, BankRef
from .uploads import Upload, copy_upload, staging

__all__ = [
    "BANK_SUFFIXES",
    "BankInfo",
    "BankList",
    "BankPublisher",
    "BankRuntime",
    "BankSet",
    "BankStore",
    "bank_set",
    "check_bank_name",
    "check_bank_ref",
    "check_default_bank",
]

log = logging.getLogger(__name__)

BANK_SUFFIXES = (".safetensors",)
"""What an uploaded bank file's name ends with."""

_STAMP_HINT = (
    "stamp it with the weights of the version it was computed on: "
    "recalib.onnx.bank_files.save_onnx_bank(onnx_model, stats, path), or "
    "save_stat_bank(model, path, metadata={'weights_digest': weights_digest(onnx_model)})"
)


_WORDS = " and ".join(repr(w) for w in sorted(RESERVED_BANK_WORDS))
"""The reserved words, for messages."""


def check_bank_ref(value: str) -> str:
    """Return ``value`` if it has the form of a stat bank name (the alias rule: a name, not
    a number): what a route that reads or deletes a bank accepts, so that a bank stored
    before a word was reserved stays reachable (:func:`check_bank_name` guards creation).

    Raises:
        InvalidInput: malformed, or made of digits only.
    """
    check_name(value, "stat bank name")
    if is_number(value):
        raise InvalidInput(
            f"expected a stat bank name that is not a number (got {value!r}: banks are named "
            "like aliases)"
        )
    return value


def check_bank_name(value: str) -> str:
    """Return ``value`` if it can name a stat bank (the alias rule: a name, not a number,
    and not one of the request words ``auto`` and ``none`` or the metric label ``other``,
    in any case).

    Raises:
        InvalidInput: malformed, made of digits only, or a reserved word.
    """
    check_bank_ref(value)
    if value.lower() in RESERVED_BANK_WORDS:
        raise InvalidInput(
            f"expected a stat bank name other than {_WORDS} (got {value!r}: parameters.bank "
            "uses these words for routing and for the version's own statistics)"
        )
    if value.lower() == BANK_OTHER:
        raise InvalidInput(
            f"expected a stat bank name other than {BANK_OTHER!r} (got {value!r}: metrics "
            "count the banks past RECALIB_BANK_METRIC_LIMIT under that label)"
        )
    return value


def check_default_bank(value: str) -> str:
    """Return ``value`` if it can be a model's default bank: ``auto``, ``none`` or a bank
    name (:func:`check_bank_name`).

    Raises:
        InvalidInput: none of these.
    """
    return value if value in RESERVED_BANK_WORDS else check_bank_name(value)


class BankRuntime(Protocol):
    """What the bank store tells the serving runtime (``ServingRuntime.set_banks``)."""

    async def set_banks(self, name: str, banks: Sequence[BankRef], default: str | None) -> None:
        """Make ``banks`` the whole bank set of model ``name`` and ``default`` its default
        (``None``, ``"auto"``, ``"none"`` or a bank name); ``([], None)`` after a delete."""


class BankPublisher(Protocol):
    """What brings the shared model store to the database's state
    (:class:`service.store_publisher.StorePublisher`)."""

    async def sync(self, name: str) -> bool:
        """Publish (or remove) model ``name``; never raises."""
        ...


@dataclass(frozen=True)
class BankSet:
    """A model's banks and default bank, as the runtime and the model store get them.

    Attributes:
        banks: by name; each with the registry's file and the versions it is valid for.
        default: ``None``, ``"auto"``, ``"none"`` or the name of one of ``banks``.
    """

    banks: tuple[BankRef, ...] = ()
    default: str | None = None


class BankInfo(BaseModel):
    """One stat bank of a model."""

    model: str
    name: str
    layers: int = Field(description="number of BN layers it holds statistics for")
    size_bytes: int
    sha256: str = Field(description="sha256 of the bank file")
    weights_digest: str = Field(description="the weights it was computed with")
    source: dict[str, Any] = Field(
        description="where it came from: kind upload (its metadata) or recalibration "
        "(job, base_version, dataset, recalibration parameters)"
    )
    valid_versions: list[int] = Field(
        description="the versions with these weights and BN layers (it may serve them)"
    )
    created_at: str


class BankList(BaseModel):
    banks: list[BankInfo]
    default: str | None = Field(
        default=None,
        description="the model's default bank (used when a request names none): 'auto', "
        "'none', a bank name, or null for none set (the version's own statistics)",
    )


def _checked_bank(path: Path) -> Any:
    """The bank file at ``path``, values checked (``recalib.onnx.bank_files.BankFile``).

    Raises:
        InvalidInput: not a bank file, no weights digest, non-finite or negative values.
    """
    from recalib.errors import StatBankMismatchError
    from recalib.onnx.bank_files import read_bank_file

    try:
        bank = read_bank_file(path)
        bank.check_values()
    except StatBankMismatchError as exc:
        raise InvalidInput(str(exc)) from exc
    if not bank.stats:
        raise InvalidInput("expected statistics for the model's BN layers (got an empty bank)")
    if bank.digest is None:
        raise InvalidInput(
            "expected a stat bank stamped with metadata 'weights_digest' (got none: the file "
            f"does not say which weights its statistics were computed with); {_STAMP_HINT}"
        )
    return bank


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _valid(row: sqlite3.Row, weights: dict[int, Any]) -> list[int]:
    """The versions a bank's row may serve: same weights digest and BN layers."""
    layers, digest = loads(row["layers"]), row["weights_digest"]
    return [v for v, (d, lay) in weights.items() if d == digest and lay == layers]


def bank_set(catalog: Catalog, name: str) -> BankSet:
    """Model ``name``'s banks (files under ``catalog.root``) and default; empty for a model
    that does not exist (deleted). Synchronous, and it may compute old versions' weights
    digests: call it in a thread."""
    try:
        model = catalog._model_row(name)  # the catalog's look-up
    except NotFound:
        return BankSet()
    rows = catalog.db.query("SELECT * FROM banks WHERE model_id = ? ORDER BY name", (model["id"],))
    weights = catalog.version_weights(model["id"]) if rows else {}
    folder = catalog.root / model["id"] / BANKS_DIR
    refs = tuple(
        BankRef(
            name=r["name"],
            path=folder / f"{r['name']}{BANK_SUFFIX}",
            versions=frozenset(_valid(r, weights)),
            sha256=r["sha256"],
        )
        for r in rows
    )
    return BankSet(refs, model["default_bank"])


class BankStore:
    """The ``banks`` rows and files of the registry's models, their default banks, and
    the pushes of both to the runtime (and the model store).

    Args:
        catalog: the registry's reads (models, versions and their weights).
        runtime: told each model's :class:`BankSet` after every change (:meth:`push`).
        publisher: what brings the model store up to date after a push (``None``: no
            store).
    """

    def __init__(
        self,
        catalog: Catalog,
        runtime: BankRuntime,
        *,
        publisher: BankPublisher | None = None,
    ) -> None:
        self.catalog = catalog
        self.db = catalog.db
        self.home = catalog.home
        self.runtime = runtime
        self.publisher = publisher
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # name -> (lock, users)

    def _model(self, name: str) -> sqlite3.Row:
        return self.catalog._model_row(name)  # the catalog's look-up (NotFound, 400)

    def _path(self, model_id: str, bank: str) -> Path:
        return self.catalog.root / model_id / BANKS_DIR / f"{bank}{BANK_SUFFIX}"

    def _row(self, name: str, bank: str) -> tuple[sqlite3.Row, sqlite3.Row]:
        model = self._model(name)
        check_bank_ref(bank)  # the form only: see check_bank_ref
        row = self.db.query_one(
            "SELECT * FROM banks WHERE model_id = ? AND name = ?", (model["id"], bank)
        )
        if row is None:
            raise NotFound(f"model {name!r} has no stat bank {bank!r}")
        return model, row

    def _info(self, name: str, row: sqlite3.Row, weights: dict[int, Any]) -> BankInfo:
        return BankInfo(
            model=name,
            name=row["name"],
            layers=len(loads(row["layers"])),
            size_bytes=row["bytes"],
            sha256=row["sha256"],
            weights_digest=row["weights_digest"],
            source=loads(row["source"]),
            valid_versions=_valid(row, weights),
            created_at=row["created_at"],
        )

    # -- reads (they may compute old versions' weights digests once: call in a thread) ---

    def banks(self, name: str) -> list[BankInfo]:
        """A model's banks, by name."""
        model = self._model(name)
        rows = self.db.query("SELECT * FROM banks WHERE model_id = ? ORDER BY name", (model["id"],))
        weights = self.catalog.version_weights(model["id"]) if rows else {}
        return [self._info(name, r, weights) for r in rows]

    def listing(self, name: str) -> BankList:
        """A model's banks, by name, and its default bank."""
        banks = self.banks(name)
        return BankList(banks=banks, default=self._model(name)["default_bank"])

    def bank(self, name: str, bank: str) -> BankInfo:
        """Raises: NotFound (InvalidInput for a malformed name)."""
        model, row = self._row(name, bank)
        return self._info(name, row, self.catalog.version_weights(model["id"]))

    def file(self, name: str, bank: str) -> Path:
        """The bank's safetensors file."""
        model, row = self._row(name, bank)
        return self._path(model["id"], row["name"])

    def exists(self, name: str, bank: str) -> bool:
        model = self._model(name)
        check_bank_ref(bank)
        return (
            self.db.query_one(
                "SELECT 1 FROM banks WHERE model_id = ? AND name = ?", (model["id"], bank)
            )
            is not None
        )

    def check_free(self, name: str, bank: str) -> None:
        """Raises: Conflict: ``name`` has a bank ``bank`` already (banks are immutable)."""
        if self.exists(name, bank):
            raise Conflict(
                f"model {name!r} has a stat bank {bank!r} already (banks are immutable: delete "
                "it first, or choose another name)"
            )

    # -- writes --------------------------------------------------------------------------

    def _check_fits(self, name: str, model_id: str, bank: Any) -> None:
        """Refuse a bank that fits no version of the model (layers: 400, weights: 422)."""
        from recalib.onnx.bank_files import layer_difference

        weights = self.catalog.version_weights(model_id)
        if not weights:
            raise Incompatible(f"model {name!r} has no version whose weights could be read")
        same = [v for v, (d, _) in weights.items() if d == bank.digest]
        version = same[-1] if same else max(weights)
        difference = layer_difference(weights[version][1], bank.layers)
        if difference is not None:
            raise InvalidInput(
                f"expected statistics for the {len(weights[version][1])} BN layers of version "
                f"{version} of model {name!r} (got {difference}): a bank of another network?"
            )
        if not same:
            known = ", ".join(f"v{v} {d[:12]}" for v, (d, _) in weights.items())
            raise Incompatible(
                f"expected a bank computed with the weights of a version of model {name!r} "
                f"({known}) (got weights digest {bank.digest[:12]}: statistics of other "
                "weights, e.g. another model's or a fine-tuned version's); compute it on the "
                "version it is for"
            )

    def add_file(self, name: str, bank: str, file: Path, source: dict[str, Any]) -> BankInfo:
        """Check the bank file ``file`` and move it in as bank ``bank`` of model ``name``
        (``file`` is renamed: put it under ``home``). Synchronous: call it in a thread.

        Raises:
            NotFound: no such model; InvalidInput: a malformed name, not a bank file, no
            digest, bad values, other BN layers; Incompatible: other weights;
            Conflict: the name is taken.
        """
        check_bank_name(bank)
        model = self._model(name)
        self.check_free(name, bank)  # again below, in the transaction
        checked = _checked_bank(file)
        self._check_fits(name, model["id"], checked)
        meta = {k: v for k, v in checked.metadata.items() if k != "weights_digest"}
        final = self._path(model["id"], bank)
        final.parent.mkdir(parents=True, exist_ok=True)
        size, sha = file.stat().st_size, _sha256(file)
        try:
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO banks (model_id, name, created_at, bytes, sha256, layers, "
                    "weights_digest, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        model["id"],
                        bank,
                        utcnow(),
                        size,
                        sha,
                        dumps(checked.layers),
                        checked.digest,
                        dumps(source | ({"metadata": meta} if source["kind"] == "upload" else {})),
                    ),
                )
                file.rename(final)  # in the transaction: a failed rename rolls the row back
        except sqlite3.IntegrityError as exc:  # a concurrent put, or the model was deleted
            self.check_free(name, bank)
            raise NotFound(f"model {name!r} was deleted while its bank was stored") from exc
        log.info("model %s: stat bank %s stored (%s)", name, bank, source["kind"])
        return self.bank(name, bank)

    async def put(self, name: str, bank: str, upload: Upload, *, max_bytes: int) -> BankInfo:
        """Store an uploaded bank file (see :meth:`add_file`).

        Raises:
            as :meth:`add_file`; InvalidInput: not a ``.safetensors`` file name;
            PayloadTooLarge: above ``max_bytes``.
        """
        from .uploads import upload_suffix

        check_bank_name(bank)
        self.check_free(name, bank)  # before reading the body
        upload_suffix(upload.filename, BANK_SUFFIXES, "stat bank")
        with staging(self.home, "bank") as folder:
            path = folder / f"bank{BANK_SUFFIX}"
            await asyncio.to_thread(copy_upload, upload.file, path, max_bytes=max_bytes)
            info = await asyncio.to_thread(self.add_file, name, bank, path, {"kind": "upload"})
        await self.push(name)
        return info

    def _delete(self, name: str, bank: str) -> None:
        model, row = self._row(name, bank)
        with self.db.transaction() as conn:
            default = conn.execute(
                "SELECT default_bank FROM models WHERE id = ?", (model["id"],)
            ).fetchone()
            if default is not None and default[0] == row["name"]:
                raise Conflict(
                    f"stat bank {bank!r} is the default bank of model {name!r}; point the "
                    f"default elsewhere (PUT /v1/models/{name}/default-bank) or clear it "
                    "(DELETE) first"
                )
            conn.execute(
                "DELETE FROM banks WHERE model_id = ? AND name = ?", (model["id"], row["name"])
            )
        self._path(model["id"], row["name"]).unlink(missing_ok=True)
        log.info("model %s: stat bank %s deleted", name, bank)

    async def delete(self, name: str, bank: str) -> None:
        """Remove a bank (its row, then its file), then :meth:`push`.

        Raises:
            NotFound: no such model or bank; Conflict: it is the model's default bank.
        """
        await asyncio.to_thread(self._delete, name, bank)
        await self.push(name)

    # -- the default bank ----------------------------------------------------------------

    def _set_default(self, name: str, bank: str | None) -> None:
        model = self._model(name)
        with self.db.transaction() as conn:
            if bank is not None and bank not in RESERVED_BANK_WORDS:
                found = conn.execute(
                    "SELECT 1 FROM banks WHERE model_id = ? AND name = ?", (model["id"], bank)
                ).fetchone()
                if found is None:
                    raise NotFound(
                        f"model {name!r} has no stat bank {bank!r} (a default bank is "
                        f"{_WORDS} or one of the model's banks)"
                    )
            changed = conn.execute(
                "UPDATE models SET default_bank = ? WHERE id = ?", (bank, model["id"])
            ).rowcount
        if not changed:
            raise NotFound(f"model {name!r} was deleted while its default bank was set")
        log.info("model %s: default bank %s", name, bank)

    async def set_default(self, name: str, bank: str) -> None:
        """Make ``bank`` model ``name``'s default bank, then :meth:`push`.

        Args:
            name: the model.
            bank: ``"auto"``, ``"none"`` or the name of one of its banks.

        Raises:
            InvalidInput: a malformed model or bank name; NotFound: no such model or bank.
        """
        check_default_bank(bank)
        await asyncio.to_thread(self._set_default, name, bank)
        await self.push(name)

    async def clear_default(self, name: str) -> None:
        """Remove model ``name``'s default bank (none set: the version's own statistics,
        unless a request names a bank), then :meth:`push`. Clearing none is no error.

        Raises:
            NotFound: no such model; InvalidInput: a malformed name.
        """
        await asyncio.to_thread(self._set_default, name, None)
        await self.push(name)

    # -- pushes to the runtime (and the store) -------------------------------------------

    def bank_set(self, name: str) -> BankSet:
        """Model ``name``'s :class:`BankSet` (empty when it does not exist); in a thread."""
        return bank_set(self.catalog, name)

    async def push(self, name: str, *, store: bool = True) -> None:
        """Give the runtime model ``name``'s whole bank set (``set_banks``), then have the
        publisher (if any, and ``store``) bring its store entry up to date. Never raises:
        the change it follows has committed; a failure is logged.

        Args:
            name: the model (one that was deleted gets ``([], None)``).
            store: also publish (``False`` at start-up: the publisher reconciles then).
        """
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:  # one push of a model at a time, each reading the latest state
                try:
                    state = await asyncio.to_thread(self.bank_set, name)
                    await self.runtime.set_banks(name, state.banks, state.default)
                # Whatever the runtime raised (it reads the files): the change stays
                # committed.
                except Exception:
                    log.exception("model %s: could not push its stat banks to the runtime", name)
        finally:  # the last user removes the lock: one entry per model being pushed, not ever
            held, users = self._locks.get(name, (None, 0))
            if held is lock:
                if users <= 1:
                    del self._locks[name]
                else:
                    self._locks[name] = (lock, users - 1)
        if store and self.publisher is not None:
            await self.publisher.sync(name)  # never raises (logged and counted)

    async def push_all(self) -> None:
        """At start-up, before the app reports ready: :meth:`push` every model's banks to
        the runtime (the store is the publisher's start-up reconciliation's)."""
        for name in await asyncio.to_thread(self.catalog.model_names):
            await self.push(name, store=False)
