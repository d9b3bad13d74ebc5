"""Upload plumbing shared by model registration and data sets.

An uploaded file is never trusted by name: :func:`upload_suffix` only reads its suffix
(one of a fixed list), and :func:`copy_upload` streams it in :data:`CHUNK`-byte pieces to
a server-chosen path while counting, so an upload above the limit stops at the limit
(:class:`~service.errors.PayloadTooLarge`) instead of filling the disk. Files are written
in a :func:`staging` directory under ``home/tmp`` that is removed whatever happens; what
is kept is moved out of it with one ``rename``.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

from .errors import InvalidInput, PayloadTooLarge

__all__ = ["CHUNK", "Upload", "copy_upload", "staging", "upload_suffix"]

CHUNK = 1 << 20
"""Bytes read from an upload at a time."""


class Upload(Protocol):
    """What an upload handler needs from an uploaded file (FastAPI's ``UploadFile`` fits)."""

    filename: str | None
    file: BinaryIO


def copy_upload(source: BinaryIO, dest: Path, *, max_bytes: int) -> tuple[int, str]:
    """Copy ``source`` to ``dest`` in chunks, counting.

    Returns:
        ``(bytes, sha256 hex)`` of what was copied.

    Raises:
        PayloadTooLarge: more than ``max_bytes`` arrived (``dest`` is removed).
    """
    digest = hashlib.sha256()
    size = 0
    with dest.open("wb") as out:
        while chunk := source.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                out.close()
                dest.unlink(missing_ok=True)
                raise PayloadTooLarge(f"expected an upload of at most {max_bytes} bytes (got more)")
            digest.update(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


def upload_suffix(filename: str | None, allowed: tuple[str, ...], what: str) -> str:
    """The lower-cased suffix of an uploaded file's name, one of ``allowed``.

    The name itself is never used as a path.

    Args:
        filename: the name the client gave.
        allowed: the accepted suffixes, with their dot (``".onnx"``).
        what: what the file is, for the message (``"model"``).

    Returns:
        The suffix, lower-cased.

    Raises:
        InvalidInput: another suffix.
    """
    suffix = Path(filename or "").suffix.lower()
    if suffix not in allowed:
        raise InvalidInput(
            f"expected a {what} file ending in {', '.join(allowed)} (got {filename!r})"
        )
    return suffix


@contextmanager
def staging(home: Path, prefix: str) -> Iterator[Path]:
    """A new, empty directory ``home/tmp/<prefix>-<random>``, removed on exit.

    Whatever should outlive it is renamed out of it before the block ends.
    """
    path = home / "tmp" / f"{prefix}-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
