"""The model registry: models, immutable versions with lineage, aliases and artifacts.

A *model* is a name (see :mod:`service.names`) with numbered *versions*. A version never
changes once written: its artifacts (``model.onnx`` always; ``model.pt2`` and
``stats.safetensors`` when it came from an ExportedProgram; ``report.json``) sit in
``home/artifacts/<model id>/<version>/`` (a server-generated id: client names never
become paths) with their sha256 recorded, next to its lineage (parent version, data set,
job, recalibration parameters, report summary, validation). A version's files are written
in a staging directory and moved in with one ``rename`` before its row is committed, so a
half-written version is never visible; :meth:`Registry.sweep` removes what a crash left.

*Aliases* name versions. ``production`` is the version ``/v2/models/{name}/infer``
serves: pointing it elsewhere first has the runtime load and warm the version
(``runtime.serve``) and only then commits the alias, so a version that fails to load
leaves the alias and the traffic where they were. Registering a model creates version 1
and points ``production`` at it, so it serves right away.

Versions come from recalibration jobs (:meth:`Registry.add_version`) or are *pushed*: an
uploaded artifact added to an existing model (:meth:`Registry.push_version`), checked like
a registration, with the signature of the model's versions, optionally under a given
number (so inference replicas can mirror the control replica's numbering). Version
numbers of a model only increase and are never reused.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from .datasets import Upload, copy_upload, upload_suffix
from .db import Database, dumps, loads, utcnow
from .errors import Conflict, Incompatible, InvalidInput, NotFound, ServiceError
from .names import check_alias, check_name, is_number

__all__ = [
    "ARTIFACT_FILES",
    "PRODUCTION",
    "AliasInfo",
    "AliasList",
    "AliasUpdate",
    "ArtifactInfo",
    "ArtifactFormat",
    "MAX_VERSION",
    "ModelInfo",
    "ModelList",
    "Registry",
    "Runtime",
    "Signature",
    "TensorSpec",
    "VersionInfo",
    "VersionList",
    "onnx_signature",
]

log = logging.getLogger(__name__)

PRODUCTION = "production"
"""The alias ``/v2/models/{name}/infer`` serves."""

ArtifactFormat = Literal["onnx", "pt2", "stats", "report"]

ARTIFACT_FILES: dict[str, str] = {
    "onnx": "model.onnx",
    "pt2": "model.pt2",
    "stats": "stats.safetensors",
    "report": "report.json",
}
"""Artifact format -> file name inside a version directory."""

MAX_VERSION = 2**63 - 1
"""The largest version number (SQLite's INTEGER); larger ones name no version."""

_MODEL_SUFFIXES = (".onnx", ".pt2")
_convert_lock = threading.Lock()  # one torch export at a time (global exporter state)


class Runtime(Protocol):
    """The serving runtime as the control plane uses it (``service.runtime.ServingRuntime``)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def serve(self, name: str, version: int, onnx_path: Path) -> None: ...

    async def unload_model(self, name: str) -> None: ...

    def drift(self, name: str) -> dict[str, Any]: ...

    def reset_drift(self, name: str) -> None: ...


class TensorSpec(BaseModel):
    """A graph input or output: name, NumPy dtype name, shape (``null``/a name if dynamic)."""

    name: str
    dtype: str
    shape: list[int | str | None]


class Signature(BaseModel):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class ArtifactInfo(BaseModel):
    file: str
    bytes: int
    sha256: str


class VersionInfo(BaseModel):
    """One immutable version and its lineage."""

    model: str
    version: int
    created_at: str
    parent_version: int | None = Field(description="version this one was recalibrated from")
    dataset: str | None = Field(description="id of the calibration data set")
    job: str | None = Field(description="id of the recalibration job that made it")
    recalibration: dict[str, Any] | None = Field(description="recalibration parameters")
    report: dict[str, Any] = Field(description="report summary (full report: format=report)")
    validation: dict[str, Any] | None = Field(description="accuracy check, when one was asked")
    signature: Signature
    artifacts: dict[str, ArtifactInfo]
    aliases: list[str]


class VersionList(BaseModel):
    versions: list[VersionInfo]


class ModelInfo(BaseModel):
    name: str
    id: str
    created_at: str
    source_format: str = Field(description="format of the registered file: onnx or pt2")
    metadata: dict[str, Any]
    aliases: dict[str, int]
    versions: int
    latest_version: int


class ModelList(BaseModel):
    models: list[ModelInfo]


class AliasUpdate(BaseModel):
    # lt, not le=MAX_VERSION: OpenAPI carries bounds as floats, and 2**63 is exact as one.
    version: int = Field(ge=1, lt=MAX_VERSION + 1)


class AliasInfo(BaseModel):
    model: str
    alias: str
    version: int
    updated_at: str


class AliasList(BaseModel):
    aliases: list[AliasInfo]


def _dtype_name(elem_type: int) -> str:
    import numpy as np
    import onnx

    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return str(onnx.TensorProto.DataType.Name(elem_type)).lower()


def _spec(value: Any) -> TensorSpec:
    tensor = value.type.tensor_type
    dims: list[int | str | None] = []
    for d in tensor.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return TensorSpec(name=value.name, dtype=_dtype_name(tensor.elem_type), shape=dims)


def onnx_signature(model: Any) -> Signature:
    """The inputs (initializers excluded) and outputs of an ``onnx.ModelProto``."""
    inits = {i.name for i in model.graph.initializer}
    return Signature(
        inputs=[_spec(v) for v in model.graph.input if v.name not in inits],
        outputs=[_spec(v) for v in model.graph.output],
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_artifacts(directory: Path) -> dict[str, ArtifactInfo]:
    return {
        fmt: ArtifactInfo(file=file, bytes=p.stat().st_size, sha256=_sha256(p))
        for fmt, file in ARTIFACT_FILES.items()
        if (p := directory / file).is_file()
    }


def _check_onnx(path: Path) -> tuple[Signature, list[str]]:
    """Load an uploaded ONNX file, check it, find its BN nodes: (signature, BN layers)."""
    import onnx
    from google.protobuf.message import DecodeError

    from recalib.onnx.names import read_bn_map

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, ValueError, OSError) as exc:
        raise InvalidInput(
            f"expected a valid ONNX model (got one that fails to load: {exc})"
        ) from exc
    bn = read_bn_map(model)
    if not bn:
        raise InvalidInput(
            "expected an ONNX model with inference BatchNormalization nodes reading stored "
            "statistics (got none: was BN fused into Conv at export? export with "
            "`recalib export` or torch.onnx.export(..., do_constant_folding=False))"
        )
    return onnx_signature(model), [info.layer for info in bn.values()]


def _example_inputs(program: Any) -> tuple[Any, ...]:
    """A batch of 2 per user input, shaped and typed from the program's placeholders."""
    import torch

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    gen = torch.Generator().manual_seed(0)
    out = []
    for name in program.graph_signature.user_inputs:
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(val, torch.Tensor):
            raise InvalidInput(
                f"expected an ExportedProgram whose inputs are tensors (got input {name!r} "
                f"of type {type(val).__name__})"
            )
        shape = []
        for axis, d in enumerate(val.shape):
            if isinstance(d, int):
                shape.append(d)
            elif axis == 0:
                shape.append(2)
            else:
                raise InvalidInput(
                    f"expected only the batch axis of input {name!r} to be dynamic (got a "
                    f"dynamic axis {axis}: {d})"
                )
        if val.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(val.dtype))
        else:
            out.append(torch.zeros(shape, dtype=val.dtype))
    return tuple(out)


def _convert_pt2(staging: Path) -> tuple[Signature, list[str], dict[str, Any]]:
    """Load ``model.pt2``, export it to ``model.onnx`` (parity-checked), save its stat bank."""
    import onnx
    import torch

    from recalib.onnx.export import export_onnx
    from recalib.statbank import save_stat_bank

    try:
        program = torch.export.load(str(staging / ARTIFACT_FILES["pt2"]))
    # torch.export.load reports a bad archive with many exception types (zip, json,
    # RuntimeError from the C++ reader ...): all mean "not a loadable ExportedProgram".
    except Exception as exc:
        raise InvalidInput(
            f"expected a .pt2 ExportedProgram (torch.export.save) (got one that "
            f"torch.export.load refuses: {exc})"
        ) from exc
    with _convert_lock, torch.no_grad():
        report = export_onnx(program, _example_inputs(program), staging / ARTIFACT_FILES["onnx"])
        save_stat_bank(program, staging / ARTIFACT_FILES["stats"], metadata={"source": "upload"})
    model = onnx.load(str(staging / ARTIFACT_FILES["onnx"]), load_external_data=False)
    layers = [str(entry["layer"]) for entry in report.bn_map.values()]
    return onnx_signature(model), layers, report.to_dict() | {"path": ARTIFACT_FILES["onnx"]}


def _prepare_upload(
    upload: Upload,
    staging: Path,
    suffix: str,
    max_bytes: int,
    *,
    kind: Literal["registration", "upload"] = "registration",
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write and validate the files of an uploaded version in ``staging``; returns the
    report (``kind``: version 1 of a registration, or a pushed version with its
    ``metadata``)."""
    fmt = suffix[1:]
    copy_upload(upload.file, staging / ARTIFACT_FILES[fmt], max_bytes=max_bytes)
    export: dict[str, Any] | None = None
    if fmt == "onnx":
        signature, layers = _check_onnx(staging / ARTIFACT_FILES["onnx"])
    else:
        signature, layers, export = _convert_pt2(staging)
    report: dict[str, Any] = {
        "kind": kind,
        "source_format": fmt,
        "bn_layers": layers,
        "export": export,
        "signature": signature.model_dump(),
    }
    if kind == "upload":
        report["metadata"] = metadata or {}
    (staging / ARTIFACT_FILES["report"]).write_text(json.dumps(report, indent=2))
    return report


def _version_number(ref: int | str) -> int:
    """``ref`` as an int; a digit string too long for any version gives ``MAX_VERSION + 1``.

    (``int()`` refuses strings of more than 4300 digits, and any number of more than 19
    digits is above :data:`MAX_VERSION` anyway.)
    """
    if isinstance(ref, int):
        return ref
    digits = ref.lstrip("0") or "0"
    return int(digits) if len(digits) <= len(str(MAX_VERSION)) else MAX_VERSION + 1


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The part of a version's report kept in its row (the whole is ``report.json``)."""
    if report.get("kind") == "registration":
        return {
            "kind": "registration",
            "source_format": report["source_format"],
            "bn_layers": len(report["bn_layers"]),
        }
    if report.get("kind") == "upload":
        return {
            "kind": "upload",
            "source_format": report["source_format"],
            "bn_layers": len(report["bn_layers"]),
            "metadata": report.get("metadata", {}),
        }
    keep = ("method", "mode", "passes", "converged", "residual", "samples", "batches", "seconds")
    out = {k: report[k] for k in keep if k in report}
    out["kind"] = "recalibration"
    out.update(report.get("totals", {}))
    return out


def _new_version_number(latest: int, version: int | None) -> int:
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


def _shape_text(shape: list[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _same_shape(a: list[int | str | None], b: list[int | str | None]) -> bool:
    """Same rank; each axis the same size, or dynamic in both (dimension names may differ)."""
    return len(a) == len(b) and all(
        x == y if isinstance(x, int) or isinstance(y, int) else True
        for x, y in zip(a, b, strict=True)
    )


def _signature_difference(expected: Signature, got: Signature) -> str | None:
    """How ``got`` differs from ``expected`` (first difference only), or ``None``.

    Inputs and outputs must have the same names (in any order), dtypes and shapes.
    """
    for what, want, have in (
        ("input", expected.inputs, got.inputs),
        ("output", expected.outputs, got.outputs),
    ):
        new = {spec.name: spec for spec in have}
        for spec in want:
            other = new.pop(spec.name, None)
            if other is None:
                return f"{what} {spec.name!r} is missing"
            if other.dtype != spec.dtype or not _same_shape(spec.shape, other.shape):
                return (
                    f"{what} {spec.name!r} is {other.dtype} {_shape_text(other.shape)}, "
                    f"expected {spec.dtype} {_shape_text(spec.shape)}"
                )
        if new:
            return f"{what} {next(iter(new))!r} is new"
    return None


class Registry:
    """Models, versions and aliases (rows in ``db``, files under ``home/artifacts``).

    Args:
        db: the metadata store.
        home: the service's state directory.
    """

    def __init__(self, db: Database, home: Path) -> None:
        self.db = db
        self.home = home
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def root(self) -> Path:
        return self.home / "artifacts"

    # -- reading -------------------------------------------------------------------------

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

    def _version_info(self, name: str, row: sqlite3.Row) -> VersionInfo:
        aliases = self.db.query(
            "SELECT alias FROM aliases WHERE model_id = ? AND version = ? ORDER BY alias",
            (row["model_id"], row["version"]),
        )
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
            artifacts={
                k: ArtifactInfo.model_validate(v) for k, v in loads(row["artifacts"]).items()
            },
            aliases=[a["alias"] for a in aliases],
        )

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of a model, oldest first."""
        model = self._model_row(name)
        rows = self.db.query(
            "SELECT * FROM versions WHERE model_id = ? ORDER BY version", (model["id"],)
        )
        return [self._version_info(name, r) for r in rows]

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
        return self.root / str(model["id"]) / str(info.version) / ARTIFACT_FILES[fmt]

    def resolve(self, name: str, ref: str | None) -> tuple[int, Path]:
        """``(version, ONNX path)`` for ``ref`` (a number, an alias, or ``None``).

        Raises:
            NotFound: unknown model, version or alias.
        """
        version = self.resolve_version(name, ref)
        return version, self.artifact(name, version, "onnx")

    def alias(self, name: str, alias: str) -> AliasInfo:
        """Raises: NotFound."""
        model = self._model_row(name)
        check_name(alias, "alias")
        row = self.db.query_one(
            "SELECT * FROM aliases WHERE model_id = ? AND alias = ?", (model["id"], alias)
        )
        if row is None:
            raise NotFound(f"model {name!r} has no alias {alias!r}")
        return AliasInfo(
            model=name, alias=alias, version=row["version"], updated_at=row["updated_at"]
        )

    def aliases(self, name: str) -> list[AliasInfo]:
        model = self._model_row(name)
        rows = self.db.query(
            "SELECT * FROM aliases WHERE model_id = ? ORDER BY alias", (model["id"],)
        )
        return [
            AliasInfo(
                model=name, alias=r["alias"], version=r["version"], updated_at=r["updated_at"]
            )
            for r in rows
        ]

    # -- writing -------------------------------------------------------------------------

    def _lock(self, model_id: str) -> asyncio.Lock:
        return self._locks.setdefault(model_id, asyncio.Lock())

    async def register(
        self,
        runtime: Runtime,
        *,
        name: str,
        upload: Upload,
        metadata: dict[str, Any],
        max_bytes: int,
    ) -> ModelInfo:
        """Create a model with version 1 from an uploaded ``.onnx`` or ``.pt2`` and serve it.

        ``.onnx``: loaded, checked and searched for BN nodes. ``.pt2``: loaded with
        ``torch.export.load`` only, exported to ONNX with the parity check (example
        inputs: a batch of 2 shaped from the program's input placeholders), its statistics
        saved as a stat bank. Then ``production`` -> 1 (loaded by the runtime first): if
        loading fails, the model is removed again and the error raised.

        Raises:
            InvalidInput: bad name, file type or file; Conflict: the name is taken;
            PayloadTooLarge: upload above ``max_bytes``; RecalibError: export failures.
        """
        check_name(name, "model name")
        suffix = upload_suffix(upload.filename, _MODEL_SUFFIXES, "model")
        if self.db.query_one("SELECT 1 FROM models WHERE name = ?", (name,)) is not None:
            raise Conflict(f"model {name!r} exists already (register under a new name)")
        staging = self.home / "tmp" / f"model-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            report = await asyncio.to_thread(_prepare_upload, upload, staging, suffix, max_bytes)
            model_id = uuid.uuid4().hex
            self._insert_model(model_id, name, suffix[1:], metadata)
            try:
                self._commit_version(
                    model_id, staging, version=1, report=report, signature=report["signature"]
                )
            except BaseException:
                self._remove_model(model_id)
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            await self.set_alias(runtime, name, PRODUCTION, 1)
        except BaseException:
            self._remove_model(model_id)
            raise
        log.info("model %s registered from %s (version 1 in production)", name, suffix)
        return self.model(name)

    def _insert_model(self, model_id: str, name: str, fmt: str, metadata: dict[str, Any]) -> None:
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

        Raises:
            Conflict: ``version`` is not above the model's highest version.
        """
        artifacts = {k: v.model_dump() for k, v in _hash_artifacts(staging).items()}
        if "onnx" not in artifacts:
            raise InvalidInput("expected a model.onnx in the new version (got none)")
        (self.root / model_id).mkdir(parents=True, exist_ok=True)
        with self.db.transaction() as conn:
            latest = conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM versions WHERE model_id = ?", (model_id,)
            ).fetchone()[0]
            version = _new_version_number(int(latest), version)
            final = self.root / model_id / str(version)
            staging.rename(final)
            try:
                conn.execute(
                    "INSERT INTO versions (model_id, version, created_at, parent_version, "
                    "dataset_id, job_id, recalibration, report, validation, signature, "
                    "artifacts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    ),
                )
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
        return version

    def add_version(
        self,
        name: str,
        staging: Path,
        *,
        parent_version: int,
        dataset: str,
        job: str,
        recalibration: dict[str, Any],
        validation: dict[str, Any] | None,
    ) -> VersionInfo:
        """Add the next version of ``name`` from a job's output directory ``staging``.

        ``staging`` holds ``model.onnx`` and ``report.json`` (the recalibration report,
        :meth:`recalib.report.RecalibrationReport.to_dict`), optionally ``model.pt2`` and
        ``stats.safetensors``; it is moved (renamed) into the registry.
        """
        import onnx

        model = self._model_row(name)
        report = json.loads((staging / ARTIFACT_FILES["report"]).read_text())
        proto = onnx.load(str(staging / ARTIFACT_FILES["onnx"]), load_external_data=False)
        version = self._commit_version(
            model["id"],
            staging,
            version=None,
            report=report.get("recalibration", report),
            signature=onnx_signature(proto).model_dump(),
            parent_version=parent_version,
            dataset=dataset,
            job=job,
            recalibration=recalibration,
            validation=validation,
        )
        log.info("model %s: version %d added by job %s", name, version, job)
        return self.version(name, version)

    def _latest(self, model_id: str) -> sqlite3.Row | None:
        """The row of a model's highest version (``None`` if it has none)."""
        return self.db.query_one(
            "SELECT * FROM versions WHERE model_id = ? ORDER BY version DESC LIMIT 1", (model_id,)
        )

    async def push_version(
        self,
        runtime: Runtime,
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

        The file is checked as in :meth:`register` (``.onnx``; ``.pt2`` too when the model
        was registered from one, exported to ONNX with its stat bank). Its signature must
        equal the model's highest version's: the same input and output names, dtypes and
        shapes (a dynamic axis matches any dynamic axis, whatever its name). ``version``
        (default: the next number) must be above every existing version. ``parent`` (a
        number or an alias of this model) is recorded as ``parent_version``; ``metadata``
        goes into the version's report. All of this is all-or-nothing: the files are
        staged and the row committed under the model's lock, or nothing is left.

        ``alias`` is then pointed at the new version with :meth:`set_alias` (for
        ``production``: loaded and warmed first). If that fails, the version stays (it is
        immutable and its number is taken), the alias is unchanged, and the error is raised
        with a message saying so.

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
        suffix = upload_suffix(upload.filename, _MODEL_SUFFIXES, "model")
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
        _new_version_number(0 if latest is None else int(latest["version"]), version)
        staging = self.home / "tmp" / f"version-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            report = await asyncio.to_thread(
                _prepare_upload,
                upload,
                staging,
                suffix,
                max_bytes,
                kind="upload",
                metadata=metadata,
            )
            async with self._lock(model["id"]):
                if self._model_row(name)["id"] != model["id"]:  # deleted and registered anew
                    raise NotFound(f"model {name!r} was deleted while the version was checked")
                latest = self._latest(model["id"])
                signature = Signature.model_validate(report["signature"])
                if latest is not None:
                    expected = Signature.model_validate(loads(latest["signature"]))
                    difference = _signature_difference(expected, signature)
                    if difference is not None:
                        raise Incompatible(
                            f"expected the signature of version {latest['version']} of model "
                            f"{name!r} (got one whose {difference}): all versions of a model "
                            "take the same inputs and give the same outputs; register a new "
                            "model for another signature"
                        )
                number = self._commit_version(
                    model["id"],
                    staging,
                    version=version,
                    report=report,
                    signature=report["signature"],
                    parent_version=parent_version,
                )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("model %s: version %d pushed from %s", name, number, suffix)
        if alias is not None:
            await self._move_alias_to_pushed(runtime, name, alias, number)
        return self.version(name, number)

    async def _move_alias_to_pushed(
        self, runtime: Runtime, name: str, alias: str, version: int
    ) -> None:
        """:meth:`set_alias` for a just-pushed version; a failure says the version stays."""
        from recalib.errors import RecalibError

        try:
            await self.set_alias(runtime, name, alias, version)
            return
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
            if isinstance(exc, ServiceError):
                raise type(exc)(message) from exc
            if isinstance(exc, RecalibError):
                raise InvalidInput(message) from exc
            raise ServiceError(message) from exc

    async def set_alias(self, runtime: Runtime, name: str, alias: str, version: int) -> AliasInfo:
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
                await runtime.serve(name, version, path)
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

    async def delete(self, runtime: Runtime, name: str) -> None:
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
            await runtime.unload_model(name)
            self._remove_model(model["id"])
        self._locks.pop(model["id"], None)
        log.info("model %s deleted", name)

    def _remove_model(self, model_id: str) -> None:
        self.db.execute("DELETE FROM models WHERE id = ?", (model_id,))
        folder = self.root / model_id
        if folder.exists():
            trash = self.home / "tmp" / f"trash-{uuid.uuid4().hex}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    async def serve_all(self, runtime: Runtime) -> None:
        """Have the runtime serve every model's production version (at startup).

        A model that fails to load is logged and skipped: one bad file must not keep the
        others from serving.
        """
        for model in self.models():
            try:
                version, path = self.resolve(model.name, None)
                await runtime.serve(model.name, version, path)
            # Startup must survive any failure of one model (ORT raises its own types).
            except Exception:
                log.exception("model %s: could not load its production version", model.name)

    def sweep(self) -> None:
        """Remove what an interrupted process left: staging dirs and uncommitted versions."""
        self._locks.clear()  # asyncio locks belong to the previous event loop
        shutil.rmtree(self.home / "tmp", ignore_errors=True)
        if not self.root.is_dir():
            return
        known = {
            (r["model_id"], str(r["version"])) for r in self.db.query("SELECT * FROM versions")
        }
        for model_dir in self.root.iterdir():
            for version_dir in model_dir.iterdir():
                if (model_dir.name, version_dir.name) not in known:
                    log.warning("removing uncommitted version directory %s", version_dir)
                    shutil.rmtree(version_dir, ignore_errors=True)
            if not any(model_dir.iterdir()):
                model_dir.rmdir()
