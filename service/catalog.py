"""What the registry holds, as rows and files: models, immutable versions, aliases.

:class:`Catalog` answers every question about them (which models, which versions and
their lineage, what a version reference names, where an artifact's file is) and does the
writes that keep rows and files in step: a model row, a staged version moved in and
committed (:meth:`Catalog._commit_version`), a model removed, leftovers swept. It makes no
decisions: which version serves, and when, is :class:`service.registry.Registry`'s job.

Files live in ``home/artifacts/<model id>/<version>/`` (a server-generated id: client
names never become paths) with their sha256 recorded in the version's row; a model's stat
banks (:mod:`service.banks`) in ``home/artifacts/<model id>/banks/``. Each version's row
also holds its weights digest and BN layers (:func:`service.artifacts.weights_identity`),
computed when it is committed, or on first use (:meth:`Catalog.version_weights`) for
versions written before schema 3. A version's
files are written in a staging directory and moved in with one ``rename`` before its row
is committed, so a half-written version is never visible; :meth:`Catalog.sweep` removes
what a crash left.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from .artifacts import ARTIFACT_FILES, hash_artifacts, weights_identity
from .db import Database, dumps, loads, utcnow
from .errors import Conflict, InvalidInput, NotFound, StorageError
from .names import check_name, is_number
from .registry_models import (
    MAX_VERSION,
    PRODUCTION,
    AliasInfo,
    ArtifactInfo,
    ModelInfo,
    Signature,
    VersionInfo,
)

__all__ = ["BANKS_DIR", "BANK_SUFFIX", "Catalog", "new_version_number"]

BANKS_DIR = "banks"
"""The folder of a model's stat banks, ``home/artifacts/<model id>/banks/``."""
BANK_SUFFIX = ".safetensors"

log = logging.getLogger(__name__)


def _version_number(ref: int | str) -> int:
    """``ref`` as an int; a digit string too long for any version gives ``MAX_VERSION + 1``.

    (``int()`` refuses strings of more than 4300 digits, and any number of more than 19
    digits is above :data:`MAX_VERSION` anyway.)
    """
    if isinstance(ref, int):
        return ref
    digits = ref.lstrip("0") or "0"
    return int(digits) if len(digits) <= len(str(MAX_VERSION)) else MAX_VERSION + 1


def new_version_number(latest: int, version: int | None) -> int:
    """The number a new version gets: ``version``, else ``latest + 1``.

    Raises:
        Conflict: ``version`` is not above ``latest`` (numbers only increase).
    """
    if version is None:
        return latest + 1
    if version <= latest:
        raise Conflict(
            f"expected a version number above {latest}, the model's highest (got {version}): "
            "versions are immutable and their numbers only increase"
        )
    return version


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The part of a version's report kept in its row (the whole is ``report.json``)."""
    kind = report.get("kind")
    if kind in ("registration", "upload"):
        out = {
            "kind": kind,
            "source_format": report["source_format"],
            "bn_layers": len(report["bn_layers"]),
        }
        if kind == "upload":
            out["metadata"] = report.get("metadata", {})
        return out
    keep = ("method", "mode", "passes", "converged", "residual", "samples", "batches", "seconds")
    out = {k: report[k] for k in keep if k in report}
    out["kind"] = "recalibration"
    out.update(report.get("totals", {}))
    return out


def _alias_info(name: str, row: sqlite3.Row) -> AliasInfo:
    return AliasInfo(
        model=name, alias=row["alias"], version=row["version"], updated_at=row["updated_at"]
    )


def _version_info(name: str, row: sqlite3.Row, aliases: list[str]) -> VersionInfo:
    """A version's row (and the aliases pointing at it) as its response model."""
    return VersionInfo(
        model=name,
        version=row["version"],
        created_at=row["created_at"],
        parent_version=row["parent_version"],
        dataset=row["dataset_id"],
        job=row["job_id"],
        recalibration=loads(row["recalibration"]),
        report=loads(row["report"]),
        validation=loads(row["validation"]),
        signature=Signature.model_validate(loads(row["signature"])),
        artifacts={k: ArtifactInfo.model_validate(v) for k, v in loads(row["artifacts"]).items()},
        aliases=aliases,
        weights_digest=row["weights_digest"],
    )


class Catalog:
    """Models, versions and aliases: rows in ``db``, files under ``home/artifacts``.

    Args:
        db: the metadata store.
        home: the service's state directory.
    """

    def __init__(self, db: Database, home: Path) -> None:
        self.db = db
        self.home = home

    @property
    def root(self) -> Path:
        return self.home / "artifacts"

    # -- models --------------------------------------------------------------------------

    def _model_row(self, name: str) -> sqlite3.Row:
        check_name(name, "model name")
        row = self.db.query_one("SELECT * FROM models WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"model {name!r} not found")
        return row

    def _model_info(self, row: sqlite3.Row) -> ModelInfo:
        aliases = self.db.query(
            "SELECT alias, version FROM aliases WHERE model_id = ? ORDER BY alias", (row["id"],)
        )
        count, latest = self.db.query(
            "SELECT COUNT(*), COALESCE(MAX(version), 0) FROM versions WHERE model_id = ?",
            (row["id"],),
        )[0]
        return ModelInfo(
            name=row["name"],
            id=row["id"],
            created_at=row["created_at"],
            source_format=row["source_format"],
            metadata=loads(row["metadata"]),
            aliases={a["alias"]: a["version"] for a in aliases},
            versions=count,
            latest_version=latest,
        )

    def model(self, name: str) -> ModelInfo:
        """Raises: NotFound (InvalidInput for a malformed name)."""
        return self._model_info(self._model_row(name))

    def model_names(self) -> list[str]:
        """Every model's name, sorted (one query: the readiness probe asks often)."""
        return [r["name"] for r in self.db.query("SELECT name FROM models ORDER BY name")]

    def models(self) -> list[ModelInfo]:
        """Every model, by name."""
        return [self._model_info(r) for r in self.db.query("SELECT * FROM models ORDER BY name")]

    # -- versions ------------------------------------------------------------------------

    def _version_info(self, name: str, row: sqlite3.Row) -> VersionInfo:
        aliases = self.db.query(
            "SELECT alias FROM aliases WHERE model_id = ? AND version = ? ORDER BY alias",
            (row["model_id"], row["version"]),
        )
        return _version_info(name, row, [a["alias"] for a in aliases])

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of a model, oldest first."""
        model = self._model_row(name)
        rows = self.db.query(
            "SELECT * FROM versions WHERE model_id = ? ORDER BY version", (model["id"],)
        )
        return [self._version_info(name, r) for r in rows]

    def _latest(self, model_id: str) -> sqlite3.Row | None:
        """The row of a model's highest version (``None`` if it has none)."""
        return self.db.query_one(
            "SELECT * FROM versions WHERE model_id = ? ORDER BY version DESC LIMIT 1", (model_id,)
        )

    def resolve_version(self, name: str, ref: str | int | None) -> int:
        """The version number ``ref`` names: a number, an alias, or ``None``.

        ``None`` means the ``production`` alias, else the latest version. A number is ASCII
        digits (or an int); one outside ``1..MAX_VERSION`` names no version.

        Raises:
            NotFound: no such model, version or alias; InvalidInput: a malformed name.
        """
        model = self._model_row(name)
        if ref is None:
            row = self.db.query_one(
                "SELECT version FROM aliases WHERE model_id = ? AND alias = ?",
                (model["id"], PRODUCTION),
            ) or self.db.query_one(
                "SELECT MAX(version) AS version FROM versions WHERE model_id = ?", (model["id"],)
            )
            if row is None or row["version"] is None:
                raise NotFound(f"model {name!r} has no version")
            return int(row["version"])
        if isinstance(ref, int) or is_number(ref):
            version = _version_number(ref)
            # Range first: SQLite cannot bind an integer above 2**63 - 1 (OverflowError).
            if not 1 <= version <= MAX_VERSION or (
                self.db.query_one(
                    "SELECT 1 FROM versions WHERE model_id = ? AND version = ?",
                    (model["id"], version),
                )
                is None
            ):
                raise NotFound(f"model {name!r} has no version {str(ref)[:40]}")
            return version
        check_name(ref, "version number or alias")
        row = self.db.query_one(
            "SELECT version FROM aliases WHERE model_id = ? AND alias = ?", (model["id"], ref)
        )
        if row is None:
            raise NotFound(f"model {name!r} has no alias {ref!r}")
        return int(row["version"])

    def version(self, name: str, ref: str | int | None) -> VersionInfo:
        """One version (``ref`` as in :meth:`resolve_version`)."""
        number = self.resolve_version(name, ref)
        model = self._model_row(name)
        row = self.db.query_one(
            "SELECT * FROM versions WHERE model_id = ? AND version = ?", (model["id"], number)
        )
        if row is None:  # deleted in between
            raise NotFound(f"model {name!r} has no version {number}")
        return self._version_info(name, row)

    def artifact(self, name: str, ref: str | int | None, fmt: str) -> Path:
        """The file of one artifact of a version.

        Raises:
            NotFound: no such model or version, or the version has no such artifact.
            StorageError: the artifact's file is missing on disk.
        """
        if fmt not in ARTIFACT_FILES:
            raise InvalidInput(
                f"expected an artifact format in {sorted(ARTIFACT_FILES)} (got {fmt!r})"
            )
        info = self.version(name, ref)
        if fmt not in info.artifacts:
            raise NotFound(
                f"version {info.version} of model {name!r} has no {fmt} artifact (it has "
                f"{', '.join(sorted(info.artifacts))})"
            )
        model = self._model_row(name)
        path = self.root / str(model["id"]) / str(info.version) / ARTIFACT_FILES[fmt]
        if not path.is_file():
            raise StorageError(
                f"version {info.version} of model {name!r}: its {ARTIFACT_FILES[fmt]} is "
                "missing from the server's artifact store (restore it from a backup, or "
                "delete the version)"
            )
        return path

    def resolve(self, name: str, ref: str | None) -> tuple[int, Path]:
        """``(version, ONNX path)`` for ``ref`` (a number, an alias, or ``None``).

        Raises:
            NotFound: unknown model, version or alias.
        """
        version = self.resolve_version(name, ref)
        return version, self.artifact(name, version, "onnx")

    # -- aliases -------------------------------------------------------------------------

    def alias(self, name: str, alias: str) -> AliasInfo:
        """Raises: NotFound."""
        model = self._model_row(name)
        check_name(alias, "alias")
        row = self.db.query_one(
            "SELECT * FROM aliases WHERE model_id = ? AND alias = ?", (model["id"], alias)
        )
        if row is None:
            raise NotFound(f"model {name!r} has no alias {alias!r}")
        return _alias_info(name, row)

    def aliases(self, name: str) -> list[AliasInfo]:
        """A model's aliases, by name."""
        model = self._model_row(name)
        rows = self.db.query(
            "SELECT * FROM aliases WHERE model_id = ? ORDER BY alias", (model["id"],)
        )
        return [_alias_info(name, r) for r in rows]

    # -- rows and files (the writes Registry, the subclass, builds its transitions on) ---

    def _insert_model(self, model_id: str, name: str, fmt: str, metadata: dict[str, Any]) -> None:
        """Add a model's row (no versions yet).

        Raises:
            Conflict: the name is taken.
        """
        try:
            self.db.execute(
                "INSERT INTO models (id, name, created_at, source_format, metadata) "
                "VALUES (?, ?, ?, ?, ?)",
                (model_id, name, utcnow(), fmt, dumps(metadata)),
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"model {name!r} exists already (register under a new name)") from exc

    def _commit_version(
        self,
        model_id: str,
        staging: Path,
        *,
        version: int | None,
        report: dict[str, Any],
        signature: dict[str, Any],
        parent_version: int | None = None,
        dataset: str | None = None,
        job: str | None = None,
        recalibration: dict[str, Any] | None = None,
        validation: dict[str, Any] | None = None,
    ) -> int:
        """Move ``staging`` in as a version of ``model_id`` and commit its row.

        ``version``: the number to give it (above every existing one), ``None`` for the
        next. The number is chosen and checked in the same transaction as the insert.

        Returns:
            The new version's number.

        Raises:
            Conflict: ``version`` is not above the model's highest version.
        """
        artifacts = {k: v.model_dump() for k, v in hash_artifacts(staging).items()}
        if "onnx" not in artifacts:
            raise InvalidInput("expected a model.onnx in the new version (got none)")
        # uploads computed it while checking the file; a job's version is committed in a thread
        weights = report.get("weights") or weights_identity(staging / ARTIFACT_FILES["onnx"])
        (self.root / model_id).mkdir(parents=True, exist_ok=True)
        with self.db.transaction() as conn:
            latest = conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM versions WHERE model_id = ?", (model_id,)
            ).fetchone()[0]
            version = new_version_number(int(latest), version)
            final = self.root / model_id / str(version)
            staging.rename(final)
            try:
                conn.execute(
                    "INSERT INTO versions (model_id, version, created_at, parent_version, "
                    "dataset_id, job_id, recalibration, report, validation, signature, "
                    "artifacts, weights_digest, bn_layers) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        model_id,
                        version,
                        utcnow(),
                        parent_version,
                        dataset,
                        job,
                        None if recalibration is None else dumps(recalibration),
                        dumps(_summary(report)),
                        None if validation is None else dumps(validation),
                        dumps(signature),
                        dumps(artifacts),
                        weights["digest"],
                        dumps(weights["bn_layers"]),
                    ),
                )
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
        return version

    def _remove_model(self, model_id: str) -> None:
        """Delete a model's rows (versions and aliases cascade) and its files."""
        self.db.execute("DELETE FROM models WHERE id = ?", (model_id,))
        folder = self.root / model_id
        if folder.exists():
            trash = self.home / "tmp" / f"trash-{uuid.uuid4().hex}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def sweep(self) -> None:
        """Remove what an interrupted process left: staging dirs and uncommitted versions."""
        shutil.rmtree(self.home / "tmp", ignore_errors=True)
        if not self.root.is_dir():
            return
        known = {
            (r["model_id"], str(r["version"])) for r in self.db.query("SELECT * FROM versions")
        }
        banks = {(r["model_id"], r["name"]) for r in self.db.query("SELECT * FROM banks")}
        for model_dir in self.root.iterdir():
            for version_dir in model_dir.iterdir():
                if version_dir.name == BANKS_DIR:
                    for file in version_dir.iterdir():  # renamed in, its row never committed
                        if (model_dir.name, file.name.removesuffix(BANK_SUFFIX)) not in banks:
                            log.warning("removing uncommitted bank file %s", file)
                            file.unlink(missing_ok=True)
                    if not any(version_dir.iterdir()):
                        version_dir.rmdir()
                elif (model_dir.name, version_dir.name) not in known:
                    log.warning("removing uncommitted version directory %s", version_dir)
                    shutil.rmtree(version_dir, ignore_errors=True)
            if not any(model_dir.iterdir()):
                model_dir.rmdir()

    def version_weights(self, model_id: str) -> dict[int, tuple[str, dict[str, int]]]:
        """``{version: (weights digest, {BN layer: channels})}`` of a model's versions.

        A version committed before schema 3 has neither: they are computed from its ONNX
        file now and stored (once; it may load the file, so call it in a thread). A version
        whose file cannot be read is logged and left out.
        """
        rows = self.db.query(
            "SELECT version, weights_digest, bn_layers FROM versions WHERE model_id = ? "
            "ORDER BY version",
            (model_id,),
        )
        out: dict[int, tuple[str, dict[str, int]]] = {}
        for row in rows:
            digest, layers = row["weights_digest"], loads(row["bn_layers"])
            if digest is None or layers is None:
                path = self.root / model_id / str(row["version"]) / ARTIFACT_FILES["onnx"]
                try:
                    weights = weights_identity(path)
                # Whatever reading an old file raises (onnx has its own errors), that version
                # takes no bank; the others are still answered.
                except Exception:
                    log.exception("could not compute the weights digest of %s", path)
                    continue
                digest, layers = weights["digest"], weights["bn_layers"]
                self.db.execute(
                    "UPDATE versions SET weights_digest = ?, bn_layers = ? "
                    "WHERE model_id = ? AND version = ?",
                    (digest, dumps(layers), model_id, row["version"]),
                )
            out[int(row["version"])] = (str(digest), dict(layers))
        return out

    def version_numbers(self, name: str) -> list[int]:
        """A model's version numbers, ascending (the v2 model metadata and repository index
        list them; cheaper than :meth:`versions`).

        Raises:
            NotFound: no such model; InvalidInput: a malformed name.
        """
        model = self._model_row(name)
        rows = self.db.query(
            "SELECT version FROM versions WHERE model_id = ? ORDER BY version", (model["id"],)
        )
        return [int(r["version"]) for r in rows]
