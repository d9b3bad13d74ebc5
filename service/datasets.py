"""Uploaded data sets: streamed to disk with a size limit, hashed, described, stored.

A data set is one ``.npz``, ``.npy`` or ``.safetensors`` file (the formats of
:mod:`recalib.datafiles`; nothing is unpickled). An upload is copied in 1 MiB chunks into a
staging directory under ``home/tmp`` while its size is counted (413 above the limit) and
its sha256 computed (:mod:`service.uploads`); the file is then described from its headers
only (array names, shapes and dtypes: nothing is loaded whole; each ``.npy`` must be
exactly as long as its header says, ``.npz`` members are CRC-checked by streaming,
safetensors checks its offsets) and moved into ``home/datasets/<id>/`` with one rename, so
a half-written data set is never visible. The data set's *input* is the array
:func:`recalib.datafiles.pick_input` would pick (``x``, or the only array, ...): it must be
floating point with a batch axis, and its length is the sample count.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import sqlite3
import uuid
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydantic import BaseModel

from recalib.datafiles import SUFFIXES, pick_input
from recalib.errors import DataError

from .db import Database, dumps, loads, utcnow
from .errors import Conflict, InvalidInput, NotFound, PayloadTooLarge
from .names import check_name
from .uploads import Upload, copy_upload, staging, upload_suffix

__all__ = [
    "DatasetInfo",
    "DatasetList",
    "DatasetStore",
    "TensorInfo",
    "check_uncompressed_size",
    "describe_arrays",
    "input_array_name",
]

log = logging.getLogger(__name__)

# safetensors dtype codes -> NumPy dtype names.
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_FLOATS = ("float64", "float32", "float16", "bfloat16")


class TensorInfo(BaseModel):
    """One array of a data file."""

    shape: list[int]
    dtype: str


class DatasetInfo(BaseModel):
    """A stored data set."""

    id: str
    filename: str
    format: str
    bytes: int
    sha256: str
    tensors: dict[str, TensorInfo]
    input: str
    """The array used as model input (see the module docstring)."""
    samples: int
    """Length of the input array along its batch axis."""
    created_at: str


class DatasetList(BaseModel):
    datasets: list[DatasetInfo]


def _npy_header(f: BinaryIO, where: str, size: int) -> TensorInfo:
    """Read the header of a ``.npy`` of ``size`` bytes at ``f``; check the size fits it.

    Raises:
        DataError: not a ``.npy``, an object (pickled) dtype, a negative dimension, or a
            size other than header + ``prod(shape) * itemsize`` (truncated or padded).
    """
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise DataError(f"expected .npy format version 1.0 or 2.0 in {where} (got {version})")
    if dtype.hasobject:
        raise DataError(f"expected a numeric array in {where} (got dtype {dtype}: pickled)")
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise DataError(f"expected non-negative dimensions in {where} (got shape {tuple(dims)})")
    # The header does not bind the data: a truncated upload parses as well as a whole one.
    expected = f.tell() + math.prod(dims) * dtype.itemsize
    if size != expected:
        raise DataError(
            f"expected {expected} bytes in {where} (header + {tuple(dims)} {dtype} data) "
            f"(got {size} bytes: truncated or inconsistent)"
        )
    return TensorInfo(shape=dims, dtype=str(dtype))


def _describe_npy(path: Path) -> dict[str, TensorInfo]:
    with path.open("rb") as f:
        return {"x": _npy_header(f, "the .npy", path.stat().st_size)}


def _describe_npz(path: Path) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    with zipfile.ZipFile(path) as zf:
        for member in zf.infolist():
            if not member.filename.endswith(".npy"):
                raise DataError(f"expected only .npy members in the .npz (got {member.filename!r})")
            with zf.open(member) as f:
                header = _npy_header(f, member.filename, member.file_size)  # type: ignore[arg-type]
                out[member.filename[: -len(".npy")]] = header
        bad = zf.testzip()
        if bad is not None:
            raise DataError(f"the .npz member {bad!r} is corrupt (CRC mismatch)")
    return out


def _describe_safetensors(path: Path) -> dict[str, TensorInfo]:
    from safetensors import safe_open

    out: dict[str, TensorInfo] = {}
    with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            part = f.get_slice(name)
            code = part.get_dtype()
            out[name] = TensorInfo(
                shape=[int(d) for d in part.get_shape()],
                dtype=_SAFETENSORS_DTYPES.get(code, code.lower()),
            )
    return out


def check_uncompressed_size(path: Path, size: int, limit: int) -> None:
    """Refuse a data file whose arrays take more than ``limit`` bytes once decompressed.

    For an ``.npz`` the sizes come from the archive's directory, before anything is
    decompressed (:func:`describe_arrays` then checks each member's ``.npy`` header
    against its size); other formats are stored uncompressed (their ``size``). An archive
    that cannot be read is left to :func:`describe_arrays` to report.

    Raises:
        PayloadTooLarge: more than ``limit`` bytes.
    """
    total = size
    if path.suffix.lower() == ".npz":
        try:
            with zipfile.ZipFile(path) as zf:
                total = sum(member.file_size for member in zf.infolist())
        except (zipfile.BadZipFile, OSError, ValueError):
            return
    if total > limit:
        raise PayloadTooLarge(
            f"expected a data set of at most {limit} bytes once decompressed "
            f"(got {total} bytes of arrays in a {size}-byte upload)"
        )


def describe_arrays(path: Path) -> dict[str, TensorInfo]:
    """The arrays of a data file from its headers (nothing is loaded whole).

    Raises:
        DataError: the file is not a readable ``.npz`` / ``.npy`` / ``.safetensors``.
    """
    suffix = path.suffix.lower()
    readers = {".npy": _describe_npy, ".npz": _describe_npz, ".safetensors": _describe_safetensors}
    if suffix not in readers:
        raise DataError(f"expected a data file ending in {', '.join(SUFFIXES)} (got {path.name!r})")
    try:
        return readers[suffix](path)
    except DataError:
        raise
    # Untrusted bytes through three parsers (NumPy, zipfile, safetensors' own SafetensorError):
    # any failure means "not a readable file of that format".
    except Exception as exc:
        raise DataError(f"could not read the upload as {suffix} data: {exc}") from exc


def input_array_name(tensors: dict[str, TensorInfo], key: str | None = None) -> str:
    """The name of the model-input array, by :func:`recalib.datafiles.pick_input`'s rule.

    Raises:
        DataError: no such array, or it is not floating point with a batch axis.
    """
    placeholders = {name: np.empty(0) for name in tensors}
    picked = pick_input(placeholders, key)
    name = next(n for n, a in placeholders.items() if a is picked)
    info = tensors[name]
    if len(info.shape) < 2 or info.shape[0] < 1:
        raise DataError(
            f"expected the input array {name!r} of shape (N, ...) with N >= 1 and at least "
            f"2 dimensions (got shape {tuple(info.shape)})"
        )
    if info.dtype not in _FLOATS:
        raise DataError(f"expected a floating-point input array {name!r} (got {info.dtype})")
    return name


class DatasetStore:
    """Data sets: rows in the ``datasets`` table, files under ``home/datasets/<id>/``.

    Args:
        db: the metadata store.
        home: the service's state directory.
    """

    def __init__(self, db: Database, home: Path) -> None:
        self._db = db
        self._home = home

    @property
    def root(self) -> Path:
        return self._home / "datasets"

    async def create(
        self, upload: Upload, *, max_bytes: int, max_uncompressed_bytes: int | None = None
    ) -> DatasetInfo:
        """Store an uploaded data file (see the module docstring).

        Raises:
            InvalidInput: not a supported data file, or no usable input array.
            PayloadTooLarge: more than ``max_bytes``, or arrays of more than
                ``max_uncompressed_bytes`` once decompressed.
        """
        suffix = upload_suffix(upload.filename, SUFFIXES, "data")
        with staging(self._home, "dataset") as files:
            return await asyncio.to_thread(
                self._store, upload, files, suffix, max_bytes, max_uncompressed_bytes
            )

    def _store(
        self,
        upload: Upload,
        files: Path,
        suffix: str,
        max_bytes: int,
        max_uncompressed_bytes: int | None = None,
    ) -> DatasetInfo:
        data = files / f"data{suffix}"
        size, sha = copy_upload(upload.file, data, max_bytes=max_bytes)
        if max_uncompressed_bytes is not None:
            check_uncompressed_size(data, size, max_uncompressed_bytes)
        try:
            tensors = describe_arrays(data)
            name = input_array_name(tensors)
        except DataError as exc:
            raise InvalidInput(f"{upload.filename}: {exc}") from exc
        info = DatasetInfo(
            id=f"ds-{uuid.uuid4().hex[:20]}",
            filename=Path(upload.filename or f"data{suffix}").name[:200],
            format=suffix[1:],
            bytes=size,
            sha256=sha,
            tensors=tensors,
            input=name,
            samples=tensors[name].shape[0],
            created_at=utcnow(),
        )
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / info.id
        files.rename(final)
        try:
            self._insert(info)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        log.info("dataset %s stored (%d bytes, %d samples)", info.id, size, info.samples)
        return info

    def _insert(self, info: DatasetInfo) -> None:
        self._db.execute(
            "INSERT INTO datasets (id, filename, format, bytes, sha256, tensors, samples, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                info.id,
                info.filename,
                info.format,
                info.bytes,
                info.sha256,
                dumps({k: [v.shape, v.dtype] for k, v in info.tensors.items()}),
                info.samples,
                info.created_at,
            ),
        )

    @staticmethod
    def _info(row: sqlite3.Row) -> DatasetInfo:
        tensors = {
            k: TensorInfo(shape=shape, dtype=dtype)
            for k, (shape, dtype) in loads(row["tensors"]).items()
        }
        return DatasetInfo(
            id=row["id"],
            filename=row["filename"],
            format=row["format"],
            bytes=row["bytes"],
            sha256=row["sha256"],
            tensors=tensors,
            input=input_array_name(tensors),
            samples=row["samples"],
            created_at=row["created_at"],
        )

    def get(self, dataset_id: str) -> DatasetInfo:
        """Raises: NotFound (InvalidInput for a malformed id)."""
        check_name(dataset_id, "dataset id")
        row = self._db.query_one("SELECT * FROM datasets WHERE id = ?", (dataset_id,))
        if row is None:
            raise NotFound(f"dataset {dataset_id!r} not found")
        return self._info(row)

    def datasets(self) -> list[DatasetInfo]:
        """Every data set, oldest first."""
        return [self._info(r) for r in self._db.query("SELECT * FROM datasets ORDER BY created_at")]

    def path(self, dataset_id: str) -> Path:
        """The stored file of a data set."""
        info = self.get(dataset_id)
        return self.root / info.id / f"data.{info.format}"

    def delete(self, dataset_id: str) -> None:
        """Remove a data set (refused while a queued or running job uses it).

        Raises:
            NotFound: no such data set.
            Conflict: a job that has not finished uses it.
        """
        info = self.get(dataset_id)
        with self._db.transaction() as conn:
            busy = conn.execute(
                "SELECT id FROM jobs WHERE state IN ('queued', 'running') AND "
                "(dataset_id = ? OR validation_dataset_id = ?)",
                (info.id, info.id),
            ).fetchone()
            if busy is not None:
                raise Conflict(
                    f"dataset {info.id!r} is used by job {busy['id']!r}; cancel it first"
                )
            conn.execute("DELETE FROM datasets WHERE id = ?", (info.id,))
        trash = self._home / "tmp" / f"trash-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        (self.root / info.id).rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
